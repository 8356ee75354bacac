"""The only module that talks to torch.distributed.

``init_distributed`` starts the process group of one actor group (world size = number of
graph nodes; NCCL with one GPU per rank, gloo on CPU: the same code) and returns a
``DistEnv``. ``Exchange`` then offers the group's few collectives:

- ``all_gather(tensors)``: the per-step exchange. A dict of named per-sample tensors
  (today the node's logits and its batch fingerprint; later edge kinds add embeddings)
  is packed into one flat byte buffer and all-gathered in **one** collective; every
  rank receives every node's tensors, stacked along a new leading node dimension. The
  received tensors carry no gradient.
- ``broadcast`` (rank 0's batch plan), ``gather_objects`` (per-epoch metrics),
  ``broadcast_object``, ``barrier``. Under NCCL the object collectives and the barrier go
  through a gloo group of the same ranks (pickles stay on the host, and gloo's blocking
  calls time out on their own).

Faults. A group that does not form in time raises ``RendezvousTimeoutError`` (which rank
waited where, and for whom when the store can tell). Once formed, every rank beats a counter
in the group's store once a second (a daemon thread; nothing on the step's path). A
collective that fails raises ``GroupTimeoutError`` / ``CollectiveError`` after watching the
beats for a window of ``diagnosis_window(dist_timeout_s)`` s; the message names the rank(s)
whose beat stood still: the one(s) that did not answer. So that a hung group ends within
``dist_timeout_s``, the collectives are given ``dist_timeout_s`` less that window (for
``dist_timeout_s`` of at least twice the window; shorter ones are kept whole).

- gloo (blocking collectives): the collective itself raises after that time when a peer
  hangs or is stopped, at once when a peer dies, and the diagnosis runs in the failed call.
- NCCL (asynchronous collectives: a call returns once queued, and the host blocks only at
  its next synchronisation, where no exception can reach it): a ``CollectiveMonitor``
  thread watches every collective this process issued. One that has not completed after
  that time is diagnosed from the heartbeats, the named error is printed at once, the
  group's NCCL communicators are aborted (which releases the blocked host), and the main
  thread raises it at its next call here (``Exchange.failure`` lets the worker put it in
  place of whatever the aborted collective's garbage made go wrong first). The error goes to
  torchrun's error file too; if the main thread does not take it within
  ``MONITOR_GRACE_S``, the monitor ends the process (exit 1). NCCL's own timeout is set beyond all that
  (``nccl_timeout``), so its watchdog is only a backstop.

Every diagnostic store call is bounded: the store may live in the very process that stopped
(rank 0 under ``tcp://``; then that rank is named because its store did not answer either).
The rank serving the store stays up to one more window, until the other survivors have read
it.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


class RendezvousTimeoutError(RuntimeError):
    """The process group did not form in time: a rank (or the store) never showed up."""


class CollectiveError(RuntimeError):
    """A collective of the group failed. The message names the rank(s) that stopped
    answering, when that can be told; the backend's own error is the ``__cause__``."""


class GroupTimeoutError(CollectiveError):
    """A collective did not complete within ``dist_timeout_s`` (a rank hangs, is stopped,
    or is cut off)."""


