#!/usr/bin/env bash
# The first GPU run in one command: checks the NCCL path end to end and prints a pass/fail table
# (scripts/gpu_check.py; README, "Running on GPUs"). Refuses without a GPU; --dry-run runs the
# same checks on the CPU over gloo. Uses .venv (set up as scripts/setup.sh does), or the Python
# named by KTG_PYTHON (one that already has the project's dependencies: no set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${KTG_PYTHON:-}" ]; then
  PY=$KTG_PYTHON
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
