"""What a run config may say about each method (`method:`), checked on load: light dataclasses,
imported without torch or peft, registered beside the implementation they configure in
`lmadapt.methods` (the implementations load when a run builds its method)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from lmadapt.errors import ConfigError


@dataclass
class MethodConfig:
    name: str
    lr: float = 5e-5
    """Default peak learning rate for this method (train.lr overrides it)."""


LoraInit = Literal["default", "gaussian", "pissa", "olora", "loftq"]


def check_lora_shape(section: str, r: int, dropout: float) -> None:
    """LoRA's rank and dropout checks, shared with the continual `adapters` strategy."""
    if r < 1:
        raise ConfigError(f"{section}.r", f"must be >= 1, got {r}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"{section}.dropout", f"must be in [0, 1), got {dropout}")


@dataclass(kw_only=True)
class LowRankShape:
    """What every LoRA-style adapter shares (lora, adalora, continual's `adapters` strategy): the
    scale, the dropout on the adapter's input and which modules are adapted. Keyword-only, so it
    mixes into configs whose `name` has no default."""

    alpha: float = 16.0
    """Scale: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (peft's default, 0): with the base frozen, dropout cost
    a third of a step and bought no accuracy (bench/results/dropout_default.md)."""
    target_modules: list[str] | None = None
    """Module names to adapt; None = peft's default for the architecture (query/value for BERT,
    q_proj/v_proj for Llama); ["all-linear"] adapts every linear layer but the head."""


@dataclass
class LoraMethodConfig(LowRankShape, MethodConfig):
    name: str = "lora"
    lr: float = 5e-4
    r: int = 8
    use_dora: bool = False
    """DoRA (Liu et al., 2024, arXiv:2402.09353): each weight split into a trained magnitude
    (one per output row) and a direction that LoRA updates; closer to full fine-tuning at the
    same rank, about twice LoRA's step time."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski, 2023, arXiv:2312.03732): scale alpha / sqrt(r)
    instead of alpha / r, so that higher ranks keep learning; changes the effective scale."""
    init: LoraInit = "default"
    """How A and B start. default: A Kaiming-uniform, B zero (the update starts at 0).
    gaussian: A ~ N(0, 1/r), B zero. pissa (Meng et al., 2024, arXiv:2404.02948): A, B from the
    top r singular vectors of W by a full SVD (exact and deterministic, so a resumed run rebuilds
    the same start; slower than peft's randomised `pissa_niter_16` on large layers), and the base
    keeps the residual. olora (Büyükakyüz, 2024, arXiv:2406.01775): A, B from a QR of W, the base
    keeps the residual. pissa and olora adapters are saved converted to plain LoRA of rank 2r
    (B·A - B0·A0) that loads onto the original base. loftq: refused (see the error)."""
    loraplus_ratio: float | None = None
    """LoRA+ (Hayou et al., 2024, arXiv:2402.12354): the B matrices train at lr x ratio (the
    paper suggests 16); None = one rate. Biases and DoRA magnitudes keep the run's rate, and
    the head keeps its own (train.head_lr), whatever the ratio."""

    def __post_init__(self) -> None:
        check_lora_shape("method", self.r, self.dropout)
        if self.loraplus_ratio is not None and not self.loraplus_ratio > 0:
            raise ConfigError(
                "method.loraplus_ratio",
                f"must be > 0 (the paper uses 16), got {self.loraplus_ratio}",
            )
        if self.init == "loftq":
            raise ConfigError(
                "method.init",
                "loftq is not supported: peft 0.21.2 computes LoftQ's quantisation on a CUDA/XPU "
                "device only (hard-coded in peft.utils.loftq_utils), and its adapter reproduces "
                "the run only over the nf4-quantised base it was fitted to, which lmadapt does "
                "not save; use pissa for a data-free SVD start",
            )


@dataclass
class AdaLoraMethodConfig(LowRankShape, MethodConfig):
    name: str = "adalora"
    lr: float = 1e-3
    """The paper uses 5e-4 to 1e-3 on GLUE; the singular values start at zero, as LoRA's B."""
    init_r: int = 12
    """Starting rank of every adapted matrix (the budget to prune from)."""
    target_r: int = 8
    """Average rank left after pruning; the total budget is target_r x number of matrices."""
    tinit_ratio: float = 0.1
    """Share of the training steps before pruning starts (the paper's t_i)."""
    tfinal_ratio: float = 0.3
    """Share of the training steps at the end with the final ranks frozen (the paper's t_f)."""
    delta_t: int = 1
    """Re-allocate the budget every this many steps during the pruning phase."""
    beta1: float = 0.85
    """EMA factor of the importance (sensitivity) score."""
    beta2: float = 0.85
    """EMA factor of the importance uncertainty."""
    orth_reg_weight: float = 0.1
    """Weight of the orthogonality penalty ||PᵀP - I||_F + ||QQᵀ - I||_F (the paper's γ = 0.1)."""

    def __post_init__(self) -> None:
        if self.target_r < 1:
            raise ConfigError("method.target_r", f"must be >= 1, got {self.target_r}")
        if self.init_r < self.target_r:
            raise ConfigError(
                "method.init_r", f"must be >= target_r ({self.target_r}), got {self.init_r}"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError("method.dropout", f"must be in [0, 1), got {self.dropout}")
        for name in ("tinit_ratio", "tfinal_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"method.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        if self.tinit_ratio + self.tfinal_ratio >= 1:
            raise ConfigError(
                "method.tfinal_ratio",
                f"tinit_ratio + tfinal_ratio must be < 1 (leaving steps to prune in), got "
                f"{self.tinit_ratio} + {self.tfinal_ratio}",
            )
        if self.delta_t < 1:
            raise ConfigError("method.delta_t", f"must be >= 1, got {self.delta_t}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"method.{name}", f"must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ConfigError("method.orth_reg_weight", f"must be >= 0, got {self.orth_reg_weight}")


@dataclass
class AdapterConfig(MethodConfig):
    name: str = "adapter"
    lr: float = 1e-3
    """Houlsby et al. sweep 1e-4 to 1e-3; the zero-initialised up-projections need the upper end."""
    variant: Literal["houlsby", "pfeiffer"] = "houlsby"
    """houlsby: adapters after attention and after the FFN; pfeiffer: after the FFN only (half the
    parameters, about the same accuracy in Pfeiffer et al.)."""
    reduction_factor: int = 16
    """Bottleneck width = hidden size // reduction_factor (24 for MiniLM's 384)."""
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    residual: bool = True
    """Add the adapter's input to its output. Without it the adapter replaces the sub-layer output
    and the model no longer starts as the pretrained one."""
    init_std: float = 1e-2
    """Std of the down-projection init; the up-projection starts at zero, so every adapter starts as
    the identity (near-identity init, as in Houlsby et al.)."""
    attn_modules: str | None = None
    """Regex of the attention output projections; None = per-architecture default (BERT-like:
    `attention.output.dense`, Llama-like: `self_attn.o_proj`)."""
    ffn_modules: str | None = None
    """Regex of the feed-forward output projections; None = per-architecture default (BERT-like:
    `layer.N.output.dense`, Llama-like: `mlp.down_proj`)."""

    def __post_init__(self) -> None:
        if self.reduction_factor < 1:
            raise ConfigError(
                "method.reduction_factor", f"must be >= 1, got {self.reduction_factor}"
            )
        if self.init_std < 0:
            raise ConfigError("method.init_std", f"must be >= 0, got {self.init_std}")
        for name in ("attn_modules", "ffn_modules"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"method.{name}", f"not a valid regex: {e}") from None


@dataclass
class BitFitConfig(MethodConfig):
    name: str = "bitfit"
    lr: float = 1e-3
    """Biases need a much larger step than full fine-tuning (the paper uses 1e-4 to 1e-3)."""


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"
    lr: float = 5e-5
    """Every weight moves, so the step is small: the BERT and RoBERTa papers fine-tune at 1e-5
    to 5e-5."""


@dataclass
class IA3MethodConfig(MethodConfig):
    name: str = "ia3"
    lr: float = 1e-2
    """Scaling vectors start at 1 and need large steps to move (the paper uses 3e-3 on T0-3B; on
    MiniLM / SST-2, 1e-2 gave 0.75 dev accuracy after 40 steps, 3e-3 gave 0.70)."""
    target_modules: list[str] | None = None
    """Modules whose output (or input, for feed-forward ones) is rescaled; None = peft's default
    for the architecture (key, value, output.dense for BERT; k_proj, v_proj, down_proj for
    Llama)."""
    feedforward_modules: list[str] | None = None
    """The subset of target_modules rescaled on their input rather than output; None = peft's
    default (output.dense for BERT, down_proj for Llama). Needs target_modules."""

    def __post_init__(self) -> None:
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ConfigError(
                "method.feedforward_modules", "needs method.target_modules (it must be a subset)"
            )
        if self.feedforward_modules and not set(self.feedforward_modules) <= set(
            self.target_modules or []
        ):
            raise ConfigError(
                "method.feedforward_modules",
                f"must be a subset of target_modules {self.target_modules}, "
                f"got {self.feedforward_modules}",
            )


@dataclass
class VirtualTokensConfig(MethodConfig):
    """What the prompt-learning methods share (prompt tuning, prefix tuning, P-tuning): a number
    of virtual tokens prepended to every input, with the task head trained alongside."""

    num_virtual_tokens: int = 20
    """Prompt length. 20 is where the papers' curves flatten for base-size models; each virtual
    token also lengthens every sequence, so costs compute at train and inference time."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(
                "method.num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}"
            )


@dataclass
class EncodedTokensConfig(VirtualTokensConfig):
    """Virtual tokens produced by a trained encoder (P-tuning's prompt encoder, prefix tuning's
    reparameterising MLP), whose width may be set."""

    encoder_hidden_size: int | None = None
    """Hidden width of the encoder; None = the model's hidden size."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(
                "method.encoder_hidden_size", f"must be >= 1, got {self.encoder_hidden_size}"
            )

    def sized(self, config: Any) -> Any:
        """peft's `config` with the encoder width set, when one is given (else peft takes the
        model's hidden size: its field is typed int but defaults to None)."""
        if self.encoder_hidden_size is not None:
            config.encoder_hidden_size = self.encoder_hidden_size
        return config


@dataclass
class PTuningMethodConfig(EncodedTokensConfig):
    name: str = "p_tuning"
    lr: float = 3e-3
    """As for prompt tuning, bounded by the task head, which trains at the same rate: 1e-2
    destabilises it on small encoders."""
    encoder: Literal["MLP", "LSTM"] = "MLP"
    """Prompt encoder type: MLP (fast) or the paper's bidirectional LSTM + MLP."""
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.encoder_dropout < 1:
            raise ConfigError(
                "method.encoder_dropout", f"must be in [0, 1), got {self.encoder_dropout}"
            )


@dataclass
class PrefixTuningMethodConfig(EncodedTokensConfig):
    name: str = "prefix_tuning"
    lr: float = 1e-2
    """The paper uses 5e-5 to 8e-5 with a reparameterising MLP; direct prefixes on small encoders
    with few steps need far larger steps (MiniLM / SST-2: 0.71 dev accuracy after 40 steps)."""
    prefix_projection: bool = False
    """Reparameterise the prefixes through a 2-layer MLP (the paper's stabiliser); costs a large
    MLP during training but is saved the same way."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ConfigError(
                "method.encoder_hidden_size", "is only used with method.prefix_projection=true"
            )


@dataclass
class PromptTuningMethodConfig(VirtualTokensConfig):
    name: str = "prompt_tuning"
    lr: float = 3e-3
    """The paper uses 0.3 (Adafactor, T5-XXL) for the prompt alone, but here the task head trains at
    the same rate: on MiniLM / SST-2, 1e-2 and above blew up the head (loss 1.1 after 5 steps,
    then stuck at chance), 3e-3 learnt steadily."""
    init: Literal["vocab", "random", "text"] = "vocab"
    """vocab: embeddings of randomly sampled vocabulary tokens (better than random in the paper);
    random: peft's random init; text: the embeddings of init_text, repeated to fill the prompt."""
    init_text: str | None = None
    """Prompt text for init=text, e.g. "Is the sentiment of this review positive or negative?"."""
    l2_penalty: float = 0.0
    """λ of an extra loss term λ·||P||² on the prompt embeddings P, keeping them near the scale of
    real token embeddings; 0 disables it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init == "text" and not (self.init_text or "").strip():
            raise ConfigError("method.init_text", "is required when method.init is 'text'")
        if self.init != "text" and self.init_text is not None:
            raise ConfigError("method.init_text", "is only used with method.init=text")
        if self.l2_penalty < 0:
            raise ConfigError("method.l2_penalty", f"must be >= 0, got {self.l2_penalty}")
