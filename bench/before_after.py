"""Before/after check for behaviour-preserving restructurings: every CLI command, same metrics.

Runs each `lmadapt` command once, small and offline, against one source tree and writes every
command's metrics to `<out>/results.json`; a second mode compares two such files after dropping
the fields that measure time, memory or where things were written.

    # 1. run the commands on the old and on the new source tree (a few minutes each on 2 cores)
    git worktree add /tmp/old BASE_COMMIT     # the code before the change, BASE_COMMIT e.g. HEAD~1
    .venv/bin/python bench/before_after.py --src /tmp/old/src --out /tmp/ba_old
    .venv/bin/python bench/before_after.py --src src --out /tmp/ba_new
    # 2. compare: prints EQUAL or DIFFERENT per command (and the differing keys); exit 1 if any
    .venv/bin/python bench/before_after.py --compare /tmp/ba_old/results.json \\
        /tmp/ba_new/results.json

Each command runs as `python -m lmadapt ...` in a subprocess with `PYTHONPATH=<src>` first,
`HF_HUB_OFFLINE=1`, `TQDM_DISABLE=1` and `LMADAPT_TENSORBOARD=0`, in the repository root that
holds `<src>` (so the configs' relative data paths resolve). Only the embedded models (`minilm`,
`smollm2-135m-instruct`), the demo data in `examples/sentiment/` and small files written into
`<out>/inputs/` are used; no `../shared` data. Every run's output directory is fresh under
`<out>/runs/`; stdout, stderr and the exit code of each command are kept in `<out>/logs/`.

Commands: train (configs/demo.yaml, 20 steps), eval and predict on that run, export --merge,
compare (lora, bitfit, 10 steps each), hpo (2 trials of 10 steps), continual (naive, lwf,
adapters on a two-task stream of the demo data), distill (the demo run as teacher), prompt
(zero-shot SmolLM2 on the demo dev set), generate --prompt and evaluate-model (SmolLM2, greedy,
few new tokens). Metrics include each run's log.jsonl (loss per step) and sha256 of its weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# Fields that differ between two identical runs: time, speed, memory, where output was written.
# A key is dropped (with everything under it) when it is in DROP_KEYS or ends with a suffix.
DROP_KEYS = {
    "seconds",
    "wall_seconds",
    "train_seconds",
    "peak_rss_mb",
    "rss_mb",
    "time",
    "elapsed",
    "timestamp",
    "date",
    "run_dir",
    "output_dir",
    "study_dir",
    "out_dir",
    "source_run",
    "speedup",  # distill: teacher/student speed ratio
    "config",  # evaluate-model: the config file's path
    "log",  # compare: each method's log file
    "paths",
}
DROP_SUFFIXES = ("_seconds", "_per_second", "_rss_mb", "_time", "_ms", "_dir", "_path")

DEMO_TRAIN = "examples/sentiment/train.csv"
DEMO_DEV = "examples/sentiment/dev.csv"
DEMO_SMALL = ["train.max_steps=20", "train.eval_every=10", "data.max_eval_samples=64"]
COMPARE_SMALL = ["train.max_steps=10", "train.eval_every=5", "data.max_eval_samples=64"]
LLM = "smollm2-135m-instruct"
MAX_NEW_TOKENS = "16"
CONTINUAL = "naive,lwf,adapters"

# Commands left out, with the reason (a failure on the old code unrelated to the change).
SKIP: dict[str, str] = {}

# Commands that read the demo run trained by `train`.
NEEDS_TRAIN = {"eval", "predict", "export", "distill"}


# ---------------------------------------------------------------------------- inputs


HPO_SPACE = {
    "method.r": {"type": "categorical", "choices": [4, 8]},
    "train.lr": {"type": "float", "low": 1e-4, "high": 2e-3, "log": True},
}

ARITHMETIC = [(2, 3), (7, 8), (30, 14)]


def continual_config(out: Path) -> dict[str, Any]:
    """Two classification tasks from the demo data: as shipped, then train/dev swapped."""
    task = {"type": "classification", "text_column": "text", "label_column": "label"}
    return {
        "model": "minilm",
        "strategy": {"name": "naive"},
        "train": {"epochs": 1, "max_steps": 6, "batch_size": 8, "eval_batch_size": 64, "seed": 42},
        "stream": [
            {"name": "reviews", "task": task, "data": {"train": DEMO_TRAIN, "dev": DEMO_DEV}},
            {
                "name": "swapped",
                "task": task,
                "data": {"train": DEMO_DEV, "dev": DEMO_TRAIN, "max_eval_samples": 64},
            },
        ],
        "output_dir": str(out / "runs" / "continual"),
    }


def generation_config(out: Path, data: Path) -> dict[str, Any]:
    """SmolLM2 on a few sums, greedy with a short budget: loss plus generated exact match."""
    return {
        "model": LLM,
        "task": {
            "type": "generation",
            "template": "auto",
            "max_length": 256,
            "max_new_tokens": int(MAX_NEW_TOKENS),
            "answer_pattern": r"####\s*(-?[\d,.]+)",
            "generate_batch_size": len(ARITHMETIC),
        },
        "method": {"name": "lora"},
        "data": {"train": str(data), "dev": str(data)},
        "train": {"eval_batch_size": len(ARITHMETIC), "seed": 42},
        "output_dir": str(out / "runs" / "evaluate-model"),
    }


def write_inputs(out: Path) -> dict[str, Path]:
    """The small files the commands read: HPO space, continual and generation configs, data."""
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    sums = [
        {
            "instruction": f"What is {a} + {b}? End with '#### <number>'.",
            "input": "",
            "output": f"{a} + {b} = {a + b}\n#### {a + b}",
        }
        for a, b in ARITHMETIC
    ]
    files = {
        "space": (inputs / "hpo_space.yaml", HPO_SPACE),
        "continual": (inputs / "continual.yaml", continual_config(out)),
        "sums": (inputs / "sums.json", sums),
    }
    files["generation"] = (inputs / "generation.yaml", generation_config(out, files["sums"][0]))
    for path, content in files.values():
        text = json.dumps(content, indent=2) if path.suffix == ".json" else yaml.safe_dump(content)
        path.write_text(text, encoding="utf-8")
    return {name: path for name, (path, _) in files.items()}


# ---------------------------------------------------------------------------- commands


def commands(out: Path) -> dict[str, list[str]]:
    """argv after `python -m lmadapt` per command. Options come before the config so that the
    same argv parses on old and new code (overrides follow the config directly)."""
    runs, inputs = out / "runs", write_inputs(out)
    demo = str(runs / "train")
    question = "What is 12 * 7? Answer with the number only."
    return {
        "train": ["train", "configs/demo.yaml", *DEMO_SMALL, f"output_dir={demo}"],
        "eval": ["eval", demo, DEMO_DEV, "--json"],
        "predict": ["predict", demo, "--file", DEMO_DEV],
        "export": ["export", demo, "--merge", str(runs / "export")],
        "compare": ["compare", "--methods", "lora,bitfit", "configs/demo.yaml"]
        + [*COMPARE_SMALL, f"output_dir={runs / 'compare'}"],
        "hpo": ["hpo", "--space", str(inputs["space"]), "--trials", "2"]
        + ["--study-dir", str(runs / "hpo"), "configs/demo.yaml", *COMPARE_SMALL],
        "continual": ["continual", "--strategies", CONTINUAL, str(inputs["continual"])],
        "distill": ["distill", "configs/distill_sst2.yaml", f"teacher.run_dir={demo}"]
        + ["task.text_column=text", "task.label_column=label"]
        + [f"data.train={DEMO_TRAIN}", f"data.dev={DEMO_DEV}", "data.max_train_samples=400"]
        + ["data.max_eval_samples=64", "train.max_steps=20", "train.batch_size=16"]
        + [f"output_dir={runs / 'distill'}"],
        "prompt": ["prompt", "configs/prompts/sst2_zero_shot.yaml", f"data.dev={DEMO_DEV}"]
        + ["data.max_eval_samples=24", "verbalizer={negative: negative, positive: positive}"]
        + [f"output_dir={runs / 'prompt'}"],
        "generate": ["generate", LLM, "--prompt", question, "--max-new-tokens", MAX_NEW_TOKENS],
        "evaluate-model": ["evaluate-model", str(inputs["generation"])],
    }


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def weight_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of each safetensors file: the saved weights must be bit-identical too."""
    return {
        str(p.relative_to(model_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.rglob("*.safetensors"))
        if "checkpoints" not in p.relative_to(model_dir).parts
    }


def history(log: Path) -> list[dict[str, Any]]:
    """A run's log.jsonl: training loss and dev metrics at every logged step."""
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line]


