"""Reading a graph file: ``conf/graph/*.yaml``, a search's ``best_graph.yaml``, or a whole
run config with a ``graph`` key (``run_config.json``: JSON is YAML).

One reader for the launcher (``launch.py graph=<file>``, which hands the mapping to hydra)
and the pictures (``drawing``, which need the ``GraphSpec``): both refuse a missing file,
one that is not YAML, and one that is not a mapping with the same ``ConfigError``. It lives
in ``actors/`` beside ``actors.graph`` so both the launcher and ``drawing/`` may import it
(drawing never imports the launcher).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.errors import ConfigError

if TYPE_CHECKING:
    from actors.graph import GraphSpec


def read_graph_file(path: str | Path, loader: Any = None) -> dict[str, Any]:
    """The mapping in a graph file, read as plain YAML: interpolations such as
    ``${dataset.name}`` stay as written. ``loader``: the YAML loader (default
    ``yaml.SafeLoader``; the launcher passes OmegaConf's, as hydra reads the file).
    ``ConfigError`` when the file is missing, unreadable, not YAML, or not a mapping."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"graph file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=loader or yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"graph file {path} is not valid YAML: {what}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"graph file {path} cannot be read: {e}") from None
    if not isinstance(raw, dict):
        got = "empty" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"graph file {path} must be a mapping (name, nodes, gates, ...); it is {got}")
    return raw


def load_graph_file(path: str | Path) -> "GraphSpec":
    """The ``GraphSpec`` of a graph file (``read_graph_file``), or of the ``graph`` of a run
    config; a graph without a name is named after the file. Interpolations in checkpoint
    paths stay unresolved (a picture does not need the checkpoint)."""
    from actors.graph import GraphSpec

    path = Path(path)
    data = read_graph_file(path)
    if "nodes" not in data and isinstance(data.get("graph"), dict):
        data = data["graph"]
    if "nodes" not in data or "gates" not in data:
        raise ConfigError(f"{path}: not a graph (a mapping with 'nodes' and 'gates', or a run config with a 'graph')")
    allowed = {f.name for f in dataclasses.fields(GraphSpec)}
    data = {k: v for k, v in data.items() if k in allowed}  # e.g. hydra's 'defaults'
    data.setdefault("name", path.stem)
    return GraphSpec.from_dict(data)
