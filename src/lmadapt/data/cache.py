"""Tokenized examples kept on disk, read by position, built once per input and reused.

A store is a directory: per feature field a flat array of every example's values
(`<field>.values`, raw little-endian) and, for per-token fields, where each example's values
start (`<field>.offsets`, int64, n + 1 entries); `lengths` (int32, the input_ids length of
each example); and `manifest.json` (sizes, checksums, and what the build learned: the task's
fitted state, the rows it skipped). `FeatureStore` reads it back as a Sequence of the feature
dicts `Task.encode` returns, so the collators and the training loop see no difference.

Why flat numpy files rather than Arrow through `datasets`: features are a handful of int
columns, read one example at a time by index. An example is two `os.pread`s per field and one
`tolist()` (no Arrow -> Python row conversion), a store needs no schema, and the writer appends
chunks as they are encoded, so the build holds one chunk at a time. Arrow is still read as an
input format (Parquet, save_to_disk).

Stores live in `cache_root()/features/<key>`; the key hashes the input file's bytes, the
tokenizer, the task's settings and whatever else changes the encoding (`cache_key`). A store is
written into a temporary directory and renamed into place: two processes building the same key
at once both finish, one rename wins and the other store is dropped. A store whose files do not
match its manifest (sizes, blake2b checksums) is rebuilt, never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmadapt.errors import LmadaptError

FORMAT = 3
"""The store layout's (and readers') version; part of every key, so a new layout or a reader that
reads a file differently never reuses an old store. 2: TSV read without quoting; 3: the manifest
carries its own checksum."""

_CHUNK = 1 << 20
"""Bytes hashed at a time."""


def cache_root() -> Path:
    """`LMADAPT_CACHE`, else `$XDG_CACHE_HOME/lmadapt` (default ~/.cache/lmadapt)."""
    env = os.environ.get("LMADAPT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmadapt"


def file_digest(path: str | Path) -> str:
    """blake2b of a file's bytes, read a chunk at a time; of a directory (a datasets
    save_to_disk one), of every file's relative name and bytes in name order."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=20)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path)).encode() if f != path else b"")
        with open(f, "rb") as stream:
            while block := stream.read(_CHUNK):
                h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """What the tokenizer maps text to: a fast tokenizer's full serialisation (vocabulary,
    normaliser, pre-tokeniser, post-processor), else its class and vocabulary; its special
    tokens and chat template either way."""
    h = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # only fast tokenizers have one
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str(getattr(tokenizer, "padding_side", None)).encode())
    return h.hexdigest()


