from lmadapt.api import load_run, predict, train
from lmadapt.config import build_run_config


def test_tiny_run_end_to_end(run_config):
    cfg = build_run_config(run_config())
    metrics = train(cfg)
    assert metrics["steps"] > 0
    rows = predict(load_run(metrics["run_dir"]), ["the film was good"])
    assert rows[0]["label"] in ("pos", "neg")
