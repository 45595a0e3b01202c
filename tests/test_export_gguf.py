"""`lmadapt export RUN --format gguf`: one GGUF file (llama.cpp, Ollama) that transformers reads
back as the adapted model, an Ollama Modelfile, and refusals that write nothing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmadapt import export_gguf as eg
from lmadapt.config import build_run_config
from lmadapt.data.templates import build_template
from lmadapt.decoding import GenerationSettings
from lmadapt.errors import ConfigError, LmadaptError
from tests.conftest import CHATML_TEMPLATE, tiny_tokenizer
from tests.tasks.test_generation import gen_config

SMOL_TEMPLATE = (  # SmolLM2-Instruct's: ChatML with a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_GO = (
    "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}'
)


def _train(root: Path, model: str, method: str, steps: int = 2) -> str:
    from lmadapt.api import train

    root.mkdir(parents=True, exist_ok=True)
    cfg = gen_config(root, model, eval_generate_max_samples=0)
    cfg["method"] = {"name": method}
    cfg["train"].update({"max_steps": steps, "lr": 1e-2})
    return train(build_run_config(cfg))["run_dir"]


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    """A LoRA generation run on the tiny Llama (2 steps) and its GGUF export."""
    root = tmp_path_factory.mktemp("gguf")
    with pytest.MonkeyPatch.context() as mp:  # the per-test cache fixture is not set up yet
        mp.setenv("LMADAPT_CACHE", str(root / "cache"))
        mp.setenv("LMADAPT_TENSORBOARD", "0")
        run_dir = _train(root / "lora", tiny_llama, "lora")
        result = eg.export_gguf(run_dir, root / "out", device="cpu")
    return run_dir, root / "out", result


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


# ---------------------------------------------------------------------- the export


def test_export_writes_the_file_a_modelfile_and_its_checks(exported):
    run_dir, out, result = exported
    assert {p.name for p in out.iterdir()} == {
        ".lmadapt-run", "model.gguf", "Modelfile", "lmadapt_export.json"
    }  # fmt: skip
    assert json.loads((out / "lmadapt_export.json").read_text()) == {
        k: v for k, v in result.items() if k != "out_dir"
    }
    assert result["method"] == "lora" and result["file_type"] == "F32"
    assert result["max_abs_diff"] <= eg.TOLERANCE and result["max_abs_diff_merged"] <= 1e-4
    assert result["greedy"] | {"samples": None} == {
        "prompts": 5, "new_tokens": 20, "matched": 5, "samples": None
    }  # fmt: skip
    assert result["tied_embeddings"] is False  # LlamaConfig's default: a separate LM head
    assert result["tokenizer"]["pre"] == "gpt-2" and result["tokenizer"]["add_bos"] is False
    assert result["tokenizer"]["prompts_tokenized_as_lmadapt"] == 5
    assert result["chat_template"]["ollama_converted"] is True


def test_the_file_reads_back_as_the_adapted_model(exported):
    """Independently of the export's own check: transformers' GGUF loader gives the unmerged
    LoRA model's greedy tokens and logits, and the same token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmadapt.api import load_run

    run_dir, out, _ = exported
    run = load_run(run_dir, "cpu")
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf").eval()
    tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert tok.chat_template == CHATML_TEMPLATE
    for prompt in ["hi", "what is 2 plus 2?", "the cat sat on the mat"]:
        text = run.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = run.tokenizer(text)["input_ids"]
        assert tok(text)["input_ids"] == ids
        assert eg.greedy(model, ids) == eg.greedy(run.model, ids)
        with torch.no_grad():
            torch.testing.assert_close(
                model(input_ids=torch.tensor([ids])).logits,
                run.model(input_ids=torch.tensor([ids])).logits,
                atol=1e-4,
                rtol=0,
            )


