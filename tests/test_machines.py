"""Several machines without a shared disk, played on one machine: two torchrun agents
(``--nnodes=2``, c10d rendezvous), each with its own run directory. A run killed mid-way
(one agent killed) and re-run resumes from the newest epoch every node saved, even when
each machine now hosts the node whose files the other machine holds, and ends bitwise
where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from actors.exchange import free_port

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
GRAPH = ["graph=dml", "graph.nodes.0.model=convnet", "graph.nodes.1.model=convnet", "train.max_steps_per_epoch=10",
         "train.batch_size=32", "train.num_threads=1", "logger=none", "train.progress=off", "dist_timeout_s=20"]
EPOCHS = 10


def agents(dirs, rdzv_id, epochs=EPOCHS):
    port = free_port()
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                              f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}", "launch.py", *GRAPH,
                              f"train.epochs={epochs}", f"hydra.run.dir={d}"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True) for d in dirs]


def static_agents(dirs, epochs=EPOCHS):
    """The same command under static rendezvous: dirs[r] is the machine of node rank r."""
    port = free_port()
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node-rank={r}", "--master-addr=127.0.0.1",
                              f"--master-port={port}", "launch.py", *GRAPH, f"train.epochs={epochs}", f"hydra.run.dir={d}"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True) for r, d in enumerate(dirs)]


def finish(procs, timeout=240):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def final_weights(dirs):
    """node<i>.pt from whichever machine wrote it."""
    found = {}
    for d in dirs:
        for f in Path(d).glob("node*.pt"):
            found[int(f.stem[4:])] = torch.load(f, weights_only=True)["model"]
    assert sorted(found) == [0, 1], found.keys()
    return [found[i] for i in range(2)]


def test_two_machines_without_a_shared_disk_resume_bitwise(tmp_path):
    straight = [tmp_path / "a0", tmp_path / "a1"]
    codes, outs = finish(agents(straight, "straight"))
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    # each machine keeps only its own node's files; rank 0's machine the record
    assert sum((d / "metrics.jsonl").exists() for d in straight) == 1
    assert all(len(list(d.glob("checkpoints/epoch_*/node*.pt"))) == 2 for d in straight)  # kept: the newest 2

    run = [tmp_path / "b0", tmp_path / "b1"]
    procs = agents(run, "killed")
    t0 = time.time()
    while not any(json.loads(m.read_text())["epoch"] >= 2 for d in run for m in d.glob("checkpoints/latest.json")):
        assert time.time() - t0 < 180 and all(p.poll() is None for p in procs), "epoch 2 never completed"
        time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)  # one machine goes down
    codes, _ = finish(procs)
    assert codes[1] != 0 and codes[0] != 0
    assert not any((d / "summary.json").exists() for d in run)

    # both machines run again, each now drawing the other's node: every node's files must
    # travel to the process that hosts it
    holds_node1 = next(d for d in run if list(d.glob("checkpoints/epoch_*/node1.pt")))
    codes, outs = finish(static_agents([holds_node1, *[d for d in run if d != holds_node1]]))
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "resuming from the group checkpoint of epoch" in outs[0] + outs[1]
    assert len(list(holds_node1.glob("checkpoints/epoch_*/node0.pt"))) == 2  # from now on each keeps its new node
    for a, b in zip(final_weights(straight), final_weights(run)):
        assert all(torch.equal(a[k], b[k]) for k in a)
