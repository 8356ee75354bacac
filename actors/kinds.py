"""Edge kinds: what knowledge an edge carries, each kind one registered object.

Beside the M x M gate matrix a graph has an optional M x M matrix of edge kinds,
``graph.kinds[t][s]`` for the edge ``s -> t``; each entry is one kind or several (a list,
or one string joined by ``+``: ``kl+rkd_distance``), summed, each through the edge's gate.
Left out, every cross edge is ``graph.loss`` (``kl``: the default cross kind) and every
diagonal entry ``ce``: what every graph meant before edges had kinds.

A kind is a subclass of ``EdgeKind`` registered in ``KINDS`` (``@register_kind``). It
*declares* what the rest of the trainer needs to know, and nothing else names it:

* where it may sit (``diagonal``; ``frozen_sources_only``) and whether a search may put it
  on an edge (``searchable``); its default weight (``weight``); its label in pictures
  (``short``);
* what it needs: ``sends``, the tensor the *source* sends across processes for it (a
  ``Sendable``: ``logits`` always cross; ``embedding``, ``features``...), and ``uses``, what
  the *receiver's* own forward must return for it (``embedding``, ``maps``);
* ``per_sample``: its loss is one value per sample (``[S, B]``, reduced by the gate), or one
  number per edge (``[S]``: relations of the batch; the Correct gate's mask reaches it as
  ``keep``, a time gate scales the number);
* its checks, run before any process starts (``check_edge``, ``check_graph``,
  ``check_data``);
* in the receiving node's process, one instance per node for all the node's incoming edges
  of the kind: ``own(x)`` (what it adds to the node's forward, e.g. a stage-1 copy's
  logits) and ``loss(batch)`` for all those edges at once (``EdgeBatch``).

The built-in kinds are in ``actors.edge_kinds`` (the table there). A kind from outside this
repository is named by its import path in ``graph.kinds`` (``my_pkg.kinds:L2Kind``): it is
imported, in every process, the first time a graph names it (docs/edge-kinds.md, 'Adding a
kind').

Kinds are a property of the graph, so validation (``parse_kinds``) runs with the graph's
and before any process starts.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch

from actors.errors import ConfigError
from actors.registry import Registry

if TYPE_CHECKING:
    from actors.data import Dataset
    from actors.graph import GraphSpec


# --- what crosses processes ------------------------------------------------------------------


@dataclass(frozen=True)
class Sendable:
    """A tensor a node sends at every step for the kinds of its outgoing edges: ``[B, width]``
    per node, padded to the widest sender's in the one all-gather."""

    name: str
    made_from: Optional[str]
    """The forward output it is made from (``embedding``, ``maps``), None for the logits."""
    width: Callable[[str, int, int], int]
    """Its per-sample width for a node of model ``(name, num_classes, in_channels)``."""
    derive: Optional[Callable[[dict[str, Any]], torch.Tensor]] = None
    """How it is made from the node's outputs (None: it is the output ``name`` itself)."""


SENDABLES: Registry[Sendable] = Registry("sent tensor")


def register_sendable(sendable: Sendable) -> Sendable:
    SENDABLES.register(sendable.name)(sendable)
    return sendable


# --- what a kind's loss sees -------------------------------------------------------------------


@dataclass
class Receiver:
    """What a kind's instance may know of the node it computes for (built once per node)."""

    index: int
    graph: "GraphSpec"
    model: str
    num_classes: int
    in_channels: int
    device: torch.device
    channels_last: bool = False
    autocast: Callable[[], Any] = field(default=lambda: torch.autocast("cpu", enabled=False))


@dataclass
class EdgeBatch:
    """One step's inputs of a kind's loss, for all the node's incoming edges of the kind."""

    own: dict[str, torch.Tensor]
    """The receiver's forward outputs (with gradient): ``logits`` [B, C] and what its kinds use."""
    labels: torch.Tensor
    source_logits: Optional[torch.Tensor]
    """Every source's detached logits ``[S, B, C]``; None on the diagonal."""
    sent: list[torch.Tensor] = field(default_factory=list)
    """Per source, what it sent for the kind (``sends``; empty for none or the logits)."""
    keep: list[Optional[torch.Tensor]] = field(default_factory=list)
    """Per edge, the Correct gate's ``[B]`` 0/1 mask, None for other gates (kinds with
    ``per_sample = False`` only)."""