def run_metrics(run_dir: Path) -> dict[str, Any]:
    return {
        **read_json(run_dir / "metrics.json"),
        "weights": weight_hashes(run_dir / "model"),
        "history": history(run_dir / "log.jsonl"),
    }


def hpo_metrics(study: Path) -> dict[str, Any]:
    trials = sorted((study / "trials").iterdir(), key=lambda p: int(p.name))
    best = yaml.safe_load((study / "best.yaml").read_text(encoding="utf-8"))
    return {"best": best, "trials": {p.name: run_metrics(p) for p in trials}}


def compare_metrics(out: Path) -> dict[str, Any]:
    rows = read_json(out / "compare.json")["rows"]
    return {"rows": rows, "runs": {r["method"]: run_metrics(Path(r["run_dir"])) for r in rows}}


def continual_metrics(out: Path) -> dict[str, Any]:
    summary = read_json(out / "summary.json")
    runs = {}
    for strategy in summary["runs"]:
        steps = sorted((out / strategy / "steps").iterdir())
        runs[strategy] = {
            **read_json(out / strategy / "continual.json"),
            "history": {p.name: history(p / "log.jsonl") for p in steps},
        }
    return {"summary": summary, "runs": runs}


def export_metrics(out: Path) -> dict[str, Any]:
    return {**read_json(out / "lmadapt_export.json"), "weights": weight_hashes(out)}


