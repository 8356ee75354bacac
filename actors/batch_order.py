"""The single source of truth for which samples, in which order, with which augmentation.

For each epoch, ``epoch_plan`` draws (from a generator seeded by ``(seed, epoch)`` only) a
permutation of the training set and each sample's crop offset and flip bit. Rank 0 makes
it and broadcasts it (``actors.exchange``); every node slices batch k out of it. Because
it depends on nothing but ``(seed, epoch)``, a resumed run continues in the same order.

Each step, the nodes also exchange a fingerprint of the batch they actually hold
(``batch_fingerprint``); a node whose batch differs from node 0's stops the run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# columns of the [N, 4] int64 plan tensor
PERM, DY, DX, FLIP = range(4)


@dataclass(frozen=True)
class BatchOrder:
    num_samples: int
    batch_size: int
    seed: int
    crop_pad: int = 0
    flip: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size  # drop_last: every step has exactly B samples

    def epoch_plan(self, epoch: int) -> torch.Tensor:
        """``[N, 4]`` int64: permutation, crop dy, crop dx, flip bit (in permuted order)."""
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch))
        n = self.num_samples
        plan = torch.zeros(n, 4, dtype=torch.int64)
        plan[:, PERM] = torch.randperm(n, generator=g)
        if self.crop_pad > 0:
            plan[:, DY:DX + 1] = torch.randint(0, 2 * self.crop_pad + 1, (n, 2), generator=g)
        if self.flip:
            plan[:, FLIP] = torch.randint(0, 2, (n,), generator=g)
        return plan

    def batch(self, plan: torch.Tensor, step: int) -> torch.Tensor:
        """Rows of ``plan`` for step ``step`` (0-based within the epoch): ``[B, 4]``."""
        return plan[step * self.batch_size : (step + 1) * self.batch_size]


def batch_fingerprint(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    """Four int64 numbers that differ, with near certainty, when two nodes' batches differ:
    the global step, an order-sensitive hash of the indices, of the labels, and of the
    exact bits of the augmented input."""
    w = torch.arange(1, rows.shape[0] + 1, device=rows.device, dtype=torch.int64)
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    xw = torch.arange(1, bits[0].numel() + 1, device=x.device, dtype=torch.int64).view_as(bits[0])
    return torch.stack(
        [
            torch.full((), step, dtype=torch.int64, device=x.device),  # a fill, not a host->device copy
            (rows[:, PERM].to(x.device) * w.to(x.device)).sum(),
            (y * w.to(y.device)).sum().to(x.device),
            (bits * xw).sum(),
        ]
    )
