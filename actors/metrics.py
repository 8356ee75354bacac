"""One node's metrics of one epoch, and the names its edge metrics are recorded under.

``NodeEpochMetrics`` is what a node's worker hands its driver after each epoch (through
the all-gather to rank 0 under torchrun, through ``ray.get`` in a search trial).
``record()`` is its row in ``metrics.jsonl``; fields marked ``driver_only`` (the wall
clock of the first step, for the search's launch overhead) are not recorded.

Every edge s -> t of node t has two recorded values, under keys made and read by
``edge_key`` / ``parse_edge_key`` only:

    edge_<s>_to_<t>_<Gate>    mean gated loss of the edge over the epoch's trained steps
    gate_<s>_to_<t>_<Gate>    mean weight its gate put on the samples

(s = t is the label edge.) The recorder turns them into wandb keys, the pictures into
curves; both parse them here. ``read_metrics_file`` reads the rows back (a resume, the
pictures).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

EDGE_LOSS = "edge"
GATE_WEIGHT = "gate"
_KEY = re.compile(r"^(edge|gate)_(\d+)_to_(\d+)_(\w+)$")


class EdgeKey(NamedTuple):
    kind: str  # EDGE_LOSS or GATE_WEIGHT
    source: int
    target: int
    gate: str


def edge_key(kind: str, source: int, target: int, gate: str) -> str:
    """The recorded name of edge ``source -> target``'s loss (``EDGE_LOSS``) or gate weight
    (``GATE_WEIGHT``)."""
    if kind not in (EDGE_LOSS, GATE_WEIGHT):
        raise ValueError(f"kind must be {EDGE_LOSS!r} or {GATE_WEIGHT!r}; got {kind!r}")
    return f"{kind}_{source}_to_{target}_{gate}"


def parse_edge_key(key: str) -> Optional[EdgeKey]:
    """``edge_key``'s inverse; None for any other metric's name."""
    m = _KEY.match(key)
    return None if m is None else EdgeKey(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))


def driver_only(default: Any = None) -> Any:
    """A field the driver reads but ``record()`` leaves out."""
    return field(default=default, metadata={"driver_only": True})


@dataclass
class NodeEpochMetrics:
    """Node ``node``'s epoch ``epoch`` (1-based: epochs completed)."""

    epoch: int
    node: int
    model: str
    frozen: bool
    train_loss: Optional[float]
    """Mean loss over the epoch's trained steps (None for a frozen node)."""
    train_acc: float
    """Accuracy on the augmented training batches, in percent."""
    lr: float
    """Learning rate after the epoch's last step."""
    skipped_steps: int
    """Steps whose update was skipped for a non-finite loss (``train.nonfinite=skip``)."""
    train_time_s: float
    edges: list[tuple[int, str]] = field(default_factory=list)
    """The node's incoming edges, (source, gate name), in the order of the two lists below."""
    edge_loss: list[float] = field(default_factory=list)
    gate_weight: list[float] = field(default_factory=list)
    val_acc: Optional[float] = None
    ensemble_val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    ensemble_test_acc: Optional[float] = None
    first_step_at: Optional[float] = driver_only()
    """Wall clock (``time.time``) of the node's first training step."""

    def record(self) -> dict[str, Any]:
        """The row recorded in ``metrics.jsonl`` (and read back by a resume, the recorder
        and the pictures): the scalar fields, then one key per edge and value."""
        row: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("driver_only"):
                continue
            if f.name == "edges":
                for kind, values in ((EDGE_LOSS, self.edge_loss), (GATE_WEIGHT, self.gate_weight)):
                    row.update({edge_key(kind, s, self.node, g): v for (s, g), v in zip(self.edges, values)})
            elif f.name not in ("edge_loss", "gate_weight"):
                row[f.name] = getattr(self, f.name)
        return row


def read_metrics_file(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a ``metrics.jsonl`` (JSON objects with an integer ``epoch`` and ``node``),
    in file order, an epoch recorded twice kept twice; and a note for each other non-blank
    line ("line N", "(the last, cut short)" when it ends the file: a crash mid-write).
    A missing file raises ``FileNotFoundError``."""
    rows, bad = [], []
    lines = Path(path).read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and isinstance(row.get("node"), int):
                rows.append(row)
                continue
        except ValueError:
            pass
        bad.append(f"line {n}{' (the last, cut short)' if n == len(lines) else ''}")
    return rows, bad
