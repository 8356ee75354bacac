"""The single-process reference: all M nodes of a graph trained in one process, node after
node, on the same batches (what the public reference implementations do).

It is the trainer itself with every node in one process (P = 1): the same ``NodeWorker``
step (forward every node, one "exchange" that at world size 1 is a local copy, then each
node's gated loss and update), run in this process without a process group. The tests
compare the M-process group with it (bitwise-equal parameters); the benchmark
(``scripts/bench.py``) measures the group against it.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from actors.config import RunConfig
from actors.data import Dataset
from actors.exchange import DistEnv, Exchange
from actors.node import GraphNode
from actors.worker import BatchCheck, EpochTotals, NodeWorker


class ReferenceTrainer:
    """The single-process reference: every node of ``cfg.graph`` in this process (a worker at
    P = 1); ``step(rows, x, y)`` is one training step of the whole graph, on a batch of
    ``batches()``."""

    def __init__(self, cfg: RunConfig, data: Dataset, device: torch.device = torch.device("cpu")):
        env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device), backend="none")
        self.worker = NodeWorker(cfg, env, Exchange(env), data, placement=[list(range(cfg.graph.num_nodes))])
        self.cfg = cfg
        self.nodes: list[GraphNode] = self.worker.nodes
        self.steps_per_epoch = self.worker.steps_per_epoch
        self._totals = [EpochTotals(len(n.edges), env.device, not self.worker.skip_nonfinite) for n in self.nodes]
        self._check = BatchCheck(1, env.device)

    @property
    def step_count(self) -> int:
        return self.worker.step

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The run's batches, epoch after epoch, in the order of the batch plan: (plan rows, x, y)."""
        w = self.worker
        for epoch in range(self.cfg.train.epochs):
            plan = w.order.epoch_plan(epoch).to(w.device)
            for k in range(self.steps_per_epoch):
                yield w.batches.step(w.order, plan, k)

    def step(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        self.worker.train_batch(rows, x, y, self._totals, self._check)


def train_sequential(cfg: RunConfig, data: Dataset, max_steps: Optional[int] = None,
                     device: torch.device = torch.device("cpu")) -> list[GraphNode]:
    """Train every node of ``cfg.graph`` for ``cfg.train.epochs`` epochs (or ``max_steps``
    steps) in this process; returns the nodes."""
    group = ReferenceTrainer(cfg, data, device)
    for batch in group.batches():
        if max_steps is not None and group.step_count >= max_steps:
            break
        group.step(*batch)
    return group.nodes
