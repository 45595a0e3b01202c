"""`run_prompt`: evaluate a frozen model by prompting, per seed, and write a run directory.

Modes are registered in MODES; each turns a PromptConfig into an Outcome (metrics, prediction
rows, report sections, plots) that `run_prompt` writes the same way: predictions.jsonl,
metrics.json, report.md (+ plots/), like a training run.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import softmax

from lmadapt.data.readers import read_records
from lmadapt.errors import ConfigError, DataError
from lmadapt.evaluate import plots
from lmadapt.evaluate.metrics import single_label_metrics
from lmadapt.evaluate.report import classification_report_markdown
from lmadapt.evaluate.text import exact_match
from lmadapt.inference import GenerationSettings, generate_ids
from lmadapt.io import atomic_dir, write_json, write_text
from lmadapt.prompting.calibration import CONTENT_FREE, calibrate, content_free_prior
from lmadapt.prompting.config import PromptConfig, load_prompt_config
from lmadapt.prompting.demos import SELECTORS, sample_pool
from lmadapt.prompting.scoring import Group, PrefixScorer, without_reuse
from lmadapt.prompting.templates import (
    Renderer,
    TemplateConfig,
    fill,
    load_template,
    template_verbalizer,
)
from lmadapt.prompting.verbalizers import Verbalizer
from lmadapt.registry import Registry
from lmadapt.rundir import check_output_dir, mark
from lmadapt.session import set_threads

MODES: Registry = Registry("prompt mode")


@dataclass
class Outcome:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    sections: list[str]
    images: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------- shared loading


@functools.cache
def load_lm(name: str) -> tuple[torch.nn.Module, Any]:
    """(causal LM, tokenizer), loaded once per process (SmolLM2 from GGUF takes 5-20 s)."""
    from transformers import AutoModelForCausalLM

    from lmadapt.models import load_model, load_tokenizer, resolve_model

    spec = resolve_model(name)
    if spec.kind != "causal":
        raise ConfigError("model", f"{name} is an encoder; this mode needs a causal LM")
    return load_model(spec, AutoModelForCausalLM).eval(), load_tokenizer(spec)


@functools.cache
def load_embedder(name: str) -> Any:
    from lmadapt.prompting.embedding import Embedder

    return Embedder(name)


class CachedEmbed:
    """Embeds texts once per process run (queries are re-embedded by every kNN seed otherwise)."""

    def __init__(self, embedder: Any):
        self.embedder, self.cache = embedder, {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            self.cache.update(zip(todo, self.embedder(todo)))
        return np.stack([self.cache[t] for t in texts])


def fields_of(ex: Any) -> dict[str, Any]:
    return {"text": ex.text, "text_pair": ex.text_pair}


def resolve_verbalizer(cfg: PromptConfig) -> Verbalizer:
    raw = cfg.verbalizer
    if raw is None and isinstance(cfg.template, str):
        raw = template_verbalizer(cfg.template)
    if raw is None:
        raise ConfigError("verbalizer", "is required (the template suggests none)")
    return Verbalizer.from_config(raw)


def read_labelled_file(cfg: PromptConfig, path: str, labels: list[str]) -> list[Any]:
    """Examples through the classification task's reader; every label must have a verbalizer."""
    from lmadapt.tasks.classification import ClassificationConfig, ClassificationTask

    task = ClassificationTask(
        ClassificationConfig(
            text_column=cfg.data.text_column,
            text_pair_column=cfg.data.text_pair_column,
            label_column=cfg.data.label_column,
        )
    )
    rows = task.read(path, cfg.data.format)
    for ex in rows:
        if ex.label not in labels:
            raise DataError(
                ex.file,
                f"label {ex.label!r} has no verbalizer entry (known: {', '.join(labels)})",
                ex.line,
                cfg.data.label_column,
            )
    return rows


