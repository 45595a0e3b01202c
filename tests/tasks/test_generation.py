"""Generation task: chat data formats, templates, response masking, packing, decoding, metrics."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from lmadapt.config import ConfigError, build_run_config
from lmadapt.data.chat import Conversation, read_conversations
from lmadapt.errors import DataError
from lmadapt.inference import model_inputs
from lmadapt.models import load_tokenizer, resolve_model
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task

GSM = r"####\s*(-?[\d,.]+)"


def make_task(**cfg):
    return build_task(parse_section(TASKS, "type", {"type": "generation", **cfg}, "task"))


def write_json(path, rows, jsonl=False):
    text = "\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows)
    path.write_text(text, encoding="utf-8")
    return path


def alpaca_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"what is {i} plus {i}?", "input": "", "output": f"two {i} #### {2 * i}"}
        for i in range(n)
    ]


def marked(tok, feature) -> str:
    """The token sequence with response tokens in [brackets], one | between tokens."""
    return "|".join(
        f"[{tok.decode([t])}]" if lab != -100 else tok.decode([t])
        for t, lab in zip(feature["input_ids"], feature["labels"])
    )


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_tokenizer(resolve_model(tiny_llama))


@pytest.fixture(scope="module")
def tok_plain(tiny_llama_no_template):
    return load_tokenizer(resolve_model(tiny_llama_no_template))


# ---------------------------------------------------------------------- data formats


def test_formats_are_detected_by_fields(tmp_path):
    alpaca = write_json(tmp_path / "a.json", [{"instruction": "hi", "input": "x", "output": "yo"}])
    share = write_json(
        tmp_path / "s.jsonl",
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
        jsonl=True,
    )
    msgs = write_json(
        tmp_path / "m.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "sys"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "yo2"},
                ]
            }
        ],
        jsonl=True,
    )
    text = write_json(tmp_path / "t.jsonl", [{"text": "raw text"}], jsonl=True)
    (a,) = read_conversations(alpaca)
    assert a.messages == [
        {"role": "user", "content": "hi\n\nx"},
        {"role": "assistant", "content": "yo"},
    ]
    assert read_conversations(share)[0].messages[1] == {"role": "assistant", "content": "yo"}
    (m,) = read_conversations(msgs)
    assert m.reference == "yo2" and m.prompt_messages[-1]["content"] == "again"
    assert read_conversations(text)[0].text == "raw text"


@pytest.mark.parametrize(
    ("row", "field", "line"),
    [
        ({"instruction": "hi", "input": ""}, "output", 2),
        ({"instruction": 3, "output": "x"}, "instruction", 2),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            "messages[1].role",
            2,
        ),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages[0].role", 2),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
            "messages[1].content",
            2,
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages", 2),
    ],
)
def test_bad_records_name_file_line_field(tmp_path, row, field, line):
    first = next(iter(row))
    good = (
        {"instruction": "ok", "input": "", "output": "fine"}
        if first == "instruction"
        else {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    )
    path = write_json(tmp_path / "bad.jsonl", [good, row], jsonl=True)
    with pytest.raises(DataError) as e:
        read_conversations(path)
    assert e.value.file == str(path) and e.value.line == line and e.value.field == field


def test_unknown_format_names_the_fields(tmp_path):
    path = write_json(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}], jsonl=True)
    with pytest.raises(DataError, match="cannot tell the data format.*question"):
        read_conversations(path)


def test_config_is_checked():
    with pytest.raises(ConfigError, match="task.template"):
        make_task(template="vicuna")
    with pytest.raises(ConfigError, match="task.answer_pattern"):
        make_task(answer_pattern="(")
    with pytest.raises(ConfigError, match="task.top_p"):
        make_task(top_p=0)


# ---------------------------------------------------------------------- templates and masks

CONV = Conversation(
    [
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four"},
    ]
)


def test_chat_template_tokens(tok):
    task = make_task()
    (f,) = task.encode([CONV], tok)
    assert task.template_name == "chat"
    assert marked(tok, f) == (  # the template's newline after the last turn is not trained
        "<|im_start|>|u|se|r|\n|w|hat| is| two| plus| two|?|<|im_end|>|\n|<|im_start|>|as|s|is|t"
        "|an|t|\n|[fo]|[u]|[r]|[<|im_end|>]|\n"
    )


def test_chatml_template_tokens(tok_plain):
    task = make_task(template="chatml")
    (f,) = task.encode([CONV], tok_plain)
    assert marked(tok_plain, f) == (
        "<|im_start|>|u|se|r|\n|w|hat| is| two| plus| two|?|<|im_end|>|\n|<|im_start|>|as|s|is|t"
        "|an|t|\n|[fo]|[u]|[r]|[<|im_end|>]"
    )


def test_alpaca_template_tokens(tok_plain):
    task = make_task()  # auto: no chat template -> alpaca
    (f,) = task.encode([CONV], tok_plain)
    assert task.template_name == "alpaca"
    text = tok_plain.decode(f["input_ids"])
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nwhat is two plus two?\n\n### Response:\n"
        "four<|endoftext|>"
    )
    assert marked(tok_plain, f).endswith("|\n|[fo]|[u]|[r]|[<|endoftext|>]")


def test_plain_template_tokens(tok_plain):
    task = make_task(template="plain")
    (f,) = task.encode([CONV], tok_plain)
    assert marked(tok_plain, f) == ("w|hat| is| two| plus| two|?|\n|[fo]|[u]|[r]|[<|endoftext|>]")


def test_multi_turn_trains_every_answer_and_alpha_weights_the_rest(tok):
    conv = Conversation(
        [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "four"},
        ]
    )
    (f,) = make_task().encode([conv], tok)
    spans = tok.decode([t for t, lab in zip(f["input_ids"], f["labels"]) if lab != -100])
    assert spans == "hello<|im_end|>four<|im_end|>"
    assert f["loss_weights"] == [1.0 if lab != -100 else 0.0 for lab in f["labels"]]
    (g,) = make_task(lm_loss_weight=0.25).encode([conv], tok)
    assert g["labels"] == f["labels"]
    assert g["loss_weights"][0] == 0.0  # the first token is never a target
    assert g["loss_weights"][1:] == [1.0 if lab != -100 else 0.25 for lab in f["labels"][1:]]


def test_text_records_train_every_token(tok):
    (f,) = make_task().encode([Conversation(text="the cat sat")], tok)
    assert tok.decode(f["input_ids"]) == "the cat sat<|endoftext|>"
    assert f["labels"][0] == -100 and all(lab != -100 for lab in f["labels"][1:])


def test_truncation_leaving_no_response_is_an_error(tok):
    long = Conversation(
        [{"role": "user", "content": "two " * 50}, {"role": "assistant", "content": "four"}],
        file="f.json",
        line=7,
    )
    with pytest.raises(DataError, match="max_length") as e:
        make_task(max_length=16).encode([long], tok)
    assert e.value.line == 7


# ---------------------------------------------------------------------- loss and packing


def test_loss_is_weighted_mean_over_shifted_tokens(tiny_llama, tok):
    task = make_task(lm_loss_weight=0.5)
    feats = task.encode([CONV], tok)
    model = task.build_model(resolve_model(tiny_llama))
    batch = task.collator(tok)(feats)
    logits = model(**model_inputs(batch)).logits
    ce = torch.nn.functional.cross_entropy(
        logits[0, :-1], batch["input_ids"][0, 1:], reduction="none"
    )
    w = batch["loss_weights"][0, 1:]
    expected = (ce * w).sum() / w.sum()
    assert torch.allclose(task.loss(logits, batch), expected, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.7, 4.0])
def test_align_weight_is_the_seeds_objective_by_hand(tiny_llama, tok, alpha):
    """L = L_LM + α·L_align: the token mean of every next-token loss in the batch plus α times
    the token mean over response tokens, computed here from log-softmax by hand."""
    convs = [
        CONV,
        Conversation(
            [{"role": "user", "content": "say yes twice"}, {"role": "assistant", "content": "yes"}]
        ),
    ]
    task = make_task(align_weight=alpha)
    feats = task.encode(convs, tok)
    assert all(w == 1.0 for f in feats for w in f["loss_weights"][1:])  # every token trains
    model = task.build_model(resolve_model(tiny_llama))
    batch = task.collator(tok)(feats)
    logp = model(**model_inputs(batch)).logits.double().log_softmax(-1)
    lm, align = [], []
    for row, f in enumerate(feats):
        for t in range(1, len(f["input_ids"])):  # predict token t from position t - 1
            nll = -float(logp[row, t - 1, f["input_ids"][t]])
            lm.append(nll)
            if f["labels"][t] != -100:
                align.append(nll)
    assert 0 < len(align) < len(lm)
    expected = sum(lm) / len(lm) + alpha * sum(align) / len(align)
    assert float(task.loss(logp.float(), batch)) == pytest.approx(expected, rel=1e-5)
    # the same with logits only at the loss positions (the training default)
    kept = model(**model_inputs(batch), **task.forward_kwargs(model, batch)).logits
    assert float(task.loss(kept, batch)) == pytest.approx(expected, rel=1e-4)


def test_align_weight_limits(tiny_llama, tok):
    """α -> ∞ is α times the response-only loss; α = 0 is plain language modelling."""
    feats_resp = make_task().encode([CONV], tok)
    model = make_task().build_model(resolve_model(tiny_llama))
    b = make_task().collator(tok)(feats_resp)
    logits = model(**model_inputs(b)).logits
    response_only = float(make_task().loss(logits, b))
    big = make_task(align_weight=1e6)
    b_big = big.collator(tok)(big.encode([CONV], tok))
    assert float(big.loss(logits, b_big)) / 1e6 == pytest.approx(response_only, rel=1e-4)
    text_only = make_task(lm_loss_weight=1.0)  # every token with weight 1: L_LM
    b_lm = text_only.collator(tok)(text_only.encode([CONV], tok))
    zero = make_task(align_weight=0.0)
    b_zero = zero.collator(tok)(zero.encode([CONV], tok))
    assert float(zero.loss(logits, b_zero)) == pytest.approx(
        float(text_only.loss(logits, b_lm)), rel=1e-6
    )


def test_align_weight_and_lm_loss_weight_exclude_each_other():
    with pytest.raises(ConfigError, match="task.align_weight"):
        make_task(align_weight=1.0, lm_loss_weight=0.5)
    with pytest.raises(ConfigError, match="task.align_weight"):
        make_task(align_weight=-1.0)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_packing_gives_the_same_loss(tiny_llama, tok, alpha):
    convs = [
        Conversation(
            [
                {"role": "user", "content": f"what is {i} plus {i}?"},
                {"role": "assistant", "content": "four " * (i + 1)},
            ]
        )
        for i in range(6)
    ]
    convs.append(Conversation(text="the cat sat on the mat"))
    plain = make_task(lm_loss_weight=alpha)
    packed = make_task(lm_loss_weight=alpha, packing=True, max_length=128)
    feats = plain.encode(convs, tok)
    model = plain.build_model(resolve_model(tiny_llama))
    model.eval()
    a = plain.collator(tok)(feats)
    b = packed.collator(tok)(feats)
    assert b["input_ids"].shape[0] < len(feats)  # several examples share a row
    assert "attention_mask" not in model_inputs(b)
    loss_a = plain.loss(model(**model_inputs(a)).logits, a)
    loss_b = packed.loss(model(**model_inputs(b)).logits, b)
    assert abs(float(loss_a) - float(loss_b)) < 1e-5


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_logits_at_loss_positions_only_give_the_same_loss_and_grads(
    tiny_llama, tok, alpha, packing
):
    convs = [
        Conversation(
            [
                {"role": "user", "content": "a long question " * (3 - i)},
                {"role": "assistant", "content": "yes " * (i + 1)},
            ]
        )
        for i in range(3)
    ]
    task = make_task(lm_loss_weight=alpha, packing=packing, max_length=128)
    feats = task.encode(convs, tok)
    model = task.build_model(resolve_model(tiny_llama))
    batch = task.collator(tok)(feats)
    kwargs = task.forward_kwargs(model, batch)
    n_keep = len(kwargs["logits_to_keep"])
    assert n_keep < batch["input_ids"].shape[1] - 1 or alpha > 0  # prompt positions skipped
    losses, grads = [], []
    for extra in ({}, kwargs):
        model.zero_grad()
        logits = model(**model_inputs(batch), **extra).logits
        loss = task.loss(logits, batch)
        loss.backward()
        losses.append(float(loss))
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert logits.shape[1] == n_keep
    assert abs(losses[0] - losses[1]) < 1e-5
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---------------------------------------------------------------------- decoding and metrics


def test_score_exact_match_format_rate_rouge_bleu():
    task = make_task(answer_pattern=GSM)
    ev = task.score(
        ["so 1,000 #### 1,000", "#### 7", "no idea", "the answer is 5"],
        ["#### 1000", "#### 8", "#### 3", "#### 5"],
    )
    assert ev.metrics["exact_match"] == 0.25
    assert ev.metrics["format_rate"] == 0.5
    # ROUGE-L F1 on lower-cased alphanumeric tokens: only "the answer is 5" vs "5" shares one
    # (P 1/4, R 1, F 0.4); the other three share none -> mean 0.1
    assert ev.metrics["rougeL"] == pytest.approx(0.1)
    # one sentence, equal lengths (no brevity penalty): LCS 5 of 6 tokens; BLEU is the geometric
    # mean of the 1..4-gram precisions 5/6, 3/5, 2/4, 1/3
    cat = make_task().score(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert cat.metrics["rougeL"] == pytest.approx(5 / 6)
    assert cat.metrics["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    same = make_task().score(["A  b"], ["a b"])
    assert same.metrics["exact_match"] == 1.0 and "format_rate" not in same.metrics


def test_label_aware_metrics():
    task = make_task(labels=["positive", "negative"])
    ev = task.score(
        ["It is Positive.", "negative, not positive", "unsure", "positive"],
        ["positive", "negative", "negative", "negative"],
    )
    assert ev.metrics["accuracy"] == 0.5
    assert ev.metrics["no_label_rate"] == 0.25
    assert ev.details["labels"] == ["positive", "negative", "(none)"]
    assert ev.details["confusion_matrix"][1] == [1, 1, 1]
    bad = Conversation(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "meh"}],
        file="d.json",
        line=3,
    )
    with pytest.raises(DataError, match="mentions none of task.labels"):
        task.check([bad])


def test_generate_greedy_sampling_and_stop_strings(tiny_llama, tok):
    task = make_task()
    task.template(tok)
    model = task.build_model(resolve_model(tiny_llama))
    convs = [Conversation([{"role": "user", "content": "hi"}])] * 2 + [
        Conversation([{"role": "user", "content": "a longer prompt here"}])
    ]
    greedy = task.generate(model, convs, task.settings(max_new_tokens=6))
    assert len(greedy) == 3 and greedy[0] == greedy[1]
    again = task.generate(model, convs, task.settings(max_new_tokens=6))
    assert again == greedy
    s1 = task.generate(model, convs[:1], task.settings(max_new_tokens=6, do_sample=True, seed=1))
    s2 = task.generate(model, convs[:1], task.settings(max_new_tokens=6, do_sample=True, seed=1))
    assert s1 == s2  # seeded
    first = greedy[0][:2]
    if first.strip():
        stopped = task.generate(model, convs[:1], task.settings(max_new_tokens=6, stop=[first]))
        assert first not in stopped[0]


# ---------------------------------------------------------------------- end to end


def gen_config(tmp_path, model, **task):
    train = write_json(tmp_path / "train.json", alpaca_rows(12))
    dev = write_json(tmp_path / "dev.jsonl", alpaca_rows(4), jsonl=True)
    return {
        "model": model,
        "task": {"type": "generation", "answer_pattern": GSM, "max_new_tokens": 8, **task},
        "method": {"name": "lora"},
        "data": {"train": str(train), "dev": str(dev), "test": str(dev)},
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "eval_batch_size": 4,
            "precision": "fp32",
            "threads": 1,
            "log_every": 1,
        },
        "output_dir": str(tmp_path / "run"),
    }


def test_train_evaluate_predict_generate_chat(tmp_path, tiny_llama):
    from lmadapt.api import evaluate, load_run, predict, train
    from lmadapt.generate import chat, evaluate_base, generate, generate_file

    cfg = gen_config(tmp_path, tiny_llama, eval_generate_max_samples=3)
    metrics = train(build_run_config(cfg))
    for key in ("loss", "perplexity", "exact_match", "format_rate", "rougeL", "bleu"):
        assert key in metrics["test"]
    assert metrics["test"]["generated"] == 3
    run = tmp_path / "run"
    assert (run / "model" / "adapter_config.json").is_file()
    report = (run / "report.md").read_text()
    assert "Sample generations" in report

    loaded = load_run(run)
    assert loaded.task.template_name == "chat"
    ev, _ = evaluate(run, cfg["data"]["dev"])
    assert math.isclose(ev.metrics["loss"], metrics["test"]["loss"], rel_tol=1e-4)
    rows = predict(run, ["what is 1 plus 1?"])
    assert set(rows[0]) == {"prompt", "output"}

    assert len(generate(str(run), ["hi", "there"], {"max_new_tokens": 3})) == 2
    assert len(generate(tiny_llama, ["hi"], {"max_new_tokens": 3})) == 1  # bare base model
    out = tmp_path / "gen.jsonl"
    assert generate_file(str(run), cfg["data"]["dev"], out, {"max_new_tokens": 3}) == 4
    first = json.loads(out.read_text().splitlines()[0])
    assert {"prompt", "output", "reference", "line"} <= set(first)

    transcript = chat(
        str(run), io.StringIO("hi\nagain\n/exit\nignored\n"), io.StringIO(), {"max_new_tokens": 3}
    )
    assert [m["role"] for m in transcript] == ["user", "assistant", "user", "assistant"]

    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(json.dumps(cfg))
    base = evaluate_base(config_file, ["task.eval_generate_max_samples=2"])
    assert base["test"]["generated"] == 2 and base["peak_rss_mb"] > 0


def test_packed_training_runs_and_tokens_match(tmp_path, tiny_llama):
    from lmadapt.api import train

    cfg = gen_config(
        tmp_path, tiny_llama, packing=True, max_length=256, eval_generate_max_samples=0
    )
    cfg["method"] = {"name": "full"}
    metrics = train(build_run_config(cfg))
    assert math.isfinite(metrics["test"]["loss"]) and "exact_match" not in metrics["test"]


def test_cli_generate_and_chat(tmp_path, tiny_llama, monkeypatch, capsys):
    from lmadapt.cli import main

    assert main(["generate", tiny_llama, "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", tiny_llama, "--max-new-tokens", "2"]) == 0
    assert "chatting with" in capsys.readouterr().out
    assert main(["generate", tiny_llama]) == 2


# ---------------------------------------------------------------------- every method


def causal_methods():
    from lmadapt.methods import METHODS

    return METHODS.names()


@pytest.mark.parametrize("name", causal_methods())
def test_every_method_trains_and_generates(tiny_llama, tok, name):
    from lmadapt.methods import METHODS, build_method
    from lmadapt.methods.base import count_parameters

    task = make_task()
    feats = task.encode(
        [Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])],
        tok,
    )
    method = build_method(parse_section(METHODS, "name", name, "method"))
    if name == "bitfit":  # Llama (and SmolLM2) have no bias terms: refused, nothing to train
        with pytest.raises(ConfigError, match="has none"):
            method.apply(task.build_model(resolve_model(tiny_llama)), task)
        return
    model = method.apply(task.build_model(resolve_model(tiny_llama)), task)
    assert count_parameters(model)[0] > 0
    batch = task.collator(tok)(feats * 2)
    loss = task.loss(model(**model_inputs(batch)).logits, batch)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    prompt = Conversation([{"role": "user", "content": "hi"}])
    (text,) = task.generate(model, [prompt], task.settings(max_new_tokens=3))
    # the wrapped model's own greedy continuation (prompt and prefix tuning's virtual tokens
    # change it from the base model's), one full forward pass per token
    ids = task.prompt_ids(task.encode([prompt], tok)[0], prompt)
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    new: list[int] = []
    model.eval()
    with torch.no_grad():
        while len(new) < 3:
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
    assert text == tok.decode(new, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_lora_end_to_end(tmp_path):
    from lmadapt.api import train

    cfg = gen_config(
        tmp_path, "smollm2-135m-instruct", max_new_tokens=12, eval_generate_max_samples=2
    )
    cfg["train"].update({"max_steps": 2, "threads": None})
    cfg["data"]["max_train_samples"] = 8
    cfg["data"]["max_eval_samples"] = 2
    metrics = train(build_run_config(cfg))
    assert metrics["test"]["generated"] == 2 and math.isfinite(metrics["test"]["loss"])
    from lmadapt.api import load_run

    run = load_run(tmp_path / "run")  # adapter reloads onto the GGUF base
    assert run.task.template_name == "chat"


@pytest.mark.slow
def test_smollm2_full_fine_tuning_saves_and_reloads(tmp_path):
    """The embedded SmolLM2 is read from GGUF; transformers' GGUF marker refused to save the
    whole model, so `method: full` died at its first checkpoint (found by bench.memory_estimate).
    """
    from lmadapt.api import load_run, train

    cfg = gen_config(tmp_path, "smollm2-135m-instruct", max_new_tokens=2, max_length=64)
    cfg["method"] = {"name": "full"}
    cfg["train"].update({"max_steps": 2, "checkpoint_every": 1, "threads": None})
    cfg["data"]["max_train_samples"] = 4
    cfg["data"]["max_eval_samples"] = 2
    metrics = train(build_run_config(cfg))
    assert math.isfinite(metrics["test"]["loss"])
    run = load_run(tmp_path / "run")  # the whole fine-tuned model, from safetensors
    assert not getattr(run.model, "hf_quantizer", None)
