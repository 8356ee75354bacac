"""One row of a search's ``trials.csv``: one trial, typed.

The search writes it (``coordinator.search_results``) and the search picture reads it back
(``drawing.figures.draw_search``); this dataclass is the one description of the columns both
use. It lives in ``actors/`` (not ``drawing/``, not ``coordinator/``) because imports run
coordinator -> drawing -> actors: this is the lowest layer both the writer and the reader
may import, and it is where the other files the two sides share are described (the
``metrics.jsonl`` keys, ``actors.metrics``). No Ray, no matplotlib.

The file's format is what users read and must not change: the columns of ``COLUMNS`` in
that order; a missing value is an empty cell; booleans as ``True``/``False``; numbers as
Python writes them (the search rounds the accuracies and start times to 3 decimals).
"""
from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass
class TrialRow:
    trial: str
    """The trial's folder name, ``trial_<id>`` (``?`` when Tune gave no folder)."""
    models: str = ""
    """Every node's model, node 0 first, a frozen one with ``*``: ``convnet, resnet32*``."""
    gates: str = ""
    """The gate matrix, rows = receiver (``coordinator.search_space.describe_gates``)."""
    extra: str = ""
    """The searched extra config keys, as JSON (``{"optim.lr": 0.05}``)."""
    kinds: str = ""
    """The edge kinds, rows = receiver, when the search searched them (else empty)."""
    epochs: int = 0
    """Epochs the trial trained."""
    last_val_acc: Optional[float] = None
    """The target's validation accuracy at its last epoch."""
    best_val_acc: Optional[float] = None
    """The target's best validation accuracy over its epochs."""
    status: str = ""
    """completed, stopped by ASHA, failed: <why>, invalid graph (not trained), unfinished (search interrupted)."""
    launch_overhead_s: Optional[float] = None
    """Seconds from the trial's start to its first training step."""
    warm: Optional[bool] = None
    """Whether the trial ran on a warm actor group (one an earlier trial started)."""

    def to_csv(self) -> dict[str, Any]:
        """The row for ``csv.DictWriter`` (which writes None as an empty cell)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> "TrialRow":
        """A row as ``csv.DictReader`` read it; a missing column or empty cell is the
        field's default (a hand-written trials.csv may hold only some columns)."""

        def text(key: str) -> str:
            return row.get(key) or ""

        def number(key: str) -> Optional[float]:
            return float(row[key]) if row.get(key) else None

        warm = row.get("warm")
        return cls(trial=text("trial"), models=text("models"), gates=text("gates"), extra=text("extra"),
                   kinds=text("kinds"), epochs=int(row["epochs"]) if row.get("epochs") else 0,
                   last_val_acc=number("last_val_acc"), best_val_acc=number("best_val_acc"), status=text("status"),
                   launch_overhead_s=number("launch_overhead_s"), warm={"True": True, "False": False}.get(warm or ""))


COLUMNS = [f.name for f in dataclasses.fields(TrialRow)]
"""trials.csv's columns, in order."""


def write_trials(path: Path, rows: list[TrialRow]) -> None:
    """``trials.csv``: a header and one line per row, in the order given. A search that
    ended with no trial writes the header ``trial`` alone (as it always has)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS if rows else ["trial"])
        w.writeheader()
        for r in rows:
            w.writerow(r.to_csv())


def read_trials(path: Path) -> list[TrialRow]:
    """The rows of a ``trials.csv``, in the file's order."""
    with open(path, newline="") as f:
        return [TrialRow.from_csv(r) for r in csv.DictReader(f)]
