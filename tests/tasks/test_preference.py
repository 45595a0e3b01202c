"""Preference task (tasks/preference.py): reply log-probabilities and the dpo/simpo/orpo losses
by hand and against TRL 1.16, then end to end on the tiny Llama: every loss and the reference
paths (peft adapters disabled, a frozen copy of the base), resume, reload and serving."""

from __future__ import annotations

import json
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmadapt.api import load_run, predict, resume, train
from lmadapt.config import build_run_config
from lmadapt.data.preference import PreferencePair
from lmadapt.errors import ConfigError
from lmadapt.hooks import Hook
from lmadapt.inference import model_inputs
from lmadapt.models import load_tokenizer, resolve_model
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from lmadapt.tasks.base import check_model_suits
from lmadapt.tasks.configs import DEFAULT_BETA
from lmadapt.tasks.generation_layouts import IGNORE
from lmadapt.tasks.preference import (
    LOSSES,
    Logps,
    PreferenceConfig,
    PreferenceTask,
    dpo,
    orpo,
    reply_logps,
    simpo,
)
from lmadapt.train.loop import TrainingInterrupted
from tests.train.test_resume import SigintAt


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


PAIRS = [
    PreferencePair([user("what is two plus two?")], "four", "five, or maybe six"),
    PreferencePair(
        [
            {"role": "system", "content": "answer briefly"},
            user("hi"),
            assistant("hello"),
            user("the cat sat on?"),
        ],
        "the mat",
        "a hat",
    ),
    PreferencePair([user("hello world")], "hello to you too", "no"),
]
PAIR_METRICS = (
    "loss",
    "reward_accuracy",
    "reward_margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logp",
    "rejected_logp",
    "logp_accuracy",
)


@pytest.fixture(scope="module")
def spec(tiny_llama):
    return resolve_model(tiny_llama)


@pytest.fixture(scope="module")
def tok(spec):
    return load_tokenizer(spec)


def make_task(spec, **cfg) -> PreferenceTask:
    task = build_task(parse_section(TASKS, "type", {"type": "preference", **cfg}, "task"))
    check_model_suits(task, spec)  # use_model: the layout, and the spec of the frozen copy
    return task


def pair_batch(task, tok, pairs=PAIRS) -> dict[str, torch.Tensor]:
    return task.collator(tok)(task.encode(pairs, tok))


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """The model with noise on its weights: a policy that differs from its reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------- batches and log-probs


def test_config_is_checked():
    assert PreferenceConfig().strength == 0.1
    assert PreferenceConfig(loss="simpo").strength == 2.0
    assert PreferenceConfig(loss="orpo", beta=0.3).strength == 0.3
    for bad, field in (
        ({"loss": "kto"}, "task.loss"),
        ({"beta": 0}, "task.beta"),
        ({"label_smoothing": 0.5}, "task.label_smoothing"),
        ({"loss": "orpo", "label_smoothing": 0.1}, "task.label_smoothing"),
        ({"report_samples": -1}, "task.report_samples"),
        ({"template": "vicuna"}, "task.template"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            PreferenceConfig(**bad)


def test_a_pair_is_two_rows_chosen_first_reply_tokens_labelled(spec, tok):
    task = make_task(spec)
    batch = pair_batch(task, tok)
    n = len(PAIRS)
    assert batch["input_ids"].shape[0] == 2 * n
    for i, pair in enumerate(PAIRS):
        for row, reply in ((i, pair.chosen), (n + i, pair.rejected)):
            labels, ids = batch["labels"][row], batch["input_ids"][row]
            keep = labels != IGNORE
            assert torch.equal(labels[keep], ids[keep])
            assert torch.equal(batch["loss_weights"][row], keep.float())
            # the reply and the end of its turn, nothing of the prompt
            assert tok.decode(ids[keep]) == f"{reply}<|im_end|>"
        # both rows share the prompt tokens up to the reply
        start = int((batch["labels"][i] != IGNORE).nonzero()[0])
        assert torch.equal(batch["input_ids"][i, :start], batch["input_ids"][n + i, :start])
        prompt = tok.decode(batch["input_ids"][i, :start])
        assert prompt.endswith(f"{pair.prompt[-1]['content']}<|im_end|>\n<|im_start|>assistant\n")


def hand_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[list, list]:
    """Σ log p(reply token) and the reply's token count per row, one row at a time."""
    sums, counts = [], []
    for row in range(len(batch["input_ids"])):
        logp = torch.log_softmax(logits[row].double(), -1)  # position t predicts token t+1
        total, count = 0.0, 0
        for t in range(1, batch["input_ids"].shape[1]):
            label = int(batch["labels"][row, t])
            if label != IGNORE:
                total += float(logp[t - 1, label])
                count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def test_reply_logps_by_hand(spec, tok):
    task = make_task(spec)
    model = perturbed(task.build_model(spec)).eval()
    batch = pair_batch(task, tok)
    with torch.no_grad():
        full = model(**model_inputs(batch)).logits
        kwargs = task.forward_kwargs(model, batch)
        assert "logits_to_keep" in kwargs  # the training path: logits at the reply positions
        kept = model(**model_inputs(batch), **kwargs).logits
    assert kept.shape[1] < full.shape[1]
    sums, counts = hand_logps(full, batch)
    for logits in (full, kept):
        got = reply_logps(logits, batch)
        assert got.counts.tolist() == counts
        torch.testing.assert_close(got.sums.double(), f64(sums), atol=1e-4, rtol=0)
        means = [s / c for s, c in zip(sums, counts)]
        torch.testing.assert_close(got.means.double(), f64(means), atol=1e-5, rtol=0)


