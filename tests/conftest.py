"""Shared fixtures: tiny randomly initialised models built in code, tiny data files.

No network: HF_HUB_OFFLINE is forced; the tokenizer comes from the embedded MiniLM package.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LMADAPT_TENSORBOARD", "1")

POS = ["good", "great", "lovely", "superb", "fine", "wonderful", "nice", "brilliant"]
NEG = ["bad", "awful", "poor", "dull", "terrible", "boring", "weak", "lousy"]
NOUNS = ["film", "movie", "plot", "cast", "story", "script", "ending", "music"]


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A trivially learnable two-class set: the adjective decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        adj = rng.choice(POS if label == "pos" else NEG)
        rows.append((f"the {rng.choice(NOUNS)} was {adj}", label))
    return rows


def write_csv(path: Path, rows: list[tuple], header: tuple = ("text", "label")) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(autouse=True)
def feature_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test's own feature cache (lmadapt.data.cache), never the user's."""
    root = tmp_path_factory.mktemp("lmadapt-cache")
    monkeypatch.setenv("LMADAPT_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from lmadapt.models import resolve_model

    return resolve_model("minilm").path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_dir) -> str:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return str(out)


@pytest.fixture
def sentiment_files(tmp_path) -> dict[str, Path]:
    return {
        "train": write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=1)),
        "dev": write_csv(tmp_path / "dev.csv", sentiment_rows(24, seed=2)),
    }


@pytest.fixture
def run_config(tmp_path, tiny_bert, sentiment_files):
    """A factory for a small classification config dict; override any section."""

    def make(**over):
        cfg = {
            "model": tiny_bert,
            "task": {"type": "classification"},
            "method": {"name": "lora"},
            "data": {"train": str(sentiment_files["train"]), "dev": str(sentiment_files["dev"])},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "eval_every": 4,
                "log_every": 2,
                "precision": "fp32",
                "threads": 1,
            },
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg

    return make


@pytest.fixture(autouse=True)
def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        yield


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_LM_CORPUS = [
    "the cat sat on the mat",
    "what is two plus two? two plus two is four",
    "answer the question. #### 4",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. ### Instruction: ### Response:",
    "system user assistant hello world",
]


def tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer (~300 tokens) trained here on a few sentences: ChatML special
    tokens, eos, pad and (optionally) a chat template. Byte-level, so any text round-trips
    through encode/decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=alphabet
    )
    tok.train_from_iterator(TINY_LM_CORPUS * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny_llama(out: Path, chat_template: str | None = CHATML_TEMPLATE) -> str:
    """A 2-layer, 32-wide Llama with random weights and the tiny byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = tiny_tokenizer(chat_template)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Tiny random Llama + byte-level BPE tokenizer with a ChatML chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_seq2seq(out: Path, arch: str) -> str:
    """A 2+2-layer, 32-wide T5 or BART with random weights and the tiny byte-level tokenizer
    (no chat template: the alpaca template applies), built from a config: no encoder-decoder
    weights can be downloaded here."""
    import torch
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    fast = tiny_tokenizer(chat_template=None)
    ids = {"pad_token_id": fast.pad_token_id, "eos_token_id": fast.eos_token_id}
    torch.manual_seed(0)
    if arch == "t5":  # T5 starts its decoder from the pad token
        cfg = T5Config(
            vocab_size=len(fast), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            decoder_start_token_id=fast.pad_token_id, **ids,
        )  # fmt: skip
        model = T5ForConditionalGeneration(cfg)
    else:  # BART from eos
        cfg = BartConfig(
            vocab_size=len(fast), d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=256, bos_token_id=fast.eos_token_id,
            decoder_start_token_id=fast.eos_token_id, forced_eos_token_id=None, **ids,
        )  # fmt: skip
        model = BartForConditionalGeneration(cfg)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session", params=["t5", "bart"])
def tiny_seq2seq(request, tmp_path_factory) -> str:
    """Tiny random T5 and BART (each test using it runs once per architecture)."""
    return build_tiny_seq2seq(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_llama_no_template(tmp_path_factory) -> str:
    """The same tiny Llama whose tokenizer has no chat template (named templates apply)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-plain"), chat_template=None)


@pytest.fixture(scope="session")
def onnx_runs(tmp_path_factory, tiny_bert) -> dict[str, str]:
    """One tiny run per task (tests/onnx_runs.py), shared by the ONNX export and serving tests."""
    from tests.onnx_runs import build_runs

    return build_runs(tmp_path_factory.mktemp("onnx-runs"), tiny_bert)


@pytest.fixture(scope="session")
def onnx_fp32(onnx_runs, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """Each of `onnx_runs` exported in fp32: (what export_onnx returned, the directory)."""
    from tests.onnx_runs import export_each

    return export_each(onnx_runs, tmp_path_factory.mktemp("onnx-fp32"))
