"""What a run config may say about each task (`task:`), checked on load: light dataclasses,
imported without torch, registered beside the task they configure in `lmadapt.tasks` (the task's
module loads when a run builds it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lmadapt.data.chat import CHAT_FORMATS
from lmadapt.data.templates import TEMPLATES
from lmadapt.decoding import GenerationSettings
from lmadapt.errors import ConfigError
from lmadapt.prompting.templates import template_verbalizer


@dataclass
class ClassificationConfig:
    type: str = "classification"
    problem: Literal["single_label", "multi_label", "regression"] = "single_label"
    text_column: str | None = None
    """Input text column; None takes the first present of text, sentence, sentence1, question."""
    text_pair_column: str | None = None
    """Second text for pair tasks; None takes sentence2 when text_column is sentence1."""
    label_column: str = "label"
    label_delimiter: str = ","
    """Multi-label: separator between label names in one cell (JSONL may give a list)."""
    threshold: float = 0.5
    """Multi-label: a label is predicted when its sigmoid probability reaches this."""
    max_length: int = 128
    """Longer inputs are truncated (tokens)."""
    calibrate: bool = False
    """Single-label: predict and serve give temperature-scaled probabilities, softmax(logits / T)
    with the T fitted on the dev set after training (Guo et al. 2017); labels are unchanged.
    Needs a dev set. Off by default, so probabilities stay the model's own unless asked."""

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ConfigError("task.threshold", f"must be in (0, 1), got {self.threshold}")
        if self.max_length < 8:
            raise ConfigError("task.max_length", f"must be >= 8, got {self.max_length}")
        if not self.label_delimiter:
            raise ConfigError("task.label_delimiter", "must not be empty")
        if self.calibrate and self.problem != "single_label":
            raise ConfigError(
                "task.calibrate", f"applies to single_label problems, not {self.problem}"
            )


@dataclass
class TokenClassificationConfig:
    type: str = "token_classification"
    scheme: Literal["auto", "iob1", "iob2", "bioes"] = "auto"
    """Tag scheme of the data files, converted to IOB2 on reading. auto: bioes when E-/S- tags
    occur, iob1 when some entity starts with I-, else iob2 (where I-X after O is an error)."""
    strict: bool = False
    """Entity metrics in seqeval's strict IOB2 mode (an I-X that does not continue a B-X entity
    opens none); default is conlleval's lenient counting."""
    label_all_subwords: bool = False
    """Train on every subword (continuations of B-X get I-X) instead of the first one only."""
    max_length: int = 128
    """Subword tokens per window, special tokens included; longer sentences are split."""
    stride: int = 32
    """Subword tokens of overlap between consecutive windows of one long sentence."""
    token_column: int = 0
    """CoNLL: column of the token (0-based; negative counts from the end)."""
    tag_column: int = -1
    """CoNLL: column of the tag; the last one by default."""
    tokens_field: str = "tokens"
    """JSONL: list of words (pre-tokenised input) ..."""
    tags_field: str = "tags"
    """... and its list of tags, one per word."""
    text_field: str = "text"
    """JSONL: raw text (split into words by the task) ..."""
    spans_field: str = "spans"
    """... and its entities as [{start, end, label}] character offsets (end exclusive)."""
    calibrate: bool = False
    """Entity scores in predict and serve come from temperature-scaled word probabilities,
    softmax(logits / T) with the T fitted on the dev words after training (Guo et al. 2017);
    tags are unchanged. Needs a dev set. Off by default: scores stay the model's own."""

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError("task.max_length", f"must be >= 8, got {self.max_length}")
        if not 0 <= self.stride <= self.max_length // 2:
            raise ConfigError(
                "task.stride",
                f"must be in [0, max_length / 2 = {self.max_length // 2}], got {self.stride}",
            )


