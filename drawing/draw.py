"""Draw a graph, a finished run or a search, as PNG and SVG.

    python -m drawing.draw conf/graph/ktg3.yaml      # a graph config (or a preset name: ktg3)
    python -m drawing.draw runs/<run>                # a run: its graph + learning curves
    python -m drawing.draw runs/search/<experiment>  # a search: val acc per epoch + ASHA rungs, best graph
    ktg-draw ...                                         # the same, once the project is installed

Pictures go to ``<run or search>/pictures/`` (``pictures/`` in the current folder for a
graph file), or ``--out DIR``. See docs/pictures.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

CONF_GRAPHS = Path(__file__).resolve().parents[1] / "conf" / "graph"
KINDS = ("a graph file (.yaml/.json, e.g. conf/graph/ktg3.yaml or a search's best_graph.yaml), "
         "a graph preset name (" + ", ".join(sorted(p.stem for p in CONF_GRAPHS.glob("*.yaml"))) + "), "
         "a run directory (with run_config.json and metrics.jsonl), "
         "or a search directory (with trials.csv or search_summary.json)")


def _kind(path: Path) -> Optional[str]:
    if path.is_dir():
        if (path / "trials.csv").is_file() or (path / "search_summary.json").is_file():
            return "search"
        if (path / "run_config.json").is_file():
            return "run"
        return None
    if path.is_file() and path.suffix in (".yaml", ".yml", ".json"):
        return "graph"
    return None


def draw(target: str, out: Optional[str] = None, name: Optional[str] = None, **asha) -> list[Path]:
    """Draw ``target`` (see ``KINDS``); returns the files written. Raises ``ValueError``
    naming the accepted kinds of path when ``target`` is none of them. ``asha``: grace,
    rf, max_epochs for a search that did not record them (see ``pictures.draw_search``)."""
    from actors.graph_file import load_graph_file
    from drawing import figures as pictures

    path = Path(target)
    kind = _kind(path)
    if kind is None and not path.exists() and (CONF_GRAPHS / f"{target}.yaml").is_file():
        path, kind = CONF_GRAPHS / f"{target}.yaml", "graph"
    if kind is None:
        what = "does not exist" if not path.exists() else "is none of these"
        raise ValueError(f"{target} {what}; expected {KINDS}")
    if kind == "graph":
        graph = load_graph_file(path)
        folder = Path(out) if out else Path("pictures")
        return pictures.draw_graph(graph, folder / (name or f"graph_{graph.name}"))
    folder = Path(out) if out else path / "pictures"
    if kind == "run":
        graph = load_graph_file(path / "run_config.json")
        files = pictures.draw_graph(graph, folder / (name or "graph"))
        if (path / "metrics.jsonl").is_file():
            files += pictures.draw_learning_curves(path, folder / (f"{name}_curves" if name else "curves"))
        return files
    return pictures.draw_search(path, folder / (name or "search"), **asha)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ktg-draw", description="Draw a knowledge transfer graph, a finished run "
                                 "(graph + learning curves) or a search (val acc per epoch, ASHA rungs, best graph) "
                                 "as PNG and SVG.")
    ap.add_argument("path", help="graph .yaml / preset name, run directory, or search directory")
    ap.add_argument("--out", help="output folder (default: <run or search>/pictures, or ./pictures for a graph)")
    ap.add_argument("--name", help="file name stem of the pictures")
    ap.add_argument("--grace", type=int, help="search: ASHA grace period (default: as recorded, else 1)")
    ap.add_argument("--rf", type=float, help="search: ASHA reduction factor (default: as recorded, else 2)")
    ap.add_argument("--max-epochs", type=int, help="search: ASHA max epochs (default: as recorded, else the longest trial)")
    args = ap.parse_args(argv)
    asha = {k: v for k, v in (("grace", args.grace), ("rf", args.rf), ("max_epochs", args.max_epochs)) if v is not None}
    try:
        files = draw(args.path, args.out, args.name, **asha)
    except (ValueError, OSError) as e:  # ConfigError (a bad graph) is a ValueError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
