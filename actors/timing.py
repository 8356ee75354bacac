"""Per-part timing of a node's training step, for the benchmark (``scripts/bench.py``).

Off by default: the worker then holds ``NO_TIMER``, whose calls do nothing, and the step
has no host-device synchronisation. When a ``StepTimer`` is attached, each ``mark(part)``
waits for the device (``torch.cuda.synchronize``) so that the time of every part is the
time its kernels took, not the time it took to queue them; timing therefore slows a GPU
step a little, and is only for measuring.

The exchange is split in two: ``wait`` (this node arrived at the all-gather before the
slowest node did: time spent waiting for it) and ``exchange`` (the transfer itself, from
the last node's arrival to the end). Each node sends its arrival time (``time.time()``)
inside the all-gather it is timing, so no extra collective is needed; this assumes the
nodes share a clock (one machine; across machines, NTP skew would enter the split).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Optional

import torch

PARTS = ("batch", "forward", "wait", "exchange", "loss", "backward", "optimizer", "tally")
"""The step's parts, in order; ``tally`` is the epoch's running sums (``EpochTotals.add``)."""


class _NoTimer:
    enabled = False

    def start(self) -> None:
        pass

    def mark(self, part: str) -> None:
        pass

    def arrival(self, device: torch.device) -> Optional[torch.Tensor]:
        return None

    def exchanged(self, arrivals: Optional[torch.Tensor]) -> None:
        pass

    def end_step(self) -> None:
        pass


NO_TIMER = _NoTimer()


class StepTimer:
    """Accumulates seconds per part of the step over the steps it has seen."""

    enabled = True

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.step_time = 0.0
        self._t = self._step_t = 0.0
        self._arrived = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        self.totals.clear()
        self.steps = 0
        self.step_time = 0.0

    def start(self) -> None:
        self._t = self._step_t = self._now()

    def mark(self, part: str) -> None:
        now = self._now()
        self.totals[part] += now - self._t
        self._t = now

    def arrival(self, device: torch.device) -> torch.Tensor:
        """This node's arrival time at the all-gather, to be sent with it."""
        self._arrived = time.time()
        return torch.tensor([self._arrived], dtype=torch.float64, device=device)

    def exchanged(self, arrivals: torch.Tensor) -> None:
        """Split the all-gather's time into waiting for the last node and the transfer."""
        now = self._now()
        total = now - self._t
        wait = min(total, max(0.0, float(arrivals.max()) - self._arrived))
        self.totals["wait"] += wait
        self.totals["exchange"] += total - wait
        self._t = now

    def end_step(self) -> None:
        self.steps += 1
        self.step_time += self._now() - self._step_t

    def summary(self) -> dict[str, float]:
        """Mean seconds per step of each part, and of the whole step (``step``)."""
        n = max(1, self.steps)
        out = {p: self.totals.get(p, 0.0) / n for p in PARTS}
        out["step"] = self.step_time / n
        return out
