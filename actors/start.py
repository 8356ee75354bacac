"""One node's start-up, the same wherever the node runs (a torchrun rank, a Ray actor):
torch's threads, the preflight (every input check, before any collective), the process
group, and the worker."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from actors.config import RunConfig
from actors.exchange import Exchange, init_distributed, shutdown
from actors.files import NodeStateFiles
from actors.preflight import place_nodes, preflight
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
