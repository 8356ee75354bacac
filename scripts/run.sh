#!/usr/bin/env bash
# Set up (first time) and train the default 3-node graph (ktg3) on the embedded digits
# dataset, one process per node. Extra arguments are hydra overrides, e.g. train.epochs=5.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=${WANDB_SILENT:-true}
exec .venv/bin/torchrun --standalone --nproc_per_node=3 launch.py "$@"
