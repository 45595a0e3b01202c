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