def read_labelled(cfg: PromptConfig, labels: list[str]) -> tuple[list[Any], list[Any]]:
    """(dev, train) Examples; train only when demonstrations are drawn from it."""
    dev = read_labelled_file(cfg, cfg.data.dev, labels)[: cfg.data.max_eval_samples]
    train = read_labelled_file(cfg, cfg.data.train, labels) if cfg.data.train and cfg.k else []
    return dev, train


class LabelScorer:
    """Per-example label distributions of a verbalizer prompt config, for other components.

    The distillation teacher uses it: the prompt's first seed picks the demonstrations, and the
    calibrated distribution is returned when the config turns calibration on.
    """

    def __init__(self, cfg: PromptConfig):
        if cfg.mode != "verbalizer":
            raise ConfigError("mode", f"must be 'verbalizer' for label scores, not {cfg.mode!r}")
        self.cfg = cfg
        self.template = load_template(cfg.template)
        self.verbalizer = resolve_verbalizer(cfg)
        self.labels = self.verbalizer.labels
        self.train = (
            read_labelled_file(cfg, cfg.data.train, self.labels) if cfg.data.train and cfg.k else []
        )

    def __call__(self, examples: list[Any]) -> np.ndarray:
        """(N, C) probabilities over `labels`; example labels are not looked at."""
        s = score_seed(
            self.cfg, self.template, self.verbalizer, examples, self.train, self.cfg.seeds[0]
        )
        return s.calibrated if s.calibrated is not None else s.probs


def select_demos(
    cfg: PromptConfig, train: list[Any], dev: list[Any], seed: int
) -> tuple[list[Any], list[list[int]]]:
    """(pool, per-query indices into the pool) for one seed; [[]] when k == 0."""
    if not cfg.k:
        return [], [[]]
    pool = sample_pool(train, cfg.data.demo_pool, seed)
    embed = CachedEmbed(load_embedder(cfg.embedder)) if cfg.selection == "knn" else None
    return pool, SELECTORS.get(cfg.selection).impl(pool, dev, cfg.k, seed, embed)


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def _pm(s: dict[str, float]) -> str:
    return f"{s['mean']:.4f} ± {s['sd']:.4f}"


# ---------------------------------------------------------------------- verbalizer scoring


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
    model, tok = load_lm(cfg.model)
    renderer = Renderer(template, tok)
    conts = verbalizer.tokenize(tok, template.answer)
    pool, selection = select_demos(cfg, train, dev, seed)

    @functools.cache
    def demo(j: int) -> str:
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
            if cfg.calibration:
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
    cal = np.zeros_like(probs) if cfg.calibration else None
    row = 0
    for key in groups:
        own = np.array(owners[key])
        block = scores[row : row + len(own)]
        row += len(own)
        p = softmax(block[own >= 0], axis=-1)
        probs[own[own >= 0]] = p
        if cal is not None:
            cal[own[own >= 0]] = calibrate(p, content_free_prior(block[own < 0]))
    return SeedScores(seed, probs, cal, seconds, first_prompt)


