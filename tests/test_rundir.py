"""A run directory never holds a silent mix: extending a run, stale checkpoints, orphaned
workers, two writers, damaged files, safe loading, permissions, one wandb run.

Each test here failed before ``coordinator.rundir`` owned the directory."""
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from actors.errors import ConfigError
from actors.files import load_model_weights
from coordinator.local import run_local
from tests.helpers import small_config

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
T = "Through"
PAIR = (["convnet", "convnet"], [[T, T], [T, T]])


def pair(epochs, steps=4, keep=2, **kw):
    """Two convnets, a few steps an epoch: a run of a few seconds."""
    train = {"epochs": epochs, "batch_size": 32, "num_threads": 1, "max_steps_per_epoch": steps,
             "keep_checkpoints": keep, "progress": "off", **kw.pop("train", {})}
    return small_config(*PAIR, train=train, **kw)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, n=2):
    return [load_model_weights(Path(run_dir) / f"node{i}.pt")[0] for i in range(n)]


def assert_same(a, b):
    for wa, wb in zip(a, b):
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def alive(pid):
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def kill_all(pids):
    """SIGKILL whatever of ``pids`` is left (a test never leaves a run behind)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_for(cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return time.time() - t0
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout}s")


# --- 1. extending a run -----------------------------------------------------------------------------

def test_an_extended_run_trains_its_new_epochs_on_the_new_schedule(tmp_path):
    """Regression: the restored scheduler kept the old total, so epochs 4-5 ran at lr 0.
    The same two runs check that files get the user's permissions (they were 0600) and
    that the resumed run logs into the same wandb run (it started a second one)."""
    wb = {"backend": "wandb", "mode": "offline", "project": "ktg-test"}
    old_umask = os.umask(0o022)
    try:
        run_local(pair(3, logger=wb), tmp_path, timeout_s=300)
        before = weights(tmp_path)
        run_local(pair(5, logger=wb), tmp_path, timeout_s=300)
    finally:
        os.umask(old_umask)
    rows = metrics(tmp_path)
    assert [(r["epoch"], r["node"]) for r in rows] == [(e, n) for e in range(1, 6) for n in range(2)]
    total = 5 * 4
    for r in rows[6:]:  # the added epochs: cosine on the new total (20 steps), from the resumed step on
        k = r["epoch"] * 4
        assert r["lr"] == pytest.approx(0.05 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * k / total)).item()), rel=1e-6)
    assert rows[6]["lr"] > 0.004 and rows[7]["lr"] > 0.004  # epoch 4: 0.05 * 0.095
    after = weights(tmp_path)
    assert not all(torch.equal(after[0][k], before[0][k]) for k in before[0])  # the new epochs trained

    for name in ("node0.pt", "summary.json", "metrics.jsonl", "run_config.json", "run_state.json",
                 "checkpoints/latest.json", "checkpoints/epoch_0005/node1.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, [r.name for r in runs]  # one wandb run id


@pytest.mark.parametrize("schedule", ["cosine", "constant", "multistep"])
def test_a_restored_node_follows_the_schedule_of_its_own_total(schedule):
    """A node state saved after 3 of 3 epochs, loaded by a node of a 5-epoch run: the next
    step's lr is the 5-epoch schedule's (constant and multistep: what a 5-epoch run has at
    that step, so extending them is bitwise the longer run)."""
    from actors.node import GraphNode

    optim = {"lr": 0.05, "schedule": schedule, "milestones": [2], "warmup_epochs": 0}
    short, long = (small_config(["convnet"], [[T]], optim=optim, train={"epochs": e}) for e in (3, 5))
    build = lambda c: GraphNode(0, c.graph, num_classes=10, in_channels=1, optim=c.optim, epochs=c.train.epochs, steps_per_epoch=4)  # noqa: E731
    a, fresh = build(short), build(long)
    for _ in range(12):
        a.skip_update()
        fresh.skip_update()
    b = build(long)
    b.load_state_dict(a.state_dict())
    assert b.lr == pytest.approx(0.05 * b.lr_schedule(12)) and b.lr == fresh.lr
    if schedule == "cosine":
        assert a.lr == 0.0 and b.lr > 0.01  # the old total's end, the new total's middle


# --- 2. stale checkpoints ------------------------------------------------------------------------------

def test_a_fresh_run_sets_the_old_runs_outputs_aside(tmp_path, capfd):
    """Regression: train.resume=false left the old checkpoints/latest.json; a next run
    killed before its first checkpoint then resumed the *previous* run's weights."""
    run_local(pair(2), tmp_path, timeout_s=300)  # run A: seed 0, 2 epochs, checkpoints at 1, 2
    old = weights(tmp_path)
    nan = {"lr": float("inf"), "schedule": "cosine", "milestones": [], "warmup_epochs": 0}
    with pytest.raises(RuntimeError, match="non-finite"):  # run B: starts over, dies in epoch 1
        run_local(pair(3, seed=1, optim=nan, train={"resume": False}), tmp_path, timeout_s=300)
    assert "moved them to" in capfd.readouterr().err
    aside = list((tmp_path / "replaced").iterdir())
    assert len(aside) == 1 and json.loads((aside[0] / "run_config.json").read_text())["seed"] == 0
    assert_same([load_model_weights(aside[0] / f"node{i}.pt")[0] for i in range(2)], old)  # nothing lost
    assert not (tmp_path / "checkpoints").exists()
    # run C, B's config (skipping the NaN steps), resume on: nothing of A may be resumed
    run_local(pair(3, seed=1, optim=nan, train={"nonfinite": "skip"}), tmp_path, timeout_s=300)
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 1, 2, 2, 3, 3]  # every epoch trained by C


