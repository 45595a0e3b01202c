"""One benchmark run in its own process (so peak RSS is its own); prints one JSON line.

python -m bench.run_one --impl lmadapt|hf --method lora|bitfit|full --rows 4000 [...]
python -m bench.run_one --impl lmadapt|hf --task instruct --method lora --rows 128 [...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LR = {"lora": 5e-4, "bitfit": 1e-3, "full": 5e-5}
# instruction tuning: SmolLM2 LoRA as in configs/gsm8k_lora.yaml, GSM8K train rows, dev = the
# first INSTRUCT_DEV test problems scored by response loss (no generation: speed is the point)
INSTRUCT_LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
INSTRUCT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def instruct_lora_config() -> object:
    """peft's LoraConfig of the instruct LoRA above, as the peers train it."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=INSTRUCT_LORA["r"],
        lora_alpha=INSTRUCT_LORA["alpha"],
        lora_dropout=INSTRUCT_LORA["dropout"],
        target_modules=INSTRUCT_TARGETS,
    )


INSTRUCT_DEV = 64


def read_tsv(path: Path, limit: int | None) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts.append(row["sentence"].strip())
            labels.append(int(row["label"]))
            if limit and len(texts) >= limit:
                break
    return texts, labels


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def lmadapt_result(m: dict, metric: str) -> dict:
    """The bench's fields from lmadapt's metrics.json."""
    return {
        "samples_per_second": m["samples_per_second"],
        "tokens_per_second": m["tokens_per_second"],
        "train_seconds": m["train_seconds"],
        f"dev_{metric}": m["dev"][metric],
        "trainable_params": m["trainable_params"],
        "bf16": m["bf16"],
        "tokens": round(m["tokens_per_second"] * m["train_seconds"]),
    }


def run_lmadapt(args: argparse.Namespace) -> dict:
    from lmadapt.api import train
    from lmadapt.config import build_run_config

    out = tempfile.mkdtemp(prefix="bench-lmadapt-")
    opts = json.loads(args.train_opts)
    attention = opts.pop("attention", "auto")
    cfg = {
        "attention": attention,
        "model": "minilm",
        "task": {"type": "classification", "text_column": "sentence"},
        "method": {"name": args.method, **json.loads(args.method_opts)},
        "data": {
            "train": str(SHARED / "sst2/train.tsv"),
            "dev": str(SHARED / "sst2/dev.tsv"),
            "max_train_samples": args.rows,
        },
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": LR[args.method],
            "seed": args.seed,
            "log_every": 50,
            **opts,
        },
        "output_dir": f"{out}/run",
    }
    return lmadapt_result(train(build_run_config(cfg)), "accuracy")


def hf_args(args: argparse.Namespace, opts: dict, lr: float, warmup: float, **extra):
    """The peer's TrainingArguments: lmadapt's schedule (linear, warmup ratio, decay 0.01),
    no checkpoints or evaluation inside the timed loop."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=lr,
        weight_decay=0.01,
        warmup_steps=warmup,  # a float is a ratio of the total steps in transformers 5
        lr_scheduler_type="linear",
        seed=args.seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if opts.get("group_by_length") else "random",
        bf16=bool(opts.get("bf16")),
        **extra,
    )


def instruct_config(rows: int, opts: dict) -> dict:
    """lmadapt's run config for the instruction scenario (its encoding feeds the peer too)."""
    lora_dropout = opts.pop("lora_dropout", INSTRUCT_LORA["dropout"])
    return {
        "model": "smollm2-135m-instruct",
        "task": {
            "type": "generation",
            "max_length": 512,
            "packing": opts.pop("packing", False),
            "loss_positions_only": opts.pop("loss_positions_only", True),
            "eval_generate_max_samples": 0,
        },
        "method": {
            "name": "lora",
            **INSTRUCT_LORA,
            "dropout": lora_dropout,
            "target_modules": INSTRUCT_TARGETS,
        },
        "data": {
            "train": str(SHARED / "instruct/gsm8k_train.json"),
            "dev": str(SHARED / "instruct/gsm8k_test.json"),
            "max_train_samples": rows,
            "max_eval_samples": INSTRUCT_DEV,
        },
        "train": {"lr": 5e-4, "warmup_ratio": 0.05, **opts},
    }


def hf_features(features: list[dict]) -> list[dict]:
    """lmadapt's generation features as the peer's Trainer takes them: the same token ids and
    response labels, every token attended."""
    return [
        {
            "input_ids": f["input_ids"],
            "attention_mask": [1] * len(f["input_ids"]),
            "labels": f["labels"],
        }
        for f in features
    ]


