"""Compare the search's samplers under the same ASHA: random (the paper) and Optuna's TPE
(model-based), several search seeds each, the same trial budget, on the noisy benchmark.

    .venv/bin/python scripts/search_compare.py                       # 2 samplers x 3 seeds x 32 trials
    .venv/bin/python scripts/search_compare.py --trials 16 --seeds 0 -- search.max_epochs=4

Every search is ``mode=search search=small dataset=digits_noisy search.frozen=exclude`` plus
the overrides after ``--`` (no frozen teachers: the teachers under ``teachers/digits`` were
trained on the clean labels). Trials run one at a time (``search.max_concurrent=1``) on warm
actor groups, so a trial's wall-clock seconds are the 2-core machine's. Then each search's
best graph is retrained with the full CPU recipe (``optim=cpu``, 20 epochs, seed 0) under
torchrun and its target test accuracy read (the overrides of `dataset`, `optim` and
``train.`` keys apply to it too).

Printed and written to ``<out>/searchers.md`` / ``searchers.json``:
- best validation accuracy any trial reached among the first 8, 16, 32 trials (trials in the
  order the sampler proposed them), mean over search seeds;
- the same as a function of the search's wall-clock seconds (both cores busy);
- the retrained best graph's test accuracy, mean +- std over search seeds.
Searches already in ``<out>`` (a ``search_summary.json``) are read, not rerun.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import launch  # noqa: F401  (registers the run-dir resolver)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def trial_curve(exp: Path) -> list[dict]:
    """Every trial of a finished search, in the order the sampler proposed it: the best val
    accuracy it reported, and when it ended (seconds since the search's first result)."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(exp)).trials  # creation order
    out = []
    for t in trials:
        lines = (Path(exp) / f"trial_{t.trial_id}" / "result.json").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        vals = [r["target_val_acc"] for r in rows if not r.get("invalid")]
        out.append({"trial": t.trial_id, "best_val": max(vals) if vals else None,
                    "epochs": max((r.get("epoch", 0) for r in rows), default=0),
                    "start": min(r["timestamp"] - r["time_this_iter_s"] for r in rows) if rows else None,
                    "end": max(r["timestamp"] for r in rows) if rows else None})
    t0 = min(r["start"] for r in out if r["start"] is not None)
    for r in out:
        r["end_s"] = None if r["end"] is None else r["end"] - t0
    return out


def best_after(curve: list[dict], n: int) -> float:
    vals = [r["best_val"] for r in curve[:n] if r["best_val"] is not None]
    return max(vals) if vals else float("nan")


def best_by(curve: list[dict], seconds: float) -> float:
    vals = [r["best_val"] for r in curve if r["best_val"] is not None and r["end_s"] is not None and r["end_s"] <= seconds]
    return max(vals) if vals else float("nan")


def retrain(graph: Path, out: Path, overrides: list[str]) -> float:
    """Target test accuracy of ``graph`` retrained with the CPU recipe (seed 0)."""
    from scripts.compare import nodes_of, torchrun

    if not (out / "summary.json").is_file():
        torchrun(nodes_of(str(graph)), [f"graph={graph}", "seed=0", "logger=none", f"hydra.run.dir={out}",
                                        *[o for o in overrides if o.startswith(("dataset", "optim", "train."))]])
    return json.loads((out / "summary.json").read_text())["target_test_acc"]


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--searchers", nargs="+", default=["random", "optuna"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--out", default="runs/searchers")
    ap.add_argument("overrides", nargs="*", help="hydra overrides for every search (after --)")
    a = ap.parse_args()
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["dataset=digits_noisy", *a.overrides]
    checkpoints = sorted({n for n in (8, 16, 32, a.trials) if n <= a.trials})
    import ray

    from launch import search

    results: dict[str, list[dict]] = {}
    for searcher in a.searchers:
        for seed in a.seeds:
            exp = out / f"{searcher}-s{seed}"
            t = time.perf_counter()
            if not (exp / "search_summary.json").is_file():
                cfg = compose(["mode=search", "search=small", "logger=none", "search.frozen=exclude", "search.max_concurrent=1",
                               f"search.num_samples={a.trials}", f"search.searcher={searcher}", "search.verbose=0",
                               f"seed={seed}", *overrides])
                search(cfg, str(exp))
            summary = json.loads((exp / "search_summary.json").read_text())
            curve = trial_curve(exp)
            test = retrain(Path(summary["best_graph"]), exp / "retrain-s0", overrides)
            row = {"searcher": searcher, "seed": seed, "wall_s": summary["wall_s"], "curve": curve,
                   "best_after": {n: best_after(curve, n) for n in checkpoints}, "retrained_test_acc": test,
                   "best_gates": summary["best_gates"], "best_models": summary["best_models"],
                   "warm_start_s_mean": summary.get("warm_start_s_mean"), "cold_start_s_mean": summary.get("cold_start_s_mean")}
            results.setdefault(searcher, []).append(row)
            print(f"{searcher:<7} seed {seed}: best val after {checkpoints}: "
                  f"{[round(v, 2) for v in row['best_after'].values()]}; search {summary['wall_s']:.0f}s; "
                  f"best graph [{summary['best_models']}] {summary['best_gates']} retrained: test {test:.2f}% "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
    if ray.is_initialized():
        ray.shutdown()

    walls = [r["wall_s"] for rows in results.values() for r in rows]
    marks = [round(f * min(walls)) for f in (0.25, 0.5, 0.75, 1.0)]
    lines = [f"Searchers under the same ASHA (search=small, {a.trials} trials, one at a time, warm groups) on digits with "
             f"label noise; search seeds {a.seeds}; overrides {overrides}", "",
             "| searcher | " + " | ".join(f"best val after {n} trials" for n in checkpoints)
             + " | " + " | ".join(f"best val by {s} s" for s in marks) + " | search wall s | retrained best graph: test % |",
             "|---" * (len(checkpoints) + len(marks) + 3) + "|"]
    for searcher, rows in results.items():
        after = [mean_sd([r["best_after"][n] for r in rows]) for n in checkpoints]
        by = [mean_sd([best_by(r["curve"], s) for r in rows]) for s in marks]
        lines.append(f"| {searcher} | " + " | ".join(after) + " | " + " | ".join(by)
                     + f" | {statistics.mean(r['wall_s'] for r in rows):.0f} | {mean_sd([r['retrained_test_acc'] for r in rows])} |")
    lines += ["", "Best graph of each search (models; gates, rows = receiver):", ""]
    lines += [f"- {r['searcher']} seed {r['seed']}: [{r['best_models']}] {r['best_gates']} -> test {r['retrained_test_acc']:.2f}%"
              for rows in results.values() for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "searchers.md").write_text(table + "\n")
    (out / "searchers.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
