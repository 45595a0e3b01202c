"""LoRA (Hu et al., 2021, arXiv:2106.09685) through peft: W + (alpha/r)·B·A on target linears.

peft's own variants are settings of the same method: DoRA (`use_dora`), rank-stabilised scaling
(`use_rslora`), the initialisation of A and B (`init`) and LoRA+'s faster B (`loraplus_ratio`,
applied by the training loop's optimizer through `lr_rules`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lmadapt.io import atomic_path, write_text
from lmadapt.methods.base import PeftMethod
from lmadapt.methods.configs import LoraMethodConfig

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task

INIT_LORA_WEIGHTS: dict[str, bool | Literal["gaussian", "pissa", "olora"]] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}
"""`init` -> peft's `init_lora_weights` (loftq is refused, see `LoraMethodConfig.__post_init__`)."""
MUTATES_BASE = ("pissa", "olora")
"""Inits that move the top of W into B·A and train over the residual base W - s·B0·A0."""


def linear_heads(model: torch.nn.Module, heads: list[str]) -> list[str]:
    """The task's heads as peft should copy them per adapter: a head that is not a linear layer
    but holds its parameters in linear layers only (BERT's pooler: "pooler.dense") by those
    layers. The same parameters train the same way, and a server can run several adapters'
    copies in one batch (peft mixes only plain layers, see serve.runs.MIXABLE_HEADS)."""
    out: list[str] = []
    for head in heads:
        found = [m for n, m in model.named_modules() if n == head or n.endswith("." + head)]
        if len(found) != 1:  # absent, or several modules of that name: peft's own matching
            out.append(head)
            continue
        linears = {c: m for c, m in found[0].named_modules() if isinstance(m, torch.nn.Linear)}
        inside = sum(p.numel() for m in linears.values() for p in m.parameters())
        # "" is the head itself, already a linear layer
        split = (
            linears
            and "" not in linears
            and inside == sum(p.numel() for p in found[0].parameters())
        )
        out += [f"{head}.{c}" for c in linears] if split else [head]
    return out


class Lora(PeftMethod[LoraMethodConfig]):
    """LoRA via peft; options use_dora, use_rslora, init (pissa, olora...), loraplus_ratio.

    Low-rank updates on the target linears; the head trains fully."""

    mergeable = True

    @property
    def quantized_base(self) -> bool:  # type: ignore[override]
        """PiSSA and OLoRA start by rewriting the base weights (W - A0 B0), which a quantised
        base cannot hold; every other LoRA leaves them as they are."""
        return self.cfg.init not in MUTATES_BASE

    @property
    def mixed_batches(self) -> bool:  # type: ignore[override]
        """peft runs rows of one batch through different LoRA adapters, except DoRA ones."""
        return not self.cfg.use_dora

    def __init__(self, cfg: LoraMethodConfig):
        super().__init__(cfg)
        self.initial: dict[str, torch.Tensor] | None = None
        """PiSSA/OLoRA's starting A0, B0 (peft's adapter keys): `save` converts against them."""

    def peft_config(self, model: torch.nn.Module, task: Task, task_type: str) -> Any:
        from peft import LoraConfig

        target: Any = self.cfg.target_modules
        heads = task.head_modules(model)
        exclude = None
        if target == ["all-linear"]:
            # peft leaves out the heads it knows by name (classifier, score); the task's own
            # (question answering's qa_outputs) train fully, so no LoRA may sit inside them
            target, exclude = "all-linear", heads or None
        return LoraConfig(
            task_type=task_type,
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,  # type: ignore[arg-type]  # peft says int; alpha / r takes a float
            lora_dropout=self.cfg.dropout,
            target_modules=target,
            exclude_modules=exclude,
            modules_to_save=linear_heads(model, heads),
            use_dora=self.cfg.use_dora,
            use_rslora=self.cfg.use_rslora,
            init_lora_weights=INIT_LORA_WEIGHTS[self.cfg.init],
        )

    def apply(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
        """Adapt `model`; with pissa/olora, keep A0 and B0 for the conversion on save."""
        from peft.utils import get_peft_model_state_dict

        adapted = super().apply(model, task)
        if self.cfg.init in MUTATES_BASE:
            state = get_peft_model_state_dict(adapted)
            self.initial = {k: v.detach().clone() for k, v in state.items() if _is_factor(k)}
        return adapted

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        """peft's adapter; a pissa/olora one rewritten as plain LoRA over the original base:
        W_res + s·B·A = W + s·(B·A - B0·A0) = W + s·[B | -B0]·[A ; A0] (peft's
        `subtract_mutated_init`, which would also drop the head and DoRA's magnitudes)."""
        super().save(model, out_dir)
        if self.cfg.init not in MUTATES_BASE:
            return
        if self.initial is None:
            raise RuntimeError(
                f"Lora.save: init {self.cfg.init} needs the model this method adapted"
            )
        from safetensors.torch import load_file, save_file

        weights = out_dir / "adapter_model.safetensors"
        state = load_file(str(weights))
        for key, value in state.items():
            if ".lora_A." in key or ".lora_embedding_A." in key:
                state[key] = torch.cat([value, self.initial[key]], dim=0)  # (2r, in)
            elif ".lora_B." in key or ".lora_embedding_B." in key:
                state[key] = torch.cat([value, -self.initial[key]], dim=1)  # (out, 2r)
        with atomic_path(weights) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        config_path = out_dir / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        # twice the rank at the same scale: alpha / r, or alpha / sqrt(r) under rsLoRA
        config["lora_alpha"] *= 2**0.5 if config["use_rslora"] else 2
        config.update(r=2 * config["r"], init_lora_weights=True)
        write_text(config_path, json.dumps(config, indent=2, sort_keys=True))

    def lr_rules(self) -> dict[str, float]:
        """LoRA+: B (and an embedding's B) at lr x ratio."""
        ratio = self.cfg.loraplus_ratio
        return {} if ratio is None else {"lora_B": ratio, "lora_embedding_B": ratio}


def _is_factor(key: str) -> bool:
    """A LoRA factor (A or B) in peft's saved-adapter keys."""
    return any(f".lora_{part}." in key for part in ("A", "B", "embedding_A", "embedding_B"))