BEAT_S = 1.0
"""Heartbeat period of every rank of a group (a counter in the group's store)."""
STORE_ANSWER_S = 2.0
"""How long a diagnostic store call may take beyond its own waiting before the store
itself counts as not answering."""
MONITOR_POLL_S = 0.1
"""How often the ``CollectiveMonitor`` looks at the oldest collective still in flight."""
MONITOR_GRACE_S = 10.0
"""After aborting a stalled group, how long the monitor waits for the main thread to raise
its error before it ends the process itself."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float = 300.0
    """The collectives' timeout (``dist_timeout_s`` less ``diagnosis_s`` when it is long enough)."""
    diagnosis_s: float = 3.0
    """How long a rank whose collective failed watches the others' heartbeats."""
    store: Any = field(default=None, repr=False, compare=False)
    """The group's (per-attempt prefixed) store; None: no diagnosis of failed collectives."""
    store_host: int | None = None
    """The rank whose process serves ``store`` (rank 0 for ``tcp://``, and for ``env://``
    without torchrun's agent store); None when no rank does (torchrun's agent, a file)."""
    host_group: Any = field(default=None, repr=False, compare=False)
    """The gloo group of the same ranks that carries the object collectives and the barrier
    under NCCL; None: the default group carries them."""
    monitor: "CollectiveMonitor | None" = field(default=None, repr=False, compare=False)
    """Watches the asynchronous (NCCL) collectives of this process; None: they block and
    raise on their own (gloo)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but CUDA is not available here; use device=cpu (or auto)")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise RuntimeError(f"local rank {local_rank} has no GPU of its own ({n} visible); one GPU per graph node is needed")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(
    rank: int,
    world_size: int,
    local_rank: int,
    init_method: str,
    device: str = "auto",
    backend: str = "auto",
    timeout_s: float = 300.0,
    rendezvous_timeout_s: float | None = None,
    monitor: bool | None = None,
) -> DistEnv:
    """Start this process's membership of the group. ``init_method`` is e.g.
    ``env://`` (torchrun) or ``tcp://host:port`` (Ray actors, ``run_local``).

    ``timeout_s`` (``dist_timeout_s``) bounds every collective. ``rendezvous_timeout_s``
    (default: ``timeout_s``) bounds forming the group: reaching the store and every rank
    checking in there. The default is that long, not shorter, because every rank loads (and
    may download) its data before it joins, so one may arrive minutes after another. A group
    that does not form in time raises ``RendezvousTimeoutError``, one line: this rank, where
    it waited, and the ranks that never checked in when the store can tell. Other failures
    of the rendezvous (e.g. the port is taken) are raised as torch reports them.

    ``monitor`` (default: with NCCL) watches the collectives from a ``CollectiveMonitor``
    thread instead of relying on them to raise; ``True`` on gloo is how the tests run the
    NCCL path's fault handling on a CPU."""
    dev = resolve_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    watched = (backend == "nccl") if monitor is None else monitor
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before init: NCCL binds this rank to its own GPU
        kwargs["device_id"] = dev
    diagnosis_s = diagnosis_window(timeout_s)
    collective_s = timeout_s - diagnosis_s if timeout_s >= 2 * diagnosis_s else timeout_s
    timeout = datetime.timedelta(seconds=collective_s)
    forming = _Forming(rank, world_size, init_method, timeout_s if rendezvous_timeout_s is None else rendezvous_timeout_s)
    store, rank, world_size = _reach_store(forming)
    store = _attempt_store(store)
    beats = [_beat_key(r) for r in range(world_size)]
    _check_in(forming, store, beats, rank)
    store.set_timeout(timeout)
    # watched collectives: the backend's own timeout is only a backstop beyond the monitor's
    pg_timeout = datetime.timedelta(seconds=nccl_timeout(timeout_s)) if watched else timeout
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=pg_timeout, **kwargs)
    # pickled objects and the barrier over gloo: on the host, blocking, raising on a lost peer by themselves
    host_group = dist.new_group(backend="gloo", timeout=timeout) if (backend != "gloo" or watched) and world_size > 1 else None
    env = DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend,
                  timeout_s=collective_s, diagnosis_s=diagnosis_s, store=store, store_host=_store_host(init_method),
                  host_group=host_group)
    if world_size > 1:
        _start_heartbeat(store, beats[rank])
        if watched:
            env = _start_monitor(env)
    return env


@dataclass
class _Forming:
    """One rank forming its group (``init_distributed``): the bound ``timeout_s`` on reaching
    the store and checking in, counted from ``t0``, and what it says when that fails."""
    rank: int
    world_size: int
    init_method: str
    timeout_s: float
    t0: float = field(default_factory=time.monotonic)

    def left_s(self) -> float:
        return max(self.timeout_s - (time.monotonic() - self.t0), 0.1)

    def not_formed(self, e: BaseException | None, missing: list[int] | None = None) -> BaseException:
        """The error to raise: ``e`` as it is when it is not a timeout (e.g. the port is
        taken), else a one-line ``RendezvousTimeoutError`` naming the ranks ``missing``."""
        if e is not None and time.monotonic() - self.t0 < 0.9 * self.timeout_s:
            return e  # not a timeout: raised as it is
        whom = f" for {_who(missing)}, which never checked in" if missing else ""
        return RendezvousTimeoutError(
            f"the process group did not form within {self.timeout_s:g} s: rank {self.rank} of {self.world_size} waited at "
            f"{_where(self.init_method)}{whom}; are all {self.world_size} processes started, and is that address "
            "reachable from each?")


