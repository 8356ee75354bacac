"""A node process that outlives its launcher ends itself.

torchrun starts its workers in sessions of their own, so a SIGKILL of the torchrun agent
(or of the Python process that called ``run_local``) leaves them running: they would
finish the run in the background, writing into a run directory that a re-run is already
using, or hang at the rendezvous. ``exit_with_parent`` starts a daemon thread that notices
within ``interval_s`` that the parent is gone (the process is re-parented) and ends this
process at once (``os._exit``): every file it wrote is complete (atomic writes), and the
run directory's lock is released by the kernel with the process.

Only for processes started by a launcher: a plain ``python launch.py`` is not watched (its
parent is a shell, which may exit while the run goes on under ``nohup``).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable


def exit_with_parent(parent: int, interval_s: float = 0.5, who: str = "node") -> threading.Thread:
    """``parent``: the launcher's pid, read when this process started (``os.getppid()`` at
    import of the entry module): a launcher killed during the seconds of start-up is caught
    too, at once."""
    return _exit_when(lambda: os.getppid() != parent, parent, interval_s, who)


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot: field 22 of ``/proc/<pid>/stat``),
    or None when there is no such process, or it has ended (a zombie, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def exit_with_process(pid: int, started: int, interval_s: float = 0.5, who: str = "node") -> threading.Thread:
    """``exit_with_parent`` for a launcher that is not this process's parent (a fork server
    sits between, and lives as long as its children): end this process once ``pid`` is gone,
    or is another process than the one that started at ``started`` (``process_start``)."""
    return _exit_when(lambda: process_start(pid) != started, pid, interval_s, who)


def _exit_when(gone: Callable[[], bool], launcher: int, interval_s: float, who: str) -> threading.Thread:
    """End this process (``os._exit(1)``) as soon as ``gone()``: now, or in a daemon thread
    that asks every ``interval_s``."""

    def end() -> None:
        print(f"[ktg] {who} (pid {os.getpid()}): its launcher (pid {launcher}) is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    if gone():
        end()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if gone():
                end()

    thread = threading.Thread(target=watch, name="ktg-lifeline", daemon=True)
    thread.start()
    return thread
