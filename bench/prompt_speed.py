"""Prompt classification speed on SST-2 dev: verbalizer scoring with prefix KV-cache reuse vs
(a) HF generate() on the same prompts with the answer parsed from the text, and (b) the same
scoring without prefix reuse. Writes bench/results/prompt_speed.{json,md}.

    python -m bench.prompt_speed --n 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lmadapt.io import write_json, write_text
from lmadapt.prompting.config import load_prompt_config
from lmadapt.prompting.modes.classify import score_seed
from lmadapt.prompting.modes.generate import greedy_generate
from lmadapt.prompting.sources import load_lm, prompt_tasks, read_labelled, select_demos

DATA = Path("../shared/data/sst2")


def parse_answer(text: str, words: dict[str, list[str]]) -> str | None:
    """The label whose verbalizer word occurs first in the generated text (None: no match)."""
    text = text.lower()
    hits = [(text.find(w.lower()), label) for label, ws in words.items() for w in ws]
    hits = [h for h in hits if h[0] >= 0]
    return min(hits)[1] if hits else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="dev sentences")
    ap.add_argument("--k", type=int, default=8, help="demonstrations (balanced, seed 0)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    cfg = load_prompt_config(
        {
            "model": a.model,
            "template": "sentiment",
            "k": a.k,
            "selection": "balanced",
            "batch_size": a.batch_size,
            "data": {
                "dev": str(DATA / "dev.tsv"),
                "train": str(DATA / "train.tsv"),
                "max_eval_samples": a.n,
            },
        }
    )
    t0 = time.perf_counter()
    model, tok = load_lm(cfg.model)
    load_s = time.perf_counter() - t0
    task = prompt_tasks(cfg)[0]
    verbalizer = task.verbalizer
    dev, train = read_labelled(cfg, task)
    gold = np.array([verbalizer.labels.index(ex.label) for ex in dev])
    rows = []
    for name, reuse in (
        ("verbalizer scoring, prefix KV reuse", True),
        ("verbalizer scoring, no reuse", False),
    ):
        cfg.prefix_reuse = reuse
        s = score_seed(cfg, task, dev, train, 0)
        acc = float((s.probs.argmax(-1) == gold).mean())
        rows.append({"method": name, "seconds": s.seconds, "accuracy": acc})
    renderer = task.renderer(tok)
    pool, sel = select_demos(cfg, train, dev, 0)
    demos = [task.demo(renderer, pool[j]) for j in sel[0]]
    prompts = ["".join(renderer.render(demos, task.fields(ex, tok))) for ex in dev]
    t0 = time.perf_counter()
    texts = greedy_generate(model, tok, prompts, 3, a.batch_size, not renderer.chat)
    seconds = time.perf_counter() - t0
    parsed = [parse_answer(t, verbalizer.words) for t in texts]
    acc = float(np.mean([p == ex.label for p, ex in zip(parsed, dev)]))
    rows.append(
        {
            "method": "HF generate() + text parsing",
            "seconds": seconds,
            "accuracy": acc,
            "unparsed": sum(p is None for p in parsed),
        }
    )
    for r in rows:
        r["sentences_per_second"] = round(len(dev) / r["seconds"], 2)
        r["seconds"] = round(r["seconds"], 2)
    base = rows[0]["sentences_per_second"]
    table = ["| method | sentences/s | speed-up of reuse | accuracy |", "|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| {r['method']} | {r['sentences_per_second']} | "
            f"{base / r['sentences_per_second']:.2f}x | {r['accuracy']:.4f} |"
        )
    result = {
        "n": len(dev),
        "k": a.k,
        "model": a.model,
        "batch_size": a.batch_size,
        "model_load_seconds": round(load_s, 1),
        "rows": rows,
    }
    out = Path(a.out)
    write_json(out / "prompt_speed.json", result)
    md = (
        f"# Prompt classification speed ({len(dev)} SST-2 dev sentences, {a.k}-shot, "
        f"{a.model}, batch {a.batch_size})\n\n" + "\n".join(table) + "\n"
    )
    write_text(out / "prompt_speed.md", md)
    print(md)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
