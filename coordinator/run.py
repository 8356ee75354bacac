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
from coordinator import checkpoints
from coordinator.config import RunConfig
from coordinator.errors import ConfigError
from coordinator.preflight import check_run_dir, preflight
from coordinator.recorder import RunRecorder

log = logging.getLogger("ktg")


def run_node(cfg: RunConfig, run_dir: str | Path, rank: int, world_size: int, local_rank: int,
             init_method: str = "env://", config_dict: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """Run graph node ``rank`` to the end. Returns the run summary on rank 0, else None."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data = preflight(cfg, world_size)  # raises ConfigError before any collective
    check_run_dir(run_dir)
    env = init_distributed(rank, world_size, local_rank, init_method, cfg.device, cfg.backend, cfg.dist_timeout_s)
    recorder = None
    try:
        exchange = Exchange(env)
        worker = NodeWorker(cfg, env, exchange, data, str(run_dir))
        start = resume_point(cfg, run_dir, worker, exchange)
        if rank == 0:
            log.info(cfg.graph.describe())
            log.info(f"dataset {data.name}: {len(data.train)} train / {len(data.val) if data.val else 0} val / "
                     f"{len(data.test)} test; {worker.steps_per_epoch} steps of {cfg.train.batch_size} per epoch; "
                     f"{world_size} processes, backend {env.backend}, device {env.device.type}")
            if start:
                log.info(f"resuming from the group checkpoint of epoch {start} in {run_dir}/checkpoints")
            recorder = RunRecorder(cfg, run_dir, config_dict or cfg.to_dict(), resume_epoch=start)
        every = cfg.train.checkpoint_every
        for epoch in range(start, cfg.train.epochs):
            metrics = worker.run_epoch(epoch)
            due = every and ((epoch + 1) % every == 0 or epoch + 1 == cfg.train.epochs)
            if due:
                worker.save_group_checkpoint()
            rows = exchange.gather_objects(metrics)  # also the barrier: every node has saved
            if recorder is not None:
                if due:
                    checkpoints.mark_complete(run_dir, epoch + 1, world_size, cfg.train.keep_checkpoints)
                recorder.log_epoch(rows)
        worker.save_checkpoint()
        summary = recorder.finish(worker.steps_per_epoch) if recorder is not None else None
        exchange.barrier()
        return summary
    finally:
        if recorder is not None:
            recorder.close()
        shutdown()


def resume_point(cfg: RunConfig, run_dir: str | Path, worker: NodeWorker, exchange: Exchange) -> int:
    """Load the group checkpoint named by ``checkpoints/latest.json`` (if resuming is on and
    there is one) into this node; returns the epoch to start from. Every node must find the
    same epoch, else the run stops."""
    epoch = checkpoints.latest_epoch(run_dir) if cfg.train.resume else None
    epochs = exchange.gather_objects(epoch)
    if len(set(epochs)) > 1:
        raise ConfigError(f"the nodes see different checkpoints in {run_dir}/checkpoints (epochs {epochs}); "
                          "is the run directory on a shared filesystem?")
    if epoch is None:
        return 0
    if epoch >= cfg.train.epochs:
        log.info(f"the checkpoint in {run_dir} is already at epoch {epoch} of {cfg.train.epochs}")
    previous = _previous_config(run_dir)
    if previous is not None:  # the same checks on every rank, so every rank stops with the same message
        for i, (a, b) in enumerate(zip(previous.graph.nodes, cfg.graph.nodes)):
            if a.model != b.model:
                raise ConfigError(f"{run_dir}/checkpoints holds node {i} as a {a.model}, but the graph says {b.model}: "
                                  "resume with the same graph, or a new run dir")
        changed = _changed(previous, cfg)
        if changed:
            raise ConfigError(f"{run_dir} holds a checkpoint of a run with other {', '.join(changed)}; resuming it with "
                              "this config would mix two experiments. Use a new hydra.run.dir, or train.resume=false to start over")
    state = checkpoints.load_node(run_dir, epoch, worker.index)
    if state.get("meta", {}).get("model") != worker.node.model_name:
        raise ConfigError(f"{run_dir}/checkpoints holds node {worker.index} as a {state.get('meta', {}).get('model')}, "
                          f"but the graph says {worker.node.model_name}: resume with the same graph, or a new run dir")
    worker.load_state(state)
    return epoch


def _previous_config(run_dir: str | Path) -> Optional[RunConfig]:
    """The config recorded by the run that wrote ``run_dir`` (None if unreadable)."""
    import json

    try:
        return RunConfig.from_dict(json.loads((Path(run_dir) / "run_config.json").read_text()))
    except Exception:
        return None


def _changed(old: RunConfig, new: RunConfig) -> list[str]:
    """Settings that differ between two runs (the epoch count may change: a resumed run can
    be extended)."""
    a, b = old.to_dict(), new.to_dict()
    keys = [("seed",), ("graph",), ("dataset",), ("optim",), ("train", "batch_size"), ("train", "max_steps_per_epoch")]
    pick = lambda d, k: d[k[0]] if len(k) == 1 else d[k[0]][k[1]]  # noqa: E731
    return [".".join(k) for k in keys if pick(a, k) != pick(b, k)]
