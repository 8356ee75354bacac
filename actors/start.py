"""One node's start-up, the same wherever the node runs (a torchrun rank, a Ray actor):
torch's threads, the preflight (every input check, before any collective), the process
group, and the worker. ``restart_node``: a warm start, a new graph's worker in a process
whose group has already formed (a search's next trial on the same actors)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from actors.config import RunConfig
from actors.exchange import Exchange, init_distributed, shutdown
from actors.files import NodeStateFiles
from actors.preflight import check_checkpoints, check_device, check_world_size, load_data, place_nodes, preflight
from actors.worker import NodeWorker


def start_node(cfg: RunConfig, rank: int, world_size: int, local_rank: int, init_method: str,
               files: Optional[Callable[[int], NodeStateFiles]] = None, default_threads: int = 0,
               placement: Optional[list[list[int]]] = None) -> NodeWorker:
    """Process ``rank``'s worker (the graph nodes ``placement[rank]``; default one node per
    process), in a process group of ``world_size`` formed through ``init_method``.
    ``train.num_threads`` sets torch's threads, else ``default_threads`` (0: leave torch's
    or the launcher's). A bad input raises ``ConfigError`` before the
    group forms; the caller calls ``actors.exchange.shutdown`` when done with the worker."""
    threads = cfg.train.num_threads or default_threads
    if threads:
        torch.set_num_threads(threads)
    data = preflight(cfg, world_size)
    if placement is None:
        placement = place_nodes(cfg, data, world_size)
    env = init_distributed(rank, world_size, local_rank, init_method, cfg.device, cfg.backend, cfg.dist_timeout_s)
    try:
        return NodeWorker(cfg, env, Exchange(env), data, files, placement)
    except BaseException:
        shutdown()
        raise


def warm_mismatch(old: RunConfig, new: RunConfig) -> Optional[str]:
    """Why a process group formed for ``old`` cannot run ``new`` (None: it can): the device,
    backend and collective timeout are fixed when the group forms."""
    for key in ("device", "backend", "dist_timeout_s"):
        if getattr(old, key) != getattr(new, key):
            return f"{key} changed from {getattr(old, key)!r} to {getattr(new, key)!r}"
    return None


def restart_node(cfg: RunConfig, previous: NodeWorker, files: Optional[Callable[[int], NodeStateFiles]] = None,
                 default_threads: int = 0, placement: Optional[list[list[int]]] = None) -> NodeWorker:
    """A worker for ``cfg`` in the process group of ``previous`` (same world size, device,
    backend: ``warm_mismatch``): no rendezvous, and the data already on the device unless
    ``cfg`` reads other data. The same checks as a cold start, then new models, optimisers and
    gates, built exactly as ``start_node`` builds them (the caller resets torch's global RNG
    to what a fresh process holds). Every process of the group restarts together."""
    why = warm_mismatch(previous.cfg, cfg)
    if why is not None:
        raise ValueError(f"a warm restart needs a new process group: {why}")
    threads = cfg.train.num_threads or default_threads
    if threads:
        torch.set_num_threads(threads)
    world_size = previous.env.world_size
    check_world_size(cfg, world_size)
    check_device(cfg)
    same_data = cfg.dataset == previous.cfg.dataset and cfg.train.batch_size == previous.cfg.train.batch_size
    data = previous.data if same_data else load_data(cfg)
    check_checkpoints(cfg, data)
    if placement is None:
        placement = place_nodes(cfg, data, world_size)
    return NodeWorker(cfg, previous.env, previous.exchange, data, files, placement)
