"""The command line's side of the run configuration (hydra).

- ``register_defaults``: the defaults of the top-level settings and of ``train.*`` are the
  dataclasses' (``actors.config``), registered with hydra as the config ``ktg_defaults``
  that ``conf/config.yaml`` starts from; the presets of ``conf/`` and the command line
  override them. Nothing in ``conf/`` restates them.
- ``check_overrides``: a command line's preset names and option names, checked before hydra
  composes, so a typo is one ``error:`` line naming what exists.
- ``reference_markdown``: ``docs/configuration.md``, every option with its default and
  meaning, generated from the dataclasses' field docstrings
  (``python -m coordinator.hydra_conf --write``; a test checks it is current).
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from actors.config import SECTIONS, TOP_LEVEL, RunConfig, defaults_dict, field_docs
from actors.errors import ConfigError
from actors.graph import GraphSpec, NodeSpec
from coordinator.search_space import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DOCS = ROOT / "docs" / "configuration.md"

MODES = ("train", "search", "attention")
MODE_DOC = ("train (one graph, one process per node, under torchrun), search (a Ray Tune ASHA search over graphs: "
            "search=<preset>) or attention (stage 1 of mhgd edges: train their attention modules).")
DEFAULTS_NODE = "ktg_defaults"
"""The name ``conf/config.yaml``'s defaults list loads the dataclass defaults by."""


def defaults_node() -> dict[str, Any]:
    """What ``ktg_defaults`` holds: ``mode`` and RunConfig's defaults of the top-level
    settings and of ``train``, as plain values (hydra keeps them untyped, so RunConfig stays
    the one validator)."""
    return {"mode": MODES[0], **defaults_dict(("train",))}


def register_defaults() -> None:
    """Register ``ktg_defaults`` with hydra's ConfigStore: before hydra composes
    ``conf/config.yaml`` (``launch.py`` on import; tests that compose call it too)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=DEFAULTS_NODE, node=defaults_node())


# --- the command line, checked before hydra -------------------------------------------------

def groups() -> list[str]:
    """The config groups: the folders of ``conf/``."""
    return sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def presets(group: str) -> list[str]:
    return sorted({p.stem for p in (CONF / group).iterdir() if p.suffix in (".yaml", ".yml")})


def section_fields() -> dict[str, list[str]]:
    """Option names per section: RunConfig's sections, ``graph`` and ``search``."""
    out = {name: [f.name for f in dataclasses.fields(klass)] for name, klass in SECTIONS.items()}
    out["graph"] = [f.name for f in dataclasses.fields(GraphSpec)]
    out["search"] = [f.name for f in dataclasses.fields(SearchConfig)]
    return out


_SWEEP = set(",()[]{}$*'\"")  # sweeps, choice()/range()/glob(), interpolations, quoting: left to hydra