def run_lmadapt_instruct(args: argparse.Namespace) -> dict:
    from lmadapt.api import train
    from lmadapt.config import build_run_config

    cfg = instruct_config(args.rows, json.loads(args.train_opts))
    cfg["train"].update(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    cfg["output_dir"] = tempfile.mkdtemp(prefix="bench-lmadapt-") + "/run"
    return lmadapt_result(train(build_run_config(cfg)), "loss")


def run_hf_instruct(args: argparse.Namespace) -> dict:
    """HF Trainer + peft on exactly lmadapt's token ids and response masks, padding collator."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer

    from lmadapt.api import prepare
    from lmadapt.config import build_run_config

    opts = json.loads(args.train_opts)
    cfg = instruct_config(args.rows, {})
    cfg["output_dir"] = tempfile.mkdtemp(prefix="bench-hf-") + "/unused"
    prep = prepare(build_run_config(cfg))
    tok = prep.tokenizer
    train_ds, dev_ds = hf_features(prep.features["train"]), hf_features(prep.features["dev"])
    torch.manual_seed(args.seed)
    model = prep.task.build_model(prep.spec)
    # transformers de-quantizes GGUF to fp32 on load but keeps the "quantized" flag, and
    # Trainer refuses to train such a model; the weights are plain fp32, so drop the flag
    model.is_quantized, model.hf_quantizer = False, None
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=INSTRUCT_LORA["r"],
            lora_alpha=INSTRUCT_LORA["alpha"],
            lora_dropout=INSTRUCT_LORA["dropout"],
            target_modules=INSTRUCT_TARGETS,
        ),
    )
    targs = hf_args(args, opts, 5e-4, 0.05, logging_steps=10)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100),
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    # dev: token-weighted response cross-entropy, fp32, one example at a time (no padding)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for f in dev_ds:
            ids = torch.tensor([f["input_ids"]])
            labels = torch.tensor(f["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1].float()
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = sum(len(x["input_ids"]) for x in train_ds) * args.epochs
    return {
        "samples_per_second": round(len(train_ds) * args.epochs / seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "train_seconds": round(seconds, 2),
        "dev_loss": total / count,
        "trainable_params": trainable,
        "bf16": bool(opts.get("bf16")),
        "tokens": tokens,
    }


def run_hf(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )

    from lmadapt.models import resolve_model

    path = resolve_model("minilm").path
    tok = AutoTokenizer.from_pretrained(path)
    tr_x, tr_y = read_tsv(SHARED / "sst2/train.tsv", args.rows)
    dv_x, dv_y = read_tsv(SHARED / "sst2/dev.tsv", None)

    def encode(xs, ys):
        enc = tok(xs, truncation=True, max_length=128)
        return [
            {"input_ids": i, "token_type_ids": t, "attention_mask": a, "labels": y}
            for i, t, a, y in zip(
                enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], ys
            )
        ]

    train_ds, dev_ds = encode(tr_x, tr_y), encode(dv_x, dv_y)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1)
        )
    elif args.method == "bitfit":
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("bias") or n.startswith(("classifier", "bert.pooler")))
    opts = json.loads(args.train_opts)
    targs = hf_args(
        args, opts, LR[args.method], 0.06, logging_steps=50, per_device_eval_batch_size=128
    )

    def metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        data_collator=DataCollatorWithPadding(tok),
        compute_metrics=metrics,
    )
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    ev = trainer.evaluate()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = sum(len(x["input_ids"]) for x in train_ds) * args.epochs
    return {
        "samples_per_second": round(len(train_ds) * args.epochs / seconds, 2),
        "hf_reported_samples_per_second": out.metrics["train_samples_per_second"],
        "tokens_per_second": round(tokens / seconds, 1),
        "train_seconds": round(seconds, 2),
        "dev_accuracy": ev["eval_accuracy"],
        "trainable_params": trainable,
        "bf16": bool(opts.get("bf16")),
        "tokens": tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["lmadapt", "hf"], required=True)
    p.add_argument("--method", choices=list(LR), required=True)
    p.add_argument("--task", choices=["sst2", "instruct"], default="sst2")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="default 32, instruct 8")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-opts", default="{}", help="JSON: extra train.* settings / HF flags")
    p.add_argument("--method-opts", default="{}", help="JSON: method.* settings (lmadapt)")
    p.add_argument("--breakdown", action="store_true", help="time each phase (step_breakdown)")
    args = p.parse_args()
    args.batch_size = args.batch_size or (8 if args.task == "instruct" else 32)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    runners = {
        ("sst2", "lmadapt"): run_lmadapt,
        ("sst2", "hf"): run_hf,
        ("instruct", "lmadapt"): run_lmadapt_instruct,
        ("instruct", "hf"): run_hf_instruct,
    }
    timers = None
    if args.breakdown:
        from bench.step_breakdown import Timers

        timers = Timers()
        timers.install()
    result = runners[args.task, args.impl](args)
    if timers is not None:
        result["step_ms"] = timers.per_step_ms(result["train_seconds"])
        result["optimizer_steps"] = timers.steps
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result.update(
        impl=args.impl,
        method=args.method,
        task=args.task,
        rows=args.rows,
        epochs=args.epochs,
        batch_size=args.batch_size,
        train_opts=json.loads(args.train_opts),
    )
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
