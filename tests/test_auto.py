"""`lmadapt auto` on tiny data with tiny models: which routes fit which data, the carved dev set,
the budget, the leaderboard, and a winner that reloads like any run."""

from __future__ import annotations

import csv
import importlib
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from lmadapt.api import load_run, predict
from lmadapt.auto import auto, parse_budget
from lmadapt.auto.plan import carve_dev, make_plan, read_train
from lmadapt.auto.routes import best, fitting_routes
from lmadapt.cli import main
from lmadapt.errors import ConfigError
from tests.conftest import sentiment_rows, write_csv
from tests.tasks.test_token_classification import ner_sentences, write_conll


def preference_pairs(n: int, seed: int = 0, layout: str = "prompt") -> list[dict]:
    """Pairs of a right and a wrong sum, in one of the preference reader's layouts: `prompt`
    with reply strings, two whole `dialogues` (message lists), or HH-RLHF `transcripts`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        ask, good, bad = f"what is {a} plus {b}?", f"it is {a + b}", f"it is {a + b + 1}"
        if layout == "prompt":
            rows.append({"prompt": ask, "chosen": good, "rejected": bad})
        elif layout == "dialogues":
            user = {"role": "user", "content": ask}
            rows.append(
                {
                    "chosen": [user, {"role": "assistant", "content": good}],
                    "rejected": [user, {"role": "assistant", "content": bad}],
                }
            )
        else:
            hh = f"\n\nHuman: {ask}\n\nAssistant: "
            rows.append({"chosen": hh + good, "rejected": hh + bad})
    return rows


def write_records(path: Path, rows: list[dict]) -> Path:
    """rows as jsonl, json (one list) or csv (string fields only), by the suffix."""
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


plan_mod = importlib.import_module("lmadapt.auto.plan")  # `lmadapt.auto` is the function
routes_mod = importlib.import_module("lmadapt.auto.routes")
runner_mod = importlib.import_module("lmadapt.auto.runner")


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), (45, 45)]
)
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "0s", "m", "-5"])
def test_bad_budget_names_the_option(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_budget(text)


def test_dev_carve_is_stratified_disjoint_and_reads_back(tmp_path):
    # 3:1 imbalance: a carve that ignored labels could drift from it
    rows = [(f"good {i}", "pos") for i in range(60)] + [(f"bad {i}", "neg") for i in range(20)]
    rows.append(("so so", "meh"))  # alone in its label: it must stay in train
    path = write_csv(tmp_path / "train.csv", rows)
    plan, carved, _ = make_plan(path, None, tmp_path / "out")
    assert carved == {"train": 65, "dev": 16}
    train = plan.task.read(str(plan.train))
    dev = plan.task.read(str(plan.dev))
    assert Counter(ex.label for ex in dev) == {"pos": 12, "neg": 4}  # the 3:1 share kept
    assert not {ex.text for ex in train} & {ex.text for ex in dev}
    assert "so so" in {ex.text for ex in train}
    assert {ex.text for ex in train} | {ex.text for ex in dev} == {t for t, _ in rows}
    _, task, examples = read_train(path, "auto", None)
    profile = task.profile(examples)
    assert carve_dev(profile, seed=0) != carve_dev(profile, seed=1)  # the seed decides the split


def test_route_choice_follows_the_data(tmp_path, monkeypatch):
    few = write_csv(tmp_path / "few.csv", sentiment_rows(40))
    plan = make_plan(few, None, tmp_path / "a")[0]
    assert plan.few and fitting_routes(plan) == ["zero_shot", "lora", "prompt_ft"]
    plan.prefer = "speed"
    assert fitting_routes(plan) == ["zero_shot", "lora", "prompt_ft", "distill"]

    monkeypatch.setattr(plan_mod, "FEW_PER_LABEL", 10)  # 16 per label now counts as many
    many = make_plan(few, None, tmp_path / "b")[0]
    assert fitting_routes(many) == ["zero_shot", "lora", "full"]

    numeric = write_csv(
        tmp_path / "num.csv", [(t, "1" if y == "pos" else "0") for t, y in sentiment_rows(40)]
    )
    plan = make_plan(numeric, None, tmp_path / "c")[0]
    assert fitting_routes(plan) == ["lora", "full"] and "not words" in plan.prompt_reason
    plan = make_plan(numeric, None, tmp_path / "d", template="sentiment")[0]
    assert fitting_routes(plan) == ["zero_shot", "lora", "full"]
    assert plan.prompt["verbalizer"] == {"0": "negative", "1": "positive"}

    conll = write_conll(tmp_path / "ner.conll", ner_sentences(40))
    plan = make_plan(conll, None, tmp_path / "e", prefer="speed")[0]
    assert plan.task.kind == "token_classification"
    assert fitting_routes(plan) == ["lora", "full"]  # no prompting, no distillation of tags
    assert plan.profile.label_counts.keys() == {"LOC", "PER"}


@pytest.mark.parametrize(
    "layout, name", [("prompt", "p.jsonl"), ("dialogues", "d.json"), ("transcripts", "t.csv")]
)
def test_a_file_of_preference_pairs_is_a_preference_task_for_dpo_on_a_causal_lm(
    tmp_path, layout, name
):
    rows = preference_pairs(30, layout=layout)
    path = write_records(tmp_path / name, rows)
    plan, carved, speed = make_plan(path, None, tmp_path / "out")
    assert plan.task.kind == "preference" and (plan.metric, plan.mode) == ("loss", "min")
    assert fitting_routes(plan) == ["lm_lora"]
    reasons = {e.name: e.impl(e.name).unfit(plan) for e in routes_mod.ROUTES}
    assert "takes no encoder" in reasons["lora"] and "takes no encoder" in reasons["full"]
    assert "single-label text" in reasons["zero_shot"]
    assert plan.profile.label_counts == {} and plan.profile.max_words > 0

    # the carved dev set is written in the file's own format and layout, and reads back
    assert Path(plan.dev).suffix == Path(name).suffix and carved == {"train": 24, "dev": 6}
    train, dev = (plan.task.read(str(f)) for f in (plan.train, plan.dev))
    assert (len(train), len(dev)) == (24, 6)
    key = [(p.prompt[-1]["content"], p.chosen) for p in train + dev]
    assert sorted(key) == sorted(
        (p.prompt[-1]["content"], p.chosen) for p in plan.task.read(str(path))
    )
    assert len(plan.task.read(str(speed), labelled=False)) == 6  # prompts to answer


def test_preference_pairs_train_dpo_lora_and_the_winner_answers(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(plan_mod, "TARGET_SAMPLES", 48)  # 2 epochs of 24 pairs: 6 steps
    task = routes_mod.LmLora.task  # short replies: the speed probe generates them
    monkeypatch.setattr(routes_mod.LmLora, "task", lambda *a: {**task(*a), "max_new_tokens": 4})
    train = write_records(tmp_path / "train.jsonl", preference_pairs(30, seed=1))
    test = write_records(tmp_path / "test.jsonl", preference_pairs(6, seed=2))
    out = tmp_path / "auto"
    result = auto(train, budget="3m", out=out, test_file=test, models={"lm_lora": tiny_llama})
    rows = {r["route"]: r for r in result["rows"]}
    assert result["winner"] == "lm_lora" and rows["lm_lora"]["status"] == "done"
    assert rows["lm_lora"]["steps"] == 6 and rows["lm_lora"]["predict_per_second"] > 0
    assert {rows[n]["status"] for n in ("zero_shot", "lora", "full", "prompt_ft")} == {"skipped"}
    assert result["metric"] == "loss" and result["task"].startswith("preference (dpo")
    assert {"reward_accuracy", "reward_margin", "base_reward_accuracy"} <= set(
        result["test_metrics"]
    )
    report = (out / "report.md").read_text()
    assert "24 training examples;" in report and "per label" not in report

    run = load_run(out / "winner", "cpu")
    assert run.task.kind == "preference" and run.config.method.name == "lora"
    assert run.config.train.dropout == 0.0 and run.task.pcfg.report_samples == 0
    (answer,) = predict(run, texts=["what is 2 plus 2?"])
    assert answer["prompt"] == "what is 2 plus 2?" and isinstance(answer["output"], str)


def test_auto_runs_the_routes_and_the_winner_reloads(tmp_path, tiny_bert, tiny_llama, monkeypatch):
    monkeypatch.setattr(plan_mod, "TARGET_SAMPLES", 60)  # 2 epochs: seconds, not minutes
    train = write_csv(tmp_path / "train.csv", sentiment_rows(32, seed=1))
    test = write_csv(tmp_path / "test.csv", sentiment_rows(12, seed=3))
    out = tmp_path / "auto"
    models = {"zero_shot": tiny_llama, "prompt_ft": tiny_llama, "lora": tiny_bert}
    result = auto(train, budget="5m", out=out, test_file=test, models=models)

    board = json.loads((out / "leaderboard.json").read_text())
    by_route = {r["route"]: r for r in board["rows"]}
    assert [r["route"] for r in board["rows"] if r["status"] == "done"][0] == board["winner"]
    assert {by_route[n]["status"] for n in ("zero_shot", "lora", "prompt_ft")} == {"done"}
    assert by_route["zero_shot"]["steps"] == 0 and by_route["prompt_ft"]["steps"] > 0
    assert by_route["prompt_ft"]["favoured"] and not by_route["lora"]["favoured"]  # few per label
    assert by_route["full"]["status"] == "skipped" and "few examples" in by_route["full"]["reason"]
    for name in ("zero_shot", "lora", "prompt_ft"):
        row = by_route[name]
        assert row["predict_per_second"] > 0 and row["size_mb"] > 0 and row["train_seconds"] >= 0
    report = (out / "report.md").read_text()
    assert "## Leaderboard" in report and "skipped: few examples" in report
    assert set(result["test_metrics"]) >= {"accuracy"}

    winner = out / "winner"
    assert result["winner_dir"] == str(winner) and not (out / "routes" / board["winner"]).exists()
    preds = predict(load_run(winner, "cpu"), texts=["the film was great", "the plot was awful"])
    assert {p["label"] for p in preds} <= {"pos", "neg"}


def test_budget_exhaustion_skips_the_remaining_routes(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setattr(routes_mod.HeadLora, "min_seconds", 1.0)
    monkeypatch.setattr(routes_mod.HeadFull, "min_seconds", 10_000.0)
    monkeypatch.setattr(plan_mod, "FEW_PER_LABEL", 5)
    monkeypatch.setattr(plan_mod, "TARGET_SAMPLES", 60)
    train = write_conll(tmp_path / "train.conll", ner_sentences(30))
    out = tmp_path / "auto"
    result = auto(train, budget="16s", out=out, models={"lora": tiny_bert, "full": tiny_bert})
    rows = {r["route"]: r for r in result["rows"]}
    assert rows["lora"]["status"] in ("done", "stopped at its time share")
    assert rows["full"]["status"] == "skipped" and "of the budget left" in rows["full"]["reason"]
    assert result["winner"] == "lora" and result["metric"] == "f1"
    preds = predict(out / "winner", texts=["Anna flew to Paris ."], device="cpu")
    assert len(preds) == 1


def test_a_tie_goes_to_the_route_favoured_for_the_data_then_the_lower_loss():
    lora = {"route": "lora", "dev_metric": 1.0, "dev_loss": 0.05, "favoured": False}
    prompt = {"route": "prompt_ft", "dev_metric": 1.0, "dev_loss": 0.4, "favoured": True}
    worse = {"route": "full", "dev_metric": 0.8, "dev_loss": 0.01, "favoured": True}
    assert best([lora, prompt, worse], "max")["route"] == "prompt_ft"
    assert best([lora, {**prompt, "favoured": False}], "max")["route"] == "lora"
    assert best([{**lora, "dev_metric": 0.9}, worse], "min")["route"] == "full"


def test_time_to_score_test_is_kept_back_from_later_routes(tmp_path, tiny_bert, monkeypatch):
    """A finished route that predicts 0.5 examples a second would need 22s for 10 test
    sentences: the next route is left what the budget has beyond that, here too little."""
    monkeypatch.setattr(plan_mod, "FEW_PER_LABEL", 5)
    monkeypatch.setattr(plan_mod, "TARGET_SAMPLES", 60)
    monkeypatch.setattr(routes_mod.HeadFull, "min_seconds", 30.0)
    monkeypatch.setattr(runner_mod, "_predict_speed", lambda *a: (1.0, 0.5))
    train = write_conll(tmp_path / "train.conll", ner_sentences(30))
    test = write_conll(tmp_path / "test.conll", ner_sentences(10, seed=5))
    models = {"lora": tiny_bert, "full": tiny_bert}
    result = auto(train, budget="50s", out=tmp_path / "o", test_file=test, models=models)
    rows = {r["route"]: r for r in result["rows"]}
    assert result["test_reserve_seconds"] == pytest.approx(1.1 * (1.0 + 10 / 0.5), abs=0.1)
    assert rows["full"]["status"] == "skipped" and "of the budget left" in rows["full"]["reason"]
    assert result["test_rows"] == 10 and result["test_seconds"] > 0
    assert "were kept back for it" in (tmp_path / "o" / "report.md").read_text()


def test_prefer_speed_distils_the_best_head_into_half_the_blocks(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setattr(plan_mod, "FEW_PER_LABEL", 5)
    monkeypatch.setattr(plan_mod, "TARGET_SAMPLES", 60)
    rows = [(t, "1" if y == "pos" else "0") for t, y in sentiment_rows(40)]
    train = write_csv(tmp_path / "train.csv", rows)
    models = {"lora": tiny_bert, "full": tiny_bert, "distill": tiny_bert}
    result = auto(train, budget="5m", out=tmp_path / "o", prefer="speed", models=models)
    by_route = {r["route"]: r for r in result["rows"]}
    assert by_route["distill"]["status"] == "done", by_route["distill"]
    assert by_route["zero_shot"]["status"] == "skipped"  # numeric labels, no template
    distilled = load_run(by_route["distill"]["run_dir"], "cpu")
    assert distilled.model.config.num_hidden_layers == 1  # of the tiny BERT's 2


def test_deadline_stops_the_loop(tmp_path, run_config):
    from lmadapt.api import train
    from lmadapt.auto.routes import Deadline
    from lmadapt.config import build_run_config

    hook = Deadline(0.0)  # long past
    metrics = train(build_run_config(run_config()), hooks=[hook])
    assert hook.fired and metrics["steps"] == 0 and metrics["dev"]["accuracy"] >= 0


def test_deadline_anneals_the_rate_into_the_time_left(monkeypatch):
    import torch

    from lmadapt.config import TrainConfig
    from lmadapt.train.loop import TrainState, linear_schedule

    clock = [100.0]
    monkeypatch.setattr(routes_mod.time, "monotonic", lambda: clock[0])

    class Trainer:  # what the hook reads of the loop
        state, cfg = TrainState(), TrainConfig(warmup_ratio=0.0)
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(2)]
        scheduler = linear_schedule(torch.optim.SGD(groups, lr=1.0), 0, 1000)

        def total_steps(self):
            return 1000

    trainer, hook = Trainer(), routes_mod.Deadline(130.0)
    hook.on_train_start(trainer)
    while not trainer.state.should_stop:
        clock[0] += 1.0  # one second a step: 30 steps fit, not 1000
        trainer.state.step += 1
        hook.on_step_end(trainer)
    assert hook.rescheduled_to == 30 and trainer.state.step == 30 and hook.fired
    assert [f(20) for f in trainer.scheduler.lr_lambdas] == [pytest.approx(1 / 3)] * 2


def test_deadline_samples_dev_by_example_keeping_every_window(monkeypatch, tiny_bert):
    """NER sentences longer than max_length are several windows: sampling dev to fit the time
    keeps or drops a sentence with all of its windows, so the task still scores what is kept."""
    import numpy as np
    from transformers import AutoTokenizer

    from lmadapt.config import TrainConfig
    from lmadapt.data.tagged import Example
    from lmadapt.tasks.token_classification import IGNORE
    from lmadapt.train.loop import TrainState
    from tests.tasks.test_token_classification import make_task

    task = make_task(max_length=16, stride=4)
    sents = ner_sentences(30, seed=4)
    examples = [
        Example(w * (1 + i % 3), " ".join(w * (1 + i % 3)), [], t * (1 + i % 3))
        for i, (w, t) in enumerate(sents)
    ]
    task.fit(examples)
    feats = task.encode(examples, AutoTokenizer.from_pretrained(tiny_bert))
    assert len(feats) > len(examples)  # some sentences are several windows
    clock, scored = [100.0], []

    def oracle(model, data):  # a second per window; logits that give the gold tags
        clock[0] += len(data.features)
        logits = []
        for f in data.features:
            lab = np.array(f["labels"])
            arr = np.zeros((len(lab), len(task.labels)), dtype=np.float32)
            arr[lab != IGNORE, lab[lab != IGNORE]] = 5.0
            logits.append(arr)
        scored.append(task.evaluate(logits, data.examples).metrics)

    monkeypatch.setattr(routes_mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(task, "evaluate_model", oracle)

    class Trainer:  # what the hook reads of the loop
        state, cfg, model, collator = TrainState(), TrainConfig(eval_batch_size=4), None, None
        dev_features, dev_examples = list(feats), list(examples)

    trainer = Trainer()
    trainer.task = task
    hook = routes_mod.Deadline(math.inf, end=400.0, started=100.0)
    hook.on_train_start(trainer)
    kept, total = hook.dev_rows
    assert total == len(examples) and 0 < kept < total == len(set(map(id, examples)))
    assert len(trainer.dev_examples) == kept and set(map(id, trainer.dev_examples)) <= set(
        map(id, examples)
    )
    assert len(trainer.dev_features) == sum(task.feature_counts(trainer.dev_examples))
    oracle(None, routes_mod.Encoded(trainer.dev_features, trainer.dev_examples, None, 4))
    assert scored[0]["f1"] == scored[-1]["f1"] == 1.0  # the probe and the kept part both align


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.csv"], "no such file"),
        (["{train}", "--budget", "ten"], "--budget"),
        (["{train}", "--task", "generation"], "classification, preference and token_class"),
        (["{train}", "--model", "nosuch=x"], "unknown route"),
    ],
)
def test_cli_bad_inputs_are_one_line(tmp_path, capsys, args, message):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(20))
    argv = [a.format(train=train) for a in args]
    assert main(["auto", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not Path(tmp_path / "o").exists()
