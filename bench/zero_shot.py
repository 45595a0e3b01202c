"""Zero-shot classification options side by side on SST-2 dev and SUBJ test (issue #19):
the old shipped recipe (one template, contextual calibration), domain calibration, template
ensembles, a several-words verbalizer, their combination, and the embedding mode.

Each template is scored once per set (raw label probabilities plus the content-free scores);
every option is then computed from those with the library's own functions, so one scoring pass
serves all the calibrations. Nothing here fits anything to labels: labels are read only to report
accuracy. Writes bench/results/zero_shot.json.

    python -m bench.zero_shot --n 872
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lmadapt.io import write_json
from lmadapt.prompting.calibration import calibrate, domain_prior, log_mean
from lmadapt.prompting.config import load_prompt_config
from lmadapt.prompting.embedding import zero_shot_scores
from lmadapt.prompting.modes.classify import score_seed
from lmadapt.prompting.sources import load_embedder, prompt_tasks, read_labelled

CONFIGS = Path(__file__).parent.parent / "configs" / "prompts"
SETS = {
    "sst2": ("sst2_zero_shot.yaml", "sst2_embedding.yaml"),
    "subj": ("subj_zero_shot.yaml", "subj_embedding.yaml"),
}
WORDS = {
    "sst2": {"0": ["negative", "bad", "terrible"], "1": ["positive", "good", "great"]},
    "subj": {"0": ["subjective", "opinion"], "1": ["objective", "fact"]},
}
"""Several words per label (pooled as log Σ p(word)), for the verbalizer-words option."""


def accuracy(probs: np.ndarray, gold: np.ndarray) -> float:
    return round(float((probs.argmax(-1) == gold).mean()), 4)


def measure(name: str, n: int) -> dict:
    """Every option on one set; the first template of the config is the single-template one."""
    prompt_yaml, embed_yaml = (CONFIGS / f for f in SETS[name])
    over = [f"data.max_eval_samples={n}", "calibration=contextual"]
    cfg = load_prompt_config(prompt_yaml, over)
    tasks = prompt_tasks(cfg)
    dev, _ = read_labelled(cfg, tasks[0])
    gold = np.array([tasks[0].labels.index(ex.label) for ex in dev])
    members, seconds = [], []
    for t in tasks:
        s = score_seed(cfg, t, dev, [], 0)  # raw + contextual (content-free)
        members.append(s)
        seconds.append(round(s.seconds, 1))
    cfg.template = cfg.templates[0]
    words = score_seed(cfg, prompt_tasks(cfg, WORDS[name])[0], dev, [], 0)
    raw = [m.probs for m in members]
    contextual = [m.calibrated for m in members]
    domain = [calibrate(p, domain_prior(p)) for p in raw]
    options = {
        "one template, raw": raw[0],
        "one template, contextual (old shipped recipe)": contextual[0],
        "one template, domain": domain[0],
        "several words, raw": words.probs,
        "several words, contextual": words.calibrated,
        "several words, domain": calibrate(words.probs, domain_prior(words.probs)),
        f"ensemble of {len(raw)} templates, raw": log_mean(raw),
        f"ensemble of {len(raw)} templates, contextual": log_mean(contextual),
        f"ensemble of {len(raw)} templates, domain (shipped)": log_mean(domain),
    }
    for i in range(1, len(raw)):
        options[f"template {i + 1} alone, raw"] = raw[i]
        options[f"template {i + 1} alone, domain"] = domain[i]
    ecfg = load_prompt_config(embed_yaml, [f"data.max_eval_samples={n}"])
    described = prompt_tasks(ecfg, ecfg.label_descriptions, "label_descriptions")[0].verbalizer
    t0 = time.perf_counter()
    sims = zero_shot_scores(
        load_embedder(ecfg.embedder, ecfg.device),
        [ex.text for ex in dev],
        [described.words[label] for label in described.labels],
    )
    embed_s = round(time.perf_counter() - t0, 1)
    eprobs = np.exp(sims * 100.0 - (sims * 100.0).max(-1, keepdims=True))  # as embedding mode
    eprobs /= eprobs.sum(-1, keepdims=True)
    options["embedding, raw"] = eprobs
    options["embedding, domain"] = calibrate(eprobs, domain_prior(eprobs))
    return {
        "n": len(dev),
        "config": str(prompt_yaml.relative_to(CONFIGS.parent.parent)),
        "scoring_seconds_per_template": seconds,
        "scoring_seconds_words": round(words.seconds, 1),
        "embedding_seconds": embed_s,
        "accuracy": {k: accuracy(v, gold) for k, v in options.items()},
        "predicted_share_of_label_1": {
            k: round(float((v.argmax(-1) == 1).mean()), 3) for k, v in options.items()
        },
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=872, help="evaluation sentences per set")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--out", default="bench/results/zero_shot.json")
    a = ap.parse_args(argv)
    out = Path(a.out)
    # sets measured before are kept: one set can be re-measured alone
    result = json.loads(out.read_text()) if out.exists() else {}
    result.pop("command", None), result.pop("seconds", None)  # per set now
    sets = result.setdefault("sets", {})
    for name in a.sets:
        t0 = time.perf_counter()
        sets[name] = measure(name, a.n)
        sets[name]["command"] = f"python -m bench.zero_shot --n {a.n} --sets {name}"
        sets[name]["seconds"] = round(time.perf_counter() - t0, 1)
    names = list(sets[a.sets[0]]["accuracy"])
    result["mean_accuracy"] = {
        k: round(float(np.mean([s["accuracy"][k] for s in sets.values() if k in s["accuracy"]])), 4)
        for k in names
    }
    write_json(Path(a.out), result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