def _reach_store(forming: _Forming) -> tuple[Any, int, int]:
    """The group's store, and this rank and the world size as the rendezvous returns them
    (kept in ``forming`` too: its later messages name them)."""
    def rendezvous() -> Any:
        return next(dist.rendezvous(forming.init_method, forming.rank, forming.world_size,
                                    timeout=datetime.timedelta(seconds=forming.timeout_s)))

    if _store_host(forming.init_method) == forming.rank:
        # This process serves the store: waiting for the clients, it keeps to the timeout
        # (and a thread left inside the server's start would abort the process at exit).
        try:
            got = rendezvous()
        except RuntimeError as e:
            got = e
    else:
        # A client, bounded in a thread: with no server there it retries past its timeout
        # (about 2.5 times it); with the server's process stopped it may wait for good.
        got = _bounded(rendezvous, forming.timeout_s + 0.5)
    if got is _NO_ANSWER:
        raise forming.not_formed(None)
    if isinstance(got, BaseException):  # DistStoreError (rank 0 waited for clients), DistNetworkError, ...
        raise forming.not_formed(got) from got
    store, forming.rank, forming.world_size = got
    return got


def _attempt_store(store: Any) -> Any:
    """Under torchrun the store outlives a restart of the workers (--max-restarts): keys of
    the failed attempt (e.g. gloo's peer addresses) would be read by the new one and its
    connections refused. A prefix per attempt keeps each attempt's keys apart."""
    return dist.PrefixStore(f"ktg/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def _check_in(forming: _Forming, store: Any, beats: list[str], rank: int) -> None:
    """Check in (the first heartbeat) and wait, bounded, for every rank to: then the backend's
    own connecting (bounded by the collective timeout only) finds every peer there."""
    left_s = forming.left_s()

    def check_in() -> None:
        store.add(beats[rank], 1)
        store.wait(beats, datetime.timedelta(seconds=left_s))

    got = _bounded(check_in, left_s + STORE_ANSWER_S)  # the store's process may be stopped
    if got is _NO_ANSWER:
        raise forming.not_formed(None)
    if isinstance(got, BaseException):
        def absent() -> list[int]:
            return [r for r in range(len(beats)) if not store.check([beats[r]])]
        missing = _bounded(absent, STORE_ANSWER_S)
        raise forming.not_formed(got, missing if isinstance(missing, list) else None) from got


def nccl_timeout(timeout_s: float) -> float:
    """The timeout given to a watched (NCCL) group itself: past ``dist_timeout_s``, the
    diagnosis and the monitor's grace, so that NCCL's watchdog (which, under torchrun's and
    Ray's async error handling, kills the process without a word about the peer) fires only
    if the monitor could not act."""
    return timeout_s + diagnosis_window(timeout_s) + STORE_ANSWER_S + MONITOR_GRACE_S + 30.0


def diagnosis_window(timeout_s: float) -> float:
    """Seconds a rank whose collective failed watches the heartbeats (``dist_timeout_s`` /
    10, at least 3 beats, at most 10 s)."""
    return min(10.0, max(3 * BEAT_S, timeout_s / 10))


def _where(init_method: str) -> str:
    if init_method.startswith("env://"):
        return f"env:// (MASTER_ADDR:MASTER_PORT = {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})"
    return init_method


def _store_host(init_method: str) -> int | None:
    """Which rank's process serves the store ``dist.rendezvous`` returned (see torch's
    ``rendezvous._create_c10d_store``)."""
    if init_method.startswith("tcp://"):
        return 0
    if init_method.startswith("env://"):
        return None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True) else 0
    return None