def start_alone(cfg, run_dir):
    """``agree_start`` as a group of one (no processes): the directory checks in-process."""
    from coordinator.resume import agree_start
    from coordinator.rundir import RunDir

    return agree_start(RunDir(run_dir), cfg, 0, [[0]], cfg.to_dict(), lambda x: [x], lambda x: x)


def fake_checkpoints(run_dir, cfg, epoch=1):
    """A run directory as a run of ``cfg`` leaves it after ``epoch`` epochs (no training)."""
    from coordinator.rundir import RunDir

    rd = RunDir(run_dir)
    rd.prepare()
    rd.write_config(cfg.to_dict())
    state = {"model": {}, "step": 4 * epoch, "epoch": epoch, "meta": {"model": "convnet", "node": 0}}
    rd.node_files(0).save_epoch(epoch, state)
    rd.mark_complete(epoch, 1)
    return rd


def test_checkpoints_without_a_readable_config_are_not_resumed(tmp_path):
    """Regression: a missing or unreadable run_config.json skipped every compatibility check."""
    one = small_config(["convnet"], [[T]], train={"epochs": 2})
    rd = fake_checkpoints(tmp_path, one)
    assert start_alone(one, tmp_path).epoch == 1  # readable and the same: resumed
    config = tmp_path / "run_config.json"
    text = config.read_text()
    for damage in ("missing", "garbage"):
        if damage == "missing":
            config.unlink()
        else:
            config.write_text(text[: len(text) // 2])
        with pytest.raises(ConfigError, match=r"run_config.json is (missing|unreadable).*cannot be checked.*train.resume=false"):
            start_alone(small_config(["convnet"], [[T]], train={"epochs": 2}, seed=5), tmp_path)
    assert rd.scan()["marker"] == 1  # a refusal moves nothing


def test_a_crash_during_the_first_group_checkpoint_starts_fresh(tmp_path):
    """No marker was ever written and no epoch is intact: nothing to resume, so a restart
    starts over (the partial files set aside) instead of failing every time."""
    one = small_config(["convnet"], [[T]], train={"epochs": 2})
    rd = fake_checkpoints(tmp_path, one)
    (tmp_path / "checkpoints" / "latest.json").unlink()
    rd.checkpoint_path(1, 0).write_bytes(b"cut short")
    assert start_alone(one, tmp_path).epoch == 0
    assert not (tmp_path / "checkpoints").exists() and list((tmp_path / "replaced").glob("*/checkpoints/epoch_0001"))


def test_a_resume_sets_aside_what_it_will_write_anew(tmp_path):
    """An extended run: the earlier end's summary and final node files, and epoch folders
    past the resumed epoch, are moved aside (they would sit next to a run that has not
    reached them)."""
    one = small_config(["convnet"], [[T]], train={"epochs": 1})
    rd = fake_checkpoints(tmp_path, one)
    rd.write_summary({"epochs": 1})
    rd.node_files(0).save_final({"model": {}})
    rd.node_files(0).save_epoch(2, {"model": {}})  # saved, never marked
    assert start_alone(small_config(["convnet"], [[T]], train={"epochs": 3}), tmp_path).epoch == 1
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "node0.pt").exists()
    assert not rd.epoch_dir(2).exists() and rd.epoch_dir(1).exists()
    aside = next((tmp_path / "replaced").iterdir())
    assert {"summary.json", "node0.pt", "checkpoints"} <= {p.name for p in aside.iterdir()}


def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path):
    one = small_config(["convnet"], [[T]], train={"epochs": 2})
    fake_checkpoints(tmp_path, one)
    for other, named in ((dict(seed=5), "seed"), (dict(optim={"lr": 0.1}), "optim"),
                         (dict(train={"epochs": 2, "max_steps_per_epoch": 3}), "train.max_steps_per_epoch")):
        with pytest.raises(ConfigError, match=rf"holds a checkpoint of a run with other {named}; .*new hydra.run.dir"):
            start_alone(small_config(["convnet"], [[T]], **{"train": {"epochs": 2}, **other}), tmp_path)
    with pytest.raises(ConfigError, match=r"holds node 0 as a convnet, but the graph says resnet20"):
        start_alone(small_config(["resnet20"], [[T]], train={"epochs": 2}), tmp_path)
    fake_checkpoints(tmp_path / "at3", one, epoch=3)
    with pytest.raises(ConfigError, match=r"holds a run at epoch 3 but train.epochs=2: a run cannot be shortened"):
        start_alone(one, tmp_path / "at3")
    assert start_alone(small_config(["convnet"], [[T]], train={"epochs": 7}), tmp_path).epoch == 1  # extending is fine


