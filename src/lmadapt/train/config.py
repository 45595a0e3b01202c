"""The `train` section of a run config: the schedule, optimizer and precision the loop runs with.

Its own module, below the loop, so the loop takes its settings without importing the run
config's builder (and the task and method registries with it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmadapt.errors import ConfigError


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None
    """Stop after this many evaluations without improvement; None disables early stopping."""
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 1:
            raise ConfigError("train.early_stopping.patience", f"must be >= 1, got {self.patience}")


@dataclass
class TrainConfig:
    epochs: float = 3.0
    max_steps: int | None = None
    """If set, overrides epochs: stop after this many optimizer steps."""
    batch_size: int = 32
    eval_batch_size: int = 0
    """Rows a batch in evaluation and prediction; 0 takes batch_size. Larger batches save no time
    on a CPU (MiniLM LoRA on SST-2 dev, 2 cores: 235 rows/s at 32, 243 at 64, 215 at 128) and
    their activations can peak above training's (at 128: +250 MB over the training steps), so by
    default evaluation needs no more memory than a training step."""
    lr: float | None = None
    """Peak learning rate; None takes the method's default (e.g. 5e-4 for LoRA, 5e-5 for full)."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    """Evaluate on dev every N optimizer steps; None evaluates at the end of each epoch."""
    metric: str | None = None
    """Dev metric that picks the best checkpoint and drives early stopping; None = task default."""
    metric_mode: Literal["auto", "max", "min"] = "auto"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast (fp32 master weights); auto = bf16 when the CPU has native bf16 units."""
    base_dtype: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    """Dtype of the frozen weights while a PEFT method trains (trained weights stay fp32):
    bf16 halves the memory the base takes; it needs bf16 autocast (precision auto or bf16), and
    dev evaluation during training then runs under autocast too. int8 (an x86 CPU, fp32
    activations) multiplies the frozen linears' weights in int8 with fbgemm, forward and input
    gradient (a MiniLM LoRA step 1.21x fp32's, at a cost in quality: NER F1 -0.007, a causal
    LM's held-out loss +4 %; see the README); their fp32 weights stay, for evaluation in fp32.
    auto = bf16 on a CUDA GPU with bf16 autocast, fp32 elsewhere. The fp32 weights come back when
    training ends, so the saved artifact and the final evaluation are those of the fp32 model."""
    dropout: float | Literal["model"] | None = None
    """Every dropout probability in the model, LoRA's too. None = the run's choice: the task's
    (preference trains without dropout), else the method's (`Method.base_dropout`: none in a
    frozen base, the model's own where the base's weights train); "model" = the model's own
    dropout and the method's setting. On a CPU random masks cost a quarter of a MiniLM step."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them: less memory for about a third more compute. Non-reentrant (correct with frozen inputs,
    so with PEFT methods too); the loss and gradients are those of a run without it."""
    group_by_length: bool | None = None
    """Length-grouped batches (shuffled buckets) to cut padding; None = the task's choice
    (random batches for token classification, where grouping slowed learning)."""
    head_lr: float | None = None
    """Learning rate of the task head's parameters (`Task.head_modules`: a new classifier);
    None = the task's choice, at least `Task.head_lr_floor`, else the run's rate."""
    optimizer: Literal["fused", "foreach"] = "fused"
    """AdamW kernel: fused updates each parameter in one pass over weights, gradients and
    moments, the faster on CPU (see bench/); foreach is torch's multi-tensor kernel."""
    log_every: int = 20
    checkpoint_every: int | None = None
    """Save a resumable checkpoint every N optimizer steps; None = at every evaluation."""
    keep_checkpoints: int = 2
    """How many resumable checkpoints to keep (oldest deleted first)."""
    threads: int | None = None
    """torch intra-op threads; None = all cores, shared out among the processes of a node."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (torchrun, accelerate launch) share a run: ddp replicates the model
    and averages gradients; fsdp also shards weights, gradients and optimizer state, on CUDA GPUs
    only. batch_size stays the global batch, split across the processes."""

    def __post_init__(self) -> None:
        if self.eval_batch_size == 0:
            self.eval_batch_size = self.batch_size
        for name in (
            "batch_size",
            "eval_batch_size",
            "grad_accum",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise ConfigError("train.epochs", f"must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("train.max_steps", f"must be >= 1, got {self.max_steps}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("train.lr", f"must be > 0, got {self.lr}")
        if self.dropout not in (None, "model") and not (
            isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1
        ):
            raise ConfigError("train.dropout", f"must be in [0, 1) or model, got {self.dropout!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        for name in ("eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {v}")
        if self.base_dtype == "bf16" and self.precision == "fp32":
            raise ConfigError(
                "train.base_dtype",
                "bf16 frozen weights need bf16 autocast; set train.precision to auto or bf16",
            )
        if self.base_dtype == "int8" and self.precision == "bf16":
            raise ConfigError(
                "train.base_dtype",
                "int8 frozen weights take fp32 activations; set train.precision to fp32",
            )
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(
                "train.gradient_checkpointing",
                f"expected true or false, got {self.gradient_checkpointing!r}",
            )
