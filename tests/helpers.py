"""Shared builders for tests: small, fast configs on digits."""
from __future__ import annotations

from typing import Any

from coordinator.config import RunConfig


def small_config(nodes: list[Any], gates: list[list[str]], **overrides: Any) -> RunConfig:
    """A fast RunConfig: convnet-sized graphs on digits, one thread per process, no wandb."""
    data: dict[str, Any] = {
        "graph": {"name": "test", "nodes": nodes, "gates": gates, "temperature": 1.0, "reduction": "sum"},
        "dataset": {"name": "digits", "val_fraction": 0.15, "crop_pad": 1, "flip": False},
        "optim": {"lr": 0.05, "schedule": "cosine", "milestones": [], "warmup_epochs": 0},
        "train": {"epochs": 1, "batch_size": 32, "num_threads": 1},
        "logger": {"backend": "none"},
        "seed": 0,
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return RunConfig.from_dict(data)