# --- 3. workers do not outlive their launcher -------------------------------------------------------------

def test_workers_end_when_torchrun_is_killed(tmp_path):
    p = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "launch.py", "graph=dml",
                          "graph.nodes.0.model=convnet", "graph.nodes.1.model=convnet", "logger=none",
                          "train.epochs=500", "train.batch_size=32", f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        wait_for(lambda: (tmp_path / "metrics.jsonl").exists(), 120, "epoch 1")
        workers = [c for c in descendants(p.pid) if b"launch.py" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2
        p.kill()  # SIGKILL the agent: it cannot stop its workers
        took = wait_for(lambda: not any(alive(w) for w in workers), 15, "the workers' exit")
        assert took < 5
    finally:
        kill_all([p.pid, *workers, *descendants(p.pid)])


def long_local_run(run_dir):
    """A Python process running a long ``run_local`` into ``run_dir`` (killed by the test)."""
    script = ("import sys; sys.path.insert(0, '.'); from tests.test_rundir import pair; "
              f"from coordinator.local import run_local; run_local(pair(500, steps=0), {str(run_dir)!r})")
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_workers_end_when_the_run_local_caller_is_killed(tmp_path):
    p = long_local_run(tmp_path)
    kids = []
    try:
        wait_for(lambda: (tmp_path / "metrics.jsonl").exists(), 120, "epoch 1")
        kids = [c for c in descendants(p.pid) if b"multiprocessing" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert kids
        p.kill()
        took = wait_for(lambda: not any(alive(k) for k in kids), 15, "the nodes' exit")
        assert took < 5
    finally:
        kill_all([p.pid, *kids, *descendants(p.pid)])


# --- 4. one run per directory -------------------------------------------------------------------------------

def test_a_second_run_into_a_used_directory_is_refused_at_once(tmp_path):
    first = long_local_run(tmp_path)
    try:
        wait_for(lambda: (tmp_path / "metrics.jsonl").exists(), 120, "epoch 1")
        t0 = time.time()
        with pytest.raises(ConfigError, match=rf"the run directory {tmp_path} is in use by another run \(pid \d+"):
            run_local(pair(2, seed=3), tmp_path, timeout_s=120)
        assert time.time() - t0 < 30  # refused by rank 0 before any training (spawn + import time only)
        kids = descendants(first.pid)
        first.kill()  # a killed run's lock goes with it
        wait_for(lambda: not any(alive(k) for k in kids), 15, "the first run's exit")
    finally:
        kill_all([first.pid, *descendants(first.pid)])
    done = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["epoch"]
    run_local(pair(done + 1, steps=0), tmp_path, timeout_s=300)  # the same run resumes and ends
    epochs = [r["epoch"] for r in metrics(tmp_path)]
    assert epochs == sorted(epochs) and len(epochs) == len(set(zip(epochs, [r["node"] for r in metrics(tmp_path)])))


# --- 5. damaged run directories -------------------------------------------------------------------------------

EPOCHS = 5


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 5-epoch run that kept every epoch's checkpoint, and its final weights."""
    run_dir = tmp_path_factory.mktemp("finished")
    run_local(pair(EPOCHS, keep=EPOCHS), run_dir, timeout_s=300)
    return run_dir, weights(run_dir)


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_marker_that_does_not_parse_is_not_trusted(tmp_path, finished, capfd):
    src, final = finished
    run_dir = copy_run(src, tmp_path / "run")
    (run_dir / "checkpoints" / "latest.json").write_text('{"epo')
    run_local(pair(EPOCHS, keep=EPOCHS), run_dir, timeout_s=300)
    assert "latest.json does not parse" in capfd.readouterr().err
    assert_same(weights(run_dir), final)
    assert [(r["epoch"], r["node"]) for r in metrics(run_dir)] == [(e, n) for e in range(1, EPOCHS + 1) for n in range(2)]


def test_damaged_checkpoints_fall_back_to_the_newest_epoch_every_node_has_intact(tmp_path, finished, capfd):
    """One damage per epoch, newest first: a missing file, another node's file, a planted
    pickle that would run code, a half-written file; epoch 1 is intact. Plus a cut last
    line in metrics.jsonl. The run resumes from epoch 1 and ends bitwise where the
    undamaged run ended, with each epoch's rows once."""
    src, final = finished
    run_dir = copy_run(src, tmp_path / "run")
    ck = run_dir / "checkpoints"
    (ck / "latest.json").write_text(json.dumps({"epoch": EPOCHS - 1, "nodes": 2}) + "\n")  # a crash in the last epoch
    rows = (src / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(rows[: 2 * (EPOCHS - 1) + 1]) + "\n" + rows[-1][:25])
    (ck / "epoch_0004" / "node1.pt").unlink()
    (ck / "epoch_0003" / "node1.pt").write_bytes((ck / "epoch_0003" / "node0.pt").read_bytes())
    proof = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    with open(ck / "epoch_0002" / "node0.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    half = ck / "epoch_0002" / "node1.pt"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    run_local(pair(EPOCHS, keep=EPOCHS), run_dir, timeout_s=300)
    err = capfd.readouterr().err
    for why in ("epoch_0004/node1.pt is missing", "epoch_0003/node1.pt holds node 0", "epoch_0002/node0.pt does not load",
                "epoch_0002/node1.pt does not load", "resuming from epoch 1, the newest epoch every node has intact",
                "metrics.jsonl: dropped line"):
        assert why in err, why
    assert not proof.exists()  # weights_only: the planted pickle never ran
    assert list((run_dir / "replaced").glob("*/checkpoints/epoch_0005"))  # past the marker: set aside, not reused
    assert_same(weights(run_dir), final)
    assert [(r["epoch"], r["node"]) for r in metrics(run_dir)] == [(e, n) for e in range(1, EPOCHS + 1) for n in range(2)]


def test_no_intact_epoch_stops_with_the_file_named_and_rewrites_nothing(tmp_path, finished):
    src, _ = finished
    run_dir = copy_run(src, tmp_path / "run")
    for e in range(1, EPOCHS + 1):
        (run_dir / "checkpoints" / f"epoch_{e:04d}" / "node1.pt").write_bytes(b"not a checkpoint")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigError, match=rf"no epoch in .*checkpoints is intact on every node \(.*epoch_000{EPOCHS}/node1.pt "
                                          r"does not load .*train.resume=false"):
        run_local(pair(EPOCHS, keep=EPOCHS), run_dir, timeout_s=300)
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # node0.pt, summary.json, metrics: untouched by a refused resume
