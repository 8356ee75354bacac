"""The first GPU run, in one command: the NCCL path checked end to end, and a table.

    bash scripts/gpu_check.sh              # a machine with >= 1 GPU (all of them are used): a few minutes
    bash scripts/gpu_check.sh --dry-run    # the same checks on the CPU over gloo, at tiny sizes (no GPU needed)
    bash scripts/gpu_check.sh --only group,hang --out /tmp/check

Checks (each one a real run of the trainer's own commands; its output in <out>/<check>.log):

- group:   the default graph (ktg3) as an NCCL group of min(G, 3) ranks for 2 epochs, against
           the single-process reference (every node in one process) on the same GPU: each
           node's final test accuracy and last-epoch train loss within the stated tolerance
           (GPU runs are not bitwise: cuDNN autotuning, atomics); on the CPU dry run, equal.
           With one GPU (no NCCL group can form: one rank per GPU) the GPU run is compared
           with the same run on the CPU instead.
- packed:  2G ConvNet nodes packed two to a GPU on all G GPUs (graph=dml_many), 1 epoch.
- search:  a tiny warm ASHA search (Ray Tune, 2 trials at a time) with per-epoch checkpoints: 2-node trials on
           NCCL groups of Ray actors (one GPU each with G >= 2; else packed, half a GPU
           each); one node actor SIGKILLed mid-search and its trial retried from its
           checkpoint.
- hang:    a 2-rank NCCL group with rank 1 SIGSTOPped mid-training: rank 0 must name rank
           1 within dist_timeout_s (the collective monitor). Needs 2 GPUs.
- syncs:   training steps of a node with kl, relation (rkd) and mhgd edges under CUDA's sync
           debug mode set to raise: no host-device synchronisation in a step.
- bench:   scripts/bench.py --quick on the device (its tables, a few steps per case).
- compile: train.compile=true, bf16 and channels_last for one epoch (2 ranks where there
           are 2 GPUs): compiled before the first step, trains.

Exit code 0 when every check passed or was skipped, 1 otherwise; 2 when there is no GPU (without
--dry-run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ACC_TOL = 3.0
"""group: the largest difference in a node's final test accuracy (points) from the reference."""
LOSS_TOL = 0.10
"""group: the largest relative difference in a node's last-epoch train loss from the reference."""


@dataclass
class Result:
    name: str
    status: str  # pass, FAIL, skip
    figures: str
    seconds: float


@dataclass
class Machine:
    dry: bool
    gpus: int
    out: Path
    python: str

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def ranks(self, most: int) -> int:
        """Processes for a check that wants up to ``most``: one per GPU (NCCL), or ``most`` on
        the CPU (the dry run)."""
        return most if self.dry else min(self.gpus, most)

    def speed(self) -> list[str]:
        """Overrides that shrink a dry run to a few steps per epoch, on one thread per process
        (then P processes and the single-process reference make bitwise the same floats)."""
        return ["train.max_steps_per_epoch=4", "train.num_threads=1"] if self.dry else []


def torchrun(m: Machine, nproc: int, overrides: list[str], log: Path, timeout_s: float,
             env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    cmd = [m.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "launch.py",
           f"device={m.device}", "logger=none", "train.progress=off", *overrides]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                              env={**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})})


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    from actors.metrics import read_metrics_file

    summary = json.loads((run_dir / "summary.json").read_text())
    rows, _ = read_metrics_file(run_dir / "metrics.jsonl")
    return summary, rows


def last_losses(rows: list[dict]) -> dict[int, float]:
    last = max(r["epoch"] for r in rows)
    return {r["node"]: r["train_loss"] for r in rows if r["epoch"] == last and r.get("train_loss") is not None}


# --- the checks ---------------------------------------------------------------------------------


