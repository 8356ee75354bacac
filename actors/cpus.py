"""Which CPU cores a node process runs on (``train.pin_cpus``).

Unpinned, the OS scheduler moves each node process from core to core as it sees fit; M node
processes of one thread each then run measurably slower than with each on cores of its own
(2 x ResNet32 on the 2-core development machine: 34.2 ms a step pinned, 36.7-39.9 ms
unpinned under torchrun), and the group moves at its slowest process's pace. ``pin_cpus``
binds local process ``r`` of ``n`` to the ``r``-th of ``n`` disjoint slices of the cores it
may use (``os.sched_getaffinity``: a container's cpuset, a ``taskset``, not the machine's
count). No torch here: the tests' children that check it start in a fraction of a second.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Optional

log = logging.getLogger(__name__)


def allowed_cpus() -> list[int]:
    """The cores this process may run on, in order; [] where the OS does not say (not Linux)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def cpu_slice(cores: Sequence[int], local_rank: int, local_world_size: int) -> Optional[list[int]]:
    """Local process ``local_rank``'s cores: ``cores`` cut, in order, into ``local_world_size``
    contiguous disjoint slices whose sizes differ by at most one. None (do not pin): a process
    alone (it has every core already), a rank outside the group, or fewer cores than processes:
    then some slice would hold two processes, which run at half speed each on their core while
    another process has a core to itself, and the group moves at its slowest process's pace;
    unpinned, the scheduler shares all the cores among all the processes, which is faster."""
    n, w = len(cores), local_world_size
    if w <= 1 or n < w or not 0 <= local_rank < w:
        return None
    return list(cores[local_rank * n // w : (local_rank + 1) * n // w])


def pin_cpus(local_rank: int, local_world_size: int, cores: Optional[Sequence[int]] = None) -> Optional[list[int]]:
    """Bind every thread of this process (and so the threads it starts later) to its slice
    (``cpu_slice``) of ``cores`` (default: ``allowed_cpus()``). Returns the slice, or None
    when the process was left as it was: nothing to pin (see ``cpu_slice``), no
    ``os.sched_setaffinity`` (not Linux), or the OS refused (a warning says why)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    mine = cpu_slice(allowed_cpus() if cores is None else cores, local_rank, local_world_size)
    if mine is None:
        return None
    try:
        bind(mine)
    except OSError as e:
        log.warning(f"local rank {local_rank}: not pinned to cores {mine} ({e}); set train.pin_cpus=false to not try")
        return None
    return mine


def bind(cores: Sequence[int]) -> None:
    """Run every thread of this process, and the threads and processes it starts later, on
    ``cores`` only (Linux). Raises ``OSError`` when the OS refuses the calling thread's."""
    os.sched_setaffinity(0, cores)  # the calling thread: pid 0 means this thread only, not the process
    for tid in _threads():  # the threads started before (torch's, a lifeline's) keep their own affinity otherwise
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # a thread that has ended since
            pass


def torchrun_local_world_size() -> Optional[int]:
    """How many node processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), or
    None outside torchrun: a Ray actor, a ``run_local`` child, a plain ``python``."""
    size = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(size) if "TORCHELASTIC_RUN_ID" in os.environ and size.isdigit() else None


def _threads() -> list[int]:
    """This process's thread ids (Linux: ``/proc/self/task``); [0] (the calling thread) elsewhere."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
