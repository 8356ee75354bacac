"""One node's start-up, the same wherever the node runs (a torchrun rank, a Ray actor):
torch's threads and the process's cores (``set_up_cpu``), the preflight (every input check, before any collective), the process
group, the worker, and (``train.compile``) the compilation of its models before the first
collective. ``restart_node``: a warm start, a new graph's worker in a process whose group
has already formed (a search's next trial on the same actors)."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from actors.config import RunConfig
from actors.cpus import pin_cpus, torchrun_local_world_size
from actors.exchange import Exchange, init_distributed, shutdown
from actors.files import NodeStateFiles
from actors.preflight import check_checkpoints, check_device, check_world_size, load_data, place_nodes, preflight
from actors.worker import NodeWorker

log = logging.getLogger("ktg")


def start_node(cfg: RunConfig, rank: int, world_size: int, local_rank: int, init_method: str,
               files: Optional[Callable[[int], NodeStateFiles]] = None, default_threads: int = 0,
               placement: Optional[list[list[int]]] = None, device: Optional[str] = None,
               local_world_size: Optional[int] = None) -> NodeWorker:
    """Process ``rank``'s worker (the graph nodes ``placement[rank]``; default one node per
    process), in a process group of ``world_size`` formed through ``init_method``.
    ``train.num_threads`` sets torch's threads, else ``default_threads`` (0: leave torch's
    or the launcher's). ``device``: the device its launcher chose (a Ray actor's, from the
    GPUs Ray gave it; with ``local_rank`` the index among the visible ones), else
    ``cfg.device``. ``local_world_size``: how many node processes run on this machine, for
    ``train.pin_cpus`` (default: torchrun's ``LOCAL_WORLD_SIZE``; unknown: not pinned). A bad
    input raises ``ConfigError`` before the group forms; the caller calls
    ``actors.exchange.shutdown`` when done with the worker."""
    if local_world_size is None:
        local_world_size = torchrun_local_world_size()
    cores = set_up_cpu(cfg, default_threads, device or cfg.device, local_rank, local_world_size)
    if cores is not None and rank == 0:
        log.info(f"cpus: each of the {local_world_size} node processes on this machine runs on its own cores "
                 f"(rank 0 on {cores}); train.pin_cpus=false to leave them to the OS")
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
    set_up_cpu(cfg, default_threads, previous.env.device.type)  # the process keeps the cores it was given at start
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


def set_up_cpu(cfg: RunConfig, default_threads: int, device: str, local_rank: int = 0,
               local_world_size: Optional[int] = None) -> Optional[list[int]]:
    """A node process's CPU set-up, before it does any work: torch's intra-op threads
    (``train.num_threads``, else ``default_threads``; 0: leave them), and, with
    ``train.pin_cpus`` on a CPU run (``device`` cpu, or auto without CUDA), this process bound
    to its slice of the cores, as local process ``local_rank`` of ``local_world_size`` on this
    machine (``actors.cpus.pin_cpus``; None: unknown, not pinned). GPU runs are not pinned
    here (``torchrun --numa-binding`` binds a rank near its GPU). Returns the cores it was
    pinned to, or None when it was left as it was."""
    threads = cfg.train.num_threads or default_threads
    if threads:
        torch.set_num_threads(threads)
    on_cpu = device.startswith("cpu") or (device == "auto" and not torch.cuda.is_available())
    if not (cfg.train.pin_cpus and on_cpu and local_world_size is not None):
        return None
    return pin_cpus(local_rank, local_world_size)


def _compile(worker: NodeWorker) -> None:
    """With ``train.compile``: every process compiles its nodes (``NodeWorker.compile``), then
    waits for the others on the host, through the group's store and not a collective, for up
    to ``dist_timeout_s``: a process still compiling is named there, instead of the others
    timing out in the first all-gather while it compiles."""
    if worker.cfg.train.compile:
        worker.compile()
        worker.exchange.wait_for_all("compile", worker.cfg.dist_timeout_s)
