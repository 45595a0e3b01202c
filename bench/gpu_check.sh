#!/usr/bin/env bash
# The script to run on a machine with a CUDA GPU: the `cuda`-marked tests (training and
# prediction on the GPU, compared with the CPU), nothing else heavy. A few minutes at most.
#   bash bench/gpu_check.sh            (from the repository root; extra args go to pytest)
# Without a GPU every selected test is skipped, which this script reports as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible")'
HF_HUB_OFFLINE=1 exec "$PY" -m pytest -m cuda -p no:cacheprovider "$@"
