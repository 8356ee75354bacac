"""What a finished (or interrupted) search leaves in its experiment folder: ``trials.csv``
(one ``actors.trial_row.TrialRow`` per trial), ``best_graph.yaml`` (the best graph as a
graph config that ``torchrun launch.py graph=<file>`` retrains) and ``search_summary.json``;
and the trial table printed at the end."""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from actors.trial_row import TrialRow, write_trials
from coordinator.search_space import SearchConfig, describe_gates
from coordinator.search_trial import METRIC

log = logging.getLogger("ktg")


@dataclass
class _Ended:
    """One trial of the result grid: its trials.csv row, and what its best graph export needs."""

    row: TrialRow
    graph: Optional[dict[str, Any]]
    """The graph config its sample stands for (None: no sample, or not a valid graph)."""
    cfg: dict[str, Any]
    """Its Tune config (the sample)."""


def write_results(grid, space: SearchConfig, out_dir: Path, wall_s: float) -> dict[str, Any]:
    """trials.csv (every trial), best_graph.yaml, search_summary.json."""
    trial_states = _trial_states(out_dir)
    interrupted = len(grid) < space.num_samples or any(st not in ("TERMINATED", "ERROR") for st in trial_states.values())
    ended = [_ended(r, space, trial_states) for r in grid]
    rows = [e.row for e in ended]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_trials(out_dir / "trials.csv", _by_best(rows))
    if interrupted:
        print(render_table(rows), flush=True)
        print(f"[search] interrupted with {sum(r.status.startswith('unfinished') for r in rows)} unfinished trial(s) "
              f"of {space.num_samples}; continue it with the command that started it plus search.resume={out_dir}, "
              f"e.g. python launch.py mode=search search={space.name} search.resume={out_dir}", flush=True)
        return {"experiment": str(out_dir), "interrupted": True, "trials": len(rows)}
    trained = [e for e in ended if e.row.last_val_acc is not None and e.row.status in ("completed", "stopped by ASHA")]
    if not trained:
        raise RuntimeError(f"no trial of the search trained to a result (see {out_dir / 'trials.csv'})")
    top = max(e.row.epochs for e in trained)
    best = max((e for e in trained if e.row.epochs == top), key=lambda e: e.row.last_val_acc)
    best_path = export_graph(best.graph, best.cfg, space, out_dir / "best_graph.yaml", best.row)
    summary = _summary(rows, best.row, best_path, space, out_dir, wall_s)
    (out_dir / "search_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(render_table(rows), flush=True)
    print(f"[search] best: trial {best.row.trial} val {best.row.last_val_acc:.2f} after {best.row.epochs} epochs; "
          f"graph written to {best_path}\n[search] retrain it: torchrun --standalone "
          f"--nproc_per_node={space.num_nodes} launch.py graph={best_path}", flush=True)
    return summary


def _trial_states(out_dir: Path) -> dict[str, str]:
    """Tune's trial states as saved with the experiment (TERMINATED, ERROR, PENDING, ...),
    by trial id; empty, with a warning, when they cannot be read."""
    try:
        from ray.tune import ExperimentAnalysis

        return {t.trial_id: t.status for t in ExperimentAnalysis(str(out_dir)).trials}
    except Exception as e:  # the table is still written from the results; say why the states are missing
        log.warning(f"could not read the trials' states from {out_dir} ({type(e).__name__}: {e}); "
                    "a trial that did not end is then reported by its epochs only")
        return {}


def _ended(r, space: SearchConfig, trial_states: dict[str, str]) -> _Ended:
    """One ``ray.tune.Result`` as its trials.csv row (with its graph and sample)."""
    df = r.metrics_dataframe
    cfg = r.config or {}
    graph = space.graph_from(cfg) if cfg else None
    epochs = int(df["epoch"].max()) if df is not None and "epoch" in df and len(df) else 0
    vals = df[METRIC].tolist() if df is not None and METRIC in df else []
    overhead = df["launch_overhead_s"].dropna().tolist() if df is not None and "launch_overhead_s" in df else []
    warm = df["warm"].dropna().tolist() if df is not None and "warm" in df else []
    row = TrialRow(
        trial=Path(r.path).name if r.path else "?",
        models=", ".join(n["model"] + ("*" if "checkpoint" in n else "") for n in graph["nodes"]) if graph else "",
        gates=describe_gates(graph["gates"]) if graph else "",
        extra=json.dumps({k[6:]: v for k, v in cfg.items() if k.startswith("extra:")}) if cfg else "",
        kinds=" / ".join(" ".join(row_kinds) for row_kinds in graph["kinds"]) if graph and graph.get("kinds") else "",
        epochs=epochs,
        last_val_acc=round(vals[-1], 3) if vals else None,
        best_val_acc=round(max(vals), 3) if vals else None,
        status=_status(r, trial_states, epochs, space),
        launch_overhead_s=round(overhead[0], 3) if overhead else None,
        warm=bool(warm[0]) if warm else None,
    )
    return _Ended(row, graph, cfg)


def _status(r, trial_states: dict[str, str], epochs: int, space: SearchConfig) -> str:
    """How a trial ended, as trials.csv says it."""
    invalid = bool(r.metrics.get("invalid")) if r.metrics else False
    if r.error is not None:
        why = str(r.error).strip()
        return f"failed: {type(r.error).__name__}: {why.splitlines()[-1][:160]}" if why else "failed"
    if invalid:
        return "invalid graph (not trained)"
    if trial_states.get(Path(r.path).name[len("trial_"):] if r.path else "", "TERMINATED") not in ("TERMINATED", "ERROR"):
        return "unfinished (search interrupted)"
    if epochs < space.max_epochs:
        return "stopped by ASHA"
    return "completed"


def _by_best(rows: list[TrialRow]) -> list[TrialRow]:
    """Best validation accuracy first (a trial without one, or with 0, last)."""
    return sorted(rows, key=lambda r: (-(r.best_val_acc or -1)))


def _summary(rows: list[TrialRow], best: TrialRow, best_path: Path, space: SearchConfig, out_dir: Path,
             wall_s: float) -> dict[str, Any]:
    """search_summary.json: the counts of each ending, the best trial, the trials' start times."""
    overheads = [r.launch_overhead_s for r in rows if r.launch_overhead_s is not None]
    by_start = {w: [r.launch_overhead_s for r in rows if r.launch_overhead_s is not None and r.warm is w]
                for w in (False, True)}
    return {
        "experiment": str(out_dir),
        "trials": len(rows),
        "completed": sum(r.status == "completed" for r in rows),
        "stopped_by_asha": sum(r.status == "stopped by ASHA" for r in rows),
        "failed": sum(r.status.startswith("failed") for r in rows),
        "invalid": sum(r.status.startswith("invalid") for r in rows),
        "interrupted": False,
        "best_trial": best.trial, "best_val_acc": best.last_val_acc, "best_graph": str(best_path),
        "best_models": best.models, "best_gates": best.gates,
        "wall_s": wall_s,
        "launch_overhead_s_mean": sum(overheads) / len(overheads) if overheads else None,
        # trial start -> first training step, by how the trial's group started
        "cold_starts": len(by_start[False]), "warm_starts": len(by_start[True]),
        "cold_start_s_mean": sum(by_start[False]) / len(by_start[False]) if by_start[False] else None,
        "warm_start_s_mean": sum(by_start[True]) / len(by_start[True]) if by_start[True] else None,
        # ASHA's schedule, for the search picture's rungs (drawing.figures.draw_search)
        "grace_period": space.grace_period,
        "reduction_factor": space.reduction_factor,
        "max_epochs": space.max_epochs,
    }


def render_table(rows: list[TrialRow]) -> str:
    kinds = any(r.kinds for r in rows)  # a search over edge kinds too
    head = "| trial | models | gates (rows = receiver) |" + (" kinds (rows = receiver) |" if kinds else "")
    lines = [head + " epochs | last val | best val | status |", "|---|---|---|" + ("---|" if kinds else "") + "---|---|---|---|"]
    for r in _by_best(rows):
        lv = "-" if r.last_val_acc is None else f"{r.last_val_acc:.2f}"
        bv = "-" if r.best_val_acc is None else f"{r.best_val_acc:.2f}"
        k = f" {r.kinds} |" if kinds else ""
        lines.append(f"| {r.trial[-14:]} | {r.models} | {r.gates} |{k} {r.epochs} | {lv} | {bv} | {r.status} |")
    return "\n".join(lines)


def export_graph(graph: dict[str, Any], cfg: dict[str, Any], space: SearchConfig, path: Path, row: TrialRow) -> Path:
    """Write the graph as a config for ``graph=<file>``. A frozen node's checkpoint becomes
    ``<teachers_dir>/<model>/node0.pt`` with the dataset left as ``${dataset.name}`` when the
    teachers folder is per dataset, so the graph transfers to another dataset."""
    import yaml

    g = copy.deepcopy(graph)
    g["name"] = "searched"
    dataset = space.dataset_name
    for n in g["nodes"]:
        if "checkpoint" in n and dataset:
            n["checkpoint"] = n["checkpoint"].replace(f"/{dataset}/", "/${dataset.name}/")
    header = (f"# Found by the search in {path.parent}\n# trial {row.trial}: target val acc {row.last_val_acc} "
              f"after {row.epochs} epochs\n# retrain: torchrun --standalone --nproc_per_node={len(g['nodes'])} "
              f"launch.py graph={path}\n")
    extra = {k[6:]: v for k, v in cfg.items() if k.startswith("extra:")}
    if extra:
        header += f"# searched alongside (not part of the graph; pass as overrides): {extra}\n"
    path.write_text(header + yaml.safe_dump(g, sort_keys=False, default_flow_style=None))
    return path
