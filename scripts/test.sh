#!/usr/bin/env bash
# Set up (first time), lint (ruff) and run the test suite on CPU (gloo). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true
echo "[test] ruff check (pyproject.toml [tool.ruff])" >&2
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
