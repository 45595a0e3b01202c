"""The training features' cache: built once per input, memory-mapped, rebuilt when any input
changes or a file of it is damaged, safe to build from two places at once; the training file
streamed (Parquet and save_to_disk inputs too) with the readers' per-row errors."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pytest

from lmadapt.api import prepare
from lmadapt.config import build_run_config
from lmadapt.data import cache
from lmadapt.data.batching import length_grouped_batches
from lmadapt.data.streams import Reread
from lmadapt.errors import DataError, LmadaptError
from lmadapt.models import load_tokenizer, resolve_model
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from tests.conftest import sentiment_rows
from tests.data.test_bad_rows import csv_with_bad_rows


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The keys `cache.build` is asked to build, in order."""
    keys: list[str] = []
    real = cache.build

    def counting(key, chunks, info):
        keys.append(key)
        return real(key, chunks, info)

    monkeypatch.setattr(cache, "build", counting)
    return keys


def in_memory(config) -> list[dict]:
    """What the task encodes of the training file without any cache."""
    task = build_task(config.task)
    rows = task.read(config.data.train, config.data.format)
    task.fit(rows)
    return task.encode(rows, load_tokenizer(resolve_model(config.model)))


def test_second_prepare_reads_the_cache(run_config, builds):
    config = build_run_config(run_config())
    first = prepare(config)
    assert isinstance(first.features["train"], cache.FeatureStore)
    assert list(first.features["train"]) == in_memory(config)
    second = prepare(build_run_config(run_config()))
    assert len(builds) == 1  # the second run built nothing
    assert list(second.features["train"]) == list(first.features["train"])
    assert second.task.labels == first.task.labels == ["neg", "pos"]
    # the training examples are not held: they are read again when asked for
    assert isinstance(second.train, Reread) and len(second.train) == 64
    assert [ex.text for ex in second.train] == [ex.text for ex in first.train]


def test_one_changed_byte_rebuilds(run_config, sentiment_files, builds):
    prepare(build_run_config(run_config()))
    path = sentiment_files["train"]
    raw = bytearray(path.read_bytes())
    at = raw.index(b"was good")
    raw[at : at + 8] = b"was fine"  # one word, same length: a different sentence
    path.write_bytes(bytes(raw))
    config = build_run_config(run_config())
    data = prepare(config)
    assert len(builds) == 2 and builds[0] != builds[1]
    assert list(data.features["train"]) == in_memory(config)


def test_changed_settings_rebuild(run_config, builds):
    prepare(build_run_config(run_config()))
    config = build_run_config(run_config(task={"type": "classification", "max_length": 8}))
    data = prepare(config)
    assert len(builds) == 2 and builds[0] != builds[1]
    assert list(data.features["train"]) == in_memory(config)
    prepare(build_run_config(run_config(data={"max_train_samples": 10})))
    assert len(builds) == 3


@pytest.mark.parametrize(
    "damage", ["flipped byte", "truncated", "manifest", "labels reordered", "missing"]
)
def test_a_damaged_cache_is_rebuilt_not_read(run_config, builds, feature_cache, damage, capsys):
    config = build_run_config(run_config())
    expected = list(prepare(config).features["train"])
    store = feature_cache / "features" / builds[0]
    values = store / "input_ids.values"
    if damage == "flipped byte":
        raw = bytearray(values.read_bytes())
        raw[5] ^= 0xFF
        values.write_bytes(bytes(raw))
    elif damage == "truncated":
        values.write_bytes(values.read_bytes()[:-4])
    elif damage == "manifest":
        (store / "manifest.json").write_text("{not json", encoding="utf-8")
    elif damage == "labels reordered":  # still valid JSON: read, it would invert every label
        manifest = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
        labels = manifest["task_state"]["labels"]
        manifest["task_state"]["labels"] = labels[::-1]
        (store / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    else:
        (store / "lengths").unlink()
    data = prepare(build_run_config(run_config()))
    assert builds == [builds[0]] * 2  # the same key, built again
    assert "damaged" in capsys.readouterr().err
    assert list(data.features["train"]) == expected
    assert cache._sound_manifest(store)[1] is None


def test_two_builders_of_one_key_both_finish_and_one_store_stays(feature_cache):
    """Both builds reach their rename together; the loser keeps the winner's store."""
    feats = [{"input_ids": [1, 2, i], "labels": i % 2} for i in range(10)]
    both_written = threading.Barrier(2)
    stores: list[cache.FeatureStore] = []

    def chunks():
        yield feats
        both_written.wait(timeout=30)  # both temp dirs are written before either renames

    def build():
        stores.append(cache.build("k", chunks(), lambda: {"examples": len(feats)}))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stores) == 2 and all(list(s) == feats for s in stores)
    assert [p.name for p in (feature_cache / "features").iterdir()] == ["k"]  # no temp left


