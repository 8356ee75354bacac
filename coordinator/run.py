"""Drive one graph node's process through a whole run (the torchrun path).

``run_node`` is what every rank executes: the run directory's lock (rank 0), the node's
start-up (``actors.start.start_node``: preflight, process group, worker), the agreed start
(fresh or resumed, ``coordinator.resume.agree_start``), the epoch loop
(``coordinator.epochs``), and teardown in ``finally``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from actors.config import RunConfig
from actors.exchange import shutdown
from actors.lifeline import exit_with_parent
from actors.metrics import NodeEpochMetrics
from actors.placement import describe_placement, node_cost
from actors.start import start_node
from actors.worker import NodeWorker
from coordinator.epochs import drive_epochs
from coordinator.recorder import RunRecorder
from coordinator.resume import agree_start
from coordinator.rundir import RunDir

log = logging.getLogger("ktg")


def placement_text(cfg: RunConfig, data, placement: list[list[int]]) -> str:
    models = [n.model for n in cfg.graph.nodes]
    info = data.info
    costs = [node_cost(m, info.num_classes, info.in_channels, info.image_size) for m in models]
    return describe_placement(placement, costs, models)


class RunRank:
    """One rank's share of a run in a process group (started by torchrun, ``run_local`` or a
    plain ``python launch.py``): its worker, every node's metrics gathered on rank 0, and rank
    0 committing the group checkpoints in the run directory."""

    def __init__(self, worker: NodeWorker, run_dir: RunDir, keep_checkpoints: int):
        self.worker, self.run_dir, self.keep = worker, run_dir, keep_checkpoints
        self.steps_per_epoch = worker.steps_per_epoch

    def run_epoch(self, epoch: int, checkpoint: bool) -> Optional[list[NodeEpochMetrics]]:
        metrics = self.worker.run_epoch(epoch, checkpoint)
        every = self.worker.exchange.gather_objects(metrics)  # also the barrier: every node has saved
        return sorted((m for ms in every for m in ms), key=lambda m: m.node) if self.worker.rank == 0 else None

    def commit_checkpoint(self, epochs_done: int) -> Optional[Path]:
        if self.worker.rank != 0:
            if self.run_dir.tends_own_copy:  # another machine's copy of the directory: its old epochs go too
                self.run_dir.prune(epochs_done, self.keep)
            return None
        self.run_dir.mark_complete(epochs_done, self.worker.cfg.graph.num_nodes, self.keep)
        return self.run_dir.epoch_dir(epochs_done)

    def save_final(self) -> None:
        self.worker.save_checkpoint()


def run_node(cfg: RunConfig, run_dir: str | Path, rank: int, world_size: int, local_rank: int,
             init_method: str = "env://", config_dict: Optional[dict[str, Any]] = None,
             watch_parent: Optional[int] = None, local_world_size: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Run graph node ``rank`` to the end. Returns the run summary on rank 0, else None.
    ``watch_parent``: the launcher's pid (torchrun's agent, the run_local caller), read as
    early as the process could: end this process as soon as that launcher is gone.
    ``local_world_size``: the node processes on this machine (``train.pin_cpus``; default
    torchrun's ``LOCAL_WORLD_SIZE``)."""
    if watch_parent is not None:
        exit_with_parent(watch_parent, who=f"rank {rank}")
    rd = RunDir(run_dir)
    if rank == 0:
        rd.lock()  # a second run into the directory is refused here, before anything else
    else:
        rd.prepare()
    try:
        worker = start_node(cfg, rank, world_size, local_rank, init_method, rd.node_files,
                            local_world_size=local_world_size)
        recorder = None
        try:
            exchange = worker.exchange
            start = agree_start(rd, cfg, rank, worker.placement, config_dict or cfg.to_dict(),
                                exchange.gather_objects, exchange.broadcast_object)
            if start.states is not None:
                worker.load_states(start.states)
            if rank == 0:
                data = worker.data
                log.info(cfg.graph.describe())
                log.info(f"dataset {data.name}: {len(data.train)} train / {len(data.val) if data.val else 0} val / "
                         f"{len(data.test)} test; {worker.steps_per_epoch} steps of {cfg.train.batch_size} per epoch; "
                         f"{world_size} processes, backend {worker.env.backend}, device {worker.env.device.type}")
                sent, every = worker.exchange_bytes(), cfg.train.check_batch_every
                fingerprint = f" + a 32-byte batch fingerprint every {every} step(s)" if every else ""
                log.info(f"exchange: {sum(sent.values()):,} bytes sent per process per step ("
                         + ", ".join(f"{k} {v:,}" for k, v in sent.items()) + f"){fingerprint}; relations are "
                         "built by the receivers")
                if world_size < cfg.graph.num_nodes:
                    log.info("placement (estimated share of the training FLOPs):\n" + placement_text(cfg, data, worker.placement))
                if start.epoch:
                    log.info(f"resuming from the group checkpoint of epoch {start.epoch} in {rd.path / 'checkpoints'}")
                recorder = RunRecorder(cfg, rd, config_dict or cfg.to_dict(), history=start.history)
            group = RunRank(worker, rd, cfg.train.keep_checkpoints)
            summary = drive_epochs(group, start.epoch, cfg.train.epochs, cfg.train.checkpoint_every, recorder)
            exchange.barrier()
            return summary
        finally:
            if recorder is not None:
                recorder.close()
            shutdown()
    finally:
        rd.unlock()
