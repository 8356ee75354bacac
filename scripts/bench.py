"""Benchmark: where a node's step time goes, and what one process per node buys.

    .venv/bin/python scripts/bench.py                 # ~3.5 min on 2 CPU cores; prints the tables
    .venv/bin/python scripts/bench.py --json out.json # also the raw numbers
    .venv/bin/python scripts/bench.py --device cuda   # NCCL, one GPU per node process (groups of up to min(G, 3))

Everything is measured in this one run, on digits (8x8, 10 classes), with the real
trainer: M spawned processes forming a gloo (or NCCL) group, each running the real
``NodeWorker.train_epoch`` with an ``actors.timing.StepTimer`` attached, and every CPU
process limited to **one thread** (so that M processes use M cores and the single-process
reference uses one: the comparison the reference implementations invite). Tables:

1. the parts of a node's step (batch, forward, wait, exchange, loss, backward, optimiser)
   for 1, 2 and 3 ResNet32 nodes at batch 64;
2. throughput of the M-process group vs the single-process reference that trains the
   same M models one after the other on the same batches (``coordinator.sequential``);
3. the exchange's share of the step as M and the batch size grow, and the all-gather
   alone for CIFAR-100/Tiny-ImageNet-sized payloads;
4. a heterogeneous graph (ResNet32 + ResNet110): how long the fast node waits;
5. the 2-node group vs the single process again, ``--repeats`` times interleaved (median):
   step times on a shared VM move by 10-20% from minute to minute.
6. several nodes per process: ResNet32 + ResNet32 + ResNet110 on P = 3, 2 (balanced), 1;
7. M = 2..32 ConvNet nodes packed on 2 processes: how the step and the exchange grow;
8. the 2-node group against one process using every core (the best single-process run).

``--kinds`` runs only another table instead: the bytes each process sends and the shares of
the exchange and of the loss in the step for kl-only graphs vs kl + relation graphs
(``graph.kinds=kl+rkd_distance+rkd_angle``: the senders' B x D embeddings cross too, and the
receiver builds the B x B and B x B x B relation matrices), 2 and 3 ResNet32 nodes, batch 64
and 256, ``--repeats`` interleaved repetitions (median):

    .venv/bin/python scripts/bench.py --kinds --steps 20 --repeats 5 --json docs/bench-2core-kinds.json  # ~6 min, 2 cores

"wait" is the time a node spends in the all-gather before the slowest node arrives
(load imbalance); "exchange" is the rest of the all-gather (the transfer itself, plus
packing the batch fingerprint). See docs/performance.md for a recorded run and the cost
model for many nodes and machines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from actors.config import RunConfig  # noqa: E402
from actors.cpus import allowed_cpus, bind, pin_cpus  # noqa: E402
from actors.data import load_dataset  # noqa: E402
from actors.exchange import Exchange, free_port, init_distributed, shutdown  # noqa: E402
from actors.timing import PARTS, StepTimer  # noqa: E402
from actors.worker import NodeWorker  # noqa: E402
from coordinator.sequential import ReferenceTrainer  # noqa: E402


def make_config(models: list[str], batch_size: int, steps: int, device: str,
                kinds: Optional[str] = None) -> tuple[RunConfig, int]:
    """A DML-style graph (every edge Through) over ``models``, with enough capped epochs for
    one warm-up epoch and ``steps`` timed steps; ``kinds``: ``graph.kinds`` (None: kl only).
    Returns (config, steps per epoch)."""
    m = len(models)
    spe = min(1437 // batch_size, steps)  # digits: 1437 training images with no val split
    epochs = 1 + math.ceil(steps / spe)
    graph = {"name": "bench", "nodes": [{"model": x} for x in models], "gates": [["Through"] * m] * m}
    if kinds is not None:
        graph["kinds"] = kinds
    cfg = RunConfig.from_dict({
        "graph": graph,
        "dataset": {"name": "digits", "val_fraction": 0.0, "crop_pad": 1, "flip": False},
        "optim": {"lr": 0.02, "schedule": "constant", "milestones": []},
        "train": {"epochs": epochs, "batch_size": batch_size, "num_threads": 1, "max_steps_per_epoch": spe,
                  "progress": "off"},
        "logger": {"backend": "none"},
        "device": device,
    })
    return cfg, spe


ALLOWED = allowed_cpus() or list(range(os.cpu_count() or 1))
"""The CPU cores this process may run on (a container's cpuset, not the machine's count), read
once, before anything is pinned (children inherit a pinned parent's set)."""


def _pin(core: Optional[int]) -> None:
    """Run this process (the single-process reference) on ``core``, or on every allowed core (None)."""
    if hasattr(os, "sched_setaffinity"):
        bind(ALLOWED if core is None else [core])


def _node(rank: int, world: int, port: int, cases: list[dict[str, Any]], device: str, pin: bool,
          results) -> None:
    """One graph node of the benchmark group: every case in turn, in one process group. With
    ``pin``, on its slice of the cores, as the trainer pins node processes (``train.pin_cpus``)."""
    torch.set_num_threads(1)
    if pin:
        pin_cpus(rank, world, ALLOWED)
    env = init_distributed(rank, world, rank, f"tcp://127.0.0.1:{port}", device, "auto")
    ex = Exchange(env)
    data = load_dataset("digits", val_fraction=0.0)
    out = []
    try:
        for case in cases:
            if case["kind"] == "train":
                cfg, spe = make_config(case["models"], case["batch_size"], case["steps"], device, case.get("kinds"))
                worker = NodeWorker(cfg, env, ex, data, None, case.get("placement"))
                worker.timer = StepTimer(env.device)
                worker.train_epoch(0)  # warm-up epoch (allocator, caches, first-call costs)
                worker.timer.reset()
                for e in range(1, cfg.train.epochs):
                    worker.train_epoch(e)
                out.append({**case, **worker.timer.summary(), "steps_timed": worker.timer.steps,
                            "bytes": worker.exchange_bytes()})
            else:  # the all-gather alone, for a [B, C] float32 payload
                x = torch.randn(case["batch_size"], case["classes"], device=env.device)
                for _ in range(5):
                    ex.all_gather({"logits": x})
                if env.device.type == "cuda":
                    torch.cuda.synchronize()  # the barrier is the host's (gloo): the warm-up gathers must be done
                ex.barrier()
                n = case["reps"]
                t = time.perf_counter()
                for _ in range(n):
                    ex.all_gather({"logits": x})
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                out.append({**case, "allgather": (time.perf_counter() - t) / n})
        results.put((rank, out))
    finally:
        shutdown()


def run_group(world: int, cases: list[dict[str, Any]], device: str, pin: bool) -> list[list[dict[str, Any]]]:
    """Spawn ``world`` node processes, run ``cases``; returns each rank's results. With
    ``pin`` on the CPU, node r runs on the r-th of ``world`` slices of the cores, as under
    torchrun (``actors.cpus.pin_cpus``: only when there are at least ``world`` cores)."""
    pin = pin and device == "cpu"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_node, args=(r, world, port, cases, device, pin, results)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < world:
            try:
                rank, out = results.get(timeout=5)
                got[rank] = out
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a benchmark node died (exit codes {dead})")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(world)]


def sequential_step_time(models: list[str], batch: int, steps: int, pin: bool, threads: int = 1,
                         device: str = "cpu") -> float:
    """Seconds per step of the single-process reference training ``models`` one after the
    other (``threads`` threads; one thread runs on core 0 with ``pin``), after one warm-up
    epoch; on ``device`` (``cuda``: cuda:0)."""
    torch.set_num_threads(threads)
    if pin and threads == 1 and device == "cpu":
        _pin(ALLOWED[0])
    cfg, spe = make_config(models, batch, steps, device)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    group = ReferenceTrainer(cfg, load_dataset("digits", val_fraction=0.0), dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    it = group.batches()
    for _ in range(spe):  # warm-up
        group.step(*next(it))
    sync()
    n, t = 0, time.perf_counter()
    for batch in it:
        group.step(*batch)
        n += 1
    sync()
    dt = (time.perf_counter() - t) / n
    _pin(None)  # the next group's processes are spawned from here: do not pass the pin on
    torch.set_num_threads(1)
    return dt


def placed(models: list[str], processes: int) -> list[list[int]]:
    """The trainer's own placement of ``models`` on ``processes`` processes (auto: balanced)."""
    from actors.placement import resolve_placement

    return resolve_placement("auto", models, 10, 1, 8, processes)


def group_step(rows: list[dict[str, Any]]) -> float:
    """The group moves at its slowest process's pace."""
    return max(r["step"] for r in rows)


def ms(v: float) -> str:
    return f"{v * 1e3:.2f}"


RELATION_KINDS = "kl+rkd_distance+rkd_angle"


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def kinds_table(args: argparse.Namespace, raw: dict[str, Any]) -> None:
    """kl-only vs kl + relation graphs: bytes sent, and the shares of the exchange and of
    the loss in the step. Each group (2, then 3 ResNet32 nodes) runs every case
    ``args.repeats`` times, interleaved (the order of the cases reversed every other
    repetition, so that drift of the machine does not favour one kind); the table gives
    the median over repetitions of each column, each repetition's value being the mean
    over the group's nodes."""
    batches, kinds = (64, 256), (None, RELATION_KINDS)
    runs: dict[int, list[list[dict[str, Any]]]] = {}
    for m in (2, 3):
        cases = []
        for r in range(args.repeats):
            order = [(b, k) for b in batches for k in kinds]
            for b, k in (order if r % 2 == 0 else order[::-1]):
                cases.append({"kind": "train", "models": ["resnet32"] * m, "batch_size": b, "steps": args.steps,
                              "kinds": k, "repeat": r})
        t = time.perf_counter()
        runs[m] = run_group(m, cases, args.device, args.pin)
        print(f"  group of {m} ResNet32 nodes, {len(cases)} cases: {time.perf_counter() - t:.0f}s", flush=True)
    raw["kinds_runs"] = {str(m): g for m, g in runs.items()}
    print(f"\n### The exchange and the loss: kl only vs kl + {RELATION_KINDS.split('+', 1)[1]} "
          f"(ResNet32 nodes, every edge Through; median of {args.repeats} interleaved repetitions; ms)\n")
    print("| nodes | batch | kinds | bytes sent per process per step | exchange | wait | loss | backward | step "
          "| exchange % | exchange + wait % | loss % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = []
    for m in (2, 3):
        for b in batches:
            for k in kinds:
                per_rep = []
                for r in range(args.repeats):
                    rows = [next(c for c in g if c["batch_size"] == b and c["kinds"] == k and c["repeat"] == r)
                            for g in runs[m]]
                    per_rep.append({p: sum(x[p] for x in rows) / len(rows)
                                    for p in ("exchange", "wait", "loss", "backward", "step")})
                    nbytes = rows[0]["bytes"]
                med = {p: median([x[p] for x in per_rep]) for p in per_rep[0]}
                share = {p: median([x[p] / x["step"] for x in per_rep]) for p in ("exchange", "loss")}
                share["exchange_wait"] = median([(x["exchange"] + x["wait"]) / x["step"] for x in per_rep])
                sent = sum(nbytes.values()) + 32  # exchange_bytes() + the batch fingerprint (every step by default)
                table.append({"nodes": m, "batch": b, "kinds": k or "kl", "bytes": nbytes, "bytes_sent": sent,
                              **med, "share": share, "per_repeat": per_rep})
                print(f"| {m} | {b} | {k or 'kl'} | {sent:,} | {ms(med['exchange'])} | {ms(med['wait'])} "
                      f"| {ms(med['loss'])} | {ms(med['backward'])} | {ms(med['step'])} "
                      f"| {100 * share['exchange']:.1f}% | {100 * share['exchange_wait']:.1f}% "
                      f"| {100 * share['loss']:.1f}% |")
    raw["kinds_table"] = table


# --- main: the options, the measurements, then each table in turn ---------------------------------

BATCHES = (16, 64, 256)
"""Batch sizes of the ResNet32 groups (tables 1 and 3)."""


def parse_args(argv=None) -> argparse.Namespace:
    """The options, and what follows from them: ``reps`` (all-gathers timed per case),
    ``gpus`` (visible CUDA devices) and ``sizes`` (the ResNet32 groups that fit: NCCL takes
    one GPU per process)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per case (after a warm-up epoch)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: gloo, one thread per process; cuda: NCCL, one GPU per node")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--repeats", type=int, default=5, help="repetitions of the 2-node group vs single-process pair (section 5); "
                         "with --kinds, interleaved repetitions of each case (median)")
    ap.add_argument("--quick", action="store_true", help="a few steps per case: checks that the benchmark runs, measures nothing")
    ap.add_argument("--kinds", action="store_true",
                    help="only the kl-only vs kl + relation graphs table (2 and 3 nodes, batch 64 and 256)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin node r to its slice of the CPU cores (train.pin_cpus; pinning applies when "
                         "there are at least M cores)")
    args = ap.parse_args(argv)
    args.reps = 200
    if args.quick:
        args.steps, args.reps, args.repeats = 2, 3, 1
    args.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and not args.gpus:
        ap.error("--device cuda: no CUDA GPU is visible here")
    args.sizes = [m for m in (1, 2, 3) if fits(args, m)]
    return args


def fits(args: argparse.Namespace, processes: int) -> bool:
    """Whether a group of ``processes`` can run here (NCCL: one GPU per process)."""
    return args.device == "cpu" or processes <= args.gpus


def print_header(args: argparse.Namespace) -> dict[str, Any]:
    """The machine and the settings, printed; returns the raw results' first entries."""
    cores = len(ALLOWED)
    print(f"ktg benchmark: digits, {args.device}, torch {torch.__version__}, {cores} CPU cores, "
          f"{args.steps} timed steps per case, 1 thread per process", flush=True)
    if args.device == "cpu" and cores < 3:
        print(f"note: {cores} cores: the 3-node group shares them (3 processes on {cores} cores), so its "
              "speed-up is capped at the core count", flush=True)
    return {"device": args.device, "cores": cores, "steps": args.steps, "torch": torch.__version__}


def measure_groups(args: argparse.Namespace) -> tuple[dict[int, list[list[dict[str, Any]]]], list[dict[str, Any]], dict[str, float]]:
    """The runs tables 1-4 read: the ResNet32 groups (every batch, and the all-gather alone),
    the heterogeneous pair, and the single-process references."""
    groups: dict[int, list[list[dict[str, Any]]]] = {}
    if len(args.sizes) < 3:
        print(f"note: {args.gpus} GPU(s): groups of up to {max(args.sizes)} node process(es) (NCCL: one GPU each)", flush=True)
    for m in args.sizes:
        cases = [{"kind": "train", "models": ["resnet32"] * m, "batch_size": b, "steps": args.steps} for b in BATCHES]
        cases += [{"kind": "allgather", "batch_size": b, "classes": c, "reps": args.reps} for c in (100, 200) for b in (64, 256, 1024)]
        t = time.perf_counter()
        groups[m] = run_group(m, cases, args.device, args.pin)
        print(f"  group of {m} ResNet32 node(s): {time.perf_counter() - t:.0f}s", flush=True)
    hetero = []
    if fits(args, 2):
        hetero = [g[0] for g in run_group(2, [{"kind": "train", "models": ["resnet32", "resnet110"], "batch_size": 64,
                                              "steps": args.steps}], args.device, args.pin)]
        print("  heterogeneous group (ResNet32 + ResNet110): done", flush=True)
    seq: dict[str, float] = {}
    for m in (1, 2, 3):  # the reference runs in one process: on cuda:0 it needs one GPU only
        seq[f"resnet32x{m}"] = sequential_step_time(["resnet32"] * m, 64, args.steps, args.pin, device=args.device)
    seq["resnet32+resnet110"] = sequential_step_time(["resnet32", "resnet110"], 64, args.steps, args.pin, device=args.device)
    print("  single-process references: done", flush=True)
    return groups, hetero, seq


def mean_over_nodes(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def train_case(groups: dict[int, list[list[dict[str, Any]]]], m: int, batch: int) -> list[dict[str, Any]]:
    """Every node's row of the M-node ResNet32 group's training case at ``batch``."""
    return [next(c for c in g if c["kind"] == "train" and c["batch_size"] == batch) for g in groups[m]]


def table_parts(args: argparse.Namespace, groups: dict[int, list[list[dict[str, Any]]]]) -> None:
    """1. The parts of a node's step."""
    print("\n### 1. A node's step, by part (ResNet32 nodes, batch 64; ms, mean over nodes)\n")
    print("| nodes | " + " | ".join(PARTS) + " | step |")
    print("|---" * (len(PARTS) + 2) + "|")
    for m in args.sizes:
        rows = train_case(groups, m, 64)
        print(f"| {m} | " + " | ".join(ms(mean_over_nodes(rows, p)) for p in PARTS) + f" | {ms(mean_over_nodes(rows, 'step'))} |")


def table_speedup(args: argparse.Namespace, groups: dict[int, list[list[dict[str, Any]]]], hetero: list[dict[str, Any]],
                  seq: dict[str, float], raw: dict[str, Any]) -> None:
    """2. The group against the single process."""
    if not seq:
        return
    print("\n### 2. Throughput: M processes vs one process training the M models in turn (batch 64)\n")
    print("| graph | group step (ms) | sequential step (ms) | group images/s | sequential images/s | speed-up |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for name, rows, s in [(f"{m} x ResNet32", train_case(groups, m, 64), seq[f"resnet32x{m}"]) for m in args.sizes] + \
                         ([("ResNet32 + ResNet110", hetero, seq["resnet32+resnet110"])] if hetero else []):
        g = max(r["step"] for r in rows)  # the group moves at its slowest node's pace
        ratios[name] = s / g
        print(f"| {name} | {ms(g)} | {ms(s)} | {64 / g:.0f} | {64 / s:.0f} | **{s / g:.2f}x** |")
    raw["speedup"] = ratios


def table_exchange(args: argparse.Namespace, groups: dict[int, list[list[dict[str, Any]]]]) -> None:
    """3. The exchange's share of the step as M and the batch grow, and the all-gather alone."""
    print("\n### 3. The exchange's share of the step "
          "(ResNet32 nodes; exchange = all-gather transfer, wait = waiting for the slowest node)\n")
    print("| nodes | batch | bytes sent per node | exchange (ms) | wait (ms) | step (ms) | exchange % | exchange + wait % |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.sizes:
        for b in BATCHES:
            rows = train_case(groups, m, b)
            ex, wt, st = (mean_over_nodes(rows, k) for k in ("exchange", "wait", "step"))
            nbytes = b * 10 * 4 + 32  # fp32 logits + the batch fingerprint
            print(f"| {m} | {b} | {nbytes:,} | {ms(ex)} | {ms(wt)} | {ms(st)} | {100 * ex / st:.1f}% | {100 * (ex + wt) / st:.1f}% |")
    print(f"\nThe all-gather alone (one [B, C] fp32 tensor per node; mean of {args.reps}; ms):\n")
    print("| nodes | C | B=64 | B=256 | B=1024 |")
    print("|---|---|---|---|---|")
    for m in args.sizes:
        for c in (100, 200):
            vals = [next(x for x in groups[m][0] if x["kind"] == "allgather" and x["classes"] == c and x["batch_size"] == b)["allgather"]
                    for b in (64, 256, 1024)]
            print(f"| {m} | {c} | " + " | ".join(ms(v) for v in vals) + " |")


def table_hetero(hetero: list[dict[str, Any]]) -> None:
    """4. The heterogeneous graph: how long the fast node waits."""
    if hetero:
        print("\n### 4. Heterogeneous graph: ResNet32 (node 0) + ResNet110 (node 1), batch 64 (ms)\n")
        print("| node | model | forward | wait | exchange | loss | backward | optimizer | step | waiting share |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for i, (r, model) in enumerate(zip(hetero, ["resnet32", "resnet110"])):
        print(f"| {i} | {model} | " + " | ".join(ms(r[p]) for p in ("forward", "wait", "exchange", "loss", "backward", "optimizer"))
              + f" | {ms(r['step'])} | {100 * r['wait'] / r['step']:.0f}% |")


def table_packing(args: argparse.Namespace, raw: dict[str, Any]) -> None:
    """6. Packing: a mixed graph on P = M, balanced P < M, and one process."""
    mixed = ["resnet32", "resnet32", "resnet110"]
    packing = {}
    for p in [p for p in (3, 2, 1) if fits(args, p)]:
        case6 = {"kind": "train", "models": mixed, "batch_size": 64, "steps": args.steps, "placement": placed(mixed, p)}
        packing[p] = ([g[0] for g in run_group(p, [case6], args.device, args.pin)], case6["placement"])
    print("\n### 6. Several nodes per process: ResNet32, ResNet32, ResNet110 (batch 64, one thread per process)\n")
    print("| processes | placement | step (ms) | images/s | slowest process waits (ms) | fastest process waits |")
    print("|---|---|---|---|---|---|")
    for p, (rows, placement) in packing.items():
        g = group_step(rows)
        waits = [r["wait"] / r["step"] for r in rows]
        print(f"| {p} | {placement} | {ms(g)} | {64 / g:.0f} | {ms(min(r['wait'] for r in rows))} | {100 * max(waits):.0f}% |")
    raw["packing"] = {str(p): {"placement": pl, "rows": rows, "images_per_s": 64 / group_step(rows)} for p, (rows, pl) in packing.items()}


def table_scaling(args: argparse.Namespace, raw: dict[str, Any]) -> None:
    """7. Many ConvNet nodes on 2 processes: how the step and the exchange grow."""
    sizes = (2, 4, 8, 16, 32) if not args.quick else (2, 4)
    world7 = min(2, len(ALLOWED)) if args.device == "cpu" else min(2, args.gpus)
    cases7 = [{"kind": "train", "models": ["convnet"] * m, "batch_size": 64, "steps": args.steps,
               "placement": placed(["convnet"] * m, world7)} for m in sizes]
    scaling = run_group(world7, cases7, args.device, args.pin)
    print(f"\n### 7. M ConvNet nodes on {world7} processes (batch 64): how the step grows with M\n")
    print("| nodes | nodes per process | step (ms) | step per node (ms) | exchange (ms) | exchange % | images/s per node |")
    print("|---|---|---|---|---|---|---|")
    raw["scaling"] = []
    for j, m in enumerate(sizes):
        rows = [g[j] for g in scaling]
        g = group_step(rows)
        ex = mean_over_nodes(rows, "exchange")
        raw["scaling"].append({"nodes": m, "step": g, "exchange": ex})
        print(f"| {m} | {m // world7} | {ms(g)} | {ms(g / m)} | {ms(ex)} | {100 * ex / g:.1f}% | {64 / g:.0f} |")


def table_all_cores(args: argparse.Namespace, groups: dict[int, list[list[dict[str, Any]]]], seq: dict[str, float],
                    raw: dict[str, Any]) -> None:
    """8. The 2-node group against a single process using every core (CPU only)."""
    if args.device != "cpu":
        return
    threads = len(ALLOWED)
    s_all = sequential_step_time(["resnet32"] * 2, 64, args.steps, args.pin, threads=threads)
    g2 = group_step(train_case(groups, 2, 64))
    raw["sequential_all_cores"] = {"threads": threads, "step": s_all}
    print(f"\n### 8. 2 x ResNet32, batch 64: the group against one process with all {threads} cores\n")
    print("| run | step (ms) | images/s |")
    print("|---|---|---|")
    print(f"| group: 2 processes x 1 thread | {ms(g2)} | {64 / g2:.0f} |")
    print(f"| one process, {threads} threads, the models in turn | {ms(s_all)} | {64 / s_all:.0f} |")
    print(f"| one process, 1 thread | {ms(seq['resnet32x2'])} | {64 / seq['resnet32x2']:.0f} |")


def table_headline(args: argparse.Namespace, raw: dict[str, Any]) -> None:
    """5. The headline pair, repeated (CPU only): this machine's noise moves single runs by ~10%."""
    if args.device != "cpu" or not args.repeats:
        return
    print(f"\n### 5. 2 x ResNet32, batch 64: group vs single process, {args.repeats} interleaved repetitions\n")
    print("| repetition | group step (ms) | exchange % | exchange + wait % | sequential step (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    reps_out = []
    for i in range(args.repeats):
        rows = [g[0] for g in run_group(2, [{"kind": "train", "models": ["resnet32"] * 2, "batch_size": 64,
                                             "steps": args.steps}], args.device, args.pin)]
        s2 = sequential_step_time(["resnet32"] * 2, 64, args.steps, args.pin)
        g2 = max(r["step"] for r in rows)
        ex, wt, st = (mean_over_nodes(rows, k) for k in ("exchange", "wait", "step"))
        reps_out.append({"group_step": g2, "sequential_step": s2, "exchange_share": ex / st,
                         "exchange_wait_share": (ex + wt) / st, "speedup": s2 / g2})
        print(f"| {i + 1} | {ms(g2)} | {100 * ex / st:.1f}% | {100 * (ex + wt) / st:.1f}% | {ms(s2)} | {s2 / g2:.2f}x |")
    raw["headline"] = reps_out
    med = lambda k: sorted(r[k] for r in reps_out)[len(reps_out) // 2]  # noqa: E731
    print(f"\n2-node ResNet32 group, batch 64 (median of {args.repeats}): exchange {100 * med('exchange_share'):.1f}% "
          f"of the step ({100 * med('exchange_wait_share'):.1f}% with waiting); {med('speedup'):.2f}x the "
          "single-process reference")


def finish(args: argparse.Namespace, raw: dict[str, Any], t_start: float) -> None:
    """The wall time, and the raw results to ``--json``."""
    print(f"benchmark wall time: {time.perf_counter() - t_start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    raw = print_header(args)
    if args.kinds:
        raw["repeats"] = args.repeats
        kinds_table(args, raw)
        finish(args, raw, t_start)
        return 0
    groups, hetero, seq = measure_groups(args)
    raw.update(groups={str(m): g for m, g in groups.items()}, hetero=hetero, sequential=seq)
    table_parts(args, groups)
    table_speedup(args, groups, hetero, seq, raw)
    table_exchange(args, groups)
    table_hetero(hetero)
    table_packing(args, raw)
    table_scaling(args, raw)
    table_all_cores(args, groups, seq, raw)
    table_headline(args, raw)
    finish(args, raw, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