def check_overrides(args: list[str]) -> None:
    """Raise ``ConfigError`` for a command-line override that names a preset not in
    ``conf/<group>/`` (``graph=nope``) or an option no section has (``train.foo=1``,
    ``epochs=5``); one line that lists what exists. Anything else (flags, ``hydra.*``,
    ``~key`` deletions, ``+key=...`` additions of top-level keys, sweeps) is left to hydra."""
    conf_groups = groups()
    fields = section_fields()
    for arg in args:
        if arg.startswith(("-", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if "/" in key:  # hydra's own groups: hydra/job_logging=disabled
            continue
        added = key.startswith("+")
        key = key.lstrip("+")
        group = key.split("@", 1)[0]
        if group in conf_groups:
            value = value.strip()
            if value in ("", "null") or _SWEEP & set(value) or (group == "graph" and value.endswith((".yaml", ".yml"))):
                continue
            names = presets(group)
            if value not in names:
                more = " (or a graph .yaml file)" if group == "graph" else ""
                raise ConfigError(f"{group}={value}: no such preset; available: {', '.join(names)}{more}")
            continue
        parts = key.split(".")
        if len(parts) == 1:
            if added or key in ("mode", "hydra") or key in TOP_LEVEL or key in fields:
                continue
            hint = " or ".join(f"{s}.{key}" for s, names in fields.items() if key in names)
            raise ConfigError(
                f"{key}: no such option{f' (did you mean {hint}?)' if hint else ''}; top-level options: "
                f"{', '.join(('mode',) + TOP_LEVEL)}; sections: {', '.join(fields)}; presets: {', '.join(g + '=' for g in conf_groups)}"
            )
        section = parts[0]
        if section not in fields:
            continue
        allowed = fields[section]
        if parts[1] not in allowed:  # worded as the section's own validation words it
            if section == "graph":
                raise ConfigError(f"graph has unknown keys {[parts[1]]}; allowed: {', '.join(sorted(allowed))}")
            raise ConfigError(f"{section}: unknown key(s) {parts[1]}; allowed: {', '.join(allowed)}")
        if section == "graph" and parts[1] == "nodes" and len(parts) >= 4:
            node_keys = [f.name for f in dataclasses.fields(NodeSpec)]
            if parts[3] not in node_keys:
                raise ConfigError(f"graph.nodes[{parts[2]}] has unknown keys {[parts[3]]}; allowed: {', '.join(node_keys)}")


# --- docs/configuration.md --------------------------------------------------------------------

def _yaml_value(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _rows_of(klass: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    docs = field_docs(klass)
    return [(prefix + f.name, _yaml_value(_default(f)), docs.get(f.name, "")) for f in dataclasses.fields(klass) if f.name not in skip]


def _preset_keys() -> dict[str, dict[str, list[str]]]:
    """section -> {"group=preset": keys of that section the preset sets}, for the presets
    that set keys outside their own group's section (``# @package _global_``)."""
    out: dict[str, dict[str, list[str]]] = {}
    for group in groups():
        for name in presets(group):
            path = next(p for p in (CONF / group).iterdir() if p.stem == name and p.suffix in (".yaml", ".yml"))
            text = path.read_text()
            if "@package _global_" not in text:
                continue
            data = yaml.safe_load(text) or {}
            for section, values in data.items():
                if section in ("defaults", "hydra", group) or not isinstance(values, dict):
                    continue
                out.setdefault(section, {})[f"{group}={name}"] = list(values)
    return out


def _markdown_text(doc: str) -> str:
    """A docstring as the text of a table cell: ``<run_dir>`` outside code spans would be read
    as an HTML tag, ``|`` as a cell's end."""
    parts = re.split(r"(`+[^`]+`+)", doc)
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;") for p in parts).replace("|", "\\|")


def _table(rows: list[tuple[str, str, str]], prefix: str) -> list[str]:
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for name, default, doc in rows:
        lines.append(f"| `{prefix}{name}` | `{default}` | {_markdown_text(doc)} |")
    return lines


def _set_by(section: str, preset_keys: dict[str, dict[str, list[str]]]) -> list[str]:
    by: dict[tuple[str, ...], list[str]] = {}
    for preset, keys in preset_keys.get(section, {}).items():
        by.setdefault(tuple(keys), []).append(f"`{preset}`")
    if not by:
        return []
    parts = [f"{', '.join(who)} ({', '.join(keys)})" for keys, who in by.items()]
    return ["", "Presets that set some of these: " + "; ".join(parts) + "."]


def reference_markdown() -> str:
    """The text of ``docs/configuration.md``."""
    config = yaml.safe_load((CONF / "config.yaml").read_text())
    chosen = {k: v for item in config.get("defaults", []) if isinstance(item, dict) for k, v in item.items()}
    preset_keys = _preset_keys()
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the dataclasses' field docstrings (actors/config.py, actors/graph.py,",
        "coordinator/search_space.py) by `python -m coordinator.hydra_conf --write`; tests/test_config.py",
        "checks that it is current. Edit the docstrings, not this file. -->",
        "",
        "Every option is set on the command line as `name=value` or `section.name=value`",
        "(`seed=1 train.epochs=5 optim.lr=0.1`); `python launch.py --cfg job ...` prints the config a",
        "command composes. A run's config is composed in this order, later wins: the defaults of the",
        "top-level options and of `train` (below; the dataclasses of `actors/config.py`, nothing in",
        "`conf/` restates them), `conf/config.yaml`, the presets chosen for each config group, the",
        "command line. The sections `dataset`, `graph`, `optim`, `logger` and `search` come from their",
        "group's preset; the default column there is the value of a key the preset leaves out. Every",
        "value is validated before training starts (`actors/config.py`): a bad one ends the command",
        "with one `error:` line naming the option and what it accepts, exit code 2.",
        "",
        "## Config groups (presets, `conf/<group>/<name>.yaml`)",
        "",
        "| group | presets | default |",
        "|---|---|---|",
    ]
    for group in groups():
        default = chosen.get(group)
        extra = ", or a graph `.yaml` file" if group == "graph" else ""
        out.append(f"| `{group}=` | {', '.join(f'`{p}`' for p in presets(group))}{extra} | "
                   f"{'`' + str(default) + '`' if default is not None else 'none'} |")
    top = [("mode", MODES[0], MODE_DOC)] + _rows_of(RunConfig, skip=("graph", *SECTIONS))
    out += ["", "## Top level", ""] + _table(top, "")
    intros = {
        "train": "How the nodes train; the defaults below apply unless a preset or the command line sets a key.",
        "dataset": "The data (`dataset=<preset>`).",
        "optim": "SGD and its learning-rate schedule (`optim=<preset>`).",
        "logger": "wandb (`logger=<preset>`); `metrics.jsonl` and `summary.json` are written either way.",
    }
    for section, klass in SECTIONS.items():
        out += ["", f"## `{section}`", "", intros.get(section, "")] + _set_by(section, preset_keys) + [""]
        out += _table(_rows_of(klass), f"{section}.")
    out += ["", "## `graph`", "", "The knowledge transfer graph (`graph=<preset>` or `graph=<file>.yaml`); "
            "see the README, \"The graph\"."] + _set_by("graph", preset_keys) + [""]
    out += _table(_rows_of(GraphSpec) + _rows_of(NodeSpec, "nodes.<i>."), "graph.")
    out += ["", "## `search`", "", "The graph search of `mode=search` (`search=<preset>`)."]
    out += _set_by("search", preset_keys) + [""] + _table(_rows_of(SearchConfig), "search.")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = reference_markdown()
    if argv == ["--write"]:
        DOCS.write_text(text)
        print(f"wrote {DOCS.relative_to(ROOT)}")
        return 0
    if argv == ["--check"]:
        if DOCS.is_file() and DOCS.read_text() == text:
            return 0
        print(f"{DOCS.relative_to(ROOT)} is out of date: python -m coordinator.hydra_conf --write", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