# Per command: its metrics from its output directory (<out>/runs/<command>) or from its stdout.
FROM_DIR = {
    "train": run_metrics,
    "distill": run_metrics,
    "export": export_metrics,
    "compare": compare_metrics,
    "hpo": hpo_metrics,
    "continual": continual_metrics,
    "prompt": lambda out: read_json(out / "metrics.json"),
}
FROM_STDOUT = {
    "eval": json.loads,
    "evaluate-model": json.loads,
    "predict": lambda s: {"predictions": [json.loads(x) for x in s.splitlines() if x.strip()]},
    "generate": lambda s: {"outputs": s.splitlines()},
}


def collect(name: str, runs: Path, stdout: str) -> Any:
    """The metrics one command produced: its JSON files, or what it printed."""
    if name in FROM_DIR:
        return FROM_DIR[name](runs / name)
    return FROM_STDOUT[name](stdout)


def normalise(value: Any, prefixes: dict[str, str]) -> Any:
    """Replace the output and repository directories in strings by <out> and <repo>."""
    if isinstance(value, dict):
        return {k: normalise(v, prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, prefixes) for v in value]
    if isinstance(value, str):
        for prefix, token in prefixes.items():
            value = value.replace(prefix, token)
    return value


def run_command(name: str, argv: list[str], src: Path, out: Path) -> dict[str, Any]:
    """Run one command; keep its stdout, stderr and exit code in <out>/logs/."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "LMADAPT_TENSORBOARD": "0",
    }
    cmd = [sys.executable, "-m", "lmadapt", *argv]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=src.parent, env=env, capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 1)
    logs = out / "logs"
    (logs / f"{name}.stdout").write_text(proc.stdout, encoding="utf-8")
    (logs / f"{name}.stderr").write_text(proc.stderr, encoding="utf-8")
    (logs / f"{name}.rc").write_text(f"{proc.returncode}\n", encoding="utf-8")
    entry: dict[str, Any] = {"argv": argv, "exit_code": proc.returncode, "seconds": wall}
    if proc.returncode == 0:
        try:
            entry["metrics"] = collect(name, out / "runs", proc.stdout)
        except (OSError, ValueError, KeyError) as e:
            entry["collect_error"] = f"{type(e).__name__}: {e}"
    status = "ok" if "metrics" in entry else f"FAILED (see {logs / name}.stderr)"
    print(f"[{name}] {status}, {wall}s", flush=True)
    return entry


def check_import(src: Path) -> str:
    """Make sure PYTHONPATH=<src> wins over the installed package."""
    code = "import lmadapt; print(lmadapt.__file__)"
    env = {**os.environ, "PYTHONPATH": str(src)}
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=src.parent, env=env, capture_output=True, text=True
    ).stdout.strip()
    if not found.startswith(str(src)):
        sys.exit(f"lmadapt imports from {found or '?'}, not from {src}")
    return found


def run_all(src: Path, out: Path, only: list[str] | None) -> int:
    src, out = src.resolve(), out.resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: give a fresh --out directory")
    (out / "logs").mkdir(parents=True)
    table = commands(out)
    wanted = set(only or table) | ({"train"} if NEEDS_TRAIN & set(only or []) else set())
    names = [n for n in table if n in wanted]
    prefixes = {str(out): "<out>", str(src.parent): "<repo>"}
    results: dict[str, Any] = {"_meta": {"src": str(src), "lmadapt": check_import(src)}}
    t0 = time.perf_counter()
    for name in names:
        if name in SKIP:
            results[name] = {"skipped": SKIP[name]}
            continue
        results[name] = normalise(run_command(name, table[name], src, out), prefixes)
        (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    results["_meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    failed = [n for n in names if n not in SKIP and "metrics" not in results[n]]
    print(f"{len(names)} commands in {results['_meta']['seconds']}s; results in {out}/results.json")
    print(f"failed: {', '.join(failed)}" if failed else "all commands succeeded")
    return 1 if failed else 0


# ---------------------------------------------------------------------------- compare


def dropped(key: str) -> bool:
    return key in DROP_KEYS or key.endswith(DROP_SUFFIXES)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"dotted.key[i]": leaf} without the dropped fields."""
    if isinstance(value, dict):
        items = {}
        for k, v in value.items():
            if not dropped(str(k)):
                items.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return items
    if isinstance(value, list):
        items = {}
        for i, v in enumerate(value):
            items.update(flatten(v, f"{prefix}[{i}]"))
        return items
    return {prefix: value}


