"""Stage 1 of MHGD: train the attention module of every frozen node that feeds ``mhgd`` edges.

    python launch.py mode=attention graph=mhgd                 # then: torchrun ... graph=mhgd

One process, before the graph's run: each such node's network is loaded from its checkpoint
and frozen (BatchNorm on its stored statistics); its attention module
(``actors.mhgd.AttentionModule``) learns to estimate the network's deeper-stage features
from the earlier stage's through the attention graph, for ``graph.mhgd.attention_epochs``
epochs of the run's batches (same order, augmentation and batch size as training), and is
written atomically to ``graph.nodes.<i>.attention``. An existing file is never overwritten.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from actors.config import RunConfig
from actors.edge_kinds import check_mhgd_widths
from actors.errors import ConfigError
from actors.exchange import resolve_device
from actors.files import load_model_weights
from actors.mhgd import save_attention, train_attention
from actors.models import build_model
from actors.preflight import check_checkpoints, check_device, file_digest, load_data
from actors.worker import build_batch_maker, build_batch_order, steps_per_epoch

log = logging.getLogger("attention")


def attention_nodes(cfg: RunConfig) -> list[int]:
    """The frozen nodes whose attention module the graph's mhgd edges need."""
    return cfg.graph.senders("features")


def run_attention(cfg: RunConfig, say=print) -> dict[int, dict[str, Any]]:
    """Train and write the attention module of every node ``attention_nodes`` names.
    Returns, per node, the file and the estimation loss of each epoch."""
    nodes = attention_nodes(cfg)
    if not nodes:
        raise ConfigError(f"mode=attention trains the attention modules of mhgd edges, and graph {cfg.graph.name!r} "
                          "has none (graph.kinds: mhgd on an edge from a frozen node; e.g. graph=mhgd)")
    for s in nodes:
        path = Path(cfg.graph.nodes[s].attention)
        if path.exists():
            raise ConfigError(f"graph.nodes[{s}].attention={path} exists already; it is never overwritten: "
                              f"delete it to train it again, or point graph.nodes.{s}.attention elsewhere")
    check_device(cfg, 1)
    data = load_data(cfg)
    check_checkpoints(cfg, data, attention=False)  # the attention files are what this writes
    for s in nodes:
        check_mhgd_widths(cfg.graph, s, data)
    device = resolve_device(cfg.device, 0)
    data = data.to(device)
    order, batches = build_batch_order(cfg, data), build_batch_maker(cfg, data, device)
    steps = steps_per_epoch(cfg, order)
    epochs, lr = cfg.graph.mhgd_option("attention_epochs"), float(cfg.graph.mhgd_option("attention_lr"))
    out = {}
    for s in nodes:
        n = cfg.graph.nodes[s]
        with torch.random.fork_rng(devices=[]):
            net = build_model(n.model, data.info.num_classes, data.info.in_channels)
        net.load_state_dict(load_model_weights(n.checkpoint)[0])
        net.to(device).eval().requires_grad_(False)
        say(f"attention module of node {s} ({n.model}, {n.checkpoint}): {epochs} epochs of {steps} steps, lr {lr:g}")

        def epoch_batches(epoch: int):
            plan = order.epoch_plan(epoch).to(device)
            for k in range(steps):
                yield batches.step(order, plan, k)[1]

        t0 = time.perf_counter()
        module, losses = train_attention(net, epoch_batches, epochs, lr, cfg.seed, log=say, device=device)
        meta = {"model": n.model, "checkpoint": n.checkpoint, "checkpoint_sha256": file_digest(n.checkpoint),
                "dataset": data.name, "epochs": epochs, "lr": lr, "seed": cfg.seed, "losses": losses}
        path = save_attention(n.attention, module, meta)
        say(f"wrote {path} (estimation loss {losses[0]:.4f} -> {losses[-1]:.4f}, {time.perf_counter() - t0:.0f}s)")
        out[s] = {"path": str(path), "losses": losses}
    return out