def cache_key(*parts: Any) -> str:
    """One key from JSON-serialisable parts (digests, settings) and the store's format."""
    text = json.dumps([FORMAT, *parts], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


class FeatureStore(Sequence):
    """A store's features as a read-only Sequence of dicts.

    `store[i]` is what `Task.encode` gave for example i (lists of ints or floats, and
    scalars); a slice gives a list of them. Fields are read with `os.pread`, not memory-mapped:
    a mapped page touched by random access stays in the process's RSS (and the kernel maps ~64 KB
    around each touch), which at 5M examples added ~200 MB by step 20; a read goes through the
    page cache, which RSS does not count. `lengths` stays memory-mapped: batching by length reads
    all of it once, sequentially, and touches no feature."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path, self.manifest = path, manifest
        self.n = manifest["features"]
        self.fields = {
            name: (np.dtype(spec["dtype"]), spec["ragged"])
            for name, spec in manifest["fields"].items()
        }
        self.lengths = _map(path / "lengths", "int32", self.n)
        self._fds: dict[str, int] = {}  # file -> descriptor; pread has no shared file position
        # closed by a finalizer, not __del__: at interpreter exit __del__ may run after `os` is
        # torn down ("Exception ignored in FeatureStore.__del__"); finalizers run before that.
        weakref.finalize(self, _close_all, self._fds)

    def __getstate__(self) -> dict[str, Any]:  # descriptors are per process: reopened on use
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        FeatureStore.__init__(self, state["path"], state["manifest"])

    def _read(self, file: str, dtype: np.dtype, start: int, count: int) -> np.ndarray:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.path / file, os.O_RDONLY)
        size = dtype.itemsize
        data = os.pread(fd, count * size, start * size)
        if len(data) != count * size:
            raise LmadaptError(f"cached features {self.path / file} are shorter than the manifest")
        return np.frombuffer(data, dtype)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        out = {}
        for name, (dtype, ragged) in self.fields.items():
            if ragged:
                a, b = self._read(f"{name}.offsets", _OFFSET, i, 2).tolist()
                out[name] = self._read(f"{name}.values", dtype, a, b - a).tolist()
            else:
                out[name] = self._read(f"{name}.values", dtype, i, 1)[0].item()
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(self.n))


_OFFSET = np.dtype("<i8")


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _map(path: Path, dtype: str, count: int) -> np.ndarray:
    if count == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class _Writer:
    """Appends chunks of feature dicts to a store directory's field files."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.fields: dict[str, dict[str, Any]] = {}
        self.files: dict[str, Any] = {}
        self.n = 0

    def _open(self, name: str) -> Any:
        if name not in self.files:
            self.files[name] = open(self.dir / name, "wb")  # noqa: SIM115 (closed in `close`)
        return self.files[name]

    def append(self, feats: list[dict[str, Any]]) -> None:
        if not feats:
            return
        if not self.fields:  # the first example decides the fields and their shape
            for name, value in feats[0].items():
                ragged = isinstance(value, list)
                self.fields[name] = {"ragged": ragged, "dtype": None, "count": 0, "end": 0}
        lengths = np.fromiter((len(f["input_ids"]) for f in feats), np.int32, len(feats))
        lengths.tofile(self._open("lengths"))
        for name, spec in self.fields.items():
            if spec["ragged"]:
                rows = [f[name] for f in feats]
                sizes = np.fromiter((len(r) for r in rows), np.int64, len(rows))
                starts = spec["end"] + np.concatenate([[0], np.cumsum(sizes)])
                # n + 1 offsets in all: each chunk writes its starts, the last chunk its end too
                starts[:-1].tofile(self._open(f"{name}.offsets"))
                spec["end"] = int(starts[-1])
                values = np.asarray([v for r in rows for v in r])
            else:
                values = np.asarray([f[name] for f in feats])
            if values.ndim != 1:
                raise LmadaptError(f"feature {name!r} is neither a flat list nor a scalar")
            values = values.astype(_dtype(name, values, spec["dtype"]), copy=False)
            spec["dtype"] = values.dtype.str
            values.tofile(self._open(f"{name}.values"))
            spec["count"] += len(values)
        self.n += len(feats)

    def close(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Fields and files (size, checksum) for the manifest."""
        for name, spec in self.fields.items():
            if spec["ragged"]:
                np.array([spec["end"]], np.int64).tofile(self._open(f"{name}.offsets"))
        for f in self.files.values():
            f.close()
        fields = {
            n: {"ragged": s["ragged"], "dtype": s["dtype"] or "<i4", "count": s["count"]}
            for n, s in self.fields.items()
        }
        files = {p.name: _file_entry(p) for p in sorted(self.dir.iterdir())}
        return fields, files


def _dtype(name: str, values: np.ndarray, previous: str | None) -> str:
    """int32 for integers, float64 for floats; a field keeps its kind in every chunk."""
    if values.size == 0:
        return previous or "<i4"
    if values.dtype.kind in "iub":
        if values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max:
            raise LmadaptError(f"feature {name!r} holds integers beyond int32; cannot cache it")
        kind = "<i4"
    elif values.dtype.kind == "f":
        kind = "<f8"
    else:
        raise LmadaptError(f"feature {name!r} holds {values.dtype} values; cannot cache it")
    if previous is not None and previous != kind:
        raise LmadaptError(f"feature {name!r} changes type between examples; cannot cache it")
    return kind


def _file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "blake2b": file_digest(path)}


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """blake2b of the manifest's content without its own checksum: a manifest edited by hand
    (labels reordered, still valid JSON) would silently invert the labels of every run."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=20).hexdigest()


def _sound_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The store's manifest when the store at `path` can be read, else why not: a manifest that
    does not parse or does not match its own checksum, a file missing or of another size or
    checksum than the manifest records."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("checksum") != _manifest_digest(manifest):
            return None, "manifest.json does not match its checksum"
        for name, entry in files.items():
            f = path / name
            if not f.is_file():
                return None, f"{name} is missing"
            if f.stat().st_size != entry["size"]:
                return (
                    None,
                    f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']}",
                )
            if file_digest(f) != entry["blake2b"]:
                return None, f"{name} does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"unreadable manifest ({e})"
    return manifest, None


def load(key: str) -> FeatureStore | None:
    """The store for `key`, or None when there is none or it is damaged (which says so)."""
    path = cache_root() / "features" / key
    if not path.exists():
        return None
    manifest, why = _sound_manifest(path)
    if manifest is None:
        print(f"lmadapt: cached features {path} are damaged ({why}); rebuilding", file=sys.stderr)
        return None
    return FeatureStore(path, manifest)


def build(
    key: str,
    chunks: Iterable[list[dict[str, Any]]],
    info: Callable[[], dict[str, Any]],
) -> FeatureStore:
    """Write the features of `chunks` as the store for `key` and return it, memory-mapped.

    `info()`, asked once every chunk is written, is what the manifest keeps beside the
    features (the task's state, the skipped rows). Written into a temporary directory and
    renamed into place, so a reader never sees half a store; when another process has placed
    a sound store for the key meanwhile, that one is used and ours dropped."""
    root = cache_root() / "features"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
    except OSError as e:
        raise LmadaptError(
            f"cannot write the feature cache in {root} ({e.strerror or e}); set LMADAPT_CACHE "
            "to a writable directory"
        ) from None
    final = root / key
    try:
        t0 = time.perf_counter()
        writer = _Writer(tmp)
        for chunk in chunks:
            writer.append(chunk)
        fields, files = writer.close()
        manifest = {
            "format": FORMAT,
            "key": key,
            "features": writer.n,
            "fields": fields,
            "files": files,
            "build_seconds": round(time.perf_counter() - t0, 3),
            **info(),
        }
        manifest["checksum"] = _manifest_digest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        _place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store = load(key)
    if store is None:
        raise LmadaptError(f"cached features {final} were damaged as soon as they were written")
    return store


def _place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; a damaged `final` is moved aside first, a sound one (another
    process's, built from the same inputs) is kept."""
    if final.exists() and _sound_manifest(final)[0] is None:
        trash = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:  # another process placed its store first: keep that one
        if not final.exists():
            raise


def features_once(
    parts: list[Any],
    examples: Iterable[Any],
    encode: Callable[[list[Any]], list[dict[str, Any]]],
    num_proc: int = 1,
) -> FeatureStore:
    """The store keyed by `parts` (`cache_key`), built from `encode` of `examples` only when
    there is none: for callers that hold their examples already (continual learning)."""
    key = cache_key(*parts)
    store = load(key)
    if store is None:
        store = build(key, encoded(examples, encode, num_proc=num_proc), dict)
    return store


@contextlib.contextmanager
def scratch(chunks: Iterable[list[dict[str, Any]]]) -> Iterator[FeatureStore]:
    """A store of the caller's own, built from `chunks` and removed on leaving: for features no
    other run could reuse safely (a teacher's outputs, which no file digest describes), held on
    disk rather than in memory all the same."""
    store = build(f"scratch-{uuid.uuid4().hex}", chunks, dict)
    try:
        yield store
    finally:
        shutil.rmtree(store.path, ignore_errors=True)


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_ENCODE: Callable[[list[Any]], list[dict[str, Any]]] | None = None
"""The encoder forked worker processes run (set before the pool forks, so nothing is pickled
but the examples and their features)."""


def _encode_chunk(chunk: list[Any]) -> list[dict[str, Any]]:
    assert _ENCODE is not None
    return _ENCODE(chunk)


def encoded(
    examples: Iterable[Any],
    encode: Callable[[list[Any]], list[dict[str, Any]]],
    chunk: int = 4096,
    num_proc: int = 1,
) -> Iterator[list[dict[str, Any]]]:
    """`encode` of `examples` a chunk at a time, in order; with num_proc > 1 the chunks are
    encoded by that many forked processes, at most 2 * num_proc chunks in flight, so the file
    is never read ahead of what the writer has taken."""
    chunks = chunked(examples, chunk)
    if num_proc <= 1:
        yield from map(encode, chunks)
        return
    global _ENCODE
    _ENCODE = encode
    pending: deque[Any] = deque()
    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        for c in chunks:
            pending.append(pool.apply_async(_encode_chunk, (c,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    _ENCODE = None
