"""Process bodies for multi-process tests (importable by spawned children)."""
from __future__ import annotations

import traceback

import torch


def exchange_child(rank: int, world: int, port: int, results) -> None:
    from actors.exchange import Exchange, init_distributed, shutdown

    try:
        env = init_distributed(rank, world, rank, f"tcp://127.0.0.1:{port}", "cpu", "gloo", 60)
        ex = Exchange(env)
        got = ex.all_gather({
            "logits": torch.full((3, 2), float(rank) + 0.5),
            "ids": torch.tensor([rank, 10 * rank], dtype=torch.int64),
            "half": torch.tensor([rank], dtype=torch.bfloat16),
        })
        plan = torch.arange(5) if rank == 0 else torch.zeros(5, dtype=torch.int64)
        ex.broadcast(plan)
        objs = ex.gather_objects({"rank": rank})
        results.put((rank, {k: v.tolist() for k, v in got.items()}, plan.tolist(), objs))
        shutdown()
    except BaseException:
        results.put((rank, traceback.format_exc(), None, None))


def drift_child(rank: int, world: int, port: int, cfg, results) -> None:
    """Node 1's batch is nudged by one ulp on one pixel: the run must stop at step 1."""
    from actors.exchange import Exchange, init_distributed, shutdown
    from actors.preflight import preflight
    from actors.worker import NodeWorker

    try:
        data = preflight(cfg, world)
        env = init_distributed(rank, world, rank, f"tcp://127.0.0.1:{port}", "cpu", "gloo", 60)
        worker = NodeWorker(cfg, env, Exchange(env), data, None)
        if rank == 1:
            make = worker.batches.step

            def drifted(order, plan, k):
                rows, x, y = make(order, plan, k)
                x[0, 0, 0, 0] = torch.nextafter(x[0, 0, 0, 0], torch.tensor(2.0))
                return rows, x, y

            worker.batches.step = drifted
        try:
            worker.train_epoch(0)
            results.put((rank, "no error", worker.step))
        except Exception as e:
            results.put((rank, f"{type(e).__name__}: {e}", worker.step))
        shutdown()
    except BaseException:
        results.put((rank, traceback.format_exc(), None))


def spawn(target, world: int, *args, timeout: float = 120):
    """Run ``target(rank, world, port, *args, results)`` in ``world`` spawned processes and
    return their results sorted by rank."""
    import multiprocessing as mp

    from actors.exchange import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = [q.get(timeout=timeout) for _ in range(world)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sorted(out, key=lambda r: r[0])