def same(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol
    return a == b


def diff_entry(a: dict[str, Any], b: dict[str, Any], tol: float) -> list[str]:
    """Lines `key: A=... B=...` for every differing field (exit code and metrics)."""
    fa = {"exit_code": a.get("exit_code"), **flatten(a.get("metrics"), "metrics")}
    fb = {"exit_code": b.get("exit_code"), **flatten(b.get("metrics"), "metrics")}
    missing = object()
    lines = []
    for key in sorted(fa.keys() | fb.keys()):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va is missing or vb is missing or not same(va, vb, tol):
            show = ["<missing>" if v is missing else json.dumps(v) for v in (va, vb)]
            lines.append(f"{key}: A={show[0]} B={show[1]}")
    return lines


def compare_files(path_a: Path, path_b: Path, tol: float, limit: int) -> int:
    a, b = read_json(path_a), read_json(path_b)
    print(f"A = {path_a}\nB = {path_b}  (dropped fields: {sorted(DROP_KEYS)}, *{DROP_SUFFIXES})")
    names = [n for n in {**a, **b} if not n.startswith("_")]
    differing = 0
    for name in names:
        ea, eb = a.get(name, {}), b.get(name, {})
        if "skipped" in ea or "skipped" in eb:
            print(f"{name:<16} SKIPPED ({ea.get('skipped') or eb.get('skipped')})")
            continue
        lines = diff_entry(ea, eb, tol)
        if not lines and "metrics" not in ea:
            lines = [f"no metrics: {ea.get('collect_error', 'command failed')}"]
        differing += bool(lines)
        print(f"{name:<16} {'DIFFERENT' if lines else 'EQUAL'}")
        for line in lines[:limit]:
            print(f"    {line}")
        if len(lines) > limit:
            print(f"    ... and {len(lines) - limit} more")
    print(f"{len(names) - differing} of {len(names)} commands equal")
    return 1 if differing else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, help="lmadapt source directory to test (…/src)")
    p.add_argument("--out", type=Path, help="fresh output directory")
    p.add_argument("--only", help="comma-separated commands (train is added when needed)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"))
    p.add_argument("--tol", type=float, default=0.0, help="absolute float tolerance (default 0)")
    p.add_argument("--limit", type=int, default=20, help="differing keys shown per command")
    a = p.parse_args()
    if a.compare:
        return compare_files(*a.compare, a.tol, a.limit)
    if not a.src or not a.out:
        p.error("give --src and --out (or --compare A.json B.json)")
    return run_all(a.src, a.out, a.only.split(",") if a.only else None)


if __name__ == "__main__":
    sys.exit(main())