def check_group(m: Machine) -> tuple[bool, str]:
    p = m.ranks(3)
    log = m.out / "group.log"
    common = ["graph=ktg3", "train.epochs=2", "seed=0", *m.speed()]
    t0 = time.perf_counter()
    r = torchrun(m, p, [*common, f"hydra.run.dir={m.out / 'group'}"], log, 600)
    t_group = time.perf_counter() - t0
    if r.returncode:
        return False, f"the {p}-rank group failed (exit {r.returncode}); see {log}"
    on_cpu = p == 1 and not m.dry  # one GPU: the same single process, on the CPU
    t0 = time.perf_counter()
    r = torchrun(m, 1, [*common, f"hydra.run.dir={m.out / 'reference'}", *(["device=cpu"] if on_cpu else [])], log, 900)
    t_ref = time.perf_counter() - t0
    if r.returncode:
        return False, f"the single-process reference failed (exit {r.returncode}); see {log}"
    (sg, rows_g), (sr, rows_r) = read_run(m.out / "group"), read_run(m.out / "reference")
    acc_g = [n["final_test_acc"] for n in sg["nodes"]]
    acc_r = [n["final_test_acc"] for n in sr["nodes"]]
    loss_g, loss_r = last_losses(rows_g), last_losses(rows_r)
    d_acc = max(abs(a - b) for a, b in zip(acc_g, acc_r))
    d_loss = max(abs(loss_g[t] - loss_r[t]) / max(abs(loss_r[t]), 1e-12) for t in loss_r)
    ok = (d_acc == 0 and d_loss == 0) if m.dry else (d_acc <= ACC_TOL and d_loss <= LOSS_TOL)
    tol = "equal (CPU: bitwise)" if m.dry else f"tolerance {ACC_TOL:g} points, {100 * LOSS_TOL:g}% loss"
    what = "1 GPU process vs the same on the CPU (1 GPU: no NCCL group)" if on_cpu else f"{p} ranks vs 1 process"
    return ok, (f"{what}: test acc {'/'.join(f'{a:.2f}' for a in acc_g)} vs "
                f"{'/'.join(f'{a:.2f}' for a in acc_r)}; max |d acc| {d_acc:.2f}, max |d loss| {100 * d_loss:.2f}% ({tol}); "
                f"{sg['images_per_s']:.0f} vs {sr['images_per_s']:.0f} img/s; {t_group:.0f} s vs {t_ref:.0f} s")


def check_packed(m: Machine) -> tuple[bool, str]:
    p = m.ranks(m.gpus if not m.dry else 2)
    nodes = 2 * p
    log = m.out / "packed.log"
    r = torchrun(m, p, ["graph=dml_many", f"graph.nodes.count={nodes}", "train.epochs=1", *m.speed(),
                        f"hydra.run.dir={m.out / 'packed'}"], log, 600)
    if r.returncode:
        return False, f"failed (exit {r.returncode}); see {log}"
    summary, rows = read_run(m.out / "packed")
    accs = [n["final_test_acc"] for n in summary["nodes"]]
    finite = all(math.isfinite(v) for v in last_losses(rows).values())
    ok = finite and len(accs) == nodes and (m.dry or min(accs) > 20.0)
    return ok, (f"{nodes} nodes on {p} process(es): test acc {min(accs):.1f}-{max(accs):.1f}, "
                f"{summary['images_per_s']:.0f} img/s")


def check_search(m: Machine) -> tuple[bool, str]:
    """Runs ``search_child`` in a process of its own, its console in search.log."""
    log = m.out / "search.log"
    cmd = [m.python, __file__, "--child=search", f"--out={m.out}"] + (["--dry-run"] if m.dry else [])
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=600,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"})
    answer = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("GPU_CHECK ")]
    if r.returncode or not answer:
        return False, f"failed (exit {r.returncode}); see {log}"
    ok, figures = json.loads(answer[-1][len("GPU_CHECK "):])
    return ok, figures


