"""Open-ended prompting (QA, short answers): greedy answers through the one decoder, scored by
exact match after the one answer normalisation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmadapt.data.readers import read_records
from lmadapt.decoding import GenerationSettings
from lmadapt.evaluate.text import exact_match
from lmadapt.inference import generate_ids
from lmadapt.prompting.config import PromptConfig
from lmadapt.prompting.modes import MODES, Outcome, mean_sd, plus_minus
from lmadapt.prompting.sources import load_lm, select_demos
from lmadapt.prompting.templates import Renderer, fill, load_template


@dataclass
class _GenExample:
    text: str
    label: str
    fields: dict[str, Any]
    text_pair: None = None


@MODES.register("generate", summary="greedy generation for open tasks (QA, summaries), exact match")
def generate_mode(cfg: PromptConfig, out_dir: Path) -> Outcome:
    template = load_template(cfg.template)
    model, tok = load_lm(cfg.model, cfg.device)
    renderer = Renderer(template, tok)

    def read(path: str) -> list[_GenExample]:
        out = []
        for r in read_records(path, cfg.data.format):
            if cfg.data.target_column not in r.fields:
                raise r.error("missing reference answer column", cfg.data.target_column)
            f = dict(r.fields)
            out.append(
                _GenExample(
                    fill(template.input, f, "template.input"), str(f[cfg.data.target_column]), f
                )
            )
        return out

    dev = read(cfg.data.dev)[: cfg.data.max_eval_samples]
    train = read(cfg.data.train) if cfg.data.train and cfg.k else []
    per_seed, rows = [], []
    for seed in cfg.seeds if cfg.stochastic else cfg.seeds[:1]:
        pool, selection = select_demos(cfg, train, dev, seed)
        prompts = []
        for i, ex in enumerate(dev):
            sel = selection[0] if len(selection) == 1 else selection[i]
            demos = [renderer.demo(pool[j].fields, pool[j].label) for j in sel]
            prefix, suffix = renderer.render(demos, ex.fields)
            prompts.append(prefix + suffix)
        t0 = time.perf_counter()
        answers = greedy_generate(
            model, tok, prompts, cfg.max_new_tokens, cfg.batch_size, not renderer.chat
        )
        seconds = time.perf_counter() - t0
        em = [exact_match([a], [ex.label]) == 1.0 for a, ex in zip(answers, dev)]
        per_seed.append(
            {
                "seed": seed,
                "exact_match": float(np.mean(em)),
                "sentences_per_second": round(len(dev) / max(seconds, 1e-9), 2),
            }
        )
        rows += [
            {
                "seed": seed,
                "prompt_input": ex.text,
                "gold": ex.label,
                "prediction": a,
                "exact_match": bool(m),
            }
            for ex, a, m in zip(dev, answers, em)
        ]
    summary = {"exact_match": mean_sd([e["exact_match"] for e in per_seed])}
    metrics = {
        "mode": cfg.mode,
        "model": cfg.model,
        "k": cfg.k,
        "n_eval": len(dev),
        "seeds": [e["seed"] for e in per_seed],
        "summary": summary,
        "per_seed": per_seed,
    }
    section = (
        f"## Results (mean ± sd over {len(per_seed)} seed(s))\n\n| metric | value |\n|---|---|\n"
    )
    section += f"| exact_match | {plus_minus(summary['exact_match'])} |"
    return Outcome(metrics, rows, [section])


def greedy_generate(
    model: torch.nn.Module,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy continuations through the one decoder, cut at the first line break (answers are
    one line)."""
    ids = [tok(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    greedy = GenerationSettings(max_new_tokens=max_new_tokens)
    texts = generate_ids(model, tok, ids, greedy, eos, [], batch_size).texts
    return [t.strip().split("\n")[0].strip() for t in texts]
