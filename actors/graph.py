"""The knowledge transfer graph: nodes, the M x M gate matrix, and its validation.

``gates[t][s]`` is the gate of the edge ``s -> t``: rows are the *receiving* node,
columns the *sending* node (the layout of the tables in the paper and in docs/method.md).
The diagonal ``gates[t][t]`` is the label edge: node t learns from the ground truth.
A node whose whole row is Cutoff learns from nothing: it is a *frozen teacher*, loaded
from a checkpoint and never updated; ``frozen_bn`` says whether its BatchNorm layers use
their stored statistics (``eval``, the default) or each batch's, letting the stored ones
drift (``train``, what both reference codes do). Node 0 is the target whose accuracy is reported and
searched for; it may not be frozen.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from actors.edge_kinds import MHGD_DEFAULTS, parse_mhgd
from actors.errors import ConfigError
from actors.gates import GATE_CLOCKS, GATES, is_cutoff
from actors.kinds import check_kinds, default_kinds, format_entry, kind_of, parse_default_cross, parse_kind_weights, parse_kinds
from actors.models import MODELS

REDUCTIONS = ("sum", "mean")
FROZEN_BN = ("eval", "train")


@dataclass
class NodeSpec:
    """One graph node."""

    model: str
    """Zoo name of the network (see ``actors.models.MODELS``)."""
    checkpoint: Optional[str] = None
    """Weights to start from; required for a frozen node (all incoming gates Cutoff)."""
    self_checkpoint: Optional[str] = None
    """The node's own stage-1 weights (the same model trained alone, e.g. ``graph=teacher``):
    the frozen self-teacher of a ``self`` kind on its diagonal (CTSL-MKT)."""
    attention: Optional[str] = None
    """Of a frozen node that feeds ``mhgd`` edges: its trained attention module (written by
    ``python launch.py mode=attention``; docs/edge-kinds.md)."""


@dataclass
class GraphSpec:
    """A knowledge transfer graph; validated on construction."""

    nodes: list[NodeSpec]
    """The nodes, node 0 the target: each ``{model: <zoo name>, checkpoint: <path or null>}``;
    or ``{model: <zoo name>, count: M}`` for M nodes of one model (``graph.nodes.count=32``)."""
    gates: list[list[str]]
    """``gates[t][s]``: gate of edge s -> t (row = receiver); the diagonal is the label edge.
    One gate name stands for every edge (``Through``: deep mutual learning over all nodes)."""
    name: str = "graph"
    """The graph's name, used in the run directory's name and the wandb run's."""
    temperature: float = 1.0
    """Softmax temperature T of the KL edges (loss is multiplied by T^2)."""
    loss: str = "kl"
    """The kind of every cross edge when ``kinds`` is null: ``kl`` (the paper), or any other
    cross-edge kind (``actors.kinds``; docs/edge-kinds.md)."""
    reduction: str = "sum"
    """How a node combines its incoming edges: ``sum`` (DCL, and the reimplementation's
    code that produced its published number) or ``mean`` (label edge plus the mean of the
    non-Cutoff cross edges, as the reimplementation's 2024 commits)."""
    frozen_bn: str = "eval"
    """BatchNorm mode of frozen nodes: ``eval`` (running statistics of the checkpoint, never
    changed) or ``train`` (batch statistics; the running statistics drift with the batches
    and are part of the node's checkpoint; as DCL and the reimplementation ran teachers).
    Either way a frozen node gets no gradient and is never stepped."""
    progress: str = "iteration"
    """How Linear/NegativeLinear count training progress: ``iteration`` (k / k_end, k the
    1-based global iteration; DCL) or ``epoch`` (e / (E - 1), e the 0-based epoch; the
    reimplementation). See ``actors.gates.gate_clock``."""
    skip_zero_loss: bool = False
    """Skip a node's optimiser step (no weight decay, no momentum) when its whole loss is
    exactly 0, as both reference codes do; the learning-rate schedule still advances."""
    self_temperature: Optional[float] = None
    """Softmax temperature of ``self`` kinds (self-distillation; loss times T^2); null: ``temperature``."""
    mhgd: Any = None
    """Options of ``mhgd`` edges: ``{clip: true, attention_epochs: 40, attention_lr: 0.1}``
    (clip: bound each parameter's mhgd gradient by its task gradient's norm, as MHGD;
    attention_*: stage 1, ``mode=attention``); null or a key left out: those defaults."""
    kinds: Any = None
    """What each edge carries, an M x M matrix beside ``gates`` (``kinds[t][s]`` for s -> t):
    ``kl``, ``rkd_distance``, ``rkd_angle``, ``mhgd`` on cross edges, ``ce``, ``self`` on the
    diagonal; several kinds on one edge as a list or joined by ``+`` (``kl+rkd_angle``), each
    through the edge's gate. One string stands for every cross edge. null: ``loss`` on every
    cross edge and ``ce`` on the diagonal (docs/edge-kinds.md)."""
    kind_weights: Any = None
    """Weights of the kinds' losses, e.g. ``{rkd_distance: 25, rkd_angle: 50}``; null or a
    kind left out: the kind's default (rkd_distance 1, rkd_angle 2, every other kind 1;
    docs/edge-kinds.md)."""

    def __post_init__(self) -> None:
        self._expand_shorthands()
        self.nodes = [self._parse_node(i, n) for i, n in enumerate(self.nodes)]
        self._check_gates()
        self._check_options()
        m = len(self.nodes)
        self.mhgd = parse_mhgd(self.mhgd)
        self.loss = parse_default_cross(self.loss)
        kinds = parse_kinds(self.kinds, m, self.loss)
        # stored as null when every edge carries what it carried before edges had kinds, so
        # existing graphs (and their run directories' configs) read exactly as before
        self.kinds = None if kinds == default_kinds(m, self.loss) else [[list(e) for e in row] for row in kinds]
        self.kind_weights = parse_kind_weights(self.kind_weights) or None
        check_kinds(self)
        if self.is_frozen(0):
            raise ConfigError(
                "graph.gates[0]: the target node 0 has every incoming edge Cutoff (it would be a frozen "
                "teacher); the target must learn from at least one edge"
            )
        for i, n in enumerate(self.nodes):
            if self.is_frozen(i) and not n.checkpoint:
                raise ConfigError(
                    f"graph.nodes[{i}] ({n.model}) is frozen (every gate in graph.gates[{i}] is Cutoff) "
                    f"and so needs graph.nodes[{i}].checkpoint: a pretrained model (see README, 'Teachers')"
                )

    def _expand_shorthands(self) -> None:
        """Shorthands for large graphs: nodes {model: m, count: M} (M nodes of model m), and one
        gate name for every edge, label edges included (gates: Through is DML over M nodes)."""
        if isinstance(self.nodes, dict) and "count" in self.nodes:
            count = self.nodes["count"]
            unknown = set(self.nodes) - {"model", "count"}
            if unknown or "model" not in self.nodes:
                raise ConfigError(f"graph.nodes as {{model: <name>, count: <M>}} takes exactly those keys; got {sorted(self.nodes)}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ConfigError(f"graph.nodes.count must be an integer >= 1; got {count!r}")
            self.nodes = [{"model": self.nodes["model"]} for _ in range(count)]
        if isinstance(self.gates, str) and isinstance(self.nodes, list):
            self.gates = [[self.gates] * len(self.nodes) for _ in self.nodes]
        if not isinstance(self.nodes, list) or not self.nodes:
            raise ConfigError("graph.nodes must be a non-empty list of {model: <name>, checkpoint: <path or null>}, "
                              "or {model: <name>, count: <M>}")

    @staticmethod
    def _parse_node(i: int, n: Any) -> NodeSpec:
        if not isinstance(n, NodeSpec):
            if isinstance(n, str):
                n = {"model": n}
            if not isinstance(n, dict) or "model" not in n:
                raise ConfigError(f"graph.nodes[{i}] must be a mapping with a 'model' key, got {n!r}")
            keys = ("model", "checkpoint", "self_checkpoint", "attention")
            unknown = set(n) - set(keys)
            if unknown:
                raise ConfigError(f"graph.nodes[{i}] has unknown keys {sorted(unknown)}; allowed: {', '.join(keys)}")
            n = NodeSpec(**{k: n.get(k) for k in keys})
        if n.model not in MODELS:
            raise ConfigError(f"graph.nodes[{i}].model: unknown model {n.model!r}; known: {', '.join(MODELS.names())}")
        n.model = MODELS.canonical(n.model)
        return n

    def _check_gates(self) -> None:
        m = len(self.nodes)
        if (
            not isinstance(self.gates, list)
            or len(self.gates) != m
            or any(not isinstance(row, list) or len(row) != m for row in self.gates)
        ):
            shape = [len(r) if isinstance(r, list) else r for r in self.gates] if isinstance(self.gates, list) else self.gates
            raise ConfigError(
                f"graph.gates must be a {m}x{m} matrix (one row per receiving node, one column per "
                f"sending node, label edge on the diagonal) for {m} nodes; got rows {shape}"
            )
        for t, row in enumerate(self.gates):
            for s, g in enumerate(row):
                if g not in GATES:
                    raise ConfigError(
                        f"graph.gates[{t}][{s}] (edge {s} -> {t}): unknown gate {g!r}; known: {', '.join(GATES.names())}"
                    )
        self.gates = [[GATES.canonical(g) for g in row] for row in self.gates]

    def _check_options(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"graph.reduction must be one of {', '.join(REDUCTIONS)}; got {self.reduction!r}")
        if self.frozen_bn not in FROZEN_BN:
            raise ConfigError(f"graph.frozen_bn must be one of {', '.join(FROZEN_BN)}; got {self.frozen_bn!r}")
        if self.progress not in GATE_CLOCKS:
            raise ConfigError(f"graph.progress must be one of {', '.join(GATE_CLOCKS)}; got {self.progress!r}")
        if not isinstance(self.skip_zero_loss, bool):
            raise ConfigError(f"graph.skip_zero_loss must be true or false; got {self.skip_zero_loss!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ConfigError(f"graph.temperature must be a number > 0; got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if self.self_temperature is not None:
            if isinstance(self.self_temperature, bool) or not isinstance(self.self_temperature, (int, float)) \
                    or not self.self_temperature > 0:
                raise ConfigError(f"graph.self_temperature must be a number > 0 or null; got {self.self_temperature!r}")
            self.self_temperature = float(self.self_temperature)

    def _default_entry(self, t: int, s: int) -> tuple[str, ...]:
        """What the edge s -> t carries in a graph without kinds."""
        return ("ce",) if s == t else (self.loss,)

    def edge_kinds(self, t: int, s: int) -> tuple[str, ...]:
        """The kinds of the edge s -> t (``ce`` ... on the diagonal)."""
        return self._default_entry(t, s) if self.kinds is None else tuple(self.kinds[t][s])

    def mhgd_option(self, key: str) -> Any:
        return {**MHGD_DEFAULTS, **(self.mhgd or {})}[key]

    def kind_weight(self, kind: str) -> float:
        cls = kind_of(kind)
        return (self.kind_weights or {}).get(cls.name, cls.weight)

    def live_kinds(self) -> list[str]:
        """The kinds on some live edge (gate not Cutoff), each once, as the graph names them."""
        seen: dict[str, None] = {}
        for t in range(self.num_nodes):
            for s, _ in self.incoming(t):
                seen.update(dict.fromkeys(self.edge_kinds(t, s)))
        return list(seen)

    def senders(self, need: str) -> list[int]:
        """The nodes that send ``need`` (a ``Sendable``: ``embedding``, ``features``...) at every
        step: some live edge out of them has a kind that ``sends`` it."""
        return sorted({s for t in range(self.num_nodes) for s, _ in self.incoming(t)
                       if s != t and any(kind_of(k).sends == need for k in self.edge_kinds(t, s))})

    def receivers(self, need: str) -> list[int]:
        """The nodes with a live incoming edge whose kind uses the source's ``need``."""
        return sorted({t for t in range(self.num_nodes) for s, _ in self.incoming(t)
                       if s != t and any(kind_of(k).sends == need for k in self.edge_kinds(t, s))})

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def is_frozen(self, t: int) -> bool:
        """A node with every incoming edge (label edge included) Cutoff never learns."""
        return all(is_cutoff(g) for g in self.gates[t])

    def incoming(self, t: int) -> list[tuple[int, str]]:
        """The non-Cutoff edges into node t, as (source index, gate name); s == t is the label edge."""
        return [(s, g) for s, g in enumerate(self.gates[t]) if not is_cutoff(g)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"graph must be a mapping, got {type(data).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"graph has unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
        for key in ("nodes", "gates"):
            if key not in data:
                raise ConfigError(f"graph.{key} is missing")
        return cls(**data)

    def resolve_paths(self, base: str | os.PathLike) -> None:
        """Make checkpoint paths absolute (relative ones are relative to ``base``)."""
        for n in self.nodes:
            for key in ("checkpoint", "self_checkpoint", "attention"):
                path = getattr(n, key)
                if path and not os.path.isabs(path):
                    setattr(n, key, str(Path(base) / path))

    def describe(self) -> str:
        """A readable one-screen picture of the graph."""
        head = f"graph {self.name!r}: {self.num_nodes} nodes, T={self.temperature:g}, reduction={self.reduction}"
        if self.progress != "iteration":
            head += f", progress={self.progress}"
        if any(self.is_frozen(t) for t in range(self.num_nodes)):
            head += f", frozen_bn={self.frozen_bn}"
        if self.skip_zero_loss:
            head += ", skip_zero_loss"
        lines = [head]
        if self.num_nodes > 8 and self.kinds is None and all(len({g for g in row}) == 1 for row in self.gates) \
                and len({row[0] for row in self.gates}) == 1:
            models = {}
            for n in self.nodes:
                models[n.model] = models.get(n.model, 0) + 1
            lines.append(f"  nodes: {', '.join(f'{c} x {m}' for m, c in models.items())}; every edge {self.gates[0][0]}")
            return "\n".join(lines)
        for t, n in enumerate(self.nodes):
            role = "target" if t == 0 else ("frozen" if self.is_frozen(t) else "")
            inc = ", ".join(f"{'label' if s == t else s}:{g}{self._kind_note(t, s)}" for s, g in self.incoming(t)) or "nothing"
            lines.append(f"  node {t} {n.model:<9} {role:<6} learns from {inc}")
        return "\n".join(lines)

    def _kind_note(self, t: int, s: int) -> str:
        kinds = self.edge_kinds(t, s)
        return "" if kinds == self._default_entry(t, s) else f"[{format_entry(kinds)}]"