def random_logps(n: int, seed: int) -> tuple[Logps, Logps]:
    """Policy and reference log-probs of n pairs (2n rows): sums over 1-20 reply tokens."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 21, (2 * n,), generator=g)
    per_token = -torch.rand(2 * n, generator=g) * 3 - 0.01
    policy = per_token * counts
    reference = policy + torch.randn(2 * n, generator=g) * 2
    return Logps(policy, counts), Logps(reference, counts)


@pytest.mark.parametrize(
    "cfg",
    [
        {"loss": "dpo"},
        {"loss": "dpo", "beta": 0.5, "label_smoothing": 0.2},
        {"loss": "simpo"},
        {"loss": "simpo", "beta": 1.5, "simpo_gamma": 0.3, "label_smoothing": 0.1},
        {"loss": "orpo"},
        {"loss": "orpo", "beta": 0.7},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_losses_by_hand(cfg):
    pcfg = PreferenceConfig(**cfg)
    beta, eps, n = pcfg.strength, pcfg.label_smoothing, 6
    policy, reference = random_logps(n, seed=3)
    out = LOSSES[pcfg.loss].fn(policy, reference, pcfg)
    s, r, c = policy.sums.tolist(), reference.sums.tolist(), policy.counts.tolist()
    losses, chosen, rejected = [], [], []
    for i in range(n):
        j = n + i  # the pair's rejected row
        if pcfg.loss == "dpo":
            w, lose = beta * (s[i] - r[i]), beta * (s[j] - r[j])
            x = w - lose
        elif pcfg.loss == "simpo":
            w, lose = beta * s[i] / c[i], beta * s[j] / c[j]
            x = w - lose - pcfg.simpo_gamma
        else:
            mw, ml = s[i] / c[i], s[j] / c[j]
            w, lose = beta * mw, beta * ml
            log_odds = (mw - ml) - (math.log(1 - math.exp(mw)) - math.log(1 - math.exp(ml)))
        if pcfg.loss == "orpo":
            losses.append(-beta * logsigmoid(log_odds))
        else:  # conservative: ε of the pairs taken to be the other way round
            losses.append(-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x))
        chosen.append(w)
        rejected.append(lose)
    want = sum(losses) / n
    if pcfg.loss == "orpo":  # plus the token-mean NLL of the chosen replies
        want += -sum(s[:n]) / sum(c[:n])
    assert math.isclose(float(out.loss), want, abs_tol=1e-5)
    torch.testing.assert_close(out.chosen_rewards.double(), f64(chosen), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.rejected_rewards.double(), f64(rejected), atol=1e-5, rtol=0)


def test_dpo_of_the_reference_itself_is_log_two_and_needs_it():
    policy, _ = random_logps(4, seed=1)
    out = dpo(policy, policy, PreferenceConfig())
    assert math.isclose(float(out.loss), math.log(2), abs_tol=1e-6)
    assert not out.chosen_rewards.any() and not out.rejected_rewards.any()
    task = PreferenceTask(PreferenceConfig())
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "loss_weights": torch.ones(2, 3)}
    with pytest.raises(RuntimeError, match="reference_logps"):
        task.loss(torch.zeros(2, 3, 5), batch)


def test_orpo_gradient_stays_finite_for_a_nearly_certain_chosen_reply():
    sums = torch.tensor([-1e-8 * 4, -12.0], requires_grad=True)  # mean -1e-8 per token
    out = orpo(Logps(sums, torch.tensor([4, 4])), None, PreferenceConfig(loss="orpo"))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(sums.grad).all()


# ---------------------------------------------------------------------- TRL 1.16, the peer


class _Accelerator:
    """What the TRL trainers' loss code asks of accelerate on one CPU process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def autocast():
        import contextlib

        return contextlib.nullcontext()


def _trl(module: str):
    """A TRL trainer module (the test is skipped without TRL)."""
    pytest.importorskip("trl")
    import importlib
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return importlib.import_module(module)


def _dpo_trainer(model, ref_model, beta: float, precompute: bool = False):
    """A stand-in for a DPOTrainer instance, with what its `_compute_loss` reads (standard
    sigmoid DPO, no weighting, no length-desensitisation), to run TRL's own loss code."""
    return types.SimpleNamespace(
        model=model,
        ref_model=ref_model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=precompute,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )


def _bind(cls, fake, *names):
    for name in names:
        setattr(fake, name, types.MethodType(getattr(cls, name), fake))
    return fake


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trls_on_given_logps(beta):
    DPOTrainer = _trl("trl.trainer.dpo_trainer").DPOTrainer
    n = 5
    policy, reference = random_logps(n, seed=7)
    mine = dpo(policy, reference, PreferenceConfig(beta=beta))

    # TRL's loss reads per-token log-probs from the fused LM head: one "token" per row holding
    # the row's sum gives the same per-sequence log-probs
    def model(**kwargs):
        zeros = torch.zeros(2 * n, 1)
        return types.SimpleNamespace(
            log_probs=policy.sums.unsqueeze(1),
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
        )

    ref_chosen, ref_rejected = reference.split(reference.sums)
    inputs = {
        "input_ids": torch.zeros(2 * n, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 2, dtype=torch.long),
        "completion_mask": torch.ones(2 * n, 2, dtype=torch.long),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    fake = _dpo_trainer(types.SimpleNamespace(training=True), None, beta, precompute=True)
    theirs = DPOTrainer._compute_loss(fake, model, inputs, False)
    assert math.isclose(float(mine.loss), float(theirs), abs_tol=1e-6)
    logged = fake._metrics["train"]
    assert math.isclose(
        logged["rewards/chosen"][0], float(mine.chosen_rewards.mean()), abs_tol=1e-6
    )
    assert math.isclose(
        logged["rewards/rejected"][0], float(mine.rejected_rewards.mean()), abs_tol=1e-6
    )


def test_conservative_dpo_equals_trls_label_smoothed_sigmoid():
    """TRL 1.16's DPO has no label smoothing on its sigmoid loss (only robust/EXO/AOT): the
    conservative form is CPO's sigmoid loss, here on the policy-to-reference log-ratios."""
    CPOTrainer = _trl("trl.experimental.cpo.cpo_trainer").CPOTrainer
    policy, reference = random_logps(5, seed=11)
    cfg = PreferenceConfig(beta=0.3, label_smoothing=0.15)
    mine = dpo(policy, reference, cfg)
    fake = types.SimpleNamespace(
        alpha=0.0, beta=0.3, label_smoothing=0.15, loss_type="sigmoid", accelerator=_Accelerator()
    )
    ratios = policy.sums - reference.sums
    losses, *_ = CPOTrainer.cpo_loss(fake, *policy.split(ratios))
    assert math.isclose(float(mine.loss), float(losses.mean()), abs_tol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_loss_equals_trl_cpos(smoothing):
    CPOTrainer = _trl("trl.experimental.cpo.cpo_trainer").CPOTrainer
    policy, _ = random_logps(5, seed=5)
    cfg = PreferenceConfig(loss="simpo", beta=2.5, simpo_gamma=0.7, label_smoothing=smoothing)
    mine = simpo(policy, None, cfg)
    fake = types.SimpleNamespace(
        alpha=0.0,
        beta=2.5,
        simpo_gamma=0.7,
        label_smoothing=smoothing,
        loss_type="simpo",
        accelerator=_Accelerator(),
    )
    losses, chosen, rejected = CPOTrainer.cpo_loss(fake, *policy.split(policy.means))
    assert math.isclose(float(mine.loss), float(losses.mean()), abs_tol=1e-6)
    torch.testing.assert_close(mine.chosen_rewards, chosen, atol=1e-6, rtol=0)
    torch.testing.assert_close(mine.rejected_rewards, rejected, atol=1e-6, rtol=0)


def test_orpo_odds_ratio_term_equals_trls():
    ORPOTrainer = _trl("trl.experimental.orpo.orpo_trainer").ORPOTrainer
    policy, _ = random_logps(5, seed=9)
    mine = orpo(policy, None, PreferenceConfig(loss="orpo", beta=0.25))
    fake = types.SimpleNamespace(beta=0.25, accelerator=_Accelerator())
    losses, chosen, rejected, *_ = ORPOTrainer.odds_ratio_loss(fake, *policy.split(policy.means))
    sums, counts = policy.split(policy.sums)[0], policy.split(policy.counts)[0]
    nll = -sums.sum() / counts.sum()  # lmadapt's SFT term: the chosen replies' tokens
    assert math.isclose(float(mine.loss), float(nll - losses.mean()), abs_tol=1e-6)
    torch.testing.assert_close(mine.chosen_rewards, chosen, atol=1e-6, rtol=0)
    torch.testing.assert_close(mine.rejected_rewards, rejected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_on_the_model_equals_trls(spec, tok, method):
    """The whole DPO step on the tiny Llama: TRL's reply log-probs (its fused LM head), its
    reference (a frozen model, or the peft model with adapters disabled) and its loss equal
    lmadapt's `prepare_batch` + `loss`."""
    dpo_trainer = _trl("trl.trainer.dpo_trainer")
    from trl.trainer.utils import add_fused_lm_head

    from lmadapt.methods import METHODS, build_method

    task = make_task(spec, beta=0.2)
    batch = pair_batch(task, tok)
    if method == "full":
        policy, ref = perturbed(task.build_model(spec)), task.build_model(spec)
    else:
        lora = build_method(parse_section(METHODS, "name", "lora", "method"))
        policy = lora.apply(task.build_model(spec), task)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a trained adapter: B != 0
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        ref = None
    policy.eval()

    mine = dict(batch)
    with torch.no_grad():
        task.prepare_batch(policy, mine)
        logits = policy(**model_inputs(mine), **task.forward_kwargs(policy, mine)).logits
        loss = task.loss(logits, mine)
        logps = reply_logps(logits, mine)

    base = policy.get_base_model() if method == "lora" else policy
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    if ref is not None:
        add_fused_lm_head(ref)
    completion = (batch["labels"] != IGNORE).long()
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": completion,
    }
    fake = _dpo_trainer(policy, ref, beta=0.2)
    with torch.no_grad():
        labels = batch["input_ids"].masked_fill(completion == 0, -100)
        out = policy(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
        )
        theirs_logps = out.log_probs.sum(1)
        ref_chosen, ref_rejected = dpo_trainer.DPOTrainer.compute_ref_log_probs(
            fake, ref if ref is not None else policy, inputs
        )
        theirs = dpo_trainer.DPOTrainer._compute_loss(fake, policy, inputs, False)
    torch.testing.assert_close(logps.sums, theirs_logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        mine["reference_logps"], torch.cat([ref_chosen, ref_rejected]), atol=1e-4, rtol=0
    )
    assert not torch.allclose(logps.sums, mine["reference_logps"])  # a policy != reference
    assert math.isclose(float(loss), float(theirs), abs_tol=1e-6)
    logged = fake._metrics["eval"]
    chosen, rejected = logps.split(logps.sums - mine["reference_logps"])
    assert math.isclose(logged["rewards/chosen"][0], 0.2 * float(chosen.mean()), abs_tol=1e-5)
    assert math.isclose(logged["rewards/rejected"][0], 0.2 * float(rejected.mean()), abs_tol=1e-5)


def _trl_pair_batch(features: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """lmadapt's encoded pairs in TRL's CPO/ORPO batch layout (chosen_/rejected_ input_ids,
    attention_mask and labels, -100 off the reply)."""
    out = {}
    for side, ids_key, labels_key in (
        ("chosen", "input_ids", "labels"),
        ("rejected", "rejected_ids", "rejected_labels"),
    ):
        width = max(len(f[ids_key]) for f in features)
        ids = torch.full((len(features), width), pad)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100)
        for i, f in enumerate(features):
            k = len(f[ids_key])
            ids[i, :k], mask[i, :k] = torch.tensor(f[ids_key]), 1
            labels[i, :k] = torch.tensor(f[labels_key])
        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return out


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_simpo_and_orpo_on_the_model_equal_trls(spec, tok, loss):
    """TRL's CPO (loss_type simpo, no NLL term) and ORPO trainers' own concatenated forward
    and loss on the same pairs. TRL's ORPO takes its NLL term over the chosen rows' prompt and
    reply tokens, lmadapt's over the reply's only (the paper's L_SFT): the odds-ratio terms and
    rewards are compared, and each loss less its own NLL."""
    task = make_task(spec, loss=loss, beta=0.4)
    features = task.encode(PAIRS, tok)
    batch = task.collator(tok)(features)
    model = perturbed(task.build_model(spec)).eval()
    with torch.no_grad():
        logits = model(**model_inputs(batch), **task.forward_kwargs(model, batch)).logits
        mine = LOSSES[loss].fn(reply_logps(logits, batch), None, task.pcfg)
        logps = reply_logps(logits, batch)
    common = {
        "accelerator": _Accelerator(),
        "is_encoder_decoder": False,
        "aux_loss_enabled": False,
        "beta": 0.4,
    }
    if loss == "simpo":
        cls = _trl("trl.experimental.cpo.cpo_trainer").CPOTrainer
        fake = types.SimpleNamespace(
            **common,
            pad_token_id=tok.pad_token_id,
            loss_type="simpo",
            simpo_gamma=task.pcfg.simpo_gamma,
            label_smoothing=0.0,
            alpha=0.0,
            cpo_alpha=0.0,
        )
        _bind(cls, fake, "concatenated_forward", "cpo_loss")
    else:
        cls = _trl("trl.experimental.orpo.orpo_trainer").ORPOTrainer
        fake = types.SimpleNamespace(**common, padding_value=tok.pad_token_id)
        _bind(cls, fake, "concatenated_forward", "odds_ratio_loss")
    fake.concatenated_inputs, fake.get_batch_logps = cls.concatenated_inputs, cls.get_batch_logps
    trl_batch = _trl_pair_batch(features, tok.pad_token_id)
    with torch.no_grad():
        chosen_logps, rejected_logps, *_ = fake.concatenated_forward(model, trl_batch)
        theirs, metrics = cls.get_batch_loss_metrics(fake, model, trl_batch, "train")
    # both average the reply's log-probs per token
    torch.testing.assert_close(
        logps.means, torch.cat([chosen_logps, rejected_logps]), atol=1e-5, rtol=0
    )
    assert math.isclose(metrics["rewards/chosen"], float(mine.chosen_rewards.mean()), abs_tol=1e-5)
    assert math.isclose(
        metrics["rewards/rejected"], float(mine.rejected_rewards.mean()), abs_tol=1e-5
    )
    if loss == "simpo":
        assert math.isclose(float(mine.loss), float(theirs), abs_tol=1e-6)
    else:
        sums, counts = logps.split(logps.sums)[0], logps.split(logps.counts)[0]
        nll = float(-sums.sum() / counts.sum())
        assert math.isclose(
            float(mine.loss) - nll, float(theirs) - metrics["nll_loss"], abs_tol=1e-6
        )


# ---------------------------------------------------------------------- end to end


def write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(p) for p in pairs) + "\n", encoding="utf-8")
    return path


TRAIN_PAIRS = [
    {"prompt": f"what is {i} plus {i}?", "chosen": f"it is {2 * i}", "rejected": "the cat sat"}
    for i in range(8)
]
TEST_PAIRS = [
    {"prompt": "what is two plus two?", "chosen": "four", "rejected": "the mat"},
    {
        "prompt": [user("hi"), assistant("hello"), user("and you?")],
        "chosen": [assistant("fine, thanks")],
        "rejected": [assistant("go away")],
    },
    {"chosen": [user("hello"), assistant("world")], "rejected": [user("hello"), assistant("no")]},
]


def preference_config(root: Path, model: str, method: str = "lora", loss: str = "dpo", **train):
    data = {
        "train": str(write_pairs(root / "train.jsonl", TRAIN_PAIRS)),
        "test": str(write_pairs(root / "test.jsonl", TEST_PAIRS)),
    }
    return {
        "model": model,
        "task": {"type": "preference", "loss": loss, "max_new_tokens": 4, "report_samples": 1},
        "method": {"name": method},
        "data": data,
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "lr": 0.01,
            "precision": "fp32",
            "threads": 1,
            "log_every": 1,
            **train,
        },
        "output_dir": str(root / "run"),
    }


def fresh_base_logps(spec, tok, path: str) -> Logps:
    """The test pairs' reply log-probs under the base model loaded anew."""
    task = make_task(spec)
    model = task.build_model(spec).eval()
    batch = pair_batch(task, tok, task.read(path))
    with torch.no_grad():
        return reply_logps(model(**model_inputs(batch)).logits, batch)


class RecordBatches(Hook):
    """Each training batch as the loss sees it (with the reference's log-probs, for dpo)."""

    def __init__(self):
        self.batches: list[dict[str, torch.Tensor]] = []

    def loss_term(self, model, batch, outputs):
        self.batches.append({k: v.detach().clone() for k, v in batch.items()})
        return None


@pytest.mark.parametrize(
    ("method", "loss"),
    [
        ("lora", "dpo"),
        ("lora", "simpo"),
        ("lora", "orpo"),
        ("full", "dpo"),
        ("ia3", "dpo"),
        ("prompt_tuning", "dpo"),
    ],
)
def test_trains_reports_and_reloads(tmp_path, tiny_llama, spec, tok, method, loss):
    cfg = preference_config(tmp_path, tiny_llama, method, loss)
    seen = RecordBatches()
    metrics = train(build_run_config(cfg), hooks=[seen])
    assert metrics["task"] == "preference" and metrics["steps"] == 2
    base_model = make_task(spec).build_model(spec).eval()
    assert len(seen.batches) == 2
    for batch in seen.batches:  # the reference of every step, the first and after it: the base
        if loss != "dpo":
            assert "reference_logps" not in batch  # reference-free: no second forward
            continue
        with torch.no_grad():
            want = reply_logps(base_model(**model_inputs(batch)).logits, batch).sums
        torch.testing.assert_close(batch["reference_logps"], want, atol=1e-4, rtol=0)
    test = metrics["test"]
    for name in PAIR_METRICS:
        assert math.isfinite(test[name]) and math.isfinite(test[f"base_{name}"]), name

    # the base_* columns are the base model's, whatever the method (adapters disabled, or the
    # frozen copy of full fine-tuning)
    base = fresh_base_logps(spec, tok, cfg["data"]["test"])
    chosen, rejected = base.split(base.sums)
    assert math.isclose(test["base_chosen_logp"], float(chosen.mean()), abs_tol=1e-4)
    assert math.isclose(test["base_rejected_logp"], float(rejected.mean()), abs_tol=1e-4)
    assert test["chosen_logp"] != test["base_chosen_logp"]  # trained: another model
    beta = DEFAULT_BETA[loss]
    if loss == "dpo":  # the base against itself: every pair a tie
        assert test["base_reward_accuracy"] == 0.5
        assert test["base_reward_margin"] == 0 and test["base_chosen_reward"] == 0
        assert math.isclose(test["base_loss"], math.log(2), abs_tol=1e-6)
    else:  # reference-free rewards: β × mean reply log-prob
        means = base.split(base.means)[0]
        assert math.isclose(test["base_chosen_reward"], beta * float(means.mean()), abs_tol=1e-4)

    run = Path(metrics["run_dir"])
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "Trained vs base model" in report and "Sample replies" in report
    assert (run / "plots" / "test_reward_margins.png").is_file()

    # reloaded from the run directory: the same log-probs, trained and base
    loaded = load_run(run)
    pairs = loaded.task.read(cfg["data"]["test"])
    again = loaded.task.evaluate_model(loaded.model, loaded.encoded(pairs)).metrics
    for name in ("chosen_logp", "rejected_logp", "base_chosen_logp", "base_rejected_logp", "loss"):
        assert math.isclose(again[name], test[name], abs_tol=1e-4), name


def test_interrupted_run_resumes_to_the_same_weights_and_metrics(tmp_path, tiny_llama):
    """Ctrl-C mid step 3 of 6 (after the forward, before the backward), then resume: the
    adapter and the test metrics are the uninterrupted run's."""

    def cfg(name):
        root = tmp_path / name
        root.mkdir()
        c = preference_config(root, tiny_llama, epochs=3, checkpoint_every=2, eval_every=3)
        c["data"]["dev"] = c["data"]["test"]
        return build_run_config(c)

    reference = train(cfg("ref"))
    assert reference["steps"] == 6
    with pytest.raises(TrainingInterrupted, match="interrupted at step 4.*--resume"):
        train(cfg("cut"), hooks=[SigintAt(3)])
    resumed = resume(tmp_path / "cut" / "run")
    assert resumed["resumed"] and resumed["steps"] == 6
    assert resumed["dev"] == reference["dev"] and resumed["test"] == reference["test"]
    a = load_file(f"{reference['run_dir']}/model/adapter_model.safetensors")
    b = load_file(f"{resumed['run_dir']}/model/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_fine_tuning_run_resumes_against_the_base_reference(tmp_path, tiny_llama):
    """The frozen reference of full fine-tuning is the base model again after a resume, not
    the checkpoint's weights."""

    def cfg(name):
        root = tmp_path / name
        root.mkdir()
        return build_run_config(
            preference_config(root, tiny_llama, "full", epochs=2, checkpoint_every=1)
        )

    reference = train(cfg("ref"))
    with pytest.raises(TrainingInterrupted):
        train(cfg("cut"), hooks=[SigintAt(2)])
    resumed = resume(tmp_path / "cut" / "run")
    assert resumed["test"] == reference["test"]
    a = load_file(f"{reference['run_dir']}/model/model.safetensors")
    b = load_file(f"{resumed['run_dir']}/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_predicts_and_serves(tmp_path, tiny_llama):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmadapt.generate import generate, load_generator
    from lmadapt.serve.app import create_app
    from lmadapt.serve.settings import ServeSettings

    cfg = preference_config(tmp_path, tiny_llama, lr=0.05)
    run_dir = train(build_run_config(cfg))["run_dir"]
    gen = load_generator(run_dir)
    prompt = "what is two plus two?"
    (want,) = generate(gen, [prompt], {"max_new_tokens": 6})
    (row,) = predict(run_dir, [prompt])
    assert set(row) == {"prompt", "output"}

    settings = ServeSettings(max_wait_ms=5, max_texts=4, max_chars=400, max_new_tokens=16)
    with TestClient(create_app([run_dir], settings)) as c:
        (card,) = c.get("/v1/models").json()["data"]
        assert card["id"] == "run" and card["task"] == "preference"
        body = {"model": "run", "prompt": prompt, "max_new_tokens": 6, "temperature": 0}
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        assert [x["text"] for x in r.json()["results"]] == [want]
        body = {"model": "run", "messages": [user(prompt)], "max_tokens": 6, "temperature": 0}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want


def test_a_long_row_loses_the_start_of_its_prompt_and_keeps_its_reply(spec, tok):
    from lmadapt.data.preference import PreferencePair

    long_prompt = " ".join(f"word{i}" for i in range(200))
    pair = PreferencePair([user(long_prompt)], "short yes", "short no", "x.jsonl", 1)
    whole = make_task(spec, max_length=4096).encode([pair], tok)[0]
    cut = make_task(spec, max_length=64).encode([pair], tok)[0]
    assert len(whole["input_ids"]) > 64 and len(cut["input_ids"]) == 64
    reply = [t for t in whole["labels"] if t != -100]
    assert [t for t in cut["labels"] if t != -100] == reply  # the reply whole
    assert cut["input_ids"] == whole["input_ids"][-64:]  # the prompt's end kept
    assert cut["labels"][0] == -100
