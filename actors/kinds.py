"""Edge kinds: what knowledge an edge carries.

Beside the M x M gate matrix a graph has an optional M x M matrix of edge kinds,
``graph.kinds[t][s]`` for the edge ``s -> t``; each entry is one kind or several (a list,
or one string joined by ``+``: ``kl+rkd_distance``), summed, each through the edge's gate.
Left out, every cross edge is ``graph.loss`` (``kl``) and every diagonal entry ``ce``: what
every graph meant before edges had kinds.

=============  ========  ===================================================================
kind           where     knowledge (what crosses processes for it)
=============  ========  ===================================================================
ce             diagonal  the labels: cross-entropy (nothing)
self           diagonal  self-distillation (CTSL-MKT): T^2 KL from the predictions of the
                         node's own stage-1 copy (``nodes[t].self_checkpoint``, frozen, in
                         the node's process) on the same batch (nothing)
kl             cross     the source's output distribution, T^2 KL (its logits, B x C)
rkd_distance   cross     distance-wise relations of the batch (RKD; its embedding, B x D)
rkd_angle      cross     angle-wise relations of the batch (RKD; its embedding, B x D)
mhgd           cross     the attention graph of a frozen source's features (MHGD; its
                         SVD-compressed features, from frozen sources only)
=============  ========  ===================================================================

Kinds are a property of the graph, so validation (``parse_kinds``) runs with the graph's
and before any process starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from actors.errors import ConfigError


@dataclass(frozen=True)
class EdgeKind:
    name: str
    diagonal: bool
    """True: a kind of the diagonal (the node's own edge); False: of a cross edge s -> t."""
    needs: Optional[str]
    """What the source must send for it: ``logits``, ``embedding``, ``features`` or None."""
    weight: float
    """Default weight (``graph.kind_weights`` overrides)."""


KINDS: dict[str, EdgeKind] = {k.name: k for k in (
    EdgeKind("ce", True, None, 1.0),
    EdgeKind("self", True, None, 1.0),
    EdgeKind("kl", False, "logits", 1.0),
    # RKD's base weights (lambda_D = 1, lambda_A = 2: the RKD paper's formulation and its code's
    # defaults). Its CIFAR-100 teacher -> student setting, 25 and 50, destabilises peers that
    # learn each other's relations from scratch (docs/edge-kinds.md, measured): set it with
    # graph.kind_weights when a frozen teacher feeds the relation edges.
    EdgeKind("rkd_distance", False, "embedding", 1.0),
    EdgeKind("rkd_angle", False, "embedding", 2.0),
    EdgeKind("mhgd", False, "features", 1.0),
)}

DIAGONAL_KINDS = tuple(k for k, v in KINDS.items() if v.diagonal)
CROSS_KINDS = tuple(k for k, v in KINDS.items() if not v.diagonal)
#: the kinds a search may put on cross edges (``search.edge_kinds``): mhgd needs a frozen
#: source and its trained attention module, which a searched graph does not have
SEARCHABLE_KINDS = ("kl", "rkd_distance", "rkd_angle")


def parse_entry(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        names = [v.strip() for v in value.split("+")]
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise ConfigError(f"{where} must be a kind name, a list of them, or names joined by '+'; got {value!r}")
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise ConfigError(f"{where} must name at least one kind; got {value!r}; known: {', '.join(KINDS)}")
    for n in names:
        if n not in KINDS:
            raise ConfigError(f"{where}: unknown edge kind {n!r}; known: {', '.join(KINDS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} names a kind twice: {value!r}")
    return tuple(sorted(names, key=list(KINDS).index))


def default_kinds(m: int, cross: str = "kl") -> list[list[tuple[str, ...]]]:
    return [[("ce",) if s == t else (cross,) for s in range(m)] for t in range(m)]


def parse_kinds(value: Any, m: int, cross: str = "kl") -> list[list[tuple[str, ...]]]:
    """``graph.kinds`` as an M x M matrix of kind tuples, validated. ``value``: None (the
    default), one entry for every cross edge (a string: ``kl+rkd_angle``), or the matrix."""
    if value is None:
        return default_kinds(m, cross)
    if isinstance(value, str):
        every = parse_entry(value, "graph.kinds")
        diag = [k for k in every if KINDS[k].diagonal]
        if diag:
            raise ConfigError(f"graph.kinds={value!r}: one entry stands for every cross edge, so it may hold only "
                              f"the cross-edge kinds {', '.join(CROSS_KINDS)}; put {', '.join(diag)} on the diagonal "
                              "of a kinds matrix")
        return [[("ce",) if s == t else every for s in range(m)] for t in range(m)]
    if not isinstance(value, (list, tuple)) or len(value) != m or any(
            not isinstance(row, (list, tuple)) or len(row) != m for row in value):
        shape = [len(r) if isinstance(r, (list, tuple)) else r for r in value] if isinstance(value, (list, tuple)) else value
        raise ConfigError(f"graph.kinds must be a {m}x{m} matrix like graph.gates (row = receiving node, column = "
                          f"sending node), or one entry for every cross edge; got rows {shape}")
    out = []
    for t, row in enumerate(value):
        parsed = []
        for s, entry in enumerate(row):
            where = f"graph.kinds[{t}][{s}] (edge {s} -> {t})" if s != t else f"graph.kinds[{t}][{t}] (node {t}'s own edge)"
            kinds = parse_entry(entry, where)
            allowed = DIAGONAL_KINDS if s == t else CROSS_KINDS
            wrong = [k for k in kinds if k not in allowed]
            if wrong:
                place = "the diagonal (a node's own edge)" if s == t else "a cross edge"
                raise ConfigError(f"{where}: {', '.join(wrong)} cannot be on {place}; allowed there: {', '.join(allowed)}")
            parsed.append(kinds)
        out.append(parsed)
    return out


def parse_kind_weights(value: Any) -> dict[str, float]:
    """``graph.kind_weights``: overrides of the kinds' default weights."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"graph.kind_weights must be a mapping kind -> weight; got {value!r}")
    out = {}
    for k, w in value.items():
        if k not in KINDS:
            raise ConfigError(f"graph.kind_weights: unknown edge kind {k!r}; known: {', '.join(KINDS)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ConfigError(f"graph.kind_weights.{k} must be a number >= 0; got {w!r}")
        out[k] = float(w)
    return out


def format_entry(kinds: tuple[str, ...]) -> str:
    return "+".join(kinds)


#: ``graph.mhgd``'s options and their defaults (MHGD's values)
MHGD_DEFAULTS = {"clip": True, "attention_epochs": 40, "attention_lr": 0.1}


def parse_mhgd(value: Any) -> Optional[dict[str, Any]]:
    """``graph.mhgd``: the options set (null when none is)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"graph.mhgd must be a mapping with keys {', '.join(MHGD_DEFAULTS)}; got {value!r}")
    unknown = set(value) - set(MHGD_DEFAULTS)
    if unknown:
        raise ConfigError(f"graph.mhgd has unknown keys {sorted(unknown)}; allowed: {', '.join(MHGD_DEFAULTS)}")
    out = dict(value)
    if "clip" in out and not isinstance(out["clip"], bool):
        raise ConfigError(f"graph.mhgd.clip must be true or false; got {out['clip']!r}")
    e = out.get("attention_epochs", 1)
    if isinstance(e, bool) or not isinstance(e, int) or e < 1:
        raise ConfigError(f"graph.mhgd.attention_epochs must be an integer >= 1; got {e!r}")
    lr = out.get("attention_lr", 1.0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"graph.mhgd.attention_lr must be a number > 0; got {lr!r}")
    return out or None
