"""The single-process reference: all M nodes of a graph trained in one process, node after
node, on the same batches (what the public reference implementations do).

It drives the very same ``GraphNode`` forward/loss/update and the same batch plan as the
distributed workers, but with no process group: the "exchange" is a ``torch.stack`` of the
nodes' detached logits. The tests use it to prove that the M-process trainer computes the
method exactly (bitwise-equal parameters); the benchmark (``scripts/bench.py``) uses it as
the baseline the M-process group is measured against.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from actors.config import RunConfig
from actors.data import Dataset
from actors.node import GraphNode
from actors.worker import build_batch_maker, build_batch_order, build_node, steps_per_epoch


class SequentialGroup:
    """Every node of ``cfg.graph`` in this process; ``step(x, y)`` is one training step of
    the whole graph."""

    def __init__(self, cfg: RunConfig, data: Dataset, device: torch.device = torch.device("cpu")):
        self.cfg = cfg
        self.data = data.to(device)
        self.device = device
        self.order = build_batch_order(cfg, self.data)
        self.make_batch = build_batch_maker(cfg, self.data, device)
        self.steps_per_epoch = steps_per_epoch(cfg, self.order)
        self.nodes: list[GraphNode] = [build_node(cfg, self.data, i, self.steps_per_epoch, device)
                                       for i in range(cfg.graph.num_nodes)]
        self.step_count = 0

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The run's batches, epoch after epoch, in the coordinator's order."""
        for epoch in range(self.cfg.train.epochs):
            plan = self.order.epoch_plan(epoch).to(self.device)
            for k in range(self.steps_per_epoch):
                yield self.make_batch(self.order.batch(plan, k))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        logits = [n.forward(x) for n in self.nodes]
        all_logits = torch.stack([z.detach() for z in logits])
        self.step_count += 1
        for n, z in zip(self.nodes, logits):
            if not n.frozen:
                loss, _ = n.loss(z, all_logits, y, n.progress(self.step_count))
                n.update(loss)  # skips the optimiser step of a zero loss under graph.skip_zero_loss


def train_sequential(cfg: RunConfig, data: Dataset, max_steps: Optional[int] = None,
                     device: torch.device = torch.device("cpu")) -> list[GraphNode]:
    """Train every node of ``cfg.graph`` for ``cfg.train.epochs`` epochs (or ``max_steps``
    steps) in this process; returns the nodes."""
    group = SequentialGroup(cfg, data, device)
    for x, y in group.batches():
        if max_steps is not None and group.step_count >= max_steps:
            break
        group.step(x, y)
    return group.nodes
