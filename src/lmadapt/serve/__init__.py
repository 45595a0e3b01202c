"""HTTP serving of finished runs: `lmadapt serve RUN_DIR ...` (needs the `serve` extra)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmadapt.errors import LmadaptError


def serve(
    run_dirs: list[str | Path] | None,
    settings: Any = None,
    log_level: str = "info",
    runs_dir: str | Path | None = None,
) -> None:
    """Serve finished runs (or ONNX exports) over HTTP until stopped: `run_dirs`, loaded now,
    or every run under `runs_dir`, loaded when first asked for (see serve.catalog).
    `settings`: a ServeSettings; None = the defaults. Refusals (exposure without an API key, a
    missing GPU) come before any model loads. Without an API key, requests must name this
    server in their Host header (DNS rebinding): loopback, --host or an --allowed-host."""
    from lmadapt.serve.settings import ServeSettings
    from lmadapt.session import resolve_device

    settings = settings or ServeSettings()
    settings.check_exposure()
    resolve_device(settings.device)
    try:
        import uvicorn

        from lmadapt.serve.app import create_app
    except ImportError as e:
        raise LmadaptError(
            f"serve needs the serve extra ({e.name} is missing): pip install 'lmadapt[serve]'"
        ) from None
    # a page rebinding its own name to this address has no key to send: the key suffices
    hosts = None if settings.api_key else settings.host_names
    app = create_app(run_dirs, settings, hosts, runs_dir)
    names = f"the runs under {runs_dir}" if runs_dir else ", ".join(sorted(app.state.server.runs))
    auth = "API key required" if settings.api_key else "no API key"
    where = f"http://{settings.host}:{settings.port}"
    print(f"lmadapt: serving {names} on {where} ({auth})", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level)
