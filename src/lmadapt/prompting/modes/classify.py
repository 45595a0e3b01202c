"""Classification by prompting: verbalizer scoring (LM log-probs of each label's words, with
KV-prefix reuse, contextual or domain calibration, template ensembles) and embedding similarity;
metrics per seed."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import softmax

from lmadapt.evaluate import plots
from lmadapt.evaluate.metrics import Evaluation, single_label_metrics
from lmadapt.evaluate.report import classification_report_markdown
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
    fields_of,
    load_embedder,
    load_lm,
    read_labelled,
    resolve_verbalizer,
    select_demos,
)
from lmadapt.prompting.templates import Demo, Renderer, TemplateConfig, load_template
from lmadapt.prompting.verbalizers import Verbalizer


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
    template: TemplateConfig,
    verbalizer: Verbalizer,
    dev: list[Any],
    train: list[Any],
    seed: int,
) -> SeedScores:
    """Label probabilities of every dev example under one seed's demonstrations."""
    model, tok = load_lm(cfg.model, cfg.device)
    renderer = Renderer(template, tok)
    conts = verbalizer.tokenize(tok, template.answer)
    pool, selection = select_demos(cfg, train, dev, seed)

    @functools.cache
    def demo(j: int) -> Demo:
        ex = pool[j]
        return renderer.demo(fields_of(ex), verbalizer.words[ex.label][0])

    def encode(text: str, special: bool) -> list[int]:
        return tok(text, add_special_tokens=special)["input_ids"]

    pair = dev[0].text_pair is not None
    groups: dict[str, Group] = {}
    owners: dict[str, list[int]] = {}  # per group: dev index of each query, -1 = content-free
    first_prompt = ""
    for i, ex in enumerate(dev):
        demos = [demo(j) for j in (selection[0] if len(selection) == 1 else selection[i])]
        prefix, suffix = renderer.render(demos, fields_of(ex))
        first_prompt = first_prompt or prefix + suffix
        if prefix not in groups:
            groups[prefix] = Group(encode(prefix, not renderer.chat), [])
            owners[prefix] = []
            if cfg.calibration == "contextual":
                for cf in CONTENT_FREE:
                    _, cf_suffix = renderer.render(
                        demos, {"text": cf, "text_pair": cf if pair else None}
                    )
                    groups[prefix].queries.append(encode(cf_suffix, False))
                    owners[prefix].append(-1)
        groups[prefix].queries.append(encode(suffix, False))
        owners[prefix].append(i)
    scorer = PrefixScorer(model, tok.pad_token_id, cfg.batch_size)
    glist = list(groups.values())
    t0 = time.perf_counter()
    raw = scorer.score(glist if cfg.prefix_reuse else without_reuse(glist), conts.ids)
    seconds = time.perf_counter() - t0
    scores = conts.label_scores(torch.from_numpy(raw), cfg.length_normalize).numpy()
    probs = np.zeros((len(dev), len(verbalizer.labels)))
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
    templates: list[TemplateConfig],
    verbalizer: Verbalizer,
    dev: list[Any],
    train: list[Any],
    seed: int,
) -> SeedScores:
    """One seed scored under every template, each calibrated on its own (its bias is its own),
    then combined by the mean of the label log-probabilities."""
    members = [score_seed(cfg, t, verbalizer, dev, train, seed) for t in templates]
    if len(members) == 1:
        return members[0]
    cal = None
    if members[0].calibrated is not None:
        cal = log_mean([m.calibrated for m in members])  # type: ignore[misc]
    seconds = sum(m.seconds for m in members)
    prompt = "\n\n---\n\n".join(m.prompt for m in members)
    return SeedScores(seed, log_mean([m.probs for m in members]), cal, seconds, prompt)


