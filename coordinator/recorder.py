"""Rank 0's record of a run: console lines, ``metrics.jsonl``, ``summary.json``, wandb.

The only place that talks to wandb (imported here, where it is used); the files it writes
go through the run's ``RunDir``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

from actors.config import RunConfig
from actors.metrics import EDGE_LOSS, NodeEpochMetrics, parse_edge_key
from coordinator.rundir import RunDir

log = logging.getLogger("ktg")


SPELLED_OUT = 8
"""Graphs of up to this many nodes get every node in the console lines; larger ones the
target and the spread of the others (every node's numbers are in metrics.jsonl and wandb)."""


def _fmt(v: Optional[float]) -> str:
    return "  -  " if v is None else f"{v:5.1f}"


def _spread(values: list[Optional[float]], digits: int = 1) -> str:
    """``mean m [min-max]`` of the values that exist."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "  -  "
    return f"mean {sum(vals) / len(vals):5.{digits}f} [{min(vals):.{digits}f}-{max(vals):.{digits}f}]"


def wandb_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One epoch's metrics of every node (gathered on rank 0) as wandb keys:
    ``node<i>/<metric>`` (train_loss, train_acc, val_acc, test_acc, lr, ...),
    ``edge_loss/<s>-><t> <Gate>`` (mean gated loss of edge s -> t; s = t is the label edge),
    ``gate_weight/<s>-><t> <Gate>`` (mean weight its gate put on the samples), and
    ``ensemble/val_acc``, ``ensemble/test_acc``."""
    r0 = rows[0]
    data: dict[str, Any] = {"epoch": r0["epoch"], "ensemble/val_acc": r0["ensemble_val_acc"],
                            "ensemble/test_acc": r0["ensemble_test_acc"]}
    for r in rows:
        for k, v in r.items():
            if k in ("epoch", "node", "model", "frozen") or v is None or k.startswith("ensemble"):
                continue
            edge = parse_edge_key(k)
            if edge is not None:
                group = "edge_loss" if edge.kind == EDGE_LOSS else "gate_weight"
                data[f"{group}/{edge.source}->{edge.target} {edge.gate}"] = v
            else:
                data[f"node{r['node']}/{k}"] = v
    return {k: v for k, v in data.items() if v is not None}


class RunRecorder:
    """Rank 0's record of one run in its ``RunDir``. ``history``: the metrics rows of the
    epochs already done (a resumed run), one list of rows (by node) per epoch."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, config_dict: dict[str, Any], wandb_name: Optional[str] = None,
                 history: Optional[list[list[dict[str, Any]]]] = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.history: list[list[dict[str, Any]]] = list(history or [])
        self.t0 = time.perf_counter()
        self.train_time = sum(max(r.get("train_time_s", 0.0) for r in rows) for rows in self.history)
        self.wandb = None
        if cfg.logger.backend == "wandb":
            import wandb

            lc = cfg.logger
            # one wandb run per run directory: resumes and restarts log into the same run
            self.wandb = wandb.init(
                project=lc.project, entity=lc.entity, group=lc.group, tags=list(lc.tags) or None,
                name=wandb_name or f"{cfg.graph.name}-{cfg.dataset.name}-s{cfg.seed}", dir=str(run_dir.path),
                config=config_dict, mode=lc.mode, reinit="finish_previous", id=run_dir.wandb_id(), resume="allow",
            )
            self.wandb.define_metric("epoch")
            self.wandb.define_metric("*", step_metric="epoch")
            if not self.history:
                self._log_graph_image()

    def _log_graph_image(self) -> None:
        """The graph as the paper draws it, as the run's ``graph`` image (also kept in
        ``<run_dir>/pictures/graph.png``). A drawing failure is reported, not fatal."""
        import wandb

        try:
            from drawing.figures import graph_image

            path = graph_image(self.cfg.graph, self.run_dir.path / "pictures" / "graph.png")
            self.wandb.log({"graph": wandb.Image(str(path), caption=self.cfg.graph.describe())}, commit=False)
        except Exception as e:  # a picture must never stop a training run
            log.warning(f"could not draw the graph for wandb: {type(e).__name__}: {e}")

    def log_epoch(self, metrics: list[NodeEpochMetrics]) -> None:
        """``metrics``: every node's, by node, for the epoch just finished."""
        rows = [m.record() for m in metrics]
        self.history.append(rows)
        self.train_time += max(r["train_time_s"] for r in rows)
        self.run_dir.append_metrics(rows)
        e, r0 = rows[0]["epoch"], rows[0]
        shown = rows if len(rows) <= SPELLED_OUT else rows[:1]
        parts = [f"n{r['node']} {r['model']}{'*' if r['frozen'] else ''} "
                 f"loss {r['train_loss'] if r['train_loss'] is not None else float('nan'):.3f} "
                 f"val {_fmt(r['val_acc'])} test {_fmt(r['test_acc'])}" for r in shown]
        if len(rows) > SPELLED_OUT:
            others = rows[1:]
            parts.append(f"the other {len(others)}: val {_spread([r['val_acc'] for r in others])} "
                         f"test {_spread([r['test_acc'] for r in others])}")
        log.info(f"epoch {e:>3}/{self.cfg.train.epochs} | " + " | ".join(parts)
                 + f" | ens test {_fmt(r0['ensemble_test_acc'])} | {r0['train_time_s']:.1f}s")
        if self.wandb is not None:
            self.wandb.log(wandb_metrics(rows), step=e)

    def finish(self, steps_per_epoch: int) -> dict[str, Any]:
        last = self.history[-1]
        nodes = []
        for i, r in enumerate(last):
            vals = [(rows[i]["val_acc"], rows[i]["test_acc"]) for rows in self.history if rows[i]["val_acc"] is not None]
            best = max(vals, key=lambda v: v[0]) if vals else (None, None)
            nodes.append({
                "index": i, "model": r["model"], "frozen": r["frozen"],
                "final_test_acc": r["test_acc"], "final_val_acc": r["val_acc"],
                "best_val_acc": best[0], "test_acc_at_best_val": best[1],
            })
        images = steps_per_epoch * self.cfg.train.batch_size * len(self.history)
        summary = {
            "graph": self.cfg.graph.name,
            "dataset": self.cfg.dataset.name,
            "label_noise": self.cfg.dataset.label_noise,
            "seed": self.cfg.seed,
            "epochs": len(self.history),
            "nodes": nodes,
            "target_test_acc": nodes[0]["final_test_acc"],
            "target_best_val_acc": nodes[0]["best_val_acc"],
            "ensemble_test_acc": last[0]["ensemble_test_acc"],
            "wall_s": time.perf_counter() - self.t0,
            "train_s": self.train_time,
            "images_per_s": images / self.train_time if self.train_time > 0 else None,
        }
        self.run_dir.write_summary(summary)
        shown = nodes if len(nodes) <= SPELLED_OUT else nodes[:1]
        others = "" if len(nodes) <= SPELLED_OUT else (
            f"; the other {len(nodes) - 1}: {_spread([n['final_test_acc'] for n in nodes[1:]], 2)}")
        log.info("final test accuracy: " + ", ".join(
            f"node {n['index']} ({n['model']}{'*' if n['frozen'] else ''}) {n['final_test_acc']:.2f}%" for n in shown)
            + others + f"; ensemble {summary['ensemble_test_acc']:.2f}%")
        log.info(f"wall {summary['wall_s']:.1f}s, {summary['images_per_s']:.0f} images/s; outputs in {self.run_dir}")
        if self.wandb is not None:
            import wandb

            columns = ["node", "model", "frozen", "final_test_acc", "final_val_acc", "best_val_acc", "test_acc_at_best_val"]
            table = wandb.Table(columns=columns, data=[
                [n["index"], n["model"], n["frozen"], n["final_test_acc"], n["final_val_acc"], n["best_val_acc"],
                 n["test_acc_at_best_val"]] for n in nodes])
            self.wandb.log({"summary_table": table}, step=last[0]["epoch"])
            self.wandb.summary.update({k: v for k, v in summary.items() if k != "nodes"})
            self.wandb.finish()
            self.wandb = None
        return summary

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)
            self.wandb = None
