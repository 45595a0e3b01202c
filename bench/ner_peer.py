"""The peer for bench/ner_side_by_side.py: HF Trainer token classification at its usual settings.

    python -m bench.ner_peer TRAIN DEV EPOCHS LR BATCH OUT [SEED]

MiniLM with AutoModelForTokenClassification, the first subword of each word labelled (the others
-100), truncation at 128 subwords, linear decay, no warmup, no weight decay, fp32, dev entity F1
by seqeval after each epoch (word-level: each word's first-subword prediction). Prints one JSON
line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from seqeval.metrics import f1_score
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    Trainer,
    TrainingArguments,
)

from lmadapt.models import resolve_model


def read_conll(path: str) -> list[tuple[list[str], list[str]]]:
    sents, words, tags = [], [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("-DOCSTART-"):
            if words:
                sents.append((words, tags))
            words, tags = [], []
            continue
        cols = line.split()
        words.append(cols[0])
        tags.append(cols[-1])
    if words:
        sents.append((words, tags))
    return sents


def main() -> None:
    train_path, dev_path, epochs, lr, batch, out = sys.argv[1:7]
    seed = int(sys.argv[7]) if len(sys.argv) > 7 else 42
    torch.manual_seed(seed)
    train, dev = read_conll(train_path), read_conll(dev_path)
    labels = sorted({t for _, tags in train for t in tags})
    index = {t: i for i, t in enumerate(labels)}
    path = resolve_model("minilm").path
    tok = AutoTokenizer.from_pretrained(path)

    def encode(sents):
        enc = tok([w for w, _ in sents], is_split_into_words=True, truncation=True, max_length=128)
        feats = []
        for i, (_, tags) in enumerate(sents):
            ids, prev, lab = enc.word_ids(i), None, []
            for w in ids:
                lab.append(-100 if w is None or w == prev else index.get(tags[w], index["O"]))
                prev = w
            feats.append({"input_ids": enc["input_ids"][i], "labels": lab})
        return feats

    model = AutoModelForTokenClassification.from_pretrained(
        path, num_labels=len(labels), use_safetensors=True
    )
    f1s: list[float] = []

    def metrics(p):
        pred = np.argmax(p.predictions, axis=-1)
        gold_seqs, pred_seqs = [], []
        for ps, ls in zip(pred, p.label_ids):
            keep = ls != -100
            gold_seqs.append([labels[x] for x in ls[keep]])
            pred_seqs.append([labels[x] for x in ps[keep]])
        f1 = f1_score(gold_seqs, pred_seqs)
        f1s.append(float(f1))
        return {"f1": f1}

    args = TrainingArguments(
        output_dir=out,
        learning_rate=float(lr),
        per_device_train_batch_size=int(batch),
        per_device_eval_batch_size=128,
        num_train_epochs=int(epochs),
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encode(train),
        eval_dataset=encode(dev),
        data_collator=DataCollatorForTokenClassification(tok),
        compute_metrics=metrics,
    )
    trainer.train()
    print(json.dumps({"dev_f1_by_epoch": f1s}))


if __name__ == "__main__":
    main()
