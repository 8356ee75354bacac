"""Drive one graph node's process through a whole run (the torchrun path).

``run_node`` is what every rank executes: preflight checks, process group, worker, the
epoch loop, per-epoch metrics gathered to rank 0, checkpoints, and teardown in ``finally``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from actors.exchange import Exchange, init_distributed, shutdown
from actors.worker import NodeWorker
from coordinator.config import RunConfig
from coordinator.preflight import preflight
from coordinator.recorder import RunRecorder

log = logging.getLogger("ktg")


def run_node(cfg: RunConfig, run_dir: str | Path, rank: int, world_size: int, local_rank: int,
             init_method: str = "env://", config_dict: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """Run graph node ``rank`` to the end. Returns the run summary on rank 0, else None."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data = preflight(cfg, world_size)  # raises ConfigError before any collective
    env = init_distributed(rank, world_size, local_rank, init_method, cfg.device, cfg.backend, cfg.dist_timeout_s)
    recorder = None
    try:
        exchange = Exchange(env)
        worker = NodeWorker(cfg, env, exchange, data, str(run_dir))
        if rank == 0:
            log.info(cfg.graph.describe())
            log.info(f"dataset {data.name}: {len(data.train)} train / {len(data.val) if data.val else 0} val / "
                     f"{len(data.test)} test; {worker.steps_per_epoch} steps of {cfg.train.batch_size} per epoch; "
                     f"{world_size} processes, backend {env.backend}, device {env.device.type}")
            recorder = RunRecorder(cfg, run_dir, config_dict or cfg.to_dict())
        for epoch in range(cfg.train.epochs):
            rows = exchange.gather_objects(worker.run_epoch(epoch))
            if recorder is not None:
                recorder.log_epoch(rows)
        summary = recorder.finish(worker.steps_per_epoch) if recorder is not None else None
        exchange.barrier()
        return summary
    finally:
        if recorder is not None:
            recorder.close()
        shutdown()