@dataclass
class QAConfig:
    type: str = "question_answering"
    version: Literal["auto", "v1", "v2"] = "auto"
    """v2 (SQuAD 2.0) allows unanswerable questions: the model may answer nothing. auto: v2 when
    the training data has an unanswerable question (one with no answers), else v1."""
    max_length: int = 384
    """Tokens per window (question, context part and special tokens)."""
    doc_stride: int = 128
    """Tokens of overlap between consecutive windows of a long context."""
    max_question_length: int = 64
    """Longer questions are cut to this many tokens."""
    max_answer_length: int = 30
    """Longest answer span decoding considers, in tokens."""
    n_best: int = 20
    """Best starts and ends per window whose pairs decoding scores."""
    null_score_diff_threshold: float = 0.0
    """v2: no answer when the null score exceeds the best span's by more than this; replaced
    after training by the value that maximises dev F1 (saved with the run)."""

    def __post_init__(self) -> None:
        for name in ("max_answer_length", "n_best", "max_question_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"task.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.doc_stride < 0:
            raise ConfigError("task.doc_stride", f"must be >= 0, got {self.doc_stride}")
        # Room for the stride in every window: question, 3-4 special tokens, and context.
        room = self.max_length - self.max_question_length - 4
        if self.doc_stride >= room:
            raise ConfigError(
                "task.doc_stride",
                f"must be below max_length - max_question_length - 4 = {room} (a window needs "
                f"context beyond its overlap), got {self.doc_stride}",
            )


@dataclass
class GenerationConfig:
    type: str = "generation"
    data_format: str = "auto"
    """auto (by fields), alpaca (instruction/input/output), sharegpt (conversations),
    messages (OpenAI-style), text (raw text for continued pre-training)."""
    template: str = "auto"
    """auto = the tokenizer's chat template if it has one, else alpaca; or chat, alpaca, chatml,
    plain."""
    max_length: int = 1024
    """Longer examples are cut at the end (tokens); an example left without response is an error."""
    lm_loss_weight: float = 0.0
    """β: prompt tokens (everything but responses) train with weight β, responses with 1, in one
    token mean: Σ_resp ce + β·Σ_prompt ce over N_resp + β·N_prompt. 0 = response-only loss."""
    align_weight: float | None = None
    """α of the instruction-tuning objective L = L_LM + α·L_align: L_LM is the mean next-token
    cross-entropy over every token of the sequence (prompt and response), L_align the mean over
    response tokens only; each a mean over the batch's tokens. Per token that is weight 1/N_all
    on prompt tokens and 1/N_all + α/N_resp on response tokens, i.e. lm_loss_weight
    β = 1 / (1 + α·N_all/N_resp), which changes with each batch's mix; α -> ∞ gives α times the
    response-only loss (lm_loss_weight 0), α = 0 plain language modelling. None = not used
    (lm_loss_weight decides). Dev loss stays the response-only loss, comparable across runs."""
    packing: bool = False
    """Pack each batch's examples into rows of up to max_length tokens, attention kept within
    each example (positions restart per example). For methods that keep the input as it is
    (full, LoRA family, IA3, BitFit, adapters), not for prompt-learning methods."""
    loss_positions_only: bool = True
    """Compute the LM head's logits only where the loss reads them (not on prompt tokens when
    lm_loss_weight is 0): less time and memory, same loss. For transformers causal LMs."""
    max_new_tokens: int = 256
    do_sample: bool = False
    """Greedy decoding by default; sampling uses temperature and top_p."""
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    """Beam search with this many beams (1 = greedy or sampling)."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (the template's end-of-turn marker always stops)."""
    answer_pattern: str | None = None
    """Regex whose first group (or whole match) is the answer for exact match, e.g. GSM8K's
    '####\\s*(-?[\\d,.]+)'; None compares whole responses."""
    labels: list[str] | None = None
    """Label-aware evaluation: a generation maps to the first label it mentions."""
    eval_generate_max_samples: int | None = None
    """Decode at most this many examples per evaluation (loss uses all); 0 = loss only,
    None = all. Generation dominates evaluation time on a CPU."""
    generate_batch_size: int = 16
    seed: int = 0
    """Sampling seed."""
    report_samples: int = 5
    """Generations shown in report.md."""

    def settings(self, **overrides: Any) -> GenerationSettings:
        """These decoding settings with `overrides` (None = keep), checked."""
        values: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
            "num_beams": self.num_beams,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationSettings(**values)

    def __post_init__(self) -> None:
        if self.data_format not in ("auto", *CHAT_FORMATS):
            known = ", ".join(["auto", *CHAT_FORMATS])
            raise ConfigError("task.data_format", f"one of {known}; got {self.data_format!r}")
        if self.template not in ("auto", *TEMPLATES.names()):
            known = ", ".join(["auto", *TEMPLATES.names()])
            raise ConfigError("task.template", f"one of {known}; got {self.template!r}")
        for name, low in (("max_length", 8), ("generate_batch_size", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"task.{name}", f"must be >= {low}, got {getattr(self, name)}")
        if self.lm_loss_weight < 0:
            raise ConfigError("task.lm_loss_weight", f"must be >= 0, got {self.lm_loss_weight}")
        if self.align_weight is not None:
            if self.align_weight < 0:
                raise ConfigError("task.align_weight", f"must be >= 0, got {self.align_weight}")
            if self.lm_loss_weight:
                raise ConfigError(
                    "task.align_weight",
                    "replaces lm_loss_weight (L_LM already trains prompt tokens); set one of them",
                )
        try:
            self.settings()  # the decoding values, checked where every caller's are
        except ConfigError as e:
            raise ConfigError(f"task.{e.field}", e.message) from None
        if self.eval_generate_max_samples is not None and self.eval_generate_max_samples < 0:
            raise ConfigError("task.eval_generate_max_samples", "must be >= 0")
        if self.answer_pattern is not None:
            try:
                pattern = re.compile(self.answer_pattern)
            except re.error as e:
                raise ConfigError("task.answer_pattern", f"not a valid regex: {e}") from None
            if pattern.groups > 1:
                raise ConfigError("task.answer_pattern", "must have at most one group")
        if self.labels is not None and len(set(self.labels)) < 2:
            raise ConfigError("task.labels", f"needs at least 2 distinct labels, got {self.labels}")


LossName = Literal["dpo", "simpo", "orpo"]
GENERATION_FIELDS = (
    "template", "max_length", "loss_positions_only", "max_new_tokens", "generate_batch_size",
    "report_samples",
)  # fmt: skip
"""What a preference task sets of the generation settings it answers prompts with."""
DEFAULT_BETA: dict[str, float] = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1}
"""Each preference loss's usual β (the papers' and TRL's defaults)."""


@dataclass
class PreferenceConfig:
    type: str = "preference"
    loss: LossName = "dpo"
    """dpo (against the reference model), simpo or orpo (reference-free)."""
    beta: float | None = None
    """β: DPO's and SimPO's inverse temperature, ORPO's weight of the odds-ratio term; None =
    the loss's usual value (dpo 0.1, simpo 2.0, orpo 0.1)."""
    label_smoothing: float = 0.0
    """ε of conservative DPO / SimPO: the share of pairs taken to be mislabelled (0 = none)."""
    simpo_gamma: float = 1.0
    """γ, SimPO's target reward margin (γ/β = 0.5 at the default β)."""
    template: str = "auto"
    """The chat template (as for generation): the tokenizer's own if it has one."""
    max_length: int = 1024
    """Prompt + reply tokens per row; a longer row loses the start of its prompt (the reply,
    what the loss scores, is kept whole where it fits)."""
    loss_positions_only: bool = True
    """Compute the LM head's logits only at reply positions (less time and memory)."""
    max_new_tokens: int = 128
    """Length of the sample replies in the report."""
    report_samples: int = 3
    """Prompts answered in the report by the trained and by the base model (0 = none)."""
    generate_batch_size: int = 8

    @property
    def strength(self) -> float:
        """β as set, else the loss's usual value."""
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]

    def generation(self) -> GenerationConfig:
        """The generation settings this task answers prompts with: its fields of the same
        names (template, lengths, batch, samples), the rest generation's defaults."""
        return GenerationConfig(**{name: getattr(self, name) for name in GENERATION_FIELDS})

    def __post_init__(self) -> None:
        if self.loss not in DEFAULT_BETA:
            raise ConfigError("task.loss", f"one of {', '.join(DEFAULT_BETA)}; got {self.loss!r}")
        if self.beta is not None and not self.beta > 0:
            raise ConfigError("task.beta", f"must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                "task.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.loss == "orpo" and self.label_smoothing:
            raise ConfigError("task.label_smoothing", "applies to dpo and simpo, not orpo")
        if self.report_samples < 0:
            raise ConfigError("task.report_samples", "must be >= 0")
        self.generation()  # template, lengths: checked, errors naming task.<field>


@dataclass
class PromptClassificationConfig:
    type: str = "prompt_classification"
    template: Any = "sentiment"
    """A named prompt template, a YAML path or an inline mapping (see lmadapt.prompting)."""
    verbalizer: dict[str, Any] | None = None
    """label -> word(s); None takes the named template's."""
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int | None = 128
    """Input texts are cut to this many tokens before being put into the template; None keeps
    them whole (the `prompt` command's zero/few-shot scoring, which has no batch to bound)."""
    length_normalize: bool = False
    """Divide each verbalizer's log-prob by its token count."""

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError("task.max_length", f"must be >= 8, got {self.max_length}")
        if self.verbalizer is None and not (
            isinstance(self.template, str) and template_verbalizer(self.template)
        ):
            raise ConfigError("task.verbalizer", "is required (the template suggests none)")
