"""The epoch loop of every run, a torchrun group's and a search trial's alike:

    for each epoch:  train + evaluate every node (each writing its share of the group
                     checkpoint when one is due) -> record the epoch's metrics -> commit
                     the checkpoint -> (last epoch) final states + summary -> report

Only the reporting differs: a torchrun run reports nothing beyond its record, a search
trial reports to Tune (``coordinator.search_trial.GraphTrial``: one ``EpochDriver.next`` per
Tune step). The group is this rank's share of a process group (``coordinator.run.RunRank``)
or a trial's Ray actors (``coordinator.group.ActorGroup``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from actors.metrics import NodeEpochMetrics
from coordinator.recorder import RunRecorder


class NodeGroup(Protocol):
    steps_per_epoch: int

    def run_epoch(self, epoch: int, checkpoint: bool) -> Optional[list[NodeEpochMetrics]]:
        """Train and evaluate every node for ``epoch`` (0-based), each node writing its share
        of the group checkpoint when ``checkpoint``. Every node's metrics on the driver,
        None elsewhere."""
        ...

    def commit_checkpoint(self, epochs_done: int) -> Optional[Path]:
        """Make the group checkpoint after ``epochs_done`` epochs the one a resume takes
        (called once the epoch's metrics are recorded); its directory on the driver."""
        ...

    def save_final(self) -> None:
        """Every node's final state."""
        ...


@dataclass
class EpochReport:
    epoch: int
    """Epochs completed (1-based)."""
    metrics: list[NodeEpochMetrics]
    """Every node's metrics, by node."""
    checkpoint: Optional[Path]
    """The group checkpoint written after this epoch, if one was due."""
    first: bool
    """The first epoch this run (or this attempt of a resumed one) trained."""


def checkpoint_due(epochs_done: int, every: int, epochs: int) -> bool:
    """Every ``every`` epochs and after the last (never when ``every`` is 0)."""
    return bool(every) and (epochs_done % every == 0 or epochs_done == epochs)


class EpochDriver:
    """The loop of ``drive_epochs`` one epoch at a time, for a caller that is itself stepped
    (a Tune class trainable: one ``step`` per epoch). ``next()`` trains epoch ``self.epoch``,
    records it, commits the checkpoint when due and, after the last epoch, saves the final
    states and the summary; ``finish()`` does the latter for a run that ends early."""

    def __init__(self, group: NodeGroup, start: int, epochs: int, checkpoint_every: int,
                 recorder: Optional[RunRecorder]):
        self.group, self.start, self.epochs = group, start, epochs
        self.checkpoint_every, self.recorder = checkpoint_every, recorder
        self.epoch = start
        """Epochs completed so far (the next to train, 0-based)."""
        self.summary: Optional[dict[str, Any]] = None
        self.finished = False

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs

    def next(self) -> EpochReport:
        epoch = self.epoch
        done = epoch + 1
        due = checkpoint_due(done, self.checkpoint_every, self.epochs)
        metrics = self.group.run_epoch(epoch, checkpoint=due)
        if self.recorder is not None:
            self.recorder.log_epoch(metrics)  # rows first: a crash before the commit leaves rows a resume trims
        saved = self.group.commit_checkpoint(done) if due else None
        self.epoch = done
        if done == self.epochs:
            self.finish()  # before the last report: Tune may end a trial at it
        return EpochReport(done, metrics, saved, first=epoch == self.start)

    def finish(self) -> None:
        self.group.save_final()
        if self.recorder is not None:
            self.summary = self.recorder.finish(self.group.steps_per_epoch)
        self.finished = True


def drive_epochs(group: NodeGroup, start: int, epochs: int, checkpoint_every: int,
                 recorder: Optional[RunRecorder], report: Optional[Callable[[EpochReport], None]] = None
                 ) -> Optional[dict[str, Any]]:
    """Epochs ``start`` .. ``epochs - 1`` of a run. ``recorder``: the driver's record (None on
    a torchrun rank other than 0). Returns the run's summary on the driver."""
    driver = EpochDriver(group, start, epochs, checkpoint_every, recorder)
    while not driver.done:
        r = driver.next()
        if report is not None and r.metrics is not None:
            report(r)
    if not driver.finished:
        driver.finish()
    return driver.summary