def test_metadata_and_tensors_follow_llama_cpp(exported):
    """llama.cpp's keys, tensor names and q/k row order (its converter's permutation of the
    merged weights), F32 tensors; the tied-embedding convention on a tied model."""
    import gguf

    from lmadapt.api import load_run

    run_dir, out, _ = exported
    reader = gguf.GGUFReader(out / "model.gguf")

    def field(key):
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama" and field("general.file_type") == 0
    assert [field(f"llama.{k}") for k in ("block_count", "embedding_length")] == [2, 32]
    assert field("llama.attention.head_count_kv") == 2 and field("llama.context_length") == 512
    assert math.isclose(field("llama.rope.freq_base"), 10000.0)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens")[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert field("tokenizer.ggml.token_type")[:5] == [3, 3, 3, 3, 1]  # specials are CONTROL
    assert field("tokenizer.ggml.eot_token_id") == 2  # <|im_end|> ends a turn
    assert field("tokenizer.chat_template") == CHATML_TEMPLATE
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 9 + 3 and "output.weight" in tensors
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    merged = load_run(run_dir, "cpu").model.merge_and_unload()
    attn = merged.model.layers[1].self_attn
    for name, weight in (("attn_q", attn.q_proj.weight), ("attn_k", attn.k_proj.weight)):
        stored = torch.from_numpy(np.array(tensors[f"blk.1.{name}.weight"].data))
        assert torch.equal(stored, eg.permute_qk(weight.detach(), 2, 2))
        assert not torch.equal(stored, weight.detach())


@pytest.mark.parametrize(("n_head", "n_kv"), [(4, 4), (4, 2)])
def test_permutation_is_the_one_transformers_undoes(n_head, n_kv):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor()._reverse_permute_weights
    q, k = torch.randn(n_head * 8, 16), torch.randn(n_kv * 8, 16)
    assert np.array_equal(undo(eg.permute_qk(q, n_head, n_head).numpy(), n_head, n_head), q)
    assert np.array_equal(undo(eg.permute_qk(k, n_head, n_kv).numpy(), n_head, n_kv), k)


def test_modelfile_has_the_template_and_stops(exported):
    _, out, result = exported
    text = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text
    assert f'TEMPLATE """{CHATML_GO}"""\n' in text
    assert "SYSTEM" not in text  # this template has no default system prompt
    assert 'PARAMETER stop "<|im_end|>"\n' in text and 'PARAMETER stop "<|im_start|>"\n' in text
    assert "PARAMETER temperature 0\n" in text  # the run decodes greedily
    assert result["chat_template"]["stops"] == ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]


