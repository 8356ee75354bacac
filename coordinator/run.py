"""Drive one graph node's process through a whole run (the torchrun path).

``run_node`` is what every rank executes: the run directory's lock (rank 0), preflight
checks, process group, worker, the agreed start (fresh or resumed, ``RunDir.start``), the
epoch loop, per-epoch metrics gathered to rank 0, checkpoints, and teardown in ``finally``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from actors.config import RunConfig
from actors.exchange import Exchange, init_distributed, shutdown
from actors.lifeline import exit_with_parent
from actors.preflight import preflight
from actors.worker import NodeWorker
from coordinator.recorder import RunRecorder
from coordinator.rundir import RunDir

log = logging.getLogger("ktg")


def run_node(cfg: RunConfig, run_dir: str | Path, rank: int, world_size: int, local_rank: int,
             init_method: str = "env://", config_dict: Optional[dict[str, Any]] = None,
             watch_parent: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Run graph node ``rank`` to the end. Returns the run summary on rank 0, else None.
    ``watch_parent``: the launcher's pid (torchrun's agent, the run_local caller), read as
    early as the process could: end this process as soon as that launcher is gone."""
    if watch_parent is not None:
        exit_with_parent(watch_parent, who=f"rank {rank}")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    rd = RunDir(run_dir)
    if rank == 0:
        rd.lock()  # a second run into the directory is refused here, before anything else
    else:
        rd.prepare()
    try:
        data = preflight(cfg, world_size)  # raises ConfigError before any collective
        env = init_distributed(rank, world_size, local_rank, init_method, cfg.device, cfg.backend, cfg.dist_timeout_s)
        recorder = None
        try:
            exchange = Exchange(env)
            worker = NodeWorker(cfg, env, exchange, data, rd.node_files(rank))
            start = rd.start(cfg, rank, worker.node.model_name, config_dict or cfg.to_dict(),
                             exchange.gather_objects, exchange.broadcast_object)
            if start.state is not None:
                worker.load_state(start.state)
            if rank == 0:
                log.info(cfg.graph.describe())
                log.info(f"dataset {data.name}: {len(data.train)} train / {len(data.val) if data.val else 0} val / "
                         f"{len(data.test)} test; {worker.steps_per_epoch} steps of {cfg.train.batch_size} per epoch; "
                         f"{world_size} processes, backend {env.backend}, device {env.device.type}")
                if start.epoch:
                    log.info(f"resuming from the group checkpoint of epoch {start.epoch} in {rd.path / 'checkpoints'}")
                recorder = RunRecorder(cfg, rd, config_dict or cfg.to_dict(), history=start.history)
            every = cfg.train.checkpoint_every
            for epoch in range(start.epoch, cfg.train.epochs):
                metrics = worker.run_epoch(epoch)
                due = every and ((epoch + 1) % every == 0 or epoch + 1 == cfg.train.epochs)
                if due:
                    worker.save_group_checkpoint()
                rows = exchange.gather_objects(metrics)  # also the barrier: every node has saved
                if recorder is not None:
                    recorder.log_epoch(rows)  # rows first: a crash before the marker moves leaves rows a resume trims
                    if due:
                        rd.mark_complete(epoch + 1, world_size, cfg.train.keep_checkpoints)
            worker.save_checkpoint()
            summary = recorder.finish(worker.steps_per_epoch) if recorder is not None else None
            exchange.barrier()
            return summary
        finally:
            if recorder is not None:
                recorder.close()
            shutdown()
    finally:
        rd.unlock()