def search_child(m: Machine) -> tuple[bool, str]:
    import logging

    import ray

    from coordinator.search import run_search
    from coordinator.search_space import SearchConfig

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = m.out / "search" / "exp-check-digits"
    packed = m.dry or m.gpus < 2
    # 2 at a time: Tune hands a trial's warm actors only to a trial waiting for them
    s = SearchConfig(name="check", num_nodes=2, target_model="convnet", zoo=["convnet", "resnet20"], num_samples=4,
                     max_concurrent=2, max_epochs=4, grace_period=1, reduction_factor=2, verbose=1, max_failures=1,
                     checkpoint_every=1,
                     teachers_dir=str(out.parent / "no-teachers"), frozen="exclude",
                     processes_per_trial=1 if packed else 0,
                     gpus_per_node=0 if m.dry else (0.5 if packed else 1),
                     num_cpus=max(8, os.cpu_count() or 1))
    base = {"dataset": {"name": "digits", "val_fraction": 0.15}, "device": m.device,
            "optim": {"lr": 0.05, "schedule": "cosine", "milestones": [], "warmup_epochs": 0},
            "train": {"batch_size": 64, "num_threads": 1, "max_steps_per_epoch": 8}, "logger": {"backend": "none"}, "seed": 0}
    killed: dict[str, float] = {}

    def killer() -> None:  # one node actor SIGKILLed once a trial has trained 2 epochs
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            for f in out.glob("trial_*/metrics.jsonl"):
                if sum(1 for _ in f.open()) >= 2 * 2:
                    pids = [p for p in _descendants(os.getpid()) if b"ray::NodeActor" in _cmdline(p)]  # ours only
                    if pids:
                        os.kill(pids[0], signal.SIGKILL)
                        killed["at"] = time.time()
                        return
            time.sleep(0.1)

    threading.Thread(target=killer, daemon=True).start()
    t0 = time.perf_counter()
    try:
        summary = run_search(s, base, out, seed=0)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t0
    restarted = []
    for f in out.glob("trial_*/result.json"):
        epochs = [json.loads(line)["epoch"] for line in f.read_text().splitlines()]
        if epochs != list(range(1, len(epochs) + 1)):
            restarted.append(f.parent.name)  # a retry that started over would report epoch 1 twice
    ok = bool(killed) and summary["failed"] == 0 and not restarted and summary["warm_starts"] >= 1
    return ok, (f"{summary['trials']} trials ({summary['completed']} completed, {summary['stopped_by_asha']} stopped by "
                f"ASHA, {summary['failed']} failed), {summary['warm_starts']} warm starts, one actor killed: "
                f"{'retried from its checkpoint' if killed and not restarted else 'NOT retried as it should be'}; "
                f"best val {summary['best_val_acc']:.2f}; {wall:.0f} s")