def classification_outcome(
    cfg: PromptConfig, labels: list[str], dev: list[Any], seeds: list[SeedScores], out_dir: Path
) -> Outcome:
    """Metrics per seed and mean ± sd, uncalibrated and calibrated side by side."""
    index = {n: i for i, n in enumerate(labels)}
    gold = np.array([index[ex.label] for ex in dev])
    variants = {"uncalibrated": lambda s: s.probs}
    if cfg.calibration:
        variants["calibrated"] = lambda s: s.calibrated
    per_seed, rows, evals = [], [], {}
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
        name: {m: _stats([e[name][m] for e in per_seed]) for m in per_seed[0][name]}
        for name in variants
    }
    speed = _stats([e["sentences_per_second"] for e in per_seed])
    metrics = {
        "mode": cfg.mode,
        "model": cfg.model,
        "k": cfg.k,
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
        table.append(f"| {m} | " + " | ".join(_pm(summary[n][m]) for n in names) + " |")
    head = (
        f"## Results (mean ± sd over {len(seeds)} seed{'s' * (len(seeds) > 1)})\n\n"
        + "\n".join(table)
        + f"\n\nSpeed: {_pm(speed)} sentences/s"
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
    template = load_template(cfg.template)
    verbalizer = resolve_verbalizer(cfg)
    dev, train = read_labelled(cfg, verbalizer.labels)
    seeds = cfg.seeds if cfg.stochastic else cfg.seeds[:1]
    results = [score_seed(cfg, template, verbalizer, dev, train, s) for s in seeds]
    return classification_outcome(cfg, verbalizer.labels, dev, results, out_dir)


@MODES.register("embedding", summary="cosine similarity of text and label descriptions (encoder)")
def embedding_mode(cfg: PromptConfig, out_dir: Path) -> Outcome:
    from lmadapt.prompting.embedding import zero_shot_scores

    raw = cfg.label_descriptions or resolve_verbalizer(cfg).words
    described = Verbalizer.from_config(raw, "label_descriptions")
    dev, _ = read_labelled(cfg, described.labels)
    texts = [ex.text if ex.text_pair is None else f"{ex.text}\n{ex.text_pair}" for ex in dev]
    embedder = load_embedder(cfg.embedder)
    t0 = time.perf_counter()
    sims = zero_shot_scores(embedder, texts, [described.words[n] for n in described.labels])
    seconds = time.perf_counter() - t0
    scores = SeedScores(cfg.seeds[0], softmax(sims * 100.0, axis=-1), None, seconds, "")
    return classification_outcome(cfg, described.labels, dev, [scores], out_dir)


# ---------------------------------------------------------------------- generation


@dataclass
class _GenExample:
    text: str
    label: str
    fields: dict[str, Any]
    text_pair: None = None


@MODES.register("generate", summary="greedy generation for open tasks (QA, summaries), exact match")
def generate_mode(cfg: PromptConfig, out_dir: Path) -> Outcome:
    template = load_template(cfg.template)
    model, tok = load_lm(cfg.model)
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
    summary = {"exact_match": _stats([e["exact_match"] for e in per_seed])}
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
    section += f"| exact_match | {_pm(summary['exact_match'])} |"
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


# ---------------------------------------------------------------------- entry point


def run_prompt(
    config: PromptConfig | str | Path | dict, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Run a prompting evaluation and write output_dir; returns the metrics.json content."""
    cfg = config if isinstance(config, PromptConfig) else load_prompt_config(config, overrides)
    out = check_output_dir(cfg.output_dir, cfg.overwrite)
    set_threads(cfg.threads)
    with atomic_dir(out) as tmp:
        mark(tmp, "prompt")
        outcome = MODES.get(cfg.mode).impl(cfg, tmp)
        from lmadapt.config import to_dict
        from lmadapt.io import write_yaml

        write_yaml(tmp / "config.yaml", to_dict(cfg))
        write_text(tmp / "predictions.jsonl", "".join(_json(r) + "\n" for r in outcome.rows))
        lines = [
            f"# lmadapt prompt run `{out.name}`",
            "",
            f"- **model**: {cfg.model}",
            f"- **mode**: {cfg.mode}",
            f"- **demonstrations**: k={cfg.k}" + (f", {cfg.selection}" if cfg.k else ""),
            f"- **template**: {cfg.template if isinstance(cfg.template, str) else 'inline'}",
            "",
        ]
        lines += [s + "\n" for s in outcome.sections]
        lines += [f"![{p.stem}]({p.relative_to(tmp).as_posix()})" for p in outcome.images]
        lines += ["", "## Reproduce", "", "```", f"lmadapt prompt {out / 'config.yaml'}", "```", ""]
        write_text(tmp / "report.md", "\n".join(lines))
        metrics = {"output_dir": str(out), **outcome.metrics}
        write_json(tmp / "metrics.json", metrics)
    return metrics


def _json(row: dict[str, Any]) -> str:
    import json

    return json.dumps(row, ensure_ascii=False)
