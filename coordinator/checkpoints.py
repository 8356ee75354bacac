"""Group checkpoints of a run: every node's full state at an epoch boundary, and the marker
that says which epoch the whole group has saved.

    <run_dir>/checkpoints/epoch_0003/node0.pt ... node<M-1>.pt   (each written atomically)
    <run_dir>/checkpoints/latest.json                            {"epoch": 3, "nodes": M}

Each node writes its own file; only after every node has written (the per-epoch metrics
gather is the barrier) does rank 0 move ``latest.json`` forward, atomically. A crash at any
point therefore leaves ``latest.json`` naming an epoch that every node has on disk. Older
epoch folders beyond ``keep`` are removed after the marker moves.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from actors.checkpoint import atomic_save, atomic_write_text

MARKER = "latest.json"


def epoch_dir(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}"


def save_node(run_dir: str | Path, epoch: int, index: int, state: dict[str, Any]) -> Path:
    path = epoch_dir(run_dir, epoch) / f"node{index}.pt"
    atomic_save(state, path)
    return path


def mark_complete(run_dir: str | Path, epoch: int, num_nodes: int, keep: int = 2) -> None:
    """Rank 0, after every node saved ``epoch``: move the marker, prune old epochs."""
    root = Path(run_dir) / "checkpoints"
    atomic_write_text(json.dumps({"epoch": epoch, "nodes": num_nodes}) + "\n", root / MARKER)
    epochs = sorted(p for p in root.glob("epoch_*") if p.is_dir())
    for old in epochs[: max(0, len(epochs) - keep)]:
        if old.name != epoch_dir(run_dir, epoch).name:
            shutil.rmtree(old, ignore_errors=True)


def latest_epoch(run_dir: str | Path) -> Optional[int]:
    marker = Path(run_dir) / "checkpoints" / MARKER
    if not marker.is_file():
        return None
    return int(json.loads(marker.read_text())["epoch"])


def load_node(run_dir: str | Path, epoch: int, index: int) -> dict[str, Any]:
    return torch.load(epoch_dir(run_dir, epoch) / f"node{index}.pt", map_location="cpu", weights_only=False)
