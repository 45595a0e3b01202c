from lmadapt.api import load_run, predict, train
from lmadapt.config import build_run_config


def test_tiny_run_end_to_end(run_config):
    # Full fine-tuning at lr 3e-3 learns the adjective rule of the fixture data: dev accuracy
    # measured 1.0 for train seeds 42 and 1-7 (best checkpoint at step 24-36 of 80), and the
    # four predictions below were right for each; an untrained or broken run stays at 0.5.
    cfg = build_run_config(run_config(method={"name": "full"}, train={"epochs": 10, "lr": 3e-3}))
    metrics = train(cfg)
    assert metrics["steps"] == 10 * 64 // 8
    assert metrics["dev"]["accuracy"] >= 0.9
    texts = [
        "the film was good",
        "the film was awful",
        "the plot was boring",
        "the cast was lovely",
    ]
    rows = predict(load_run(metrics["run_dir"]), texts)
    assert [r["label"] for r in rows] == ["pos", "neg", "neg", "pos"]


def test_evaluations_json_holds_what_the_report_renders(run_config):
    """evaluations.json is the structured source: the report's confusion table and per-class
    rows show its numbers (the dashboard plots the same file)."""
    import json
    from pathlib import Path

    from lmadapt.rundir import RunDir

    run = RunDir(train(build_run_config(run_config(train={"max_steps": 4})))["run_dir"])
    evaluations = json.loads(run.evaluations.read_text())
    dev = evaluations["dev"]
    assert dev["labels"] == ["neg", "pos"] and sum(map(sum, dev["confusion_matrix"])) == 24
    assert dev["metrics"] == json.loads(run.metrics.read_text())["dev"]
    report = run.report.read_text()
    for gold, row in zip(dev["labels"], dev["confusion_matrix"]):
        assert f"| **{gold}** | {' | '.join(map(str, row))} |" in report
    assert Path(run.path, "evaluations.json") == run.evaluations
