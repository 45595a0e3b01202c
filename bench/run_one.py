"""One benchmark run in its own process (so peak RSS is its own); prints one JSON line.

python -m bench.run_one --impl lmadapt|hf --method lora|bitfit|full --rows 4000 [...]
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
        "method": {"name": args.method},
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
    m = train(build_run_config(cfg))
    return {
        "samples_per_second": m["samples_per_second"],
        "tokens_per_second": m["tokens_per_second"],
        "train_seconds": m["train_seconds"],
        "dev_accuracy": m["dev"]["accuracy"],
        "trainable_params": m["trainable_params"],
        "bf16": m["bf16"],
        "tokens": round(m["tokens_per_second"] * m["train_seconds"]),
    }


def run_hf(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
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
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        num_train_epochs=args.epochs,
        learning_rate=LR[args.method],
        weight_decay=0.01,
        warmup_steps=0.06,  # a float is a ratio of the total steps in transformers 5
        lr_scheduler_type="linear",
        seed=args.seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if opts.get("group_by_length") else "random",
        bf16=bool(opts.get("bf16")),
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
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-opts", default="{}", help="JSON: extra train.* settings / HF flags")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    result = (run_lmadapt if args.impl == "lmadapt" else run_hf)(args)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result.update(
        impl=args.impl,
        method=args.method,
        rows=args.rows,
        epochs=args.epochs,
        batch_size=args.batch_size,
        train_opts=json.loads(args.train_opts),
    )
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
