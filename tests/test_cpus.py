"""train.pin_cpus: which cores each local node process gets (actors.cpus), when start-up pins
(actors.start.set_up_cpu), and that a started process is pinned, every thread of it."""
from __future__ import annotations

import os
import threading

import pytest

from actors.cpus import cpu_slice, pin_cpus, torchrun_local_world_size  # no torch: the spawned children start at once


@pytest.mark.parametrize("cores, processes", [
    ([0, 1], 2), (list(range(16)), 2), (list(range(16)), 3), (list(range(7)), 7), ([2, 3, 6, 7, 10], 2),
])
def test_each_local_process_gets_a_disjoint_slice_and_together_they_use_every_core(cores, processes):
    slices = [cpu_slice(cores, r, processes) for r in range(processes)]
    assert [c for s in slices for c in s] == cores  # in order, disjoint, every core
    sizes = [len(s) for s in slices]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, sizes


def test_slices_of_two_processes_on_two_cores_are_one_core_each():
    assert [cpu_slice([0, 1], r, 2) for r in (0, 1)] == [[0], [1]]
    assert [cpu_slice(range(8), r, 3) for r in (0, 1, 2)] == [[0, 1], [2, 3, 4], [5, 6, 7]]


@pytest.mark.parametrize("cores, rank, processes", [
    ([0, 1], 0, 3), ([0, 1], 2, 3),   # fewer cores than processes: a shared core would slow the group
    (list(range(4)), 0, 1),           # a process alone has every core already
    ([0, 1], 2, 2), ([0, 1], -1, 2),  # not a local rank of the group
])
def test_no_slice_where_pinning_does_not_help(cores, rank, processes):
    assert cpu_slice(cores, rank, processes) is None


def test_the_local_world_size_is_torchruns(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert torchrun_local_world_size() is None  # not under torchrun (e.g. a variable a Ray actor inherited)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert torchrun_local_world_size() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    assert torchrun_local_world_size() is None


@pytest.mark.parametrize("pin, device, cuda, local_world_size, pinned", [
    (True, "cpu", False, 2, True), (True, "auto", False, 2, True),
    (False, "cpu", False, 2, False),                                   # train.pin_cpus=false
    (True, "cuda", True, 2, False), (True, "auto", True, 2, False),     # GPU runs: torchrun --numa-binding
    (True, "cuda:1", True, 2, False),                                  # a Ray actor's GPU
    (True, "cpu", False, None, False),                                 # how many processes share the machine is unknown
])
def test_start_up_pins_cpu_runs_only(monkeypatch, pin, device, cuda, local_world_size, pinned):
    import torch

    import actors.start as start
    from tests.helpers import small_config

    calls = []
    monkeypatch.setattr(start, "pin_cpus", lambda rank, world: calls.append((rank, world)) or [rank])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    threads = torch.get_num_threads()
    try:
        cfg = small_config(["convnet"], [["Through"]], train={"epochs": 1, "batch_size": 32, "num_threads": 1, "pin_cpus": pin})
        got = start.set_up_cpu(cfg, 0, device, 1, local_world_size)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert calls == ([(1, local_world_size)] if pinned else [])
    assert got == ([1] if pinned else None)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_pin_cpus_must_be_a_boolean(value):
    from actors.errors import ConfigError
    from tests.helpers import small_config

    with pytest.raises(ConfigError, match=rf"^train.pin_cpus must be true or false; got {value!r}$"):
        small_config(["convnet"], [["Through"]], train={"pin_cpus": value})


def _pinned_child(rank: int, world: int, cores: list[int], results) -> None:
    """Starts a thread, pins itself as torchrun's local rank ``rank`` of ``world``, and
    reports the affinity of both threads."""
    os.environ.update(TORCHELASTIC_RUN_ID="test", LOCAL_WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    started, stop = threading.Event(), threading.Event()
    ids = []

    def earlier():
        ids.append(threading.get_native_id())
        started.set()
        stop.wait()

    t = threading.Thread(target=earlier, daemon=True)
    t.start()
    started.wait()
    got = pin_cpus(rank, torchrun_local_world_size(), cores)
    results.put((rank, got, sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(ids[0]))))
    stop.set()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs sched_setaffinity and 2 cores")
def test_started_processes_are_pinned_with_every_thread():
    import multiprocessing as mp

    cores = sorted(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_pinned_child, args=(r, 2, cores, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict((r, rest) for r, *rest in (results.get(timeout=60) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=10)
    for r in range(2):
        want = cpu_slice(cores, r, 2)
        assert got[r] == [want, want, want], got[r]  # what it returned, its main thread, the thread started before
    assert not set(got[0][0]) & set(got[1][0])


@pytest.mark.process
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs two cores to pin two processes")
def test_run_local_pins_its_node_processes_as_torchrun_does(tmp_path, capfd):
    """``coordinator.local.run_local`` starts every process on this machine: they are pinned like
    torchrun's (rank 0 says where), and the run is the same either way."""
    from coordinator.local import run_local
    from tests.helpers import small_config

    cfg = small_config(["convnet", "convnet"], [["Through"] * 2] * 2,
                       train={"epochs": 1, "batch_size": 32, "num_threads": 1, "max_steps_per_epoch": 2})
    pinned = run_local(cfg, tmp_path / "pinned", timeout_s=300)
    err = capfd.readouterr().err
    assert "cpus: each of the 2 node processes on this machine runs on its own cores (rank 0 on [" in err, err[-2000:]
    cfg.train.pin_cpus = False
    free = run_local(cfg, tmp_path / "free", timeout_s=300)
    assert "runs on its own cores" not in capfd.readouterr().err
    assert pinned["target_test_acc"] == free["target_test_acc"]
