"""Hangs: a node that stops answering (SIGSTOP) ends its group within ``dist_timeout_s``
(plus a few seconds of diagnosis), and every survivor's error names the rank that stopped;
a group that never forms gives up in bounded time with a message saying who waited where."""
import datetime
import json
import multiprocessing as mp
import os
import re
import signal
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch

from tests.helpers import small_config

T = "Through"
WINDOW_S = 3.0  # the heartbeat window of the diagnosis for timeouts under 30 s
STORE_S = 2.0  # how long the diagnosis waits beyond it for a store that does not answer


def _stopped(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def _gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _release(pid):
    """Leave nothing behind: a stopped process is killed (SIGKILL works on a stopped one)."""
    for sig in (signal.SIGKILL, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def loop_child(rank, world, port, timeout_s, slow_rank, results):
    """Steps like a node: all_gathers, and every few steps a gather_objects that
    ``slow_rank`` reaches 2 s late (a node slower to evaluate). Reports its pid, its error
    and when (CLOCK_MONOTONIC, shared by the processes of this machine), and that it got
    through ``shutdown``."""
    from actors.exchange import Exchange, init_distributed, shutdown

    torch.set_num_threads(1)
    try:
        env = init_distributed(rank, world, rank, f"tcp://127.0.0.1:{port}", "cpu", "gloo", timeout_s)
        step_until_it_fails(Exchange(env), rank, results, slow_rank, shutdown)
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", traceback.format_exc(), time.monotonic()))


def step_until_it_fails(ex, rank, results, slow_rank, shutdown):
    """Steps like a node until a collective fails (reported with the time), then shuts the
    group down and says so."""
    results.put((rank, "pid", os.getpid()))
    try:
        step = 0
        while True:
            ex.all_gather({"x": torch.full((8,), float(rank))})
            step += 1
            if step % 20 == 0:
                if rank == slow_rank:
                    time.sleep(2.0)
                ex.gather_objects(step)  # (under a monitor, over the host group, as under NCCL)
            time.sleep(0.005)
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", f"{type(e).__name__}: {e}", time.monotonic()))
    finally:
        shutdown()
    results.put((rank, "shut down", None, time.monotonic()))


def _run_group_and_stop(world, stop, timeout_s, slow_rank=-1, sig=signal.SIGSTOP, settle_s=1.5):
    """Start ``world`` loop_child processes; once all run, send rank ``stop`` ``sig``.
    Returns {survivor rank: (its error, seconds from the signal to the error)}, after
    checking that every survivor got through ``shutdown`` (so it can end)."""
    from actors.exchange import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=loop_child, args=(r, world, port, timeout_s, slow_rank, q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    pids = {}
    try:
        while len(pids) < world:
            rank, kind, *rest = q.get(timeout=60)
            assert kind == "pid", rest
            pids[rank] = rest[0]
        time.sleep(settle_s)  # a few collectives, and a gather_objects with its late rank
        os.kill(pids[stop], sig)
        signalled_at = time.monotonic()
        errors, shut = {}, set()
        while len(shut) < world - 1:
            rank, kind, msg, at = q.get(timeout=timeout_s + 30)
            if kind == "error":
                errors[rank] = (msg, at - signalled_at)
            else:
                shut.add(rank)
        if sig == signal.SIGSTOP:
            assert _stopped(pids[stop])  # stopped all along: the survivors ended on their own
        return errors
    finally:
        for p in procs:
            _release(p.pid)
            p.join(timeout=10)


def test_stopped_rank_is_named_by_every_survivor():
    """3 ranks, rank 1 stopped: ranks 0 and 2 raise GroupTimeoutError within the timeout
    plus the diagnosis, naming rank 1 only; rank 2, 2 s late at every gather_objects, is
    not blamed."""
    timeout_s = 4.0
    errors = _run_group_and_stop(3, 1, timeout_s, slow_rank=2)
    assert sorted(errors) == [0, 2]
    for rank, (msg, after) in errors.items():
        assert re.match(rf"GroupTimeoutError: (all_gather|gather_objects) timed out after 4 s on rank {rank} of 3: "
                        r"rank 1 did not answer \(no heartbeat", msg), msg
        # the timeout, up to 2 s late arrival of rank 2, the diagnosis window, margin
        assert after < timeout_s + 2.0 + WINDOW_S + 3.0, (rank, after, msg)


def test_stopped_store_host_is_named():
    """Under tcp:// rank 0 serves the group's store: stopped, it answers neither the
    collective nor the store. The survivors still end in bounded time and name it."""
    timeout_s = 4.0
    errors = _run_group_and_stop(3, 0, timeout_s)
    assert sorted(errors) == [1, 2]
    for rank, (msg, after) in errors.items():
        assert re.match(rf"GroupTimeoutError: \w+ timed out after 4 s on rank {rank} of 3: rank 0 did not answer "
                        r"\(nor did the group's store", msg), msg
        assert after < timeout_s + WINDOW_S + STORE_S + 3.0, (rank, after, msg)


def _run_local_children(world):
    """The processes of the running ``run_local`` call: rank -> pid. It starts them in rank
    order (and ``Process.start`` drops its target and arguments), so creation order tells."""
    kids = sorted(mp.active_children(), key=lambda p: p._identity)
    return {r: p.pid for r, p in enumerate(kids)} if len(kids) == world else {}


def test_stopped_node_ends_the_run_naming_it(tmp_path):
    """A 2-node run under run_local, dist_timeout_s=8: node 1 is SIGSTOPped mid-training.
    Node 0 ends within dist_timeout_s (the collective times out after 5 s, the heartbeats
    are watched for 3 s) plus the time to exit, and the run's error names node 1."""
    from coordinator.local import run_local

    timeout_s = 8.0
    cfg = small_config(["convnet", "convnet"], [[T, T], [T, T]],
                       train={"epochs": 50, "batch_size": 32, "num_threads": 1}, dist_timeout_s=timeout_s)
    seen = {}

    def stopper():
        t0 = time.time()
        while time.time() - t0 < 60 and len(seen.get("pids", {})) < 2:
            seen["pids"] = _run_local_children(2)
            time.sleep(0.05)
        metrics = tmp_path / "metrics.jsonl"
        while time.time() - t0 < 60:  # epoch 1 recorded: training is under way
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        os.kill(seen["pids"][1], signal.SIGSTOP)
        seen["stopped_at"] = time.monotonic()
        while time.time() - t0 < 90 and not _gone(seen["pids"][0]):
            time.sleep(0.05)
        seen["rank0_gone_at"] = time.monotonic()

    watcher = threading.Thread(target=stopper, daemon=True)
    watcher.start()
    try:
        with pytest.raises(RuntimeError) as info:
            run_local(cfg, tmp_path, timeout_s=120)
        watcher.join(timeout=30)
    finally:
        for pid in seen.get("pids", {}).values():
            _release(pid)
    msg = str(info.value)
    assert "stopped_at" in seen, msg
    assert re.search(r"GroupTimeoutError: \w+ timed out after 5 s on rank 0 of 2: rank 1 did not answer", msg), msg
    ended = seen["rank0_gone_at"] - seen["stopped_at"]
    assert ended < timeout_s + 3.0, f"node 0 ended {ended:.1f} s after node 1 stopped"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= len(rows) < 2 * 50  # it did stop mid-run


def test_rank_alone_at_a_tcp_rendezvous_gives_up():
    """World size 2, only rank 0 started (it serves the store): it gives up within the
    bound with a one-line message saying which rank waited where."""
    from actors.exchange import free_port, init_distributed

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        init_distributed(0, 2, 0, f"tcp://127.0.0.1:{port}", "cpu", "gloo", 3.0)
    took = time.monotonic() - t0
    assert type(info.value).__name__ == "RendezvousTimeoutError", repr(info.value)
    msg = str(info.value)
    assert re.match(rf"the process group did not form within 3 s: rank 0 of 2 waited at tcp://127\.0\.0\.1:{port}; "
                    r"are all 2 processes started", msg), msg
    assert "\n" not in msg
    assert took < 3.0 + 3.0, took


def test_rank_whose_peer_never_comes_names_it(monkeypatch):
    """Under torchrun the agent serves the store (env://): rank 1 reaches it at once but
    rank 0 never checks in. Rank 1 gives up within the rendezvous bound (not the collective
    timeout) and names rank 0."""
    import torch.distributed as dist

    from actors.exchange import free_port, init_distributed

    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        init_distributed(1, 2, 1, "env://", "cpu", "gloo", 60.0, rendezvous_timeout_s=2.0)
    took = time.monotonic() - t0
    del agent
    assert type(info.value).__name__ == "RendezvousTimeoutError", repr(info.value)
    msg = str(info.value)
    assert re.match(rf"the process group did not form within 2 s: rank 1 of 2 waited at env:// "
                    rf"\(MASTER_ADDR:MASTER_PORT = 127\.0\.0\.1:{port}\) for rank 0, which never checked in; ", msg), msg
    assert took < 2.0 + 3.0, took


# --- NCCL's asynchronous collectives, as the monitor sees them ------------------------------------


def nccl_like_child(rank, world, port, timeout_s, results, abort_frees=True, error_file=None):
    """A node stepping on a group whose collectives behave as NCCL's do on the host: a call
    returns once queued, and the host then blocks (``_wait``, here a poll of the real gloo
    work) until the collective completes, or until the group's communicators are aborted,
    which is the only thing that frees it (``abort_frees=False``: not even that, as when the
    abort itself hangs). The monitor, its deadline, its diagnosis, its abort call and the
    main thread's raise are the trainer's own code."""
    import actors.exchange as xm

    aborted = threading.Event()

    def wait(work):
        while not work.is_completed():
            if aborted.wait(0.01) and abort_frees:
                raise RuntimeError("NCCL communicator was aborted on rank %d" % rank)
        work.wait()

    xm._wait = wait
    xm._abort_backend = lambda device: aborted.set
    xm.MONITOR_GRACE_S = 1.0
    if error_file:
        os.environ["TORCHELASTIC_ERROR_FILE"] = error_file
    torch.set_num_threads(1)
    try:
        env = xm.init_distributed(rank, world, rank, f"tcp://127.0.0.1:{port}", "cpu", "gloo", timeout_s, monitor=True)
        step_until_it_fails(xm.Exchange(env), rank, results, -1, xm.shutdown)
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", traceback.format_exc(), time.monotonic()))


def test_the_monitor_names_a_stopped_rank_when_collectives_do_not_raise(tmp_path):
    """Under NCCL a collective never raises when a peer stops: the host just blocks. With the
    collectives made to behave so (gloo's own timeout pushed past the monitor's, as the NCCL
    group's is), rank 1 SIGSTOPped: the monitors of ranks 0 and 2 see their all-gather still
    in flight after the collective timeout, name rank 1 from the heartbeats and abort. Rank 2,
    freed by the abort, raises that error within dist_timeout_s; rank 0, whose abort frees
    nothing, is ended by its monitor after the grace (exit code 1), the error in torchrun's
    error file (so torchrun's failure summary names the stopped rank)."""
    import actors.exchange as xm
    from actors.exchange import free_port

    timeout_s = 6.0
    assert xm.nccl_timeout(timeout_s) > timeout_s + 3.0 + 2.0 + xm.MONITOR_GRACE_S  # NCCL's watchdog only as a backstop
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    error_file = tmp_path / "error.json"
    kwargs = {0: {"abort_frees": False, "error_file": str(error_file)}}
    procs = [ctx.Process(target=nccl_like_child, args=(r, 3, port, timeout_s, q), kwargs=kwargs.get(r, {}), daemon=True)
             for r in range(3)]
    for p in procs:
        p.start()
    try:
        pids = {}
        while len(pids) < 3:
            rank, kind, *rest = q.get(timeout=60)
            assert kind == "pid", rest
            pids[rank] = rest[0]
        time.sleep(1.0)
        os.kill(pids[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        errors = {}
        while 2 not in errors or procs[0].exitcode is None:
            try:
                rank, kind, msg, at = q.get(timeout=1)
            except Exception:  # noqa: BLE001 - queue.Empty: rank 0 ends without a word on the queue
                assert time.monotonic() - stopped_at < 60
                continue
            if kind == "error":
                errors[rank] = (msg, at - stopped_at)
        procs[0].join(timeout=10)
    finally:
        for p in procs:
            _release(p.pid)
            p.join(timeout=10)
    assert sorted(errors) == [2]
    msg, after = errors[2]
    # the collectives get 6 - 3 s, the heartbeats are watched for 3 s: named within dist_timeout_s
    assert re.match(r"GroupTimeoutError: all_gather timed out after 3 s on rank 2 of 3: rank 1 did not answer "
                    r"\(no heartbeat for 3 s", msg), msg
    assert after < timeout_s + 2.0, (after, msg)  # plus polling and the exit
    assert procs[0].exitcode == 1
    record = json.loads(error_file.read_text())
    assert re.match(r"GroupTimeoutError: all_gather timed out after 3 s on rank 0 of 3: rank 1 did not answer",
                    record["message"]["message"]), record
