"""Search throughput: the same ASHA search run cold (every trial starts its own actors) and
warm (``search.warm=true``: a trial's actors, data and process group serve the next trial).

    .venv/bin/python scripts/bench_search.py                  # search=small on digits: ~6 min on 2 cores
    .venv/bin/python scripts/bench_search.py --trials 16 -- search.max_concurrent=1

Both searches sample the same graphs (same seed, same random sampler). Printed (and written
with ``--json``): wall-clock seconds of the search (``Tuner.fit``; starting Ray, once, is
not counted in either), trials per hour, the epochs trained, and each trial's
start (trial start to its first training step: the ``launch_overhead_s`` of trials.csv),
mean and max, split by cold and warm starts; and whether every graph that both searches
trained reached the same validation accuracies at the same epochs (it must: a warm trial
trains exactly as a cold one).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(warm: bool, trials: int, overrides: list[str], out: Path) -> dict:
    from launch import search
    from scripts.search_compare import compose

    cfg = compose(["mode=search", "search=small", "logger=none", "search.verbose=0", f"search.num_samples={trials}",
                   f"search.warm={str(warm).lower()}", *overrides])
    summary = search(cfg, str(out))
    wall = summary["wall_s"]  # Tuner.fit alone: not the first search's ray.init
    rows = list(csv.DictReader(open(out / "trials.csv")))
    vals = {}
    for r in rows:
        lines = (out / r["trial"] / "result.json").read_text().splitlines()
        vals[(r["models"], r["gates"], r["extra"])] = [round(json.loads(x)["target_val_acc"], 6) for x in lines if x.strip()]
    starts = {w: [float(r["launch_overhead_s"]) for r in rows if r["warm"] == w and r["launch_overhead_s"]] for w in ("False", "True")}
    return {"warm": warm, "wall_s": wall, "trials": len(rows), "trials_per_hour": len(rows) / wall * 3600,
            "epochs": sum(int(r["epochs"]) for r in rows), "summary": summary, "vals": vals,
            "cold_starts": starts["False"], "warm_starts": starts["True"]}


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} / {max(xs):.3f} ({len(xs)})" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("overrides", nargs="*", help="hydra overrides for both searches (after --)")
    a = ap.parse_args()
    import ray

    res = {}
    with tempfile.TemporaryDirectory(prefix="ktg-bench-search-") as d:
        for warm in (False, True):
            res[warm] = run(warm, a.trials, a.overrides, Path(d) / f"exp-{'warm' if warm else 'cold'}-digits")
            r = res[warm]
            print(f"{'warm' if warm else 'cold'}: {r['trials']} trials, {r['epochs']} epochs in {r['wall_s']:.1f} s "
                  f"({r['trials_per_hour']:.0f} trials/h); start s mean/max (n): cold {fmt(r['cold_starts'])}, "
                  f"warm {fmt(r['warm_starts'])}", flush=True)
    if ray.is_initialized():
        ray.shutdown()
    cold, warm = res[False], res[True]
    both = set(cold["vals"]) & set(warm["vals"])
    same = all(cold["vals"][k][:n] == warm["vals"][k][:n] for k in both for n in [min(len(cold["vals"][k]), len(warm["vals"][k]))])
    print(f"\nsearch=small on digits, {a.trials} trials, overrides {a.overrides or 'none'}\n")
    print("| search | wall s | trials/h | epochs trained | cold starts: mean / max s (n) | warm starts: mean / max s (n) |")
    print("|---|---|---|---|---|---|")
    for name, r in (("cold (search.warm=false)", cold), ("warm (search.warm=true)", warm)):
        print(f"| {name} | {r['wall_s']:.1f} | {r['trials_per_hour']:.0f} | {r['epochs']} | {fmt(r['cold_starts'])} | "
              f"{fmt(r['warm_starts'])} |")
    print(f"\nspeed-up in trials/h: {warm['trials_per_hour'] / cold['trials_per_hour']:.2f}x; graphs trained by both: {len(both)}, "
          f"same val accuracies at every epoch both ran: {'yes' if same else 'NO'}")
    if a.json:
        for r in res.values():
            r["vals"] = {" | ".join(k): v for k, v in r["vals"].items()}
        Path(a.json).write_text(json.dumps({str(k): v for k, v in res.items()}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
