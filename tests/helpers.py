"""Shared builders for tests: small, fast configs on digits."""
from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from actors.config import RunConfig

# the gates of the session's real run (conftest.real_run): every kind of edge, Cutoffs included
WANDB_RUN_GATES = [["Through", "Linear", "Cutoff"],
                   ["Correct", "Through", "Through"],
                   ["Cutoff", "Cutoff", "Through"]]


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


def write_cifar(root, n_classes, n_train_per_file=6, n_test=5):
    """Small CIFAR files in torchvision's own on-disk format (pickled batches) under ``root``."""
    rng = np.random.default_rng(0)
    if n_classes == 10:
        folder = root / "cifar-10-batches-py"
        files, key = [f"data_batch_{i}" for i in range(1, 6)], b"labels"
        test = ["test_batch"]
    else:
        folder = root / "cifar-100-python"
        files, key, test = ["train"], b"fine_labels", ["test"]
    folder.mkdir(parents=True)
    expected = {}
    for name in files + test:
        n = n_test if name in test else n_train_per_file
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_classes, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, f)
        expected[name] = (data, labels)
    return expected


def node_loss(node, logits, all_logits, labels, progress, own=None, received=None):
    """``node.loss`` from plain tensors: the node's logits (with its other outputs ``own``),
    every node's logits ``all_logits`` [M, B, C] and the sent tensors ``received``; returns
    (total, per-edge terms, the whole ``NodeLoss``)."""
    from actors.node import Delivered

    result = node.loss({**(own or {}), "logits": logits}, Delivered(all_logits, received or {}), labels, progress)
    return result.total, result.terms, result


def make_node(index, graph, num_classes=3, in_channels=1, epochs=1, steps_per_epoch=10, optim=None):
    """A GraphNode on the CPU with a constant learning rate (unit tests of its loss)."""
    from actors.config import OptimConfig
    from actors.node import GraphNode

    return GraphNode(index, graph, num_classes=num_classes, in_channels=in_channels,
                     optim=optim or OptimConfig(schedule="constant", milestones=[]), epochs=epochs,
                     steps_per_epoch=steps_per_epoch)
