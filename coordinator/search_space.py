"""The graph search's space and settings (``search=<preset>``, ``search.*``): what a trial
samples (the model of every non-target node from a zoo, the gate of each of the M x M
edges, extra config keys) and how the search runs. Plain dataclasses, no Ray: the launcher
validates them and the configuration reference reads them without starting Ray's imports;
``coordinator.search`` runs the search.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from actors.config import _build
from actors.errors import ConfigError
from actors.gates import GATES, is_cutoff
from actors.kinds import format_entry, kind_of, parse_entry, searchable_kinds
from actors.models import MODELS

SEARCHERS = ("random", "optuna")
FROZEN_POLICIES = ("teachers", "exclude")


@dataclass
class SearchConfig:
    name: str = "search"
    """The experiment's name: its folder is <storage>/<time>-<name>-<dataset>."""
    num_nodes: int = 3
    """M, the nodes of every sampled graph (node 0 is the target)."""
    target_model: str = "resnet32"
    """Node 0's model: fixed, not searched."""
    zoo: list[str] = field(default_factory=lambda: ["resnet32", "resnet110", "wrn28_2"])
    """Models to choose from for nodes 1..M-1."""
    models: Optional[list[str]] = None
    """Fix every node's model (node 0 first) and search the gates only, e.g. the slides'
    3-node models: [resnet32, resnet110, resnet32]. Sets num_nodes and target_model."""
    gates: list[str] = field(default_factory=lambda: ["Through", "Cutoff", "Linear", "Correct"])
    """Gates to choose from for each of the M x M edges."""
    edge_kinds: Optional[list[str]] = None
    """What a cross edge may carry, one choice per entry, e.g. ``[kl, kl+rkd_distance+rkd_angle]``
    (from kl, rkd_distance, rkd_angle): a ``kind_<t>_<s>`` parameter per cross edge. null:
    every edge kl, as the paper searches."""
    frozen: str = "teachers"
    """teachers: a frozen node loads <teachers_dir>/<model>/node0.pt; exclude: never sample one."""
    teachers_dir: str = "teachers"
    """Where frozen teachers are found: <teachers_dir>/<model>/node0.pt (a run of graph=teacher)."""
    num_samples: int = 1500
    """Number of trials (graphs)."""
    max_epochs: int = 200
    """ASHA's max_t; every trial's schedule is laid out over this many epochs."""
    grace_period: int = 1
    """ASHA: epochs every trial trains before it can be stopped (the paper: 1)."""
    reduction_factor: int = 2
    """ASHA: the top 1/reduction_factor of the trials at a rung go on (the paper: 2)."""
    searcher: str = "random"
    """random (the paper) or optuna (TPE, model-based; needs `pip install optuna`)."""
    max_concurrent: int = 0
    """Trials at once (0 = as many as the resources allow)."""
    cpus_per_node: float = 1.0
    """Logical CPUs each node actor reserves (the trial's driver reserves 1 more)."""
    processes_per_trial: int = 0
    """Processes (Ray actors) each trial's graph runs in: 0 = one per node; fewer pack several
    nodes into each (balanced on their FLOPs, ``placement=auto``), e.g. a 4-node graph on 1
    GPU with processes_per_trial=1. cpus_per_node and gpus_per_node are then per process."""
    gpus_per_node: Optional[float] = None
    """GPUs per node actor (per process), from 0 to 1; null = 1 if the Ray cluster has GPUs,
    else 0. A fraction shares a GPU between trials and needs search.processes_per_trial=1
    (NCCL cannot put two ranks of one trial on one GPU)."""
    num_cpus: Optional[int] = None
    """Logical CPUs of a local Ray cluster (null = Ray's count); ignored with an address."""
    address: Optional[str] = None
    """Ray cluster address (or set RAY_ADDRESS); null starts a local cluster."""
    storage: str = "runs/search"
    """Where experiments are stored (one folder per experiment)."""
    resume: Optional[str] = None
    """Path of an interrupted experiment to continue."""
    warm: bool = True
    """Keep each trial's actor group for the next trial (Tune's ``reuse_actors``): the next
    graph rebuilds only its models, optimisers and gates in processes that have imported
    torch, loaded the data and formed their process group. Results are the same either way
    (bitwise on CPU); false starts every trial's actors anew."""
    max_failures: int = 0
    """Retries of a failed trial, from its last checkpoint."""
    checkpoint_every: int = 1
    """Save every node's state to the trial's checkpoint every N epochs (0 = never)."""
    extra: Optional[dict[str, Any]] = None
    """Other config keys to search, as a nested mapping to lists of values:
    ``{optim: {lr: [0.05, 0.1]}}`` (dotted keys ``{"optim.lr": [...]}`` work from Python)."""
    dataset_name: Optional[str] = None
    """Set by the launcher: lets an exported graph's teacher paths follow ${dataset.name}."""
    verbose: int = 1
    """The console: 1 (default) a line per ended trial and a status line every 30 s; 0 none of them."""

    def __post_init__(self) -> None:
        self._check_models()
        self._check_edges()
        self._check_schedule()
        self._check_trials()
        if self.grace_period > self.max_epochs:
            raise ConfigError(f"search.grace_period={self.grace_period} exceeds search.max_epochs={self.max_epochs}")
        self.extra = _flatten(self.extra or {})
        for key, values in self.extra.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"search.extra.{key} must be a non-empty list of values to try")

    def _check_models(self) -> None:
        """search.models (which sets num_nodes, target_model, zoo), num_nodes, target_model
        and zoo: known models, in their canonical names."""
        if self.models is not None:
            if not isinstance(self.models, list) or not self.models:
                raise ConfigError(f"search.models must be a non-empty list of model names (node 0 first); got {self.models!r}")
            for i, m in enumerate(self.models):
                if m not in MODELS:
                    raise ConfigError(f"search.models[{i}]: unknown model {m!r}; known: {', '.join(MODELS.names())}")
            self.models = [MODELS.canonical(m) for m in self.models]
            self.num_nodes, self.target_model = len(self.models), self.models[0]
            self.zoo = list(dict.fromkeys(self.models[1:])) or [self.target_model]
        if not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ConfigError(f"search.num_nodes must be an integer >= 1; got {self.num_nodes!r}")
        for i, m in enumerate([self.target_model, *self.zoo]):
            if m not in MODELS:
                where = "search.target_model" if i == 0 else f"search.zoo[{i - 1}]"
                raise ConfigError(f"{where}: unknown model {m!r}; known: {', '.join(MODELS.names())}")
        if not self.zoo and self.num_nodes > 1:
            raise ConfigError("search.zoo is empty: list the models the non-target nodes may use")
        self.target_model = MODELS.canonical(self.target_model)
        self.zoo = [MODELS.canonical(m) for m in self.zoo]

    def _check_edges(self) -> None:
        """search.gates (known, and not all Cutoff) and search.edge_kinds (searchable kinds,
        each choice once), in their canonical names."""
        for i, g in enumerate(self.gates):
            if g not in GATES:
                raise ConfigError(f"search.gates[{i}]: unknown gate {g!r}; known: {', '.join(GATES.names())}")
        self.gates = [GATES.canonical(g) for g in self.gates]
        if not self.gates or all(is_cutoff(g) for g in self.gates):
            raise ConfigError(
                f"search.gates={self.gates} leaves no valid graph: the target node needs a non-Cutoff "
                f"incoming edge; add one of {', '.join(g for g in GATES.names() if not is_cutoff(g))}"
            )
        if self.edge_kinds is not None:
            if not isinstance(self.edge_kinds, list) or not self.edge_kinds:
                raise ConfigError(f"search.edge_kinds must be a non-empty list of cross-edge kinds (e.g. [kl, "
                                  f"kl+rkd_distance+rkd_angle]) or null; got {self.edge_kinds!r}")
            choices = []
            for i, entry in enumerate(self.edge_kinds):
                kinds = parse_entry(entry, f"search.edge_kinds[{i}]")
                wrong = [kind_of(k).name for k in kinds if not kind_of(k).searchable]
                if wrong:
                    raise ConfigError(f"search.edge_kinds[{i}]: {', '.join(wrong)} cannot be searched; allowed: "
                                      f"{', '.join(searchable_kinds())}, or a kind with searchable = True by its import "
                                      "path (joined by '+' for several on one edge)")
                choices.append(format_entry(kinds))
            if len(set(choices)) != len(choices):
                raise ConfigError(f"search.edge_kinds lists a choice twice: {choices}")
            self.edge_kinds = choices

    def _check_schedule(self) -> None:
        """The sampler (search.frozen, search.searcher), the trial budget and ASHA's schedule."""
        if self.frozen not in FROZEN_POLICIES:
            raise ConfigError(f"search.frozen must be one of {', '.join(FROZEN_POLICIES)}; got {self.frozen!r}")
        if self.searcher not in SEARCHERS:
            raise ConfigError(f"search.searcher must be one of {', '.join(SEARCHERS)}; got {self.searcher!r}")
        for key in ("num_samples", "max_epochs", "grace_period"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"search.{key} must be an integer >= 1; got {v!r}")
        if not isinstance(self.reduction_factor, (int, float)) or self.reduction_factor < 2:
            raise ConfigError(f"search.reduction_factor must be >= 2; got {self.reduction_factor!r}")

    def _check_trials(self) -> None:
        """How each trial runs: its processes, warm groups, GPUs per process."""
        if not isinstance(self.processes_per_trial, int) or isinstance(self.processes_per_trial, bool) \
                or not 0 <= self.processes_per_trial <= self.num_nodes:
            raise ConfigError(f"search.processes_per_trial must be an integer from 0 (one per node) to search.num_nodes="
                              f"{self.num_nodes}; got {self.processes_per_trial!r}")
        if not isinstance(self.warm, bool):
            raise ConfigError(f"search.warm must be true or false; got {self.warm!r}")
        g = self.gpus_per_node
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 1):
            raise ConfigError(f"search.gpus_per_node must be null (1 where the Ray cluster has GPUs, else 0) or a number "
                              f"from 0 to 1 (a node process uses one GPU); got {g!r}")
        if g is not None and 0 < g < 1 and self.processes > 1:
            per = (f"search.processes_per_trial={self.processes_per_trial}" if self.processes_per_trial
                   else f"search.processes_per_trial=0: one per node, search.num_nodes={self.num_nodes}")
            raise ConfigError(
                f"search.gpus_per_node={g} with {self.processes} processes per trial ({per}): Ray may give two processes "
                "of one trial the same GPU, and NCCL cannot run two ranks of one group on one GPU; use "
                "search.gpus_per_node=1, or search.processes_per_trial=1 to pack each trial's graph into one process "
                "on a share of a GPU")

    @property
    def processes(self) -> int:
        """The Ray actors of each trial's group."""
        return self.processes_per_trial or self.num_nodes

    # --- the space ------------------------------------------------------------------------------

    def teacher_path(self, model: str) -> str:
        return str(Path(self.teachers_dir) / model / "node0.pt")

    def can_freeze(self, model: str) -> bool:
        return self.frozen == "teachers" and os.path.isfile(self.teacher_path(model))

    def choices(self) -> dict[str, list]:
        """The flat space: model_<i> for non-target nodes, gate_<t>_<s> per edge, extras."""
        space: dict[str, list] = {f"model_{i}": [self.models[i]] if self.models else list(self.zoo)
                                  for i in range(1, self.num_nodes)}
        for t in range(self.num_nodes):
            for s in range(self.num_nodes):
                space[f"gate_{t}_{s}"] = list(self.gates)
        if self.edge_kinds:
            for t in range(self.num_nodes):
                for s in range(self.num_nodes):
                    if s != t:
                        space[f"kind_{t}_{s}"] = list(self.edge_kinds)
        for key, values in self.extra.items():
            space[f"extra:{key}"] = list(values)
        return space

    def graph_from(self, params: dict[str, Any], name: str = "searched") -> Optional[dict[str, Any]]:
        """The graph config a sample stands for, or None when the sample is not a valid graph
        (frozen target, or a frozen node this policy cannot give a checkpoint)."""
        m = self.num_nodes
        models = [self.target_model] + [params[f"model_{i}"] for i in range(1, m)]
        gates = [[params[f"gate_{t}_{s}"] for s in range(m)] for t in range(m)]
        nodes = []
        for t in range(m):
            node: dict[str, Any] = {"model": models[t]}
            if all(is_cutoff(g) for g in gates[t]):
                if t == 0 or not self.can_freeze(models[t]):
                    return None
                node["checkpoint"] = self.teacher_path(models[t])
            nodes.append(node)
        graph = {"name": name, "nodes": nodes, "gates": gates, "temperature": 1.0, "loss": "kl", "reduction": "sum"}
        if self.edge_kinds:
            graph["kinds"] = [["ce" if s == t else params[f"kind_{t}_{s}"] for s in range(m)] for t in range(m)]
        return graph


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def describe_gates(gates: list[list[str]]) -> str:
    """Compact matrix text: rows = receivers, e.g. 'T L C / X T T' (X = Cutoff, N = NegativeLinear)."""
    short = {"Through": "T", "Cutoff": "X", "Linear": "L", "Correct": "C", "NegativeLinear": "N"}
    return " / ".join(" ".join(short.get(g, g) for g in row) for row in gates)


def search_config_from(data: dict[str, Any]) -> SearchConfig:
    return _build(SearchConfig, dict(data), "search")
