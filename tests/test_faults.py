"""Faults: a killed node ends its group fast and leaves nothing behind; a killed run resumes
to bitwise the same weights as an uninterrupted one; NaN losses are named; bad input is
refused."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from actors.errors import ConfigError
from actors.files import load_model_weights
from tests.helpers import small_config

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
T = "Through"
EPOCHS = 12  # long enough (~4 s) that a kill at epoch 2 or 3 lands mid-run
GRAPH = ["graph=dml", "graph.nodes.0.model=convnet", "graph.nodes.1.model=convnet", "logger=none",
         "train.batch_size=32", "optim.warmup_epochs=0"]


def children(pid):
    """Live descendants of ``pid`` (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def rank_pid(pid, rank):
    for c in children(pid):
        try:
            env = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return c
    return None


def start(run_dir, epochs, *extra):
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", *extra, "launch.py", *GRAPH,
           f"train.epochs={epochs}", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_epoch(run_dir, epoch, proc, timeout=120):
    """Until metrics.jsonl holds both nodes' rows of ``epoch``."""
    t0 = time.time()
    path = Path(run_dir) / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if path.exists() and sum(1 for _ in path.open()) >= 2 * epoch:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError(f"epoch {epoch} not reached")


def find_rank(proc, rank, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        pid = rank_pid(proc.pid, rank)
        if pid:
            return pid
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} process not found")


def kill_when(proc, run_dir, epoch, rank):
    """SIGKILL rank ``rank`` as soon as epoch ``epoch`` is recorded (the pid is found
    beforehand, so the kill lands mid-run, not after the run has finished)."""
    pid = find_rank(proc, rank)
    wait_for_epoch(run_dir, epoch, proc)
    os.kill(pid, signal.SIGKILL)
    return time.time()


def final_weights(run_dir):
    return [load_model_weights(Path(run_dir) / f"node{i}.pt")[0] for i in range(2)]


def assert_same(a, b):
    for wa, wb in zip(a, b):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    p = start(run_dir, EPOCHS)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    return final_weights(run_dir)


def test_killed_node_ends_the_group_fast_and_leaves_nothing(tmp_path):
    p = start(tmp_path, 200)
    find_rank(p, 1)
    group = children(p.pid)
    killed_at = kill_when(p, tmp_path, 1, 1)
    out, _ = p.communicate(timeout=120)
    elapsed = time.time() - killed_at
    assert p.returncode != 0
    assert elapsed < 60, f"group took {elapsed:.1f}s to exit"
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", out), out[-2000:]  # the failed node is named
    time.sleep(0.5)
    alive = [c for c in group if Path(f"/proc/{c}").exists() and "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]]
    assert not alive, f"left running: {alive}"


def test_torchrun_restart_resumes_to_the_same_weights(tmp_path, uninterrupted):
    p = start(tmp_path, EPOCHS, "--max-restarts=1")
    kill_when(p, tmp_path, 2, 1)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    assert "resuming from the group checkpoint of epoch" in out
    assert_same(final_weights(tmp_path), uninterrupted)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * EPOCHS  # each epoch recorded once per node, none twice


def test_rerun_after_a_killed_run_resumes_to_the_same_weights(tmp_path, uninterrupted):
    p = start(tmp_path, EPOCHS)
    kill_when(p, tmp_path, 3, 0)
    p.communicate(timeout=120)
    assert p.returncode != 0 and not (tmp_path / "summary.json").exists()
    again = start(tmp_path, EPOCHS)  # the same command, the same run dir: train.resume defaults to true
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert "resuming from the group checkpoint of epoch" in out
    assert_same(final_weights(tmp_path), uninterrupted)


def test_nan_loss_stops_the_group_naming_node_step_and_edge(tmp_path):
    from coordinator.local import run_local

    cfg = small_config(["convnet", "convnet"], [[T, T], [T, T]], optim__lr=1.0e6)
    with pytest.raises(RuntimeError, match=r"NonFiniteLossError: non-finite training loss on node \d at step \d+ "
                                           r"\(epoch 1\) in .*(label edge|edge \d -> \d)"):
        run_local(cfg, tmp_path, timeout_s=300)


def test_nan_steps_can_be_skipped_and_counted(tmp_path):
    from coordinator.local import run_local

    cfg = small_config(["convnet", "convnet"], [[T, T], [T, T]], optim__lr=1.0e6, train__nonfinite="skip")
    run_local(cfg, tmp_path, timeout_s=300)
    import json

    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]  # noqa: E741
    assert sum(r["skipped_steps"] for r in rows) > 0


def test_unwritable_run_dir_is_refused(tmp_path):
    from coordinator.rundir import RunDir

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"cannot write to the run directory .*a-file/run .*hydra.run.dir"):
        RunDir(blocker / "run").prepare()


def test_missing_teacher_checkpoint_names_the_fix(tmp_path):
    from actors.preflight import preflight

    cfg = small_config(["convnet", {"model": "resnet110", "checkpoint": str(tmp_path / "t.pt")}], [[T, T], ["Cutoff"] * 2])
    with pytest.raises(ConfigError, match=r"graph.nodes\[1\].checkpoint=.*t.pt: file not found. Pretrain it first .*graph=teacher"):
        preflight(cfg, 2)


def test_resume_refuses_a_run_dir_of_a_quick_look(tmp_path):
    """A quick look (train.max_steps_per_epoch) and the real run must not share a run dir:
    the real run would continue the quick look's few-step epochs."""
    from coordinator.rundir import changed_settings as _changed

    quick = small_config(["convnet"], [[T]], train={"epochs": 1, "max_steps_per_epoch": 3})
    real = small_config(["convnet"], [[T]], train={"epochs": 20})
    assert _changed(quick, real) == ["train.max_steps_per_epoch"]
    assert _changed(real, small_config(["convnet"], [[T]], train={"epochs": 30})) == []


def test_skipped_steps_count_in_no_metric(one_thread):
    """train.nonfinite=skip: a skipped step adds nothing to the loss, edge and gate-weight
    means (regression: gate weights were summed over skipped steps too, Through read 2.0)."""
    import os

    from actors.data import load_dataset
    from actors.exchange import Exchange, free_port, init_distributed, shutdown
    from actors.worker import NodeWorker

    cfg = small_config(["convnet"], [[T]], train={"epochs": 1, "batch_size": 32, "num_threads": 1,
                                                   "max_steps_per_epoch": 8, "nonfinite": "skip"})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env = init_distributed(0, 1, 0, "env://", "cpu", "gloo")
    try:
        worker = NodeWorker(cfg, env, Exchange(env), load_dataset("digits", val_fraction=0.15), None)
        real_loss, calls = worker.node.loss, []

        def every_other_nan(*args, **kwargs):
            result = real_loss(*args, **kwargs)
            calls.append(1)
            if len(calls) % 2 == 0:
                result.total, result.terms = result.total * float("nan"), result.terms * float("nan")
            return result

        worker.node.loss = every_other_nan
        [m] = [r.record() for r in worker.train_epoch(0)]
    finally:
        shutdown()
    assert m["skipped_steps"] == 4
    assert m["gate_0_to_0_Through"] == 1.0
    assert m["train_loss"] == m["train_loss"] and m["edge_0_to_0_Through"] == pytest.approx(m["train_loss"])  # not NaN