def _children(pid: int) -> list[int]:
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _worker_pid(agent: int, rank: int) -> Optional[int]:
    """The pid of torchrun agent ``agent``'s worker of rank ``rank`` (from /proc)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def check_hang(m: Machine) -> tuple[bool, str]:
    if not m.dry and m.gpus < 2:
        raise Skip("needs 2 GPUs (NCCL runs one rank per GPU)")
    timeout_s = 12.0 if m.dry else 20.0
    log = m.out / "hang.log"
    run = m.out / "hang"
    cmd = [m.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch.py", f"device={m.device}",
           "logger=none", "train.progress=off", "graph=dml", "train.epochs=100", f"dist_timeout_s={timeout_s:g}",
           f"hydra.run.dir={run}"]
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
    f = open(log, "a")
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"})
    stopped_pid, named_after = None, None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and agent.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        stopped_pid = _worker_pid(agent.pid, 1)
        if stopped_pid is None:
            return False, f"rank 1's process was not found (run ended: {agent.poll()}); see {log}"
        os.kill(stopped_pid, signal.SIGSTOP)
        t0 = time.monotonic()
        pattern = re.compile(r"rank 0 of 2: rank 1 did not answer")
        while time.monotonic() - t0 < timeout_s + 60:
            if pattern.search(log.read_text(errors="replace")):
                named_after = time.monotonic() - t0
                break
            time.sleep(0.2)
    finally:
        if stopped_pid is not None:
            os.kill(stopped_pid, signal.SIGKILL)
        try:
            agent.wait(timeout=90)
        except subprocess.TimeoutExpired:
            agent.kill()
        f.close()
    if named_after is None:
        return False, f"rank 0 never named rank 1; see {log}"
    line = next(x for x in log.read_text(errors="replace").splitlines() if "rank 1 did not answer" in x)
    ok = named_after <= timeout_s + 5.0
    return ok, f"named {named_after:.1f} s after the SIGSTOP (dist_timeout_s={timeout_s:g}): {line.strip()[:160]}"


def check_syncs(m: Machine) -> tuple[bool, str]:
    """Steps of a 3-node graph in one process (the single-process reference's worker) whose
    learner has ce, kl + rkd_distance + rkd_angle and mhgd edges (clipped), under CUDA's sync
    debug mode set to raise."""
    import tempfile

    import torch

    from actors.config import RunConfig
    from actors.data import load_dataset
    from actors.mhgd import AttentionModule, save_attention
    from actors.models import build_model
    from coordinator.sequential import ReferenceTrainer

    tmp = Path(tempfile.mkdtemp(prefix="sync-", dir=m.out))
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet20", 10, 1).state_dict(), "meta": {"model": "resnet20"}}, tmp / "teacher.pt")
    save_attention(tmp / "attention.pt", AttentionModule([16, 32, 64]), {"model": "resnet20"})
    T, C = "Through", "Cutoff"
    graph = {"name": "syncs", "nodes": [{"model": "resnet20"}, {"model": "resnet20"},
                                        {"model": "resnet20", "checkpoint": str(tmp / "teacher.pt"),
                                         "attention": str(tmp / "attention.pt")}],
             "gates": [[T, T, T], [T, T, C], [C, C, C]],
             "kinds": [["ce", "kl+rkd_distance+rkd_angle", "mhgd"], ["kl", "ce", "kl"], ["kl", "kl", "ce"]]}
    cfg = RunConfig.from_dict({"graph": graph, "dataset": {"name": "digits", "val_fraction": 0.15},
                               "train": {"epochs": 1, "batch_size": 64, "num_threads": 1}, "logger": {"backend": "none"},
                               "device": m.device})
    dev = torch.device("cuda", 0) if not m.dry else torch.device("cpu")
    group = ReferenceTrainer(cfg, load_dataset("digits", val_fraction=0.15), dev)
    batches = group.batches()
    for _ in range(2):  # warm up: lazy initialisation, cuDNN's autotuning, the epoch plan's copy
        group.step(*next(batches))
    steps = [next(batches) for _ in range(3)]
    if m.dry:
        for b in steps:
            group.step(*b)
        return True, "3 steps with ce, kl+rkd, mhgd (clipped) edges ran; syncs are only detectable on CUDA"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in steps:
            group.step(*b)
    except RuntimeError as e:
        return False, f"a step synchronised with the host: {str(e).strip().splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return True, "3 steps of a learner with ce, kl + rkd_distance + rkd_angle and clipped mhgd edges: no host sync"


def check_bench(m: Machine) -> tuple[bool, str]:
    log = m.out / "bench.log"
    raw = m.out / "bench.json"
    cmd = [m.python, "scripts/bench.py", "--quick", f"--device={m.device}", f"--json={raw}"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    if r.returncode:
        return False, f"failed (exit {r.returncode}); see {log}"
    data = json.loads(raw.read_text())
    one = next(c for c in data["groups"]["1"][0] if c["kind"] == "train" and c["batch_size"] == 64)
    text = f"1 ResNet32 node, batch 64: step {1000 * one['step']:.1f} ms (forward {1000 * one['forward']:.1f}, backward " \
           f"{1000 * one['backward']:.1f})"
    if data.get("sequential"):
        text += f"; single-process reference {1000 * data['sequential']['resnet32x1']:.1f} ms"
    return True, text + f"; {time.perf_counter() - t0:.0f} s (quick: a few steps per case)"


def check_compile(m: Machine) -> tuple[bool, str]:
    p = m.ranks(2)
    log = m.out / "compile.log"
    models = ["graph.nodes.0.model=convnet", "graph.nodes.1.model=convnet"] if m.dry else []
    t0 = time.perf_counter()
    r = torchrun(m, p, ["graph=dml", *models, "train.epochs=1", "train.compile=true", "train.precision=bf16",
                        "train.channels_last=true", *m.speed(), f"hydra.run.dir={m.out / 'compile'}"], log, 600)
    wall = time.perf_counter() - t0
    if r.returncode:
        return False, f"failed (exit {r.returncode}); see {log}"
    summary, rows = read_run(m.out / "compile")
    said = re.search(r"train.compile: compiled node\(s\) \[[^\]]*\] in ([0-9.]+) s", log.read_text(errors="replace"))
    finite = all(math.isfinite(v) for v in last_losses(rows).values())
    accs = [n["final_test_acc"] for n in summary["nodes"]]
    ok = finite and said is not None and (m.dry or min(accs) > 20.0)
    return ok, (f"{p} rank(s), bf16 + channels_last: compiled in {said.group(1) if said else '?'} s before the first step; "
                f"test acc {'/'.join(f'{a:.1f}' for a in accs)}; {wall:.0f} s in all")


class Skip(Exception):
    """The check cannot run on this machine (e.g. it needs more GPUs)."""


CHECKS: dict[str, Callable[[Machine], tuple[bool, str]]] = {
    "group": check_group, "packed": check_packed, "search": check_search, "hang": check_hang,
    "syncs": check_syncs, "bench": check_bench, "compile": check_compile,
}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="run the checks on the CPU over gloo, at tiny sizes (no GPU needed)")
    ap.add_argument("--out", default=None, help="folder for the runs and logs (default: runs/gpu_check-<time>)")
    ap.add_argument("--only", default=None, help=f"comma-separated checks to run, of: {', '.join(CHECKS)}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a check run in a process of its own
    args = ap.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not args.dry_run:
        print("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is false), and this script checks the GPU "
              "path; run it on a machine with a GPU, or with --dry-run to run the same checks on the CPU over gloo",
              file=sys.stderr)
        return 2
    only = args.only.split(",") if args.only else list(CHECKS)
    unknown = [c for c in only if c not in CHECKS]
    if unknown:
        ap.error(f"--only: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    out = Path(args.out or ROOT / "runs" / time.strftime("gpu_check-%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    m = Machine(dry=args.dry_run, gpus=gpus, out=out, python=sys.executable)
    if args.child == "search":
        print("GPU_CHECK " + json.dumps(search_child(m)), flush=True)
        return 0
    where = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus and not m.dry else "CPU (gloo), dry run"
    print(f"gpu_check: {where}; torch {torch.__version__}"
          + (f", CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if gpus and not m.dry else "")
          + f"; runs and logs in {out}", flush=True)
    results = []
    for name in only:
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            ok, figures = CHECKS[name](m)
            status = "pass" if ok else "FAIL"
        except Skip as e:
            status, figures = "skip", str(e)
        except Exception as e:  # noqa: BLE001 - a check that breaks is a failed check, the others still run
            status, figures = "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        results.append(Result(name, status, figures, time.perf_counter() - t0))
        print(f"[gpu_check] {name}: {status} ({results[-1].seconds:.0f} s) {figures}", flush=True)
    print("\n| check | result | figures | s |\n|---|---|---|---|")
    for r in results:
        print(f"| {r.name} | {r.status} | {r.figures} | {r.seconds:.0f} |")
    (out / "gpu_check.json").write_text(json.dumps([r.__dict__ for r in results], indent=1) + "\n")
    return 0 if all(r.status != "FAIL" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