def test_a_full_fine_tuning_run_of_a_tied_gqa_llama_exports_as_it_is(tmp_path):
    """Whole-model weights as they are; tied embeddings written as llama.cpp writes them (no
    output.weight) and grouped-query attention's k rows permuted by its own head count."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, rope_theta=50000.0, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    run_dir = _train(tmp_path / "full", str(tmp_path / "tied"), "full")
    result = eg.export_gguf(run_dir, tmp_path / "out")
    assert result["method"] == "full" and result["max_abs_diff_merged"] == 0.0
    assert result["greedy"]["matched"] == 5 and result["max_abs_diff"] <= eg.TOLERANCE
    assert result["tied_embeddings"] is True
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    assert "output.weight" not in {t.name for t in reader.tensors}
    assert reader.get_field("llama.attention.head_count_kv").contents() == 2
    assert math.isclose(reader.get_field("llama.rope.freq_base").contents(), 50000.0)


# ---------------------------------------------------------------------- refusals


def test_methods_that_cannot_merge_are_refused(tmp_path, tiny_llama):
    run_dir = _train(tmp_path / "pt", tiny_llama, "prompt_tuning")
    out = tmp_path / "out"
    with pytest.raises(LmadaptError, match="method 'prompt_tuning' cannot be merged") as e:
        eg.export_gguf(run_dir, out)
    assert e.value.exit_code == 2
    _nothing_written(out)


def test_unmapped_architectures_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    run_dir = _train(tmp_path / "run", str(tmp_path / "gpt2"), "full")
    out = tmp_path / "out"
    with pytest.raises(LmadaptError, match="this run's model is 'gpt2'") as e:
        eg.export_gguf(run_dir, out)
    assert e.value.exit_code == 2
    _nothing_written(out)


def test_logits_beyond_the_tolerance_write_nothing(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(eg, "TOLERANCE", -1.0)
    out = tmp_path / "out"
    with pytest.raises(LmadaptError, match="GGUF file's logits .* differ"):
        eg.export_gguf(exported[0], out)
    _nothing_written(out)


def test_an_existing_output_dir_is_replaced_only_when_asked_and_ours(exported, tmp_path):
    run_dir, first, _ = exported
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite") as e:
        eg.export_gguf(run_dir, mine)
    assert e.value.exit_code == 2
    with pytest.raises(ConfigError, match="not created by lmadapt"):
        eg.export_gguf(run_dir, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    again = tmp_path / "again"
    shutil.copytree(first, again)  # an earlier export: marked as lmadapt's
    assert eg.export_gguf(run_dir, again, overwrite=True)["greedy"]["matched"] == 5
    assert (again / "model.gguf").read_bytes() == (first / "model.gguf").read_bytes()


def test_the_cli_exports_gguf(exported, tmp_path, capsys):
    from lmadapt import cli

    out = tmp_path / "cli"
    assert cli.main(["export", exported[0], "--format", "gguf", "--out", str(out)]) == 0
    assert (out / "model.gguf").is_file() and str(out) in capsys.readouterr().out
    assert cli.main(["export", exported[0], "--format", "gguf", "--out", str(out)]) == 2


# ---------------------------------------------------------------------- templates


def test_chatml_with_a_default_system_prompt_converts():
    tok = tiny_tokenizer(SMOL_TEMPLATE)
    chat = eg.convert_template(build_template("chat", tok), tok)
    assert chat.turns is not None and chat.jinja == SMOL_TEMPLATE
    assert chat.turns.default_system == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    assert chat.turns.go_template() == CHATML_GO
    text = eg.modelfile(chat, ["<|im_end|>"], GenerationSettings(), "test")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text


def test_lmadapt_markup_templates_convert_both_ways():
    """alpaca (a tokenizer without a chat template): per-role Go branches, and a Jinja template
    for the GGUF file that renders as lmadapt does."""
    tok = tiny_tokenizer(chat_template=None)
    template = build_template("alpaca", tok)
    chat = eg.convert_template(template, tok)
    assert chat.turns is not None and chat.jinja is not None
    go = chat.turns.go_template()
    assert '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n' in go
    assert chat.turns.stops() == ["<|endoftext|>", "### Instruction:"]
    assert chat.turns.default_system.startswith("Below is an instruction")
    conv = eg.CONVERSATIONS[2]
    rendered = tok.apply_chat_template(
        conv, chat_template=chat.jinja, tokenize=False, add_generation_prompt=True
    )
    assert rendered == chat.turns.render(conv) == eg._render(template, conv)


def test_lmadapt_chatml_markup_converts_to_the_any_role_form():
    tok = tiny_tokenizer(chat_template=None)
    chat = eg.convert_template(build_template("chatml", tok), tok)
    assert chat.turns is not None and chat.turns.go_template() == CHATML_GO
    assert chat.jinja is not None and chat.turns.default_system is None


def test_templates_that_cannot_convert_faithfully_say_so():
    trim = CHATML_TEMPLATE.replace("m['content']", "m['content'] | trim")
    tok = tiny_tokenizer(trim)
    chat = eg.convert_template(build_template("chat", tok), tok)
    assert chat.turns is None and chat.jinja == trim  # the file keeps the tokenizer's own
    assert "could not be converted to Ollama's template language faithfully" in chat.note
    text = eg.modelfile(chat, ["<|endoftext|>"], GenerationSettings(), "test")
    assert "TEMPLATE" not in text and "# Chat template: the run's 'chat' template could" in text


# ---------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_lora_run_exports_to_gguf(tmp_path):
    """SmolLM2-135M-Instruct (llama, tied embeddings, GGUF base), LoRA 2 steps: 5 prompts x 20
    greedy tokens from the file read back equal the merged model's."""
    from lmadapt.api import train

    cfg = gen_config(tmp_path, "smollm2-135m-instruct", eval_generate_max_samples=0)
    cfg["train"].update({"max_steps": 2, "threads": None})
    cfg["data"].update({"max_train_samples": 8, "max_eval_samples": 2})
    run_dir = train(build_run_config(cfg))["run_dir"]
    result = eg.export_gguf(run_dir, tmp_path / "gguf")
    assert result["greedy"]["matched"] == 5 and result["greedy"]["new_tokens"] == 20
    assert result["max_abs_diff"] <= eg.TOLERANCE and result["tied_embeddings"] is True
    assert result["tokenizer"]["pre"] == "smollm"
    chat = result["chat_template"]
    assert chat["ollama_converted"] and chat["default_system"].startswith("You are a helpful")
    text = (tmp_path / "gguf" / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" in text
