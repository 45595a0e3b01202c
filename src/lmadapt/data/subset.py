"""Write a subset of a data file in the file's own format, so that the same task config reads it.

Used to carve a dev set out of a training file (`lmadapt auto`): each kept example is named by
the lines it was read from (`tasks.base.DataProfile.source_lines`; a table's rows), and the subset
keeps its columns, header and format (Parquet stays Parquet, a `datasets` save_to_disk directory
stays one), rather than a re-encoding that could read back differently.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lmadapt.data.conll import is_conll
from lmadapt.data.readers import detect_format, read_records, read_text


def write_subset(src: str | Path, fmt: str, groups: list[list[int]], out: str | Path) -> Path:
    """Write the examples whose source lines are `groups` (one list per example, in the order
    to write them) from `src` to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_conll(src, fmt):  # one sentence a block of token lines, blocks split by blank lines
        lines = read_text(src).split("\n")
        blocks = ["\n".join(lines[i - 1] for i in group) for group in groups]
        out.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
        return out
    fmt = detect_format(src, fmt)
    if fmt in ("parquet", "dataset"):  # a table's "line" N is its N-th row
        return _write_table_subset(src, fmt, [g[0] - 1 for g in groups], out)
    if fmt in ("jsonl", "tsv"):  # one record a line (TSV has no quoting): lines copied as they are
        lines = read_text(src).split("\n")
        header = next(line + "\n" for line in lines if line.strip()) if fmt == "tsv" else ""
        out.write_text(header + "".join(lines[g[0] - 1] + "\n" for g in groups), encoding="utf-8")
        return out
    # csv rows may span lines (quoted newlines) and json is one document: go through records,
    # whose line numbers are the ones the examples were read with.
    by_line = {r.line: r.fields for r in read_records(src, fmt)}
    rows = [by_line[g[0]] for g in groups]
    if fmt == "json":
        out.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        return out
    with open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _write_table_subset(src: str | Path, fmt: str, rows: list[int], out: Path) -> Path:
    """The rows (0-based) of a Parquet file or a `datasets` directory, written as the same kind,
    column types and all."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(src).take(rows), out)
        return out
    import datasets

    datasets.load_from_disk(str(src)).select(rows).save_to_disk(str(out))
    return out
