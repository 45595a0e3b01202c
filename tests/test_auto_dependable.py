"""`lmadapt auto` keeps what finished and stays within its budget (issue #29 items 1, 2, 6, 12,
13 and the auto cosmetics; #30 defect 2): Ctrl-C and late errors never remove finished routes,
every input is checked before the first route, the budget bounds loading, scoring and the test
file, and Parquet / `datasets` training files are carved in their own format."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import pytest

from lmadapt.auto import auto, parse_budget
from lmadapt.auto.plan import make_plan
from lmadapt.cli import main
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.rundir import mark
from lmadapt.train.loop import TrainingInterrupted
from tests.conftest import sentiment_rows, write_csv
from tests.test_auto import preference_pairs, write_records

plan_mod = importlib.import_module("lmadapt.auto.plan")
routes_mod = importlib.import_module("lmadapt.auto.routes")
runner_mod = importlib.import_module("lmadapt.auto.runner")

TOLERANCE = 4.0
"""Seconds past the budget a bounded run may take (the report, the route's own clean-up)."""


@pytest.fixture
def small(monkeypatch):
    """Routes train a couple of epochs and may start with a second left."""
    monkeypatch.setattr(plan_mod, "TARGET_SAMPLES", 60)
    for route in (routes_mod.ZeroShot, routes_mod.HeadLora, routes_mod.PromptFinetune):
        monkeypatch.setattr(route, "min_seconds", 1.0)


def only_lora(monkeypatch) -> None:
    """Numeric labels leave prompting out and few per label leaves full fine-tuning out."""
    monkeypatch.setattr(routes_mod.PromptRoute, "unfit", lambda self, plan: "not in this test")


def numeric_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    return [(t, "1" if y == "pos" else "0") for t, y in sentiment_rows(n, seed)]


@pytest.fixture
def no_route(monkeypatch) -> list:
    """Every trained route records that it ran (and fails): the list must stay empty."""
    ran = []

    def record(self, *args):
        ran.append(self.name)
        raise AssertionError("a route ran")

    monkeypatch.setattr(routes_mod.TrainedRoute, "run", record)
    return ran


# ---------------------------------------------------------------- item 1: Ctrl-C


@pytest.mark.parametrize(
    "stop",
    [
        KeyboardInterrupt(),
        TrainingInterrupted("interrupted at step 3; Resume with: lmadapt train --resume x"),
    ],
)
def test_ctrl_c_keeps_the_finished_routes_and_says_so(
    tmp_path, capsys, small, monkeypatch, tiny_bert, tiny_llama, stop
):
    def interrupted(self, plan, run_dir, deadline):
        (run_dir / "checkpoints").mkdir(parents=True)  # a half-done route's files
        raise stop

    monkeypatch.setattr(routes_mod.PromptFinetune, "run", interrupted)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(32, seed=1))
    out = tmp_path / "auto"
    argv = ["auto", str(train), "--out", str(out), "--budget", "5m"]
    argv += ["--model", f"zero_shot={tiny_llama}", "--model", f"lora={tiny_bert}"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume" not in err and "kept" in err and "--overwrite" in err
    board = json.loads((out / "leaderboard.json").read_text())
    status = {r["route"]: r["status"] for r in board["rows"]}
    assert status["prompt_ft"] == "interrupted" and status["distill"] == "not run"
    assert board["interrupted"] and board["winner"] in ("zero_shot", "lora")
    assert (out / "winner" / "metrics.json").is_file()
    finished = {"zero_shot", "lora"} - {board["winner"]}
    assert all((out / "routes" / name / "metrics.json").is_file() for name in finished)
    assert not (out / "routes" / "prompt_ft").exists()  # unfinished: nothing half-written
    assert "interrupted" in (out / "report.md").read_text()


def test_a_lone_finished_route_leaves_no_empty_routes_folder(
    tmp_path, capsys, small, monkeypatch, tiny_bert
):
    """The only finished route becomes OUT/winner: OUT/routes is then empty and is removed."""
    only_lora(monkeypatch)

    def interrupted(self, plan, run_dir, deadline):
        raise KeyboardInterrupt

    monkeypatch.setattr(routes_mod.HeadFull, "run", interrupted)
    monkeypatch.setattr(routes_mod.HeadFull, "unfit", lambda self, plan: None)
    train = write_csv(tmp_path / "train.csv", numeric_rows(32, seed=1))
    out = tmp_path / "auto"
    argv = ["auto", str(train), "--out", str(out), "--budget", "5m", "--model", f"lora={tiny_bert}"]
    argv += ["--model", f"full={tiny_bert}"]
    assert main(argv) == 130
    assert (out / "winner" / "metrics.json").is_file()
    assert not (out / "routes").exists()


def test_ctrl_c_before_any_route_finished_removes_out_and_says_so(
    tmp_path, capsys, small, monkeypatch
):
    def interrupted(self, plan, run_dir, deadline):
        raise KeyboardInterrupt

    monkeypatch.setattr(routes_mod.TrainedRoute, "run", interrupted)
    train = write_csv(tmp_path / "train.csv", numeric_rows(32))
    out = tmp_path / "auto"
    assert main(["auto", str(train), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "before any route finished" in err and "removed" in err and "--resume" not in err
    assert not out.exists() and train.is_file()


def test_ctrl_c_after_a_route_finished_keeps_it(tmp_path, capsys, small, monkeypatch, tiny_bert):
    """Ctrl-C in the speed probe, after the run wrote its metrics.json: the run is finished."""
    only_lora(monkeypatch)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "_predict_speed", interrupted)
    train = write_csv(tmp_path / "train.csv", numeric_rows(32))
    out = tmp_path / "auto"
    assert main(["auto", str(train), "--out", str(out), "--model", f"lora={tiny_bert}"]) == 130
    assert "kept" in capsys.readouterr().err
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["winner"] == "lora" and (out / "winner" / "metrics.json").is_file()
    row = board["rows"][0]
    assert row["predict_per_second"] is None and "speed not measured" in row["reason"]


# ---------------------------------------------------------------- item 2: check first


def test_a_test_label_train_lacks_fails_before_any_route(tmp_path, capsys, no_route):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(32))
    test = write_csv(tmp_path / "test.csv", [*sentiment_rows(4), ("the film was so so", "meh")])
    out = tmp_path / "auto"
    assert main(["auto", str(train), "--test", str(test), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "test.csv" in err and "meh" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not no_route


@pytest.mark.parametrize(
    "args, field, words",
    [
        (["--template", "sentimnt"], "--template", ["unknown template", "sentiment"]),
        (["--verbalizer", "0=bad"], "--verbalizer", ["no word for label", "1"]),
        (["--model", "lora=minilmm"], "--model", ["lora=minilmm", "minilm"]),
        (["--model", "lora=./no/such/dir"], "--model", ["no such directory"]),
    ],
)
def test_a_bad_template_verbalizer_or_model_fails_before_any_route(
    tmp_path, capsys, no_route, args, field, words
):
    train = write_csv(tmp_path / "train.csv", numeric_rows(32))
    out = tmp_path / "auto"
    assert main(["auto", str(train), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"'{field}'" in err and all(w in err for w in words), err
    assert "suggests no verbalizer" not in err
    assert not out.exists() and not no_route


def test_an_encoder_for_preference_pairs_is_refused_before_any_route(
    tmp_path, capsys, no_route, tiny_bert
):
    train = write_records(tmp_path / "pairs.jsonl", preference_pairs(20))
    out = tmp_path / "auto"
    argv = ["auto", str(train), "--out", str(out), "--model", f"lm_lora={tiny_bert}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "'--model'" in err and len(err.splitlines()) == 1
    assert all(w in err for w in ("lm_lora=", "is an encoder model", "preference", "causal")), err
    assert not out.exists() and not no_route
    # a model for a route that does not fit the data is not checked: that route is skipped
    with pytest.raises(LmadaptError, match="no route finished"):
        auto(train, out=out, models={"lora": tiny_bert})
    assert no_route == ["lm_lora"]


@pytest.mark.parametrize(
    "rows, words",
    [  # recognised as pairs, so the preference reader's refusal is the file's error
        ([{"prompt": "hi", "chosen": "yes", "rejected": "yes"}], ["line 1", "'rejected'"]),
        ([{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "b"}], ["'rejected'"]),
    ],
)
def test_a_bad_file_of_pairs_fails_with_its_own_error(tmp_path, capsys, no_route, rows, words):
    train = write_records(tmp_path / "pairs.jsonl", rows * 10)
    assert main(["auto", str(train), "--out", str(tmp_path / "auto")]) == 2
    err = capsys.readouterr().err
    assert "no task reads this file" not in err and all(w in err for w in words), err
    assert not no_route


def test_an_error_after_the_routes_keeps_them(tmp_path, small, monkeypatch, tiny_bert):
    only_lora(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("scoring the test file broke")

    monkeypatch.setattr(runner_mod, "evaluate", broken)
    train = write_csv(tmp_path / "train.csv", numeric_rows(32))
    test = write_csv(tmp_path / "test.csv", numeric_rows(6, seed=2))
    out = tmp_path / "auto"
    with pytest.raises(RuntimeError):
        auto(train, out=out, test_file=test, models={"lora": tiny_bert})
    assert (out / "winner" / "metrics.json").is_file()


def test_overwrite_refuses_an_out_that_holds_an_input(tmp_path, capsys):
    out = tmp_path / "auto"
    (out / "data").mkdir(parents=True)
    mark(out, "auto")
    train = write_csv(out / "data" / "train.csv", numeric_rows(32))
    assert main(["auto", str(train), "--out", str(out), "--overwrite"]) == 2
    assert "input" in capsys.readouterr().err and train.is_file()


# ---------------------------------------------------------------- item 6: the budget


@pytest.mark.parametrize("text, seconds", [("1h30", 5400), ("2m30", 150), ("1h30m15", 5415)])
def test_a_bare_number_after_a_unit_is_the_next_unit(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["30s15", "1h30x", "h30"])
def test_a_bare_number_after_seconds_is_refused(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_budget(text)


@pytest.mark.slow
def test_a_route_that_hangs_is_stopped_where_its_share_ends(tmp_path, small, monkeypatch, capsys):
    only_lora(monkeypatch)
    monkeypatch.setattr(routes_mod.HeadLora, "run", lambda *a: time.sleep(30))
    train = write_csv(tmp_path / "train.csv", numeric_rows(32))
    out = tmp_path / "auto"
    t0 = time.monotonic()
    with pytest.raises(LmadaptError, match="no route finished"):
        auto(train, budget="5s", out=out)
    assert time.monotonic() - t0 < 5 + TOLERANCE
    rows = {r["route"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert rows["lora"]["status"] == "out of time" and not (out / "routes" / "lora").exists()
    assert "[auto] lora: out of time: still running when" in capsys.readouterr().err


@pytest.mark.slow
def test_zero_shot_scores_the_dev_rows_that_fit_its_share(tmp_path, small, monkeypatch, tiny_llama):
    """Scoring a dev row takes 100 ms here: all 80 of them, twice (the loop's evaluation and the
    report's), would not fit an 8 s budget; a random part of dev that fits is scored and marked."""
    from lmadapt.tasks.prompt_classification import PromptClassificationTask

    monkeypatch.setattr(routes_mod.HeadLora, "unfit", lambda self, plan: "not in this test")
    score = PromptClassificationTask.evaluate_model

    def slow(self, model, features, *rest):
        time.sleep(0.1 * len(features))
        return score(self, model, features, *rest)

    monkeypatch.setattr(PromptClassificationTask, "evaluate_model", slow)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(400))
    out = tmp_path / "auto"
    t0 = time.monotonic()
    result = auto(train, budget="8s", out=out, models={"zero_shot": tiny_llama})
    assert time.monotonic() - t0 < 8 + TOLERANCE
    row = next(r for r in result["rows"] if r["route"] == "zero_shot")
    scored, total = row["dev_rows"]
    assert total == result["carved"]["dev"] == 80 and 0 < scored < total
    assert f"({scored:,} of 80)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_scoring_the_test_file_stops_at_the_budget(tmp_path, small, monkeypatch, tiny_bert):
    only_lora(monkeypatch)
    monkeypatch.setattr(runner_mod, "evaluate", lambda *a: time.sleep(30))
    train = write_csv(tmp_path / "train.csv", numeric_rows(32))
    test = write_csv(tmp_path / "test.csv", numeric_rows(6, seed=2))
    out = tmp_path / "auto"
    t0 = time.monotonic()
    result = auto(train, budget="8s", out=out, test_file=test, models={"lora": tiny_bert})
    assert time.monotonic() - t0 < 8 + TOLERANCE
    assert result["test_metrics"] is None and "budget ran out" in result["test_note"]
    assert (out / "winner" / "metrics.json").is_file()


def test_the_budget_counts_from_the_start_it_is_given(tmp_path, small, no_route):
    train = write_csv(tmp_path / "train.csv", numeric_rows(32))
    with pytest.raises(LmadaptError, match="no route finished"):
        auto(train, budget="30s", out=tmp_path / "o", started=time.monotonic() - 29.5)
    assert not no_route


# ---------------------------------------------------------------- items 12, 13: formats


def test_a_parquet_train_file_is_carved_into_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = zip(*sentiment_rows(40))
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "train.parquet")
    plan, carved, speed = make_plan(tmp_path / "train.parquet", None, tmp_path / "out")
    dev = pq.read_table(plan.dev)  # a real Parquet file, not CSV text
    assert dev.num_rows == carved["dev"] and dev.column_names == ["text", "label"]
    assert pq.read_table(plan.train).num_rows == carved["train"]
    assert pq.read_table(speed).num_rows == carved["dev"]
    assert {ex.text for ex in plan.task.read(str(plan.dev))} <= set(texts)


def test_a_datasets_directory_is_accepted_and_carved_into_one(
    tmp_path, small, monkeypatch, tiny_bert
):
    import datasets

    only_lora(monkeypatch)
    texts, labels = zip(*numeric_rows(40))
    data = tmp_path / "train_ds"
    datasets.Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(str(data))
    out = tmp_path / "auto"
    argv = ["auto", str(data), "--format", "dataset", "--out", str(out), "--budget", "2m"]
    assert main([*argv, "--model", f"lora={tiny_bert}"]) == 0
    dev = datasets.load_from_disk(str(out / "data" / "dev"))
    assert len(dev) == json.loads((out / "leaderboard.json").read_text())["carved"]["dev"]
    assert (out / "winner" / "metrics.json").is_file()
    assert Path(data, "dataset_info.json").is_file()  # the input untouched
