"""train.base_dtype int8: the frozen linears of a PEFT method multiply in int8 while it trains
(forward and input gradient), giving the fp32 base's loss and gradients within int8's rounding;
eval mode and the saved artifact are the fp32 model's."""

from __future__ import annotations

import pytest
import torch

from lmadapt.api import prepare, train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.inference import frozen_base_dtype, model_inputs
from lmadapt.memory import model_shape
from lmadapt.methods import build_method
from lmadapt.session import apply_method
from lmadapt.train.int8_base import frozen_in_int8, int8_linears
from tests.tasks.test_generation import gen_config
from tests.train.test_base_dtype import adapted

METHODS = ["lora", "ia3", "bitfit", "adapter", "prompt_tuning"]


def one_step(cfg: dict, int8: bool, train_mode: bool = True) -> tuple[float, torch.Tensor, dict]:
    """Loss and logits of one fp32 step, and the trained parameters' gradients."""
    model, data, batch = adapted(cfg)
    model.train(train_mode)
    restore = frozen_in_int8(model) if int8 else None
    out = model(**model_inputs(batch), **data.task.forward_kwargs(model, batch))
    loss = data.task.loss(out.logits, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if restore:
        restore()
        assert not any("forward" in vars(m) for m in model.modules())
    return loss.item(), out.logits.detach(), grads


def _cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    flat = [torch.cat([g.flatten() for g in d.values()]) for d in (a, b)]
    return torch.nn.functional.cosine_similarity(*flat, dim=0).item()


def _row_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative error of a row of `a` against `b`."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def test_int8_matmul_gives_the_product_and_input_gradient_of_fp32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40).requires_grad_(False)
    x = torch.randn(3, 20, 48, requires_grad=True)
    # tokens' gradients several orders of magnitude apart, as in a real backward pass
    grad = torch.randn(3, 20, 40) * 10.0 ** -torch.randint(0, 7, (3, 20, 1)).float()
    y = linear(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    linear.train()
    restore = frozen_in_int8(linear)
    y8 = linear(x)
    (gx8,) = torch.autograd.grad(y8, x, grad)
    restore()
    assert y8.shape == y.shape and not torch.equal(y8, y)
    assert _row_error(y8, y) < 0.03
    assert _row_error(gx8, gx) < 0.03  # every token's gradient, the smallest too


@pytest.mark.parametrize("method", METHODS)
def test_int8_base_gives_the_loss_and_gradients_of_the_fp32_base(method, run_config):
    cfg = run_config(method={"name": method}, train={"precision": "fp32"})
    loss, logits, grads = one_step(cfg, int8=False)
    loss8, logits8, grads8 = one_step(cfg, int8=True)
    assert not torch.equal(logits8, logits)  # the int8 kernels ran
    assert loss8 == pytest.approx(loss, rel=2e-2)
    assert torch.allclose(logits8, logits, atol=0.05 * logits.abs().max().item())
    assert grads8.keys() == grads.keys()
    assert _cosine(grads8, grads) > 0.99
    # the input gradient flows down through the int8 layers to the lowest trained tensors
    assert all(grads8[n].abs().sum() > 0 for n in grads if grads[n].abs().sum() > 0)


def test_int8_base_on_a_causal_lm(tmp_path, tiny_llama):
    loss, _, grads = one_step(gen_config(tmp_path, tiny_llama), int8=False)
    loss8, _, grads8 = one_step(gen_config(tmp_path, tiny_llama), int8=True)
    assert loss8 == pytest.approx(loss, rel=2e-2)
    assert _cosine(grads8, grads) > 0.99


def test_eval_mode_computes_in_fp32(run_config):
    cfg = run_config(train={"precision": "fp32"})
    _, logits, _ = one_step(cfg, int8=False, train_mode=False)
    _, logits8, _ = one_step(cfg, int8=True, train_mode=False)
    assert torch.equal(logits8, logits)


def test_only_frozen_fp32_linear_weights_go_int8(run_config):
    config = build_run_config(run_config(method={"name": "bitfit"}))
    data = prepare(config)
    model = apply_method(
        data.task.build_model(data.spec), build_method(config.method), data.task, config.train
    )
    chosen = int8_linears(model)
    assert chosen and all(not m.weight.requires_grad for m in chosen)
    assert any(m.bias is not None and m.bias.requires_grad for m in chosen)  # BitFit's biases
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    assert head and not set(map(id, head)) & set(map(id, chosen))


def test_int8_base_with_gradient_checkpointing(run_config):
    cfg = run_config(
        train={
            "max_steps": 2,
            "precision": "fp32",
            "base_dtype": "int8",
            "gradient_checkpointing": True,
        }
    )
    assert train(build_run_config(cfg))["steps"] == 2


@pytest.mark.parametrize(
    ("settings", "quantize"),
    [({"precision": "bf16", "base_dtype": "int8"}, "none"), ({"base_dtype": "int8"}, "nf4")],
)
def test_int8_base_refuses_bf16_autocast_and_a_quantised_base(settings, quantize, run_config):
    with pytest.raises(ConfigError, match="train.base_dtype"):
        build_run_config(run_config(train=settings, quantize=quantize))


def test_int8_base_is_a_cpu_setting():
    with pytest.raises(ConfigError, match="x86 CPU"):
        frozen_base_dtype("int8", False, torch.device("cuda"), "ddp")
    with pytest.raises(ConfigError, match="precision"):  # precision auto resolved to bf16
        frozen_base_dtype("int8", True, torch.device("cpu"), "ddp")
    assert frozen_base_dtype("int8", False, torch.device("cpu"), "ddp") == "int8"


def test_the_estimate_counts_the_packed_int8_copies(run_config):
    config = build_run_config(run_config())
    data = prepare(config)
    method = build_method(config.method)
    fp32 = model_shape(data.spec, data.task, method, False)
    int8 = model_shape(data.spec, data.task, method, False, base_dtype="int8")
    config_model = data.task.build_model(data.spec)
    linears = apply_method(config_model, method, data.task, config.train)
    weights = sum(m.weight.numel() for m in int8_linears(linears))
    assert int8.frozen_bytes - fp32.frozen_bytes == 2 * weights > 0