def test_store_reads_fields_by_position_without_mapping_them(feature_cache):
    """Ragged ints, floats and scalars come back as written, by index, negative index, slice
    and after pickling (a spawned worker's copy); no feature file is memory-mapped, so pages
    read by random access never count in the process's RSS (#23)."""
    feats = [
        {"input_ids": list(range(i + 1)), "weights": [0.5 * i] * 2, "labels": i} for i in range(7)
    ]
    store = cache.build("k", iter([feats[:3], feats[3:]]), lambda: {})
    assert list(store) == feats and store[-1] == feats[6] and store[2:4] == feats[2:4]
    assert store.lengths.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert list(pickle.loads(pickle.dumps(store))) == feats
    maps = Path("/proc/self/maps")
    if maps.exists():
        mapped = maps.read_text()
        assert ".values" not in mapped and ".offsets" not in mapped


def test_num_proc_gives_the_same_features(run_config):
    config = build_run_config(run_config())
    task = build_task(config.task)
    rows = task.read(config.data.train)
    task.fit(rows)
    tok = load_tokenizer(resolve_model(config.model))

    def encode(chunk):
        return task.encode(chunk, tok)

    one = [f for c in cache.encoded(rows, encode, chunk=5) for f in c]
    two = [f for c in cache.encoded(rows, encode, chunk=5, num_proc=2) for f in c]
    assert one == two == task.encode(rows, tok)


def test_stored_lengths_batch_as_the_features_in_memory(run_config):
    config = build_run_config(run_config(train={"batch_size": 4}))
    store = prepare(config).features["train"]
    lengths = [len(f["input_ids"]) for f in in_memory(config)]
    stored = length_grouped_batches(store.lengths, 4, seed=3, bucket_batches=2)
    memory = length_grouped_batches(lengths, 4, seed=3, bucket_batches=2)
    assert list(stored) == list(memory)
    assert sorted(i for b in stored for i in b) == list(range(64))
    # inside each mega-bucket of 2 batches the examples run longest first
    order = stored.order.tolist()
    for start in range(0, 64, 8):
        chunk = [lengths[i] for i in order[start : start + 8]]
        assert chunk == sorted(chunk, reverse=True)


def test_skipped_rows_are_kept_with_the_cache(tmp_path, run_config, builds):
    path, bad_lines = csv_with_bad_rows(tmp_path / "train.csv")
    over = {"data": {"train": str(path), "bad_rows": "skip", "max_bad_fraction": 0.2}}
    first = prepare(build_run_config(run_config(**over)))
    second = prepare(build_run_config(run_config(**over)))
    assert len(builds) == 1
    assert [r.line for r in second.bad_rows["train"]] == bad_lines
    assert second.bad_rows == first.bad_rows and len(second.train) == 20


