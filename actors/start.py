"""One node's start-up, the same wherever the node runs (a torchrun rank, a Ray actor):
torch's threads, the preflight (every input check, before any collective), the process
group, the worker, and (``train.compile``) the compilation of its models before the first
collective. ``restart_node``: a warm start, a new graph's worker in a process whose group
has already formed (a search's next trial on the same actors)."""
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
               placement: Optional[list[list[int]]] = None, device: Optional[str] = None) -> NodeWorker:
    """Process ``rank``'s worker (the graph nodes ``placement[rank]``; default one node per
    process), in a process group of ``world_size`` formed through ``init_method``.
    ``train.num_threads`` sets torch's threads, else ``default_threads`` (0: leave torch's
    or the launcher's). ``device``: the device its launcher chose (a Ray actor's, from the
    GPUs Ray gave it; with ``local_rank`` the index among the visible ones), else
    ``cfg.device``. A bad input raises ``ConfigError`` before the group forms; the caller
    calls ``actors.exchange.shutdown`` when done with the worker."""
    _set_threads(cfg, default_threads)
    data = preflight(cfg, world_size, device)
    if placement is None:
        placement = place_nodes(cfg, data, world_size)
    env = init_distributed(rank, world_size, local_rank, init_method, device or cfg.device, cfg.backend, cfg.dist_timeout_s)
    try:
        worker = NodeWorker(cfg, env, Exchange(env), data, files, placement)
        _compile(worker)
        return worker
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
    ``cfg`` reads other data. The same checks as a cold start, then ``previous`` lets go of
    its models, optimisers, buffers (and data, when the new graph reads other data) before
    the new ones are built, so the device never holds two graphs; the new models are built
    exactly as ``start_node`` builds them (the caller resets torch's global RNG to what a
    fresh process holds). Every process of the group restarts together."""
    why = warm_mismatch(previous.cfg, cfg)
    if why is not None:
        raise ValueError(f"a warm restart needs a new process group: {why}")
    _set_threads(cfg, default_threads)
    env, exchange = previous.env, previous.exchange
    check_world_size(cfg, env.world_size)
    check_device(cfg, device=env.device.type)
    same_data = cfg.dataset == previous.cfg.dataset and cfg.train.batch_size == previous.cfg.train.batch_size
    data = previous.data if same_data else load_data(cfg)  # a new dataset is loaded on the host first
    check_checkpoints(cfg, data)
    if placement is None:
        placement = place_nodes(cfg, data, env.world_size)
    compiled = previous.cfg.train.compile or cfg.train.compile
    previous.release()  # refcounting frees its tensors here (a gc pass would add ~0.15 s to every warm start)
    del previous
    if compiled:
        import gc

        import torch._dynamo

        torch._dynamo.reset()  # another graph's models: compile afresh (its caches would count as recompiles)
        gc.collect()  # what only dynamo's caches held (compiled wrappers, guards) goes now, not later
    worker = NodeWorker(cfg, env, exchange, data, files, placement)
    _compile(worker)
    return worker


def _set_threads(cfg: RunConfig, default_threads: int) -> None:
    threads = cfg.train.num_threads or default_threads
    if threads:
        torch.set_num_threads(threads)


def _compile(worker: NodeWorker) -> None:
    """With ``train.compile``: every process compiles its nodes (``NodeWorker.compile``), then
    waits for the others on the host, through the group's store and not a collective, for up
    to ``dist_timeout_s``: a process still compiling is named there, instead of the others
    timing out in the first all-gather while it compiles."""
    if worker.cfg.train.compile:
        worker.compile()
        worker.exchange.wait_for_all("compile", worker.cfg.dist_timeout_s)
