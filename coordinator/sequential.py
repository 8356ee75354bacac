"""The single-process reference: all M nodes of a graph trained in one process, node after
node, on the same batches (what the public reference implementations do).

It drives the very same ``GraphNode`` forward/loss/update and the same batch plan as the
distributed workers, but with no process group: the "exchange" is a ``torch.stack`` of the
nodes' detached logits. The tests use it to prove that the M-process trainer computes the
method exactly (bitwise-equal parameters); the benchmark uses it as the baseline.
"""
from __future__ import annotations

from typing import Optional

import torch

from actors.data import Dataset
from actors.node import GraphNode
from actors.worker import build_batch_maker, build_batch_order, build_node, steps_per_epoch


def train_sequential(cfg, data: Dataset, max_steps: Optional[int] = None,
                     device: torch.device = torch.device("cpu")) -> list[GraphNode]:
    """Train every node of ``cfg.graph`` for ``cfg.train.epochs`` epochs (or ``max_steps``
    steps) in this process; returns the nodes."""
    data = data.to(device)
    order = build_batch_order(cfg, data)
    batches = build_batch_maker(cfg, data, device)
    spe = steps_per_epoch(cfg, order)
    total = spe * cfg.train.epochs
    nodes = [build_node(cfg, data, i, spe, device) for i in range(cfg.graph.num_nodes)]
    step = 0
    for epoch in range(cfg.train.epochs):
        plan = order.epoch_plan(epoch).to(device)
        for k in range(spe):
            if max_steps is not None and step >= max_steps:
                return nodes
            x, y = batches(order.batch(plan, k))
            logits = [n.forward(x) for n in nodes]
            all_logits = torch.stack([z.detach() for z in logits])
            step += 1
            for n, z in zip(nodes, logits):
                if not n.frozen:
                    loss, _ = n.loss(z, all_logits, y, step / total)
                    n.update(loss)
    return nodes
