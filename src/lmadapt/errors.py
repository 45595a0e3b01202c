"""User-facing errors: each names where the problem is, and the CLI maps them to exit code 2."""

from __future__ import annotations


class LmadaptError(Exception):
    """An error caused by the user's input (config, data, paths), not by a bug."""

    exit_code = 2


class ConfigError(LmadaptError):
    def __init__(self, field: str, message: str, source: str | None = None):
        self.field, self.source, self.message = field, source, message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}field '{field}': {message}")


class DataError(LmadaptError):
    def __init__(self, file: str, message: str, line: int | None = None, field: str | None = None):
        self.file, self.line, self.field = file, line, field
        parts = [f"file {file}"]
        if line is not None:
            parts.append(f"line {line}")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(f"{', '.join(parts)}: {message}")
