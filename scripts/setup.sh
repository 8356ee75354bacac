#!/usr/bin/env bash
# Create .venv and install the project with its test extra (idempotent: re-installs only
# when pyproject.toml changed). torch 2.14.1 / torchvision 0.29.1 are pinned here because
# that pair is available offline on our dev machines; on a GPU machine pip picks the
# matching CUDA build. Override with KTG_TORCH_SPEC="torch==X torchvision==Y".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.ktg-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies into .venv (about a minute)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2 || true
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q ${KTG_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1} -e '.[dev]' >&2
  echo "$want" > "$stamp"
fi