class EdgeKind:
    """What one kind of knowledge is; see the module docstring. Subclass, set the class
    attributes, write ``loss`` (and ``own``/checks where needed), and ``@register_kind``."""

    name: ClassVar[str] = ""
    diagonal: ClassVar[bool] = False
    """True: a kind of the diagonal (the node's own edge); False: of a cross edge s -> t."""
    frozen_sources_only: ClassVar[bool] = False
    """Only from a frozen node (every incoming gate Cutoff)."""
    sends: ClassVar[Optional[str]] = None
    """What the source must send for it (a ``SENDABLES`` name), None for nothing."""
    uses: ClassVar[tuple[str, ...]] = ()
    """What the receiver's own forward must return for it besides its logits: ``embedding``, ``maps``."""
    per_sample: ClassVar[bool] = True
    weight: ClassVar[float] = 1.0
    """Default weight (``graph.kind_weights`` overrides)."""
    searchable: ClassVar[bool] = False
    """May ``search.edge_kinds`` put it on cross edges?"""
    short: ClassVar[str] = ""
    """Its label on drawn edges."""
    knowledge: ClassVar[str] = "the knowledge"
    """What it transfers, in words (errors say it)."""

    # --- checks, before any process starts (class methods: no node is built) ---

    @classmethod
    def check_edge(cls, graph: "GraphSpec", t: int, s: int, where: str) -> None:
        """Refuse this kind on the edge ``s -> t`` (``where`` names the field), beyond placement."""

    @classmethod
    def check_graph(cls, graph: "GraphSpec") -> None:
        """Graph-wide checks; run for every registered kind, used or not (e.g. a node field only it reads)."""

    @classmethod
    def check_data(cls, graph: "GraphSpec", data: "Dataset", trained: bool = True) -> None:
        """Checks that need the dataset or files (preflight), for a kind on some live edge.
        ``trained``: the kind's stage-1 outputs must exist already (False: they are being made)."""

    # --- in the receiving node's process ---

    def __init__(self, receiver: Receiver, sources: list[int]):
        self.receiver, self.sources = receiver, list(sources)

    def own(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the kind adds to the receiver's forward outputs at a step (no gradient)."""
        return {}

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        """``[S, B]`` per-sample losses (``per_sample``) or ``[S]``, one per edge, ungated,
        unweighted, in the order of ``self.sources``."""
        raise NotImplementedError

    def apart(self) -> bool:
        """Does its gated loss enter the update apart from the rest (``backward``)?"""
        return False

    def backward(self, params: list[torch.nn.Parameter], task: torch.Tensor, apart: torch.Tensor,
                 epoch: int) -> None:
        """With ``apart``: set ``p.grad`` from the task loss and this kind's loss."""
        raise NotImplementedError


KINDS: Registry[type[EdgeKind]] = Registry("edge kind")
_ORDER: list[str] = []  # registration order (the built-ins' order is that of their module)
BUILTIN_MODULE = "actors.edge_kinds"


def builtin_kinds() -> tuple[str, ...]:
    """The built-in kinds (``actors.edge_kinds``), in the order of a multi-kind edge's sum; any
    other kind comes after them, by its import path: the same order in every process, whatever
    it imported before."""
    return tuple(n for n in _ORDER if KINDS.get(n).__module__ == BUILTIN_MODULE)

MODEL_OUTPUTS = ("embedding", "maps")
"""What a node's forward can return besides its logits (``EdgeKind.uses``, ``Sendable.made_from``)."""


def register_kind(cls: type[EdgeKind]) -> type[EdgeKind]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    wrong = [u for u in cls.uses if u not in MODEL_OUTPUTS]
    if wrong:
        raise ConfigError(f"edge kind {cls.name}: uses {wrong}, which a node's forward does not return; it can "
                          f"return {', '.join(MODEL_OUTPUTS)} besides its logits (own() adds anything else)")
    if cls.sends is not None and cls.sends not in SENDABLES:
        raise ConfigError(f"edge kind {cls.name}: sends {cls.sends!r}, which is no registered Sendable; registered: "
                          f"{', '.join(SENDABLES.names())} (register_sendable registers another)")
    KINDS.register(cls.name)(cls)
    _ORDER.append(cls.name)
    return cls


def kind_of(name: str) -> type[EdgeKind]:
    """The kind registered as ``name``, or named by an import path ``package.module:Class``
    (imported and registered on first use, in whichever process asks)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"edge kind {name!r}: cannot import {attr} from {module} ({type(e).__name__}: {e})") from e
        if not (isinstance(cls, type) and issubclass(cls, EdgeKind)) or not cls.name:
            raise ConfigError(f"edge kind {name!r} is not a named EdgeKind subclass (actors.kinds.EdgeKind)")
        if cls.name not in KINDS:
            register_kind(cls)
        elif KINDS.get(cls.name) is not cls:
            raise ConfigError(f"edge kind {name!r} is named {cls.name!r}, which is already another kind's name")
        return cls
    return KINDS.get(name)


def kind_path(cls: type[EdgeKind]) -> str:
    """The import path of a kind's class, ``package.module:Class``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def canonical_kind(name: str) -> str:
    """How a graph stores a kind: a built-in by its name, any other kind by its import path
    (which a spawned process or a Ray actor imports; a bare name registered by an import
    would be unknown there)."""
    cls = kind_of(name)
    if cls.name in builtin_kinds():
        return cls.name
    path = kind_path(cls)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ConfigError(f"edge kind {name!r} is {path}: define it at the top level of an importable module, "
                          "so that every node process can import it by its path")
    return path


def cross_kinds() -> tuple[str, ...]:
    """The built-in kinds of cross edges (any other kind is named by its import path)."""
    return tuple(k for k in builtin_kinds() if not KINDS.get(k).diagonal)


def diagonal_kinds() -> tuple[str, ...]:
    return tuple(k for k in builtin_kinds() if KINDS.get(k).diagonal)


def searchable_kinds() -> tuple[str, ...]:
    """The built-in kinds a search may put on cross edges (``search.edge_kinds``; any other kind
    with ``searchable = True``, by its import path)."""
    return tuple(k for k in builtin_kinds() if KINDS.get(k).searchable)


# --- parsing graph.kinds ------------------------------------------------------------------------


def _known() -> str:
    return ", ".join(builtin_kinds()) + ", or an import path package.module:Class"


def order_key(name: str) -> tuple[int, str]:
    """Sort key of kind names: the built-ins in their order, then any other kind by its import
    path (never by what a process happened to register first)."""
    cls = kind_of(name)
    builtins = builtin_kinds()
    return (builtins.index(cls.name), "") if cls.name in builtins else (len(builtins), kind_path(cls))


def parse_entry(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        names = [v.strip() for v in value.split("+")]
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise ConfigError(f"{where} must be a kind name, a list of them, or names joined by '+'; got {value!r}")
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise ConfigError(f"{where} must name at least one kind; got {value!r}; known: {_known()}")
    for n in names:
        if ":" not in n and n not in KINDS:
            raise ConfigError(f"{where}: unknown edge kind {n!r}; known: {_known()}")
        try:
            kind_of(n)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
    try:
        canonical = [canonical_kind(n) for n in names]
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    if len({kind_of(n).name for n in canonical}) != len(canonical):
        raise ConfigError(f"{where} names a kind twice: {value!r}")
    return tuple(sorted(canonical, key=order_key))


def default_kinds(m: int, cross: str = "kl") -> list[list[tuple[str, ...]]]:
    return [[("ce",) if s == t else (cross,) for s in range(m)] for t in range(m)]


def _check_place(kinds: tuple[str, ...], diagonal: bool, where: str) -> None:
    wrong = [k for k in kinds if kind_of(k).diagonal != diagonal]
    if wrong:
        place = "the diagonal (a node's own edge)" if diagonal else "a cross edge"
        allowed = diagonal_kinds() if diagonal else cross_kinds()
        raise ConfigError(f"{where}: {', '.join(wrong)} cannot be on {place}; allowed there: {', '.join(allowed)}")


def parse_kinds(value: Any, m: int, cross: str = "kl") -> list[list[tuple[str, ...]]]:
    """``graph.kinds`` as an M x M matrix of kind tuples, validated. ``value``: None (the
    default), one entry for every cross edge (a string: ``kl+rkd_angle``), or the matrix."""
    if value is None:
        return default_kinds(m, cross)
    if isinstance(value, str):
        every = parse_entry(value, "graph.kinds")
        diag = [k for k in every if kind_of(k).diagonal]
        if diag:
            raise ConfigError(f"graph.kinds={value!r}: one entry stands for every cross edge, so it may hold only "
                              f"the cross-edge kinds {', '.join(cross_kinds())}; put {', '.join(diag)} on the diagonal "
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
            where = edge_field(t, s)
            kinds = parse_entry(entry, where)
            _check_place(kinds, s == t, where)
            parsed.append(kinds)
        out.append(parsed)
    return out


def edge_field(t: int, s: int) -> str:
    """The config field of the edge s -> t's kinds, as errors name it."""
    return f"graph.kinds[{t}][{s}] (edge {s} -> {t})" if s != t else f"graph.kinds[{t}][{t}] (node {t}'s own edge)"


def parse_default_cross(value: Any) -> str:
    """``graph.loss``: the kind of every cross edge of a graph without ``graph.kinds``."""
    if not isinstance(value, str) or not (":" in value or value in KINDS):
        raise ConfigError(f"graph.loss: unknown edge kind {value!r}; known cross-edge kinds: {', '.join(cross_kinds())}, "
                          "or an import path package.module:Class")
    (name,) = parse_entry(value, "graph.loss")
    if kind_of(name).diagonal:
        raise ConfigError(f"graph.loss={value!r} is a kind of the diagonal; it names the kind of every cross edge: "
                          f"one of {', '.join(cross_kinds())}")
    return name


def parse_kind_weights(value: Any) -> dict[str, float]:
    """``graph.kind_weights``: overrides of the kinds' default weights."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"graph.kind_weights must be a mapping kind -> weight; got {value!r}")
    out = {}
    for k, w in value.items():
        if not isinstance(k, str) or (":" not in k and k not in KINDS):
            raise ConfigError(f"graph.kind_weights: unknown edge kind {k!r}; known: {_known()}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ConfigError(f"graph.kind_weights.{k} must be a number >= 0; got {w!r}")
        try:
            out[kind_of(k).name] = float(w)
        except ConfigError as e:
            raise ConfigError(f"graph.kind_weights: {e}") from e
    return out


def format_entry(kinds: tuple[str, ...]) -> str:
    return "+".join(kinds)


def check_kinds(graph: "GraphSpec") -> None:
    """Every kind's own checks of the graph (placement was checked by ``parse_kinds``)."""
    for t in range(graph.num_nodes):
        for s in range(graph.num_nodes):
            for name in graph.edge_kinds(t, s):
                kind = kind_of(name)
                if s != t and kind.frozen_sources_only and not graph.is_frozen(s):
                    allowed = ", ".join(k for k in cross_kinds() if not KINDS.get(k).frozen_sources_only)
                    raise ConfigError(
                        f"{edge_field(t, s)}: {kind.name} transfers {kind.knowledge} of a frozen teacher, and node {s} is "
                        f"not frozen (graph.gates[{s}] is not all Cutoff); allowed from a learning node: {allowed}")
                kind.check_edge(graph, t, s, edge_field(t, s))
    for t in range(graph.num_nodes):
        apart = sorted({kind_of(k).name for s, _ in graph.incoming(t) for k in graph.edge_kinds(t, s)
                        if kind_of(k).apart is not EdgeKind.apart})
        if len(apart) > 1:
            raise ConfigError(f"graph.kinds[{t}]: node {t} learns through {' and '.join(apart)}, whose losses each enter "
                              "the update apart (their own backward); a node takes at most one such kind")
    used = {kind_of(k) for t in range(graph.num_nodes) for s in range(graph.num_nodes) for k in graph.edge_kinds(t, s)}
    builtins = [KINDS.get(n) for n in builtin_kinds()]
    for kind in builtins + sorted(used - set(builtins), key=kind_path):
        kind.check_graph(graph)


from actors import edge_kinds  # noqa: E402,F401  (registers the built-in kinds)