def _tables(tmp_path: Path, rows: list[tuple[str, str]]) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"text": [t for t, _ in rows], "label": [label for _, label in rows]}
    pq.write_table(pa.table(columns), tmp_path / "train.parquet", row_group_size=7)
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "train_ds"))
    return {"parquet": tmp_path / "train.parquet", "dataset": tmp_path / "train_ds"}


@pytest.mark.parametrize("fmt", ["parquet", "dataset"])
def test_parquet_and_save_to_disk_inputs(tmp_path, run_config, sentiment_files, fmt):
    path = _tables(tmp_path, sentiment_rows(64, seed=1))[fmt]
    data = prepare(build_run_config(run_config(data={"train": str(path)})))
    csv_config = build_run_config(run_config())
    assert list(data.features["train"]) == in_memory(csv_config)
    assert [ex.line for ex in data.train][:3] == [1, 2, 3]  # row numbers


@pytest.mark.parametrize("fmt", ["parquet", "dataset"])
def test_table_errors_name_file_row_and_field(tmp_path, run_config, fmt):
    rows = sentiment_rows(20)
    rows[4] = ("  ", "pos")
    path = _tables(tmp_path, rows)[fmt]
    with pytest.raises(DataError) as info:
        prepare(build_run_config(run_config(data={"train": str(path)})))
    assert f"file {path}, line 5, field 'text': empty text" in str(info.value)
    task = build_task(parse_section(TASKS, "type", "classification", "task"))
    with pytest.raises(DataError, match="line 5, field 'text'"):
        task.read(str(path))


def test_bad_rows_are_refused_when_fit_reads_no_example(tmp_path, run_config, builds):
    """A regression task's fit learns nothing from the rows; the file is still checked whole."""
    rows = [(t, str(i / 10)) for i, (t, _) in enumerate(sentiment_rows(20))]
    rows[6] = (rows[6][0], "high")
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"{t},{v}\n" for t, v in rows), encoding="utf-8")
    over = {"task": {"type": "classification", "problem": "regression"}}
    with pytest.raises(DataError, match="line 8, field 'label': expected a number"):
        prepare(build_run_config(run_config(data={"train": str(path)}, **over)))
    assert builds == []


def test_batches_are_those_of_python_lists():
    """The int32 batching draws exactly the permutations random.Random gave on Python lists,
    so training runs see the same batches as before the cache (then the longest goes first)."""
    import random

    draw = random.Random(0)
    lengths = [draw.randint(1, 30) for _ in range(203)]
    rng = random.Random(3)
    order = list(range(203))
    rng.shuffle(order)
    expected = []
    for start in range(0, 203, 32):
        chunk = sorted(order[start : start + 32], key=lambda i: -lengths[i])
        expected += [chunk[i : i + 8] for i in range(0, len(chunk), 8)]
    rng.shuffle(expected)
    longest = next(k for k, b in enumerate(expected) if lengths.index(max(lengths)) in b)
    expected[0], expected[longest] = expected[longest], expected[0]
    assert list(length_grouped_batches(lengths, 8, seed=3, bucket_batches=4)) == expected


def test_an_unwritable_cache_names_lmadapt_cache(run_config, feature_cache, monkeypatch):
    blocker = feature_cache.parent / "not_a_dir"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setenv("LMADAPT_CACHE", str(blocker))
    with pytest.raises(LmadaptError, match="LMADAPT_CACHE"):
        prepare(build_run_config(run_config()))


def test_a_store_open_at_exit_closes_quietly(tmp_path):
    """Its descriptors are closed by a finalizer: no "Exception ignored in __del__" at exit."""
    import subprocess
    import sys

    script = (
        "from lmadapt.data import cache\n"
        "store = cache.build('k', [[{'input_ids': [1, 2, 3], 'labels': 0}]], lambda: {})\n"
        "assert store[0]['input_ids'] == [1, 2, 3]\n"
        "import builtins; builtins.kept = store\n"  # alive until the interpreter tears down
    )
    env = {**__import__("os").environ, "LMADAPT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr
