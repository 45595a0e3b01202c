"""`lmadapt auto`: pick the adaptation route that fits the data, within a time budget.

It reads the training file with the task that recognises it by its form (a CoNLL file, records
of preference pairs), else with the first that accepts it, or with the one named (the tasks it
adapts are the `AdaptableTask`s), asks the task to describe the data (`DataProfile`: examples
per label, lengths), carves a stratified dev set out of train when none is given (written as
files, so every route reads the same dev; a test file is never used for selection and is scored
for the winner only), then runs the routes that fit (preference pairs: DPO with LoRA on a causal
LM, the `lm_lora` route), cheapest first, each an ordinary `lmadapt.api.train` run
(distillation: `run_distill`) with a `Deadline` hook that fits the one training loop into the
route's share of the budget. The best dev metric wins; its run directory is moved to
OUT/winner, where predict, serve and export read it as they read any run. report.md and
leaderboard.json list every route: its dev metric, training time, prediction speed, artifact size
and status (or why it was skipped).

The budget bounds the whole command: each route's Deadline fits its training and dev scoring
into its share (sampling a dev set too large to score down to what fits), and `time_limit` stops
whatever is still running where a share, or the budget, ends (loading, a hanging route, the test
file). Every input is checked before the first route; Ctrl-C or an error keeps the routes that
finished.

    plan.py    the data: task, profile, carved dev set, prompt
    routes.py  the routes (one class each, registered cheapest first) and the Deadline hook
    runner.py  the budget, the routes in turn, the winner, report.md and leaderboard.json
"""

from lmadapt.auto.routes import ROUTES, Deadline
from lmadapt.auto.runner import auto, parse_budget

__all__ = ["ROUTES", "Deadline", "auto", "parse_budget"]
