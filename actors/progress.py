"""Rank 0's console progress within an epoch.

``bar`` (default on a terminal): one line redrawn in place, at most 5 times a second::

    epoch  3/20 [##########..........] 120/391  1843 img/s  loss 1.234  eta 0:00:15

``lines`` (default when the output is a file or a pipe): a plain line every
``train.log_every`` steps (auto: ~5 per epoch on epochs of >= 200 steps), with the loss.
``off``: nothing (the per-epoch line of the recorder is still printed).

Reading the running loss is a host-device synchronisation: the bar shows it only on the
CPU; on an accelerator it is read at the ``lines`` steps only.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

MODES = ("auto", "bar", "lines", "off")


def resolve_mode(mode: str, stream: TextIO) -> str:
    if mode == "auto":
        return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
    return mode


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class EpochProgress:
    """Progress of one epoch of ``total`` steps; ``update(k)`` after step k (1-based)."""

    def __init__(self, mode: str, epoch: int, epochs: int, total: int, batch_size: int, log_every: int,
                 read_loss: Callable[[], float], loss_is_free: bool, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stdout
        self.mode = resolve_mode(mode, self.stream)
        self.epoch, self.epochs, self.total, self.batch_size = epoch, epochs, total, batch_size
        self.log_every, self.read_loss, self.loss_is_free = log_every, read_loss, loss_is_free
        self.t0 = self.last_draw = time.perf_counter()
        self.drawn = False

    def update(self, k: int) -> None:
        if self.mode == "off":
            return
        if self.mode == "lines":
            if self.log_every and k % self.log_every == 0:
                el = time.perf_counter() - self.t0
                self.stream.write(f"  epoch {self.epoch} step {k}/{self.total} | loss {self.read_loss():.3f} | "
                                  f"{k * self.batch_size / el:.0f} img/s | {el:.0f}s\n")
                self.stream.flush()
            return
        now = time.perf_counter()
        if now - self.last_draw < 0.2 and k < self.total:
            return
        self.last_draw = now
        el = now - self.t0
        width = 20
        filled = int(width * k / self.total)
        rate = k / el if el > 0 else 0.0
        loss = f"  loss {self.read_loss():.3f}" if self.loss_is_free else ""
        eta = _clock((self.total - k) / rate) if rate > 0 else "?"
        n = len(str(self.epochs))
        self.stream.write(f"\repoch {self.epoch:>{n}}/{self.epochs} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{k}/{self.total}  {rate * self.batch_size:.0f} img/s{loss}  eta {eta}   ")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """Clear the bar, so the epoch's summary line takes its place."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False
