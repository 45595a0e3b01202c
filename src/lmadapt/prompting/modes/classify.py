"""Classification by prompting: verbalizer scoring (LM log-probs of each label's words, with
KV-prefix reuse, contextual or domain calibration, template ensembles) and embedding similarity;
metrics per seed. Reading, rendering, label scores, metrics and the report come from the
prompt-classification task (the one stack a training run uses too); what is here needs no
training."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import softmax

from lmadapt.evaluate.metrics import Evaluation
from lmadapt.prompting.calibration import (
    CONTENT_FREE,
    calibrate,
    content_free_prior,
    domain_prior,
    log_mean,
)
from lmadapt.prompting.config import PromptConfig
from lmadapt.prompting.modes import MODES, Outcome, mean_sd, plus_minus
from lmadapt.prompting.scoring import Group, PrefixScorer, without_reuse
from lmadapt.prompting.sources import (
    load_embedder,
    load_lm,
    prompt_tasks,
    read_labelled,
    select_demos,
)
from lmadapt.prompting.templates import Demo
from lmadapt.tasks.classification import Example
from lmadapt.tasks.prompt_classification import PromptClassificationTask


@dataclass
class SeedScores:
    seed: int
    probs: np.ndarray
    """(N, C) label probabilities."""
    calibrated: np.ndarray | None
    seconds: float
    prompt: str
    """The first query's full prompt, for the report."""


def score_seed(
    cfg: PromptConfig,
    task: PromptClassificationTask,
    dev: list[Example],
    train: list[Example],
    seed: int,
) -> SeedScores:
    """Label probabilities of every dev example under one seed's demonstrations."""
    model, tok = load_lm(cfg.model, cfg.device)
    renderer = task.renderer(tok)
    pool, selection = select_demos(cfg, train, dev, seed)

    @functools.cache
    def demo(j: int) -> Demo:
        return task.demo(renderer, pool[j])

    pair = dev[0].text_pair is not None
    groups: dict[tuple[int, ...], Group] = {}
    owners: dict[tuple[int, ...], list[int]] = {}  # per group: dev index of each query, -1 = CF
    first_prompt = ""
    for i, ex in enumerate(dev):
        demos = [demo(j) for j in (selection[0] if len(selection) == 1 else selection[i])]
        fields = task.fields(ex, tok)
        first_prompt = first_prompt or "".join(renderer.render(demos, fields))
        prefix, suffix = task.prompt_ids(renderer, fields, demos)
        key = tuple(prefix)
        if key not in groups:
            groups[key] = Group(prefix, [])
            owners[key] = []
            if cfg.calibration == "contextual":
                for cf in CONTENT_FREE:
                    cf_fields = {"text": cf, "text_pair": cf if pair else None}
                    groups[key].queries.append(task.prompt_ids(renderer, cf_fields, demos)[1])
                    owners[key].append(-1)
        groups[key].queries.append(suffix)
        owners[key].append(i)
    scorer = PrefixScorer(model, tok.pad_token_id, cfg.batch_size)
    glist = list(groups.values())
    t0 = time.perf_counter()
    raw = scorer.score(glist if cfg.prefix_reuse else without_reuse(glist), task.continuations.ids)
    seconds = time.perf_counter() - t0
    scores = task.continuation_scores(torch.from_numpy(raw)).numpy()
    probs = np.zeros((len(dev), len(task.labels)))
    cal = np.zeros_like(probs) if cfg.calibration == "contextual" else None
    row = 0
    for key in groups:
        own = np.array(owners[key])
        block = scores[row : row + len(own)]
        row += len(own)
        p = softmax(block[own >= 0], axis=-1)
        probs[own[own >= 0]] = p
        if cal is not None:
            cal[own[own >= 0]] = calibrate(p, content_free_prior(block[own < 0]))
    if cfg.calibration == "domain":  # one prior over all inputs: a kNN prefix holds one query
        cal = calibrate(probs, domain_prior(probs))
    return SeedScores(seed, probs, cal, seconds, first_prompt)


def score_ensemble(
    cfg: PromptConfig,
    tasks: list[PromptClassificationTask],
    dev: list[Example],
    train: list[Example],
    seed: int,
) -> SeedScores:
    """One seed scored under every template, each calibrated on its own (its bias is its own),
    then combined by the mean of the label log-probabilities."""
    members = [score_seed(cfg, t, dev, train, seed) for t in tasks]
    if len(members) == 1:
        return members[0]
    cal = None
    if members[0].calibrated is not None:
        cal = log_mean([m.calibrated for m in members])  # type: ignore[misc]
    seconds = sum(m.seconds for m in members)
    prompt = "\n\n---\n\n".join(m.prompt for m in members)
    return SeedScores(seed, log_mean([m.probs for m in members]), cal, seconds, prompt)


def _log(p: np.ndarray) -> list[np.ndarray]:
    """Probabilities as the task's label log-scores (a zero probability stays the lowest)."""
    with np.errstate(divide="ignore"):
        return list(np.log(p))