def classification_outcome(
    cfg: PromptConfig, labels: list[str], dev: list[Any], seeds: list[SeedScores], out_dir: Path
) -> Outcome:
    """Metrics per seed and mean ± sd, uncalibrated and calibrated side by side."""
    index = {n: i for i, n in enumerate(labels)}
    gold = np.array([index[ex.label] for ex in dev])
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
        preds = {}
        for name, get in variants.items():
            ev = single_label_metrics(get(s).argmax(-1), gold, labels)
            entry[name] = ev.metrics
            evals.setdefault(name, ev)  # the first seed's details go into the report
            preds[name] = get(s)
        per_seed.append(entry)
        for i, ex in enumerate(dev):
            r = {"seed": s.seed, **{k: v for k, v in fields_of(ex).items() if v is not None}}
            r["gold"] = ex.label
            for name, p in preds.items():
                r[f"pred_{name}"] = labels[int(p[i].argmax())]
                r[f"probabilities_{name}"] = {n: round(float(v), 6) for n, v in zip(labels, p[i])}
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
    names = list(variants)
    table = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in per_seed[0][names[0]]:
        table.append(f"| {m} | " + " | ".join(plus_minus(summary[n][m]) for n in names) + " |")
    head = (
        f"## Results (mean ± sd over {len(seeds)} seed{'s' * (len(seeds) > 1)})\n\n"
        + "\n".join(table)
        + f"\n\nSpeed: {plus_minus(speed)} sentences/s"
    )
    seed_rows = [
        "| seed | " + " | ".join(f"{n} accuracy" for n in names) + " | sentences/s |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for e in per_seed:
        accs = " | ".join(f"{e[n]['accuracy']:.4f}" for n in names)
        seed_rows.append(f"| {e['seed']} | {accs} | {e['sentences_per_second']} |")
    sections = [head, "## Per seed\n\n" + "\n".join(seed_rows)]
    images = []
    for name, ev in evals.items():
        sections.append(
            f"## {name.capitalize()}, seed {seeds[0].seed}\n\n" + classification_report_markdown(ev)
        )
        path = out_dir / "plots" / f"{name}_confusion_matrix.png"
        plots.confusion_matrix(np.array(ev.details["confusion_matrix"]), labels, path, title=name)
        images.append(path)
    if seeds[0].prompt:
        sections.append(
            f"## Prompt (first query, seed {seeds[0].seed})\n\n```\n{seeds[0].prompt}\n```"
        )
    return Outcome(metrics, rows, sections, images)


@MODES.register("verbalizer", summary="score each label by the LM log-prob of its verbalizer")
def verbalizer_mode(cfg: PromptConfig, out_dir: Path) -> Outcome:
    templates = [load_template(t) for t in cfg.templates]
    verbalizer = resolve_verbalizer(cfg)
    dev, train = read_labelled(cfg, verbalizer.labels)
    seeds = cfg.seeds if cfg.stochastic else cfg.seeds[:1]
    results = [score_ensemble(cfg, templates, verbalizer, dev, train, s) for s in seeds]
    return classification_outcome(cfg, verbalizer.labels, dev, results, out_dir)


@MODES.register("embedding", summary="cosine similarity of text and label descriptions (encoder)")
def embedding_mode(cfg: PromptConfig, out_dir: Path) -> Outcome:
    from lmadapt.prompting.embedding import zero_shot_scores

    raw = cfg.label_descriptions or resolve_verbalizer(cfg).words
    described = Verbalizer.from_config(raw, "label_descriptions")
    dev, _ = read_labelled(cfg, described.labels)
    texts = [ex.text if ex.text_pair is None else f"{ex.text}\n{ex.text_pair}" for ex in dev]
    embedder = load_embedder(cfg.embedder, cfg.device)
    t0 = time.perf_counter()
    sims = zero_shot_scores(embedder, texts, [described.words[n] for n in described.labels])
    seconds = time.perf_counter() - t0
    probs = softmax(sims * 100.0, axis=-1)
    cal = calibrate(probs, domain_prior(probs)) if cfg.calibration == "domain" else None
    scores = SeedScores(cfg.seeds[0], probs, cal, seconds, "")
    return classification_outcome(cfg, described.labels, dev, [scores], out_dir)
