"""A tiny random Llama (2 layers, hidden 32) with a small byte-level BPE tokenizer built in code.

The GGUF tokenizer of SmolLM2 takes ~20 s to parse, so tests train a 400-token BPE on a toy
corpus instead, and give it SmolLM2's chat template so chat rendering is exercised too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import NEG, NOUNS, POS, sentiment_rows, write_csv

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        f"Review: the {n} was {a}\nSentiment: {s}"
        for n in NOUNS
        for a, s in [(p, "positive") for p in POS] + [(q, "negative") for q in NEG]
    ] + ["Classify the sentiment of the review. N/A [MASK] great terrible"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Directory with a random 2-layer Llama (safetensors) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_lm(tiny_llama):
    """(model, tokenizer) loaded once per session, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def sst_files(tmp_path) -> dict[str, Path]:
    """Sentiment files with SST-2's column names (sentence, label 0/1)."""
    rows = [(t, "1" if y == "pos" else "0") for t, y in sentiment_rows(64, seed=1)]
    dev = [(t, "1" if y == "pos" else "0") for t, y in sentiment_rows(16, seed=2)]
    return {
        "train": write_csv(tmp_path / "train.csv", rows, ("sentence", "label")),
        "dev": write_csv(tmp_path / "dev.csv", dev, ("sentence", "label")),
    }


def prompt_config(tiny_llama, sst_files, tmp_path, **over) -> dict:
    """A small 2-shot verbalizer prompt config over the sst_files fixture; override any key."""
    cfg = {
        "model": tiny_llama,
        "template": "sentiment",
        "k": 2,
        "selection": "balanced",
        "seeds": [0, 1],
        "calibration": True,
        "batch_size": 4,
        "threads": 1,
        "data": {"dev": str(sst_files["dev"]), "train": str(sst_files["train"])},
        "output_dir": str(tmp_path / "out"),
    }
    cfg.update(over)
    return cfg