def classification_outcome(
    cfg: PromptConfig,
    task: PromptClassificationTask,
    dev: list[Example],
    seeds: list[SeedScores],
    out_dir: Path,
) -> Outcome:
    """Metrics per seed and mean ± sd, uncalibrated and calibrated side by side."""
    variants = {"uncalibrated": lambda s: s.probs}
    if cfg.calibration != "none":
        variants["calibrated"] = lambda s: s.calibrated
    per_seed, rows = [], []
    evals: dict[str, Evaluation] = {}
    for s in seeds:
        entry: dict[str, Any] = {
            "seed": s.seed,
            "seconds": round(s.seconds, 3),
            "sentences_per_second": round(len(dev) / max(s.seconds, 1e-9), 2),
        }
        decoded = {}
        for name, get in variants.items():
            ev = task.evaluate(_log(get(s)), dev)
            entry[name] = ev.metrics
            evals.setdefault(name, ev)  # the first seed's details go into the report
            decoded[name] = task.decode(_log(get(s)), dev)
        per_seed.append(entry)
        for i, ex in enumerate(dev):
            r = {"seed": s.seed, "text": ex.text}
            if ex.text_pair is not None:
                r["text_pair"] = ex.text_pair
            r["gold"] = ex.label
            for name, d in decoded.items():
                r[f"pred_{name}"] = d[i]["label"]
                r[f"probabilities_{name}"] = d[i]["probabilities"]
            rows.append(r)
    summary = {
        name: {m: mean_sd([e[name][m] for e in per_seed]) for m in per_seed[0][name]}
        for name in variants
    }
    speed = mean_sd([e["sentences_per_second"] for e in per_seed])
    metrics = {
        "mode": cfg.mode,
        "model": cfg.model,
        "k": cfg.k,
        "calibration": cfg.calibration,
        "templates": len(cfg.templates),
        "selection": cfg.selection if cfg.k else None,
        "n_eval": len(dev),
        "seeds": [s.seed for s in seeds],
        "summary": summary,
        "sentences_per_second": speed,
        "per_seed": per_seed,
    }
    sections = _summary_sections(summary, per_seed, speed, len(seeds))
    images = []
    for name, ev in evals.items():
        sections.append(f"## {name.capitalize()}, seed {seeds[0].seed}\n\n" + task.report(ev))
        images += task.plots(ev, out_dir / "plots", f"{name}_")
    if seeds[0].prompt:
        sections.append(
            f"## Prompt (first query, seed {seeds[0].seed})\n\n```\n{seeds[0].prompt}\n```"
        )
    return Outcome(metrics, rows, sections, images)


def _summary_sections(
    summary: dict[str, Any], per_seed: list[dict[str, Any]], speed: dict[str, float], n: int
) -> list[str]:
    """The mean ± sd table and the per-seed table of report.md."""
    names = list(summary)
    table = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in per_seed[0][names[0]]:
        table.append(f"| {m} | " + " | ".join(plus_minus(summary[k][m]) for k in names) + " |")
    head = (
        f"## Results (mean ± sd over {n} seed{'s' * (n > 1)})\n\n"
        + "\n".join(table)
        + f"\n\nSpeed: {plus_minus(speed)} sentences/s"
    )
    seed_rows = [
        "| seed | " + " | ".join(f"{k} accuracy" for k in names) + " | sentences/s |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for e in per_seed:
        accs = " | ".join(f"{e[k]['accuracy']:.4f}" for k in names)
        seed_rows.append(f"| {e['seed']} | {accs} | {e['sentences_per_second']} |")
    return [head, "## Per seed\n\n" + "\n".join(seed_rows)]


@MODES.register("verbalizer", summary="score each label by the LM log-prob of its verbalizer")
def verbalizer_mode(cfg: PromptConfig, out_dir: Path) -> Outcome:
    tasks = prompt_tasks(cfg)
    dev, train = read_labelled(cfg, tasks[0])
    seeds = cfg.seeds if cfg.stochastic else cfg.seeds[:1]
    results = [score_ensemble(cfg, tasks, dev, train, s) for s in seeds]
    return classification_outcome(cfg, tasks[0], dev, results, out_dir)


@MODES.register("embedding", summary="cosine similarity of text and label descriptions (encoder)")
def embedding_mode(cfg: PromptConfig, out_dir: Path) -> Outcome:
    from lmadapt.prompting.embedding import zero_shot_scores

    task = prompt_tasks(cfg, cfg.label_descriptions, "label_descriptions")[0]  # words: descriptions
    dev, _ = read_labelled(cfg, task)
    texts = [ex.text if ex.text_pair is None else f"{ex.text}\n{ex.text_pair}" for ex in dev]
    embedder = load_embedder(cfg.embedder, cfg.device)
    t0 = time.perf_counter()
    sims = zero_shot_scores(embedder, texts, [task.verbalizer.words[n] for n in task.labels])
    seconds = time.perf_counter() - t0
    probs = softmax(sims * 100.0, axis=-1)
    cal = calibrate(probs, domain_prior(probs)) if cfg.calibration == "domain" else None
    scores = SeedScores(cfg.seeds[0], probs, cal, seconds, "")
    return classification_outcome(cfg, task, dev, [scores], out_dir)
