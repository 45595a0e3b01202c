"""Bottleneck adapters: Houlsby et al. (2019, arXiv:1902.00751), after the attention output and
after the feed-forward block, and Pfeiffer et al. (2021, arXiv:2005.00247), after the feed-forward
block only. Each adapter is h + up(f(down(h))), inserted before the residual add and LayerNorm.

Hand-written because peft has no bottleneck adapters and the `adapters` library (1.3.0) pins
transformers ~=4.57, while lmadapt runs on transformers 5. The adapters are attached as child
modules of the projection they follow, and a forward hook passes that projection's output through
them, so the model's own code and weight names are untouched.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods.base import NoHooks, unfreeze_modules
from lmadapt.methods.configs import AdapterConfig
from lmadapt.models import ModelSpec
from lmadapt.schema import from_dict

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

_BERT = (r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$")
_LLAMA = (r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$")
SITES: dict[str, tuple[str, str]] = {
    # model_type -> (attention output projection, feed-forward output projection), as regexes on
    # module names; both are the last Linear before the residual add.
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert"), _BERT),
    "distilbert": (r"\.attention\.out_lin$", r"\.ffn\.lin2$"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), _LLAMA),
}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class Bottleneck(nn.Module):
    """h -> h + up(f(down(h))): 2·d·b + b + d parameters for width d and bottleneck b."""

    def __init__(self, d: int, bottleneck: int, act: str, residual: bool, init_std: float):
        super().__init__()
        self.down = nn.Linear(d, bottleneck)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(bottleneck, d)
        self.residual = residual
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.up(self.act(self.down(h)))
        return h + z if self.residual else z


def _run_adapter(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return cast(Bottleneck, module.adapter)(output)  # inject() attached it


def adapter_sites(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Names of the Linear modules that get an adapter after them."""
    model_type = getattr(model.config, "model_type", "")
    default = SITES.get(model_type)
    attn = cfg.attn_modules or (default and default[0])
    ffn = cfg.ffn_modules or (default and default[1])
    no_default = (
        f"no default adapter placement for model type '{model_type}' "
        f"(known: {', '.join(sorted(SITES))}); give the module-name regex"
    )
    if not ffn:
        raise ConfigError("method.ffn_modules", no_default)
    patterns = [re.compile(ffn)]
    if cfg.variant == "houlsby":
        if not attn:
            raise ConfigError("method.attn_modules", no_default)
        patterns.append(re.compile(attn))
    sites = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(p.search(n) for p in patterns)
    ]
    if not sites:
        raise ConfigError("method.ffn_modules", f"no Linear module of {model_type} matches")
    return sites


def inject(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Freeze `model`, attach a bottleneck adapter after each site; returns the site names."""
    model.requires_grad_(False)
    sites = adapter_sites(model, cfg)
    for name in sites:
        linear = cast(nn.Linear, model.get_submodule(name))  # adapter_sites keeps Linears only
        d = linear.out_features
        adapter = Bottleneck(
            d, max(1, d // cfg.reduction_factor), cfg.non_linearity, cfg.residual, cfg.init_std
        ).to(linear.weight.device, linear.weight.dtype)
        linear.add_module("adapter", adapter)
        linear.register_forward_hook(_run_adapter)
    return sites


class Adapter(NoHooks):
    """Bottleneck adapters (Houlsby / Pfeiffer) after attention and FFN; the head trains."""

    mergeable = False  # the adapter is non-linear, so it cannot be folded into the weights
    quantized_base = False
    saves_whole_model = False
    base_dropout: float | None = 0.0  # the base is frozen (see Method.base_dropout)

    def __init__(self, cfg: AdapterConfig):
        self.cfg = cfg

    def apply(self, model: nn.Module, task: Task) -> nn.Module:
        inject(model, self.cfg)
        unfreeze_modules(model, task.head_modules(model))
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Adapter weights and the task head (everything trainable), plus the placement config."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            n: p.detach().clone().contiguous()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
        info = {
            "lmadapt_adapter": 1,
            "config": asdict(self.cfg),
            "sites": adapter_sites(model, self.cfg),
        }
        (out_dir / CONFIG).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def load(
        self, task: Task, base: ModelSpec, artifact: Path, trust_remote_code: bool = False
    ) -> nn.Module:
        artifact = Path(artifact)
        if not (artifact / WEIGHTS).is_file() or not (artifact / CONFIG).is_file():
            raise LmadaptError(f"{artifact} is not an adapter artifact (no {WEIGHTS} / {CONFIG})")
        info = json.loads((artifact / CONFIG).read_text(encoding="utf-8"))
        cfg = from_dict(AdapterConfig, info["config"], "method")
        model = task.build_model(base, trust_remote_code)
        sites = inject(model, cfg)
        if sites != info["sites"]:
            raise LmadaptError(f"{artifact}: adapter placement does not match the base model")
        state = load_file(str(artifact / WEIGHTS))
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if ".adapter." in k]
        if result.unexpected_keys or missing:
            raise LmadaptError(
                f"{artifact}: weights do not fit the model "
                f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})"
            )
        return model
