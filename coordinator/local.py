"""Run a whole graph on this machine from Python, without torchrun: M processes (from a
fork server that has imported torch once, or spawned), one per node, forming a gloo/NCCL
group over a local TCP port. The same ``run_node`` as under torchrun; useful from notebooks
and tests.

    from coordinator.local import run_local
    summary = run_local(cfg, "runs/my-run")
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from actors.config import RunConfig
from actors.errors import ConfigError
from actors.exchange import free_port
from actors.lifeline import process_start
from actors.preflight import check_device, check_world_size


def _context():
    """How the node processes start: from a fork server that has imported torch and the
    trainer once (a node then starts in a fraction of a second instead of importing torch
    for about two), or spawned where there is no fork server. Either way a node starts from a
    process that holds no threads and no CUDA context of the caller's, and with the caller's
    environment as it is now (``_child``)."""
    if "forkserver" in mp.get_all_start_methods() and process_start(os.getpid()) is not None:  # Linux: /proc
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["coordinator.run"])
        return ctx
    return mp.get_context("spawn")


def _child(cfg: RunConfig, run_dir: str, rank: int, world_size: int, port: int, results, caller: int,
           environ: Optional[dict[str, str]] = None, caller_started: Optional[int] = None,
           stdio: Optional[tuple] = None) -> None:
    """Node ``rank``'s process. ``caller_started`` (from a fork server): when the caller
    started, to watch it by its pid (the fork server is this process's parent, and lives as
    long as its children do); else the caller is this process's parent."""
    import logging

    if environ is not None:  # the caller's environment now, not the fork server's when it started
        os.environ.clear()
        os.environ.update(environ)
    if stdio is not None:  # the caller's stdout and stderr now (a fork server keeps those it started with)
        for fd, target in zip(stdio, (1, 2)):
            os.dup2(fd.detach(), target)
    if caller_started is not None:
        from actors.lifeline import exit_with_process

        exit_with_process(caller, caller_started, who=f"rank {rank}")
    from coordinator.run import run_node

    if not logging.getLogger().handlers:  # the run's console lines (rank 0), as under torchrun
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = run_node(cfg, run_dir, rank, world_size, rank, init_method=f"tcp://127.0.0.1:{port}",
                           watch_parent=None if caller_started is not None else caller,
                           local_world_size=world_size)  # every process on this machine: pinned as torchrun's
        results.put((rank, "ok", summary))
    except BaseException as e:  # report, then exit non-zero
        results.put((rank, "error", _failure(e, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
        raise SystemExit(1)


def _failure(e: BaseException, text: str) -> tuple[BaseException, str]:
    """What a failed node sends its caller: the exception itself (a ConfigError is raised
    again as it is), or, when it does not survive pickling, a RuntimeError with its text;
    and the text with the traceback. Checked here: the queue pickles in a feeder thread,
    where a failure would be lost and the node reported as exiting without a word."""
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:  # anything its pickling or unpickling raises: send the text instead
        return RuntimeError(text.split("\n", 1)[0]), text
    return e, text


def _stdio() -> tuple:
    """This process's stdout and stderr file descriptors, as a child of the fork server receives
    them (``multiprocessing``'s own descriptor passing)."""
    from multiprocessing.reduction import DupFd

    sys.stdout.flush()
    sys.stderr.flush()
    return DupFd(1), DupFd(2)


def run_local(cfg: RunConfig, run_dir: str | Path, timeout_s: Optional[float] = None,
              processes: Optional[int] = None) -> dict[str, Any]:
    """Train ``cfg.graph`` with ``processes`` spawned processes (default: one per node; fewer
    host several nodes each, placed by ``cfg.placement``); returns rank 0's summary.
    Raises ``RuntimeError`` naming the failed node(s) when any process fails."""
    m = processes or (len(cfg.placement) if isinstance(cfg.placement, list) else cfg.graph.num_nodes)
    check_world_size(cfg, m)
    check_device(cfg, local_world_size=m)  # all m processes on this machine
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    forked = ctx.get_start_method() == "forkserver"
    started = process_start(os.getpid()) if forked else None
    procs = [ctx.Process(target=_child, args=(cfg, str(run_dir), r, m, port, results, os.getpid(), dict(os.environ), started,
                                              _stdio() if forked else None), daemon=True) for r in range(m)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while len(outcomes) < m:
            try:
                rank, status, payload = results.get(timeout=1.0)
                outcomes[rank] = (status, payload)
                if status == "error":
                    break
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outcomes and p.exitcode is not None]
                if dead:  # died without reporting (killed, crashed in C, ...)
                    for r in dead:
                        msg = f"process exited with code {procs[r].exitcode} without reporting"
                        outcomes[r] = ("error", (None, msg))
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"graph run timed out after {timeout_s}s; finished nodes: {sorted(outcomes)}")
        for p in procs:
            p.join(timeout=60 if len(outcomes) == m else 3)  # after a failure the others are stuck in a collective
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    failed = {r: o[1] for r, o in outcomes.items() if o[0] == "error"}
    if failed:
        _raise_failure(failed, "node" if m == cfg.graph.num_nodes else "process")
    return outcomes[0][1]


def _raise_failure(failed: dict[int, tuple[Optional[BaseException], str]], unit: str = "node") -> None:
    """The first failed node's ``ConfigError`` as it is (bad input: the node's own message,
    as a launcher prints it); else a RuntimeError naming the failed nodes, with the first
    one's error and traceback (that error is its ``__cause__``). ``unit``: what a rank is,
    a node (one per process) or a process (hosting several nodes)."""
    first = min(failed)
    error, msg = failed[first]
    if isinstance(error, ConfigError):
        raise error
    raise RuntimeError(f"{unit}(s) {sorted(failed)} failed; {unit} {first}: {msg}") from error
