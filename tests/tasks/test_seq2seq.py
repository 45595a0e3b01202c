"""Encoder-decoder generation (T5, BART): the prompt on the encoder, the response on the
decoder, through the one decoder (greedy, beams, sampling); trained with peft methods, saved in
peft format, reloaded and merged with the same generations. No such weights can be downloaded
here, so the models are tiny and random, built from a config (tests/conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch

from lmadapt.api import load_run, prepare, train
from lmadapt.config import build_run_config
from lmadapt.data.chat import Conversation
from lmadapt.errors import ConfigError, DataError
from lmadapt.export import export_merged
from lmadapt.generate import generate, load_generator
from lmadapt.hooks import Hook
from lmadapt.inference import model_inputs
from tests.tasks.test_generation import gen_config, write_json

PROMPTS = ["what is 3 plus 3?", "what is 10 plus 10?"]


def _convs(prompts: list[str]) -> list[Conversation]:
    return [Conversation([{"role": "user", "content": p}]) for p in prompts]


def test_the_prompt_goes_to_the_encoder_and_the_response_to_the_decoder(tmp_path, tiny_seq2seq):
    data = prepare(build_run_config(gen_config(tmp_path, tiny_seq2seq)))
    task, tok = data.task, data.tokenizer
    assert task.peft_task_type == "SEQ_2_SEQ_LM"
    f = data.features["train"][2]
    assert tok.decode(f["labels"]) == "two 2 #### 4" + tok.eos_token
    source = tok.decode(f["input_ids"])
    assert "what is 2 plus 2?" in source and "#### 4" not in source
    assert f["input_ids"][-1] == tok.eos_token_id
    # labels longer than some inputs: padded to their own width; the decoder reads them shifted
    batch = task.collator(tok)(data.features["train"][:3])
    labels, dec = batch["labels"], batch["decoder_input_ids"]
    assert labels.shape == dec.shape and (labels[:, 0] != -100).all()
    assert (dec[:, 0] == task.decoder_start).all()
    shifted = labels[:, :-1].masked_fill(labels[:, :-1] == -100, tok.pad_token_id)
    assert torch.equal(dec[:, 1:], shifted)
    assert "labels" not in model_inputs(batch) and "decoder_input_ids" in model_inputs(batch)


def test_the_loss_is_the_decoders_cross_entropy_on_the_response(tmp_path, tiny_seq2seq):
    data = prepare(build_run_config(gen_config(tmp_path, tiny_seq2seq)))
    task = data.task
    model = task.build_model(data.spec)
    batch = task.collator(data.tokenizer)(data.features["train"][:4])
    labels = batch["labels"]
    out = model(**model_inputs(batch), labels=labels)  # transformers' own seq2seq loss
    ours = task.loss(model(**model_inputs(batch)).logits, batch)
    assert float(ours) == pytest.approx(float(out.loss), rel=1e-5)


class Generations(Hook):
    """What the trained model (best checkpoint, in memory) answers when training ends."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def on_train_end(self, trainer) -> None:
        task = trainer.task
        self.texts = task.generate(trainer.model, _convs(PROMPTS), task.settings())


def test_lora_trains_saves_reloads_and_merges_to_the_same_generations(tmp_path, tiny_seq2seq):
    cfg = gen_config(tmp_path, tiny_seq2seq, eval_generate_max_samples=2)
    # 4 epochs: a tiny random model's greedy answers are a lottery; with these settings they are
    # not empty, so the comparisons below compare something
    cfg["train"].update(epochs=4, lr=1e-2)
    seen = Generations()
    metrics = train(build_run_config(cfg), hooks=[seen])
    run = tmp_path / "run"
    assert (run / "model" / "adapter_config.json").is_file()  # peft format
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    dev = [r["dev"]["loss"] for r in log if "dev" in r]
    assert len(dev) == 4 and dev[-1] < dev[0]  # it learns
    assert metrics["test"]["generated"] == 2 and "rougeL" in metrics["test"]
    assert seen.texts and any(seen.texts)
    reloaded = generate(str(run), PROMPTS)
    assert reloaded == seen.texts  # save + reload = the in-memory model
    merged = export_merged(run, tmp_path / "merged")  # checks merged logits = unmerged
    assert merged["max_abs_diff"] <= 1e-4
    # a plain transformers dir (a bare model: the run's decoding budget given explicitly)
    assert generate(str(tmp_path / "merged"), PROMPTS, {"max_new_tokens": 8}) == seen.texts
    assert load_run(run).task.seq2seq


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning", "prefix_tuning"])
def test_peft_methods_train_and_reload(tmp_path, tiny_seq2seq, method):
    cfg = gen_config(tmp_path, tiny_seq2seq, eval_generate_max_samples=1)
    cfg["method"] = {"name": method}
    seen = Generations()
    metrics = train(build_run_config(cfg), hooks=[seen])
    assert metrics["steps"] == 3 and metrics["test"]["generated"] == 1
    assert generate(str(tmp_path / "run"), PROMPTS) == seen.texts


def test_beam_search_and_sampling_go_through_the_one_decoder(tiny_seq2seq):
    gen = load_generator(tiny_seq2seq, device="cpu")
    greedy = gen.generate(_convs(PROMPTS), gen.task.settings(max_new_tokens=6))
    one_beam = gen.generate(_convs(PROMPTS), gen.task.settings(max_new_tokens=6, num_beams=1))
    beams = gen.generate(_convs(PROMPTS), gen.task.settings(max_new_tokens=6, num_beams=3))
    assert one_beam == greedy and len(beams) == 2
    sampled = [
        gen.generate(_convs(PROMPTS), gen.task.settings(max_new_tokens=6, do_sample=True, seed=s))
        for s in (1, 1)
    ]
    assert sampled[0] == sampled[1]  # seeded


def test_what_only_a_causal_lm_can_do_is_refused(tmp_path, tiny_seq2seq):
    for task in ({"packing": True}, {"lm_loss_weight": 0.5}, {"align_weight": 1.0}):
        with pytest.raises(ConfigError, match=f"task.{next(iter(task))}.*encoder-decoder"):
            prepare(build_run_config(gen_config(tmp_path, tiny_seq2seq, **task)))
    text = write_json(tmp_path / "text.jsonl", [{"text": "the cat sat"}] * 3, jsonl=True)
    cfg = gen_config(tmp_path, tiny_seq2seq)
    cfg["data"] = {"train": str(text)}
    with pytest.raises(DataError, match="raw text"):
        prepare(build_run_config(cfg))
