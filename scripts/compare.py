"""Train several graph presets over several seeds with torchrun and print the target
node's test accuracy (mean +- std) per preset.

    .venv/bin/python scripts/compare.py --graphs independent kd dml ktg3 --seeds 0 1 2
    .venv/bin/python scripts/compare.py --graphs dml ktg3 --seeds 0 1 -- dataset=cifar100 optim=paper
    .venv/bin/python scripts/compare.py --graphs dml dml_relation=dml:graph.kinds=kl+rkd_distance+rkd_angle ctsl_mkt -- dataset=digits_noisy

A ``kd`` preset needs its frozen teacher: if ``teachers/<dataset>/resnet110/node0.pt`` is
missing it is pretrained first (graph=teacher, seed 0); ``ctsl_mkt`` likewise its
self-teachers (resnet32 and resnet110 trained alone) and ``mhgd`` its teacher and attention
module (``mode=attention``), all on the same data (``<dataset>`` is
the ``dataset=`` preset named, so ``dataset=digits_noisy`` gets a teacher trained on the
noisy labels, not the clean digits teacher; with ``dataset.label_noise=<r>`` among the
overrides, ``<dataset>`` is ``<preset>-noise<r>``). Runs go to ``runs/compare/``; the
table is printed and written to ``runs/compare/table.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODES = {"independent": 3, "kd": 2, "dml": 2, "ktg3": 3, "teacher": 1, "ctsl_mkt": 2, "mhgd": 2}


def torchrun(nproc: int, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "launch.py"), *overrides]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")


def parse_entry(entry: str) -> tuple[str, str, list[str]]:
    """``[label=]graph[:override;override...]`` -> (label, graph, overrides), e.g.
    ``dml_relation=dml:graph.kinds=kl+rkd_distance+rkd_angle`` (``;`` between overrides, as
    hydra values may hold commas)."""
    head, _, tail = entry.partition(":")
    name, _, graph = head.rpartition("=")
    graph = graph or head
    overrides = [o for o in tail.split(";") if o] if tail else []
    return (name or label(graph)), graph, overrides


def teacher_file(dataset: str, model: str, common: list[str]) -> Path:
    """``teachers/<dataset>/<model>/node0.pt``, pretrained (graph=teacher, seed 0) if missing."""
    path = ROOT / "teachers" / dataset / model / "node0.pt"
    if not path.is_file():
        print(f"pretraining {model} alone -> {path}", flush=True)
        torchrun(1, ["graph=teacher", f"graph.nodes.0.model={model}", "seed=0", f"hydra.run.dir={path.parent}", *common])
    return path


def stage1(graph: str, dataset: str, common: list[str]) -> list[str]:
    """What a preset needs trained first, as overrides: kd's teacher, ctsl_mkt's self-teachers
    (each model trained alone), mhgd's teacher and its attention module."""
    if graph == "kd":
        return [f"graph.nodes.1.checkpoint={teacher_file(dataset, 'resnet110', common)}"]
    if graph == "ctsl_mkt":
        return [f"graph.nodes.{i}.self_checkpoint={teacher_file(dataset, m, common)}"
                for i, m in enumerate(("resnet32", "resnet110"))]
    if graph == "mhgd":
        teacher = teacher_file(dataset, "resnet110", common)
        att = teacher.parent / "mhgd_attention.pt"
        out = [f"graph.nodes.1.checkpoint={teacher}", f"graph.nodes.1.attention={att}"]
        if not att.is_file():
            print(f"training the mhgd attention module -> {att}", flush=True)
            r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "mode=attention", "graph=mhgd", *out, *common],
                               cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"failed: mode=attention\n{r.stderr[-3000:]}")
        return out
    return []


def nodes_of(graph: str) -> int:
    """Node count of a preset name or of a graph file (e.g. a search's best_graph.yaml)."""
    if graph in NODES:
        return NODES[graph]
    import yaml

    path = Path(graph) if graph.endswith((".yaml", ".yml")) else ROOT / "conf" / "graph" / f"{graph}.yaml"
    return len(yaml.safe_load(path.read_text())["nodes"])


def label(graph: str) -> str:
    return Path(graph).parent.name.split("-")[-2] + "-best" if graph.endswith((".yaml", ".yml")) else graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", nargs="+", default=["independent", "kd", "dml", "ktg3"],
                    help="preset names or graph files (a search's best_graph.yaml); [label=]graph:override;... "
                         "for a variant, e.g. dml_relation=dml:graph.kinds=kl+rkd_distance+rkd_angle")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("overrides", nargs="*", help="hydra overrides for every run (after --)")
    a = ap.parse_args()
    out = ROOT / a.out
    dataset = next((o.split("=", 1)[1] for o in a.overrides if o.startswith("dataset=")), "digits")
    common = ["logger=none", *a.overrides]
    noise = next((o.split("=", 1)[1] for o in a.overrides if o.startswith("dataset.label_noise=")), None)
    if noise is not None:  # a teacher per noise rate: it learns from the same labels as the graph
        dataset = f"{dataset}-noise{noise}"
    results: dict[str, list[dict]] = {}
    for entry in a.graphs:
        name, g, overrides = parse_entry(entry)
        extra = stage1(g, dataset, common) + overrides
        for s in a.seeds:
            run_dir = out / f"{name}-{dataset}-s{s}"
            t = time.perf_counter()
            if not (run_dir / "summary.json").is_file():
                torchrun(nodes_of(g), [f"graph={g}", f"seed={s}", f"hydra.run.dir={run_dir}", *extra, *common])
            summ = json.loads((run_dir / "summary.json").read_text())
            results.setdefault(name, []).append(summ)
            print(f"{name:<12} seed {s}: target {summ['target_test_acc']:.2f}%  ensemble {summ['ensemble_test_acc']:.2f}%"
                  f"  ({time.perf_counter() - t:.0f}s)", flush=True)
    noise = {r.get("label_noise", 0.0) for runs in results.values() for r in runs}
    noise_s = f" (label noise {', '.join(map(str, sorted(noise)))} on train+val)" if noise != {0.0} else ""
    lines = [f"Target node (node 0) test accuracy on {dataset}{noise_s}, seeds {a.seeds}, overrides {a.overrides or 'none'}", "",
             "| graph | nodes | target test acc % (mean ± std) | ensemble % | wall s / run |", "|---|---|---|---|---|"]
    for g, runs in results.items():
        acc = [r["target_test_acc"] for r in runs]
        ens = [r["ensemble_test_acc"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        models = ", ".join(n["model"] + ("*" if n["frozen"] else "") for n in runs[0]["nodes"])
        lines.append(f"| {g} | {models} | {statistics.mean(acc):.2f} ± {sd:.2f} | {statistics.mean(ens):.2f} | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