def _who(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _beat_key(rank: int) -> str:
    return f"beat/{rank}"


_NO_ANSWER = object()


def _bounded(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` in a daemon thread: its result, the exception it raised, or ``_NO_ANSWER``
    if it did not return within ``timeout_s`` (a store call to a stopped process blocks for
    good, whatever the store's timeout says; the thread is left behind)."""
    box: list[Any] = [_NO_ANSWER]

    def run() -> None:
        try:
            box[0] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the caller
            box[0] = e

    t = threading.Thread(target=run, name="ktg-diagnosis", daemon=True)
    t.start()
    t.join(timeout_s)
    return box[0]


_heartbeat_stop: threading.Event | None = None


def _start_heartbeat(store: Any, key: str) -> None:
    global _heartbeat_stop
    _stop_heartbeat()  # of an earlier group of this process
    stop = _heartbeat_stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone: the group is ending anyway
                return

    threading.Thread(target=beat, name="ktg-heartbeat", daemon=True).start()


def _stop_heartbeat() -> None:
    global _heartbeat_stop
    if _heartbeat_stop is not None:
        _heartbeat_stop.set()
        _heartbeat_stop = None


def _silent_ranks(env: DistEnv, window_s: float) -> Any:
    """This rank says in the store that it failed, then watches the others' heartbeats for
    ``window_s``: the other ranks whose beat did not move and that did not say they failed
    (sorted list), or what kept that from being told: ``_NO_ANSWER`` (the store did not
    answer) or the exception the store raised."""
    store, others = env.store, [r for r in range(env.world_size) if r != env.rank]

    def read() -> list[int]:
        store.add(_failed_key(env.rank), 1)  # a survivor that fails and exits is not blamed
        before = {r: store.add(_beat_key(r), 0) for r in others}
        time.sleep(window_s)
        silent = [r for r in others if store.add(_beat_key(r), 0) == before[r] and not store.add(_failed_key(r), 0)]
        store.add(_done_key(env.rank), 1)
        return silent

    silent = _bounded(read, window_s + STORE_ANSWER_S)
    if isinstance(silent, list) and env.store_host == env.rank:
        # This process serves the store: it stays until the other survivors, which may have
        # failed later, have read it too (bounded: one more window).
        def linger() -> None:
            deadline = time.monotonic() + window_s + STORE_ANSWER_S
            while time.monotonic() < deadline and not all(store.add(_done_key(r), 0) for r in others if r not in silent):
                time.sleep(0.05)

        _bounded(linger, window_s + 2 * STORE_ANSWER_S)
    return silent


def _failed_key(rank: int) -> str:
    return f"failed/{rank}"


def _done_key(rank: int) -> str:
    return f"diagnosed/{rank}"


def env_from_torchrun() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a plain ``python``
    process is rank 0 of a group of 1 (a free local port is picked for its store)."""
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def shutdown() -> None:
    _stop_heartbeat()
    stalled = _stop_monitor()
    if dist.is_available() and dist.is_initialized():
        if stalled:  # an aborted NCCL group, or one with work in flight: tearing it down may block
            _bounded(dist.destroy_process_group, 5.0)
        else:
            dist.destroy_process_group()


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> Any:
    if hasattr(dist, "all_gather_single"):  # torch >= 2.13: all_gather_into_tensor is deprecated
        return dist.all_gather_single(out, inp, async_op=async_op)
    return dist.all_gather_into_tensor(out, inp, async_op=async_op)


_ALIGN = 16  # bytes
MAX_PLANS = 8
"""Payload layouts whose buffers an ``Exchange`` keeps (the least recently used go first): a
run uses a handful (the step with and without the batch fingerprint, evaluation, the NaN
check), and a warm search process meets new ones with every graph."""


class _Plan:
    """Buffers of one payload layout: the tensors packed into one flat uint8 send buffer
    (each at a 16-byte aligned offset), an ``[M, bytes]`` receive buffer, and the views of
    it that ``all_gather`` returns: ``name -> [M, *shape]`` in the original dtype. Built
    once per layout, so a step's exchange is one copy per tensor plus the collective."""

    def __init__(self, layout: tuple, world_size: int):
        self.spans: list[tuple[int, int]] = []
        offset = 0
        for _, shape, dtype, _ in layout:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self.spans.append((offset, size))
            offset += size + (-size % _ALIGN)  # keep every tensor's offset aligned for the views
        device = layout[0][3]
        self.send = torch.zeros(offset, dtype=torch.uint8, device=device)
        # a group of one gathers nothing: its receive buffer is its send buffer
        self.recv_flat = self.send if world_size == 1 else torch.empty(world_size * offset, dtype=torch.uint8, device=device)
        recv = self.recv_flat.view(world_size, offset)  # gloo only takes the flat layout
        self.views = {
            name: recv[:, off : off + size].view(dtype).view(world_size, *shape)
            for (name, shape, dtype, _), (off, size) in zip(layout, self.spans)
        }


class Exchange:
    """Collectives of one actor group. Works unchanged at world size 1, with or without a
    process group (a group of one: every collective is local)."""

    def __init__(self, env: DistEnv):
        self.env = env
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()  # per payload layout: reused send/receive buffers
        self.alone = env.world_size == 1
        self._waits = 0  # wait_for_all calls so far (each waits on keys of its own)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def failure(self) -> CollectiveError | None:
        """The monitor's error once it has aborted a stalled group (NCCL), else None: the
        worker raises it in place of whatever the aborted collectives' garbage caused."""
        monitor = self.env.monitor
        return monitor.take() if monitor is not None and monitor.failure is not None else None

    def release(self) -> None:
        """Drop every layout's buffers (a warm process's next graph builds its own)."""
        self._plans.clear()

    def all_gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One all-gather of several named tensors. Every rank must pass the same names,
        shapes and dtypes (true by construction: same graph, same batch size). Returns each
        name stacked over nodes: ``[M, *shape]``, detached.

        The returned tensors are views into a receive buffer that is reused by the next
        call with the same layout: use them within the step (clone to keep them longer)."""
        layout = tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in tensors.items())
        plan = self._plans.get(layout)
        if plan is None:
            plan = self._plans[layout] = _Plan(layout, self.world_size)
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(layout)
        for (off, size), t in zip(plan.spans, tensors.values()):
            plan.send[off : off + size].copy_(t.detach().reshape(-1).view(torch.uint8))
        if not self.alone:
            self._collective("all_gather", lambda async_op: _all_gather_flat(plan.recv_flat, plan.send, async_op))
        return dict(plan.views)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In-place broadcast from ``src``; other ranks pass a buffer of the same shape."""
        if not self.alone:
            self._collective("broadcast", lambda async_op: dist.broadcast(tensor, src=src, async_op=async_op))
        return tensor

    def _collective(self, op: str, issue: Callable[[bool], Any]) -> None:
        """Run a tensor collective: blocking (gloo: it raises on a lost peer), or issued
        asynchronously and handed to the monitor (NCCL: ``work.wait()`` only makes this
        rank's stream wait for it; the host goes on)."""
        monitor = self.env.monitor
        if monitor is not None:
            monitor.check()  # the group was aborted: its error, not another collective's
        try:
            if monitor is None:
                issue(False)
                return
            work = issue(True)
            monitor.watch(op, work)
            _wait(work)
        except RuntimeError as e:  # gloo; NCCL under TORCH_NCCL_BLOCKING_WAIT=1, or after the monitor's abort
            raise self._failed(op, e) from e

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (on every rank)."""
        if self.alone:
            return [obj]
        self._check_monitor()
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.env.host_group)
        except RuntimeError as e:
            raise self._failed("gather_objects", e) from e
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.alone:
            return obj
        self._check_monitor()
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=src, group=self.env.host_group)
        except RuntimeError as e:
            raise self._failed("broadcast_object", e) from e
        return box[0]

    def barrier(self) -> None:
        if self.alone:
            return
        self._check_monitor()
        try:
            dist.barrier(group=self.env.host_group)
        except RuntimeError as e:
            raise self._failed("barrier", e) from e

    def wait_for_all(self, what: str, timeout_s: float) -> None:
        """Every rank reaches this point, told through the group's store (on the host, no
        collective, so no collective timeout): for work of unequal length before the first
        collective, e.g. compiling. A ``CollectiveError`` after ``timeout_s`` names the ranks
        that did not arrive."""
        if self.alone or self.env.store is None:
            return
        self._waits += 1
        store, env = self.env.store, self.env
        keys = [f"ready/{what}/{self._waits}/{r}" for r in range(env.world_size)]

        def arrive() -> None:
            store.add(keys[env.rank], 1)
            store.wait(keys, datetime.timedelta(seconds=timeout_s))

        got = _bounded(arrive, timeout_s + STORE_ANSWER_S)
        if got is _NO_ANSWER or isinstance(got, BaseException):
            missing = _bounded(lambda: [r for r in range(env.world_size) if not store.check([keys[r]])], STORE_ANSWER_S)
            who = _who(missing) if isinstance(missing, list) and missing else "a rank (the store did not say which)"
            raise CollectiveError(f"rank {env.rank} of {env.world_size} waited {timeout_s:g} s for every rank to finish "
                                  f"{what}: {who} did not (raise dist_timeout_s if {what} takes longer); the group stops")

    def _check_monitor(self) -> None:
        if self.env.monitor is not None:
            self.env.monitor.check()

    def _failed(self, op: str, e: RuntimeError) -> RuntimeError:
        """The error to raise for collective ``op`` that failed with ``e``: the monitor's, when
        it aborted the group; else which ranks stopped answering, told from their heartbeats
        (this takes a few seconds)."""
        if isinstance(e, CollectiveError):
            return e
        if self.env.monitor is not None and self.env.monitor.failure is not None:
            return self.env.monitor.take()
        text = str(e).lower()
        timed_out = "timed out" in text or "timeout" in text  # gloo: "Timed out waiting 5000ms for recv ..."
        return diagnose(self.env, op, timed_out)


def diagnose(env: DistEnv, op: str, timed_out: bool) -> CollectiveError:
    """The error for collective ``op`` of this rank that timed out (or failed): which ranks
    stopped answering, told by watching their heartbeats for ``env.diagnosis_s``."""
    what = (f"{op} timed out after {env.timeout_s:g} s" if timed_out else f"{op} failed") \
        + f" on rank {env.rank} of {env.world_size}"
    window = env.diagnosis_s
    silent = _silent_ranks(env, window) if env.store is not None else None
    if silent is None:
        why = "which rank did not answer is unknown (no store to ask)"
    elif isinstance(silent, list) and silent:
        why = f"{_who(silent)} did not answer (no heartbeat for {window:g} s: stopped, hung, dead or cut off)"
    elif isinstance(silent, list):
        why = ("every rank still answers (a rank may be stuck in a loop or far behind)" if timed_out
               else "every rank still answers: no rank was lost (see the error above)")
    elif silent is _NO_ANSWER and env.store_host is not None and env.store_host != env.rank:
        why = (f"rank {env.store_host} did not answer (nor did the group's store, which rank {env.store_host} "
               f"serves, within {window + STORE_ANSWER_S:g} s: stopped, hung or cut off)")
    elif silent is _NO_ANSWER:
        why = f"which rank did not answer is unknown (the group's store did not answer within {window + STORE_ANSWER_S:g} s)"
    else:
        why = f"which rank did not answer is unknown (the group's store failed: {type(silent).__name__})"
    return (GroupTimeoutError if timed_out else CollectiveError)(f"{what}: {why}; the group stops")


# --- the monitor of asynchronous (NCCL) collectives ----------------------------------------------


class CollectiveMonitor:
    """Watches the collectives one process issued on an asynchronous (NCCL) group.

    An NCCL collective returns once it is queued on the GPU; if a peer never joins it, the
    host blocks at its next synchronisation (a ``.item()``, the end of an epoch), where no
    exception can reach it, until NCCL's watchdog kills the process without naming anyone.
    This thread looks every ``MONITOR_POLL_S`` at the oldest collective still in flight
    (``Work.is_completed``, a non-blocking event query). When one has been in flight for the
    group's collective timeout, it diagnoses the group from the heartbeats (``diagnose``),
    prints the named error and writes it to torchrun's error file (when there is one: its
    failure summary then names the stopped rank), and calls ``abort`` (the NCCL
    communicators'), which ends the stalled kernels and so releases the blocked host. The main
    thread raises the error at its next collective (``check``), or the worker raises it in
    place of what the aborted collective's garbage made go wrong (``Exchange.failure``).
    Should the main thread not take it within ``grace_s``, the monitor ends the process with
    exit code 1."""

    def __init__(self, env: DistEnv, abort: Callable[[], None], grace_s: float | None = None):
        self.env, self._abort = env, abort
        self.grace_s = MONITOR_GRACE_S if grace_s is None else grace_s
        self._pending: deque[tuple[str, Any, float]] = deque()  # (op, work, issued at); the main thread appends
        self.failure: CollectiveError | None = None
        self._taken = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ktg-collective-monitor", daemon=True)
        self._thread.start()

    def watch(self, op: str, work: Any) -> None:
        """Collective ``op`` was issued (``work``: its ``dist.Work``)."""
        self._pending.append((op, work, time.monotonic()))

    def check(self) -> None:
        """Raise the monitor's error if it has diagnosed a stalled collective."""
        if self.failure is not None:
            raise self.take()

    def take(self) -> CollectiveError:
        """The monitor's error, taken by the main thread (which will raise it)."""
        self._taken.set()
        return self.failure

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        if self.env.device.type == "cuda":
            import torch.cuda

            torch.cuda.set_device(self.env.device)  # the events it queries belong to this rank's GPU
        while not self._stop.wait(MONITOR_POLL_S):
            while self._pending and _completed(self._pending[0][1]):
                self._pending.popleft()
            if not self._pending:
                continue
            op, _, issued = self._pending[0]
            if time.monotonic() - issued < self.env.timeout_s:
                continue
            self.failure = diagnose(self.env, op, timed_out=True)
            # said first, whatever ends this process: on stderr, and in torchrun's error file
            # (its failure summary then names the rank that stopped answering)
            print(f"[rank {self.env.rank}] {type(self.failure).__name__}: {self.failure}", file=sys.stderr, flush=True)
            _write_error_file(self.failure)
            try:
                self._abort()
            except Exception as e:  # noqa: BLE001 - the grace below still ends the process
                print(f"[rank {self.env.rank}] aborting the process group failed: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
            if not self._taken.wait(self.grace_s) and not self._stop.is_set():
                os._exit(1)
            return


def _wait(work: Any) -> None:
    """``work.wait()``: for NCCL the current stream waits for the collective, the host does
    not (unless ``TORCH_NCCL_BLOCKING_WAIT=1``); gloo's blocks. The tests replace it to make
    a gloo collective wait as an NCCL one does on the host: until it completes or is aborted."""
    work.wait()


def _completed(work: Any) -> bool:
    try:
        return bool(work.is_completed())
    except Exception:  # noqa: BLE001 - a work that failed: the main thread sees its error
        return True


def _abort_backend(device: torch.device) -> Callable[[], None]:
    """Abort the default group's communicators on ``device``'s backend (NCCL's
    ``ncclCommAbort``: the kernels waiting for a lost peer return; the group is unusable)."""
    def abort() -> None:
        dist.group.WORLD._get_backend(device).abort()

    return abort


def _write_error_file(error: BaseException) -> None:
    """torchrun's error file (``TORCHELASTIC_ERROR_FILE``, through torch's own handler), so
    that its failure summary says why this worker exited; nothing outside torchrun."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        try:
            ErrorHandler().record_exception(error)
        except Exception:  # noqa: BLE001 - the message is on stderr already
            pass


_monitor: CollectiveMonitor | None = None


def _start_monitor(env: DistEnv) -> DistEnv:
    import dataclasses

    global _monitor
    _stop_monitor()
    _monitor = CollectiveMonitor(env, _abort_backend(env.device))
    env = dataclasses.replace(env, monitor=_monitor)
    _monitor.env = env
    return env


def _stop_monitor() -> bool:
    """Stop this process's monitor; whether its group may be stalled: aborted, or with a
    collective still in flight (tearing that down may block)."""
    global _monitor
    stalled = _monitor is not None and (_monitor.failure is not None or _monitor.in_flight > 0)
    if _monitor is not None:
        _monitor.stop()
        _monitor = None
    return stalled
