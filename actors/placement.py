"""Placement: which graph nodes each process hosts.

With P processes (torchrun's world size) and an M-node graph (1 <= P <= M), a placement is a
list of P lists of node indices: every node 0..M-1 exactly once, every process at least one
node, each list ascending. Node t keeps index t everywhere (config, checkpoints, metrics);
only the process that hosts it changes.

The ``placement`` setting chooses it:

- ``auto`` (default): one node per process, ``[[0], [1], ...]``, when P = M; else ``balanced``.
- ``balanced``: greedy longest-first on each node's cost (``node_cost``, training FLOPs per
  image). At P = M every process hosts exactly one node whatever the costs, so it is the
  same as ``auto`` there: ``[[0], [1], ...]``.
- a list of P lists, e.g. ``[[0, 2], [1]]``: taken as written (``check_placement``).

Every process computes the same placement from the same config (the costs are FLOP counts,
not timings), so no process has to send it to the others.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from actors.errors import ConfigError
from actors.models import build_model

PLACEMENTS = ("auto", "balanced")
FORMS = "auto, balanced, or a list of lists of node indices, one list per process, e.g. [[0,2],[1]]"


@functools.lru_cache(maxsize=None)
def node_cost(model_name: str, num_classes: int, in_channels: int, image_size: int) -> float:
    """Training FLOPs per image of one node's model: ``torch.utils.flop_counter.FlopCounterMode``'s
    count of a forward and a backward (of ``logits.sum()``) on a batch of 2 random images
    ``[2, in_channels, image_size, image_size]``, divided by 2. The count depends only on the
    shapes (convolutions and matrix products; batch norm, activations and the optimiser step
    are not counted), so it is the same on every process and every run. The model and the
    batch live on the ``meta`` device: the count equals the CPU's, but nothing is computed
    (well under a second even for resnet110 at 64x64, where a CPU pass takes seconds), and
    everything runs under ``torch.random.fork_rng``: the global RNG is left as it was."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 2  # train-mode batch norm needs more than one value per channel, even at 1x1
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(model_name, num_classes, in_channels).train()
        x = torch.randn(batch, in_channels, image_size, image_size)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x).sum().backward()
    return counter.get_total_flops() / batch


def balanced(costs: Sequence[float], processes: int) -> list[list[int]]:
    """Greedy longest-first: take the nodes by decreasing cost (ties: lower index first) and
    give each to the process with the smallest load so far (ties: lower process index); each
    process's nodes are returned ascending. An empty process comes first (it has the smallest
    load anyway when costs are > 0; this also holds for zero costs), so with P <= M the first
    P nodes go one to each process and every process gets a node."""
    if not 1 <= processes <= len(costs):
        raise ConfigError(f"placement: {processes} processes for {len(costs)} nodes; start between 1 and {len(costs)}")
    loads = [0.0] * processes
    hosted: list[list[int]] = [[] for _ in range(processes)]
    for node in sorted(range(len(costs)), key=lambda t: (-costs[t], t)):
        p = min(range(processes), key=lambda q: (bool(hosted[q]), loads[q], q))
        loads[p] += costs[node]
        hosted[p].append(node)
    assert all(hosted), hosted
    return [sorted(nodes) for nodes in hosted]


def check_form(spec: Any) -> None:
    """Raise ``ConfigError`` unless ``spec`` is ``auto``, ``balanced`` or a list of non-empty
    lists of ints: what can be checked without the graph and P (RunConfig checks this much)."""
    if isinstance(spec, str):
        if spec not in PLACEMENTS:
            raise ConfigError(f"placement must be {FORMS}; got {spec!r}")
        return
    if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(nodes, (list, tuple)) for nodes in spec):
        raise ConfigError(f"placement must be {FORMS}; got {spec!r}")
    for p, nodes in enumerate(spec):
        if not nodes:
            raise ConfigError(f"placement: process {p} hosts no node")
        bad = [t for t in nodes if not isinstance(t, int) or isinstance(t, bool)]
        if bad:
            raise ConfigError(f"placement: process {p} lists {bad[0]!r}, not a node index")


def check_placement(spec: Any, num_nodes: int, processes: int) -> list[list[int]]:
    """A hand-written placement, checked against the processes started (exactly ``processes``
    non-empty lists) and the graph (every node 0..M-1 exactly once); each list returned
    ascending. Anything else raises ``ConfigError`` naming ``placement`` and what is wrong."""
    if isinstance(spec, str):
        raise ConfigError(f"placement must be a list of lists of node indices here; got {spec!r}")
    check_form(spec)
    if len(spec) != processes:
        raise ConfigError(f"placement lists {len(spec)} process{'es' if len(spec) != 1 else ''} "
                          f"but {processes} {'were' if processes != 1 else 'was'} started")
    seen: set[int] = set()
    for nodes in spec:
        for t in nodes:
            if not 0 <= t < num_nodes:
                raise ConfigError(f"placement: node {t} does not exist (the graph has nodes 0..{num_nodes - 1})")
            if t in seen:
                raise ConfigError(f"placement: node {t} appears twice")
            seen.add(t)
    missing = [t for t in range(num_nodes) if t not in seen]
    if missing:
        raise ConfigError(f"placement: node {missing[0]} is missing" if len(missing) == 1
                          else f"placement: nodes {', '.join(map(str, missing))} are missing")
    return [sorted(nodes) for nodes in spec]


def resolve_placement(spec: Any, models: Sequence[str], num_classes: int, in_channels: int, image_size: int,
                      processes: int) -> list[list[int]]:
    """The placement of ``models`` (node t runs ``models[t]``) on ``processes`` processes:
    ``[[0], [1], ...]`` when processes = M and spec is auto or balanced; ``balanced`` on
    ``node_cost`` when processes < M; a list is checked (``check_placement``)."""
    check_form(spec)
    num_nodes = len(models)
    if not isinstance(spec, str):
        return check_placement(spec, num_nodes, processes)
    if not 1 <= processes <= num_nodes:
        raise ConfigError(f"placement: {processes} processes for {num_nodes} nodes; start between 1 and {num_nodes} "
                          f"(torchrun --nproc_per_node)")
    if processes == num_nodes:
        return [[t] for t in range(num_nodes)]
    return balanced([node_cost(m, num_classes, in_channels, image_size) for m in models], processes)


def describe_placement(placement: Sequence[Sequence[int]], costs: Sequence[float], models: Sequence[str]) -> str:
    """One line per process: its nodes (``index model``) and their share of the summed cost,
    e.g. ``process 0: 0 resnet32, 2 resnet32 (49%)``."""
    total = sum(costs) or 1.0
    lines = []
    for p, nodes in enumerate(placement):
        share = 100.0 * sum(costs[t] for t in nodes) / total
        if len(nodes) <= 6:
            listed = ", ".join(f"{t} {models[t]}" for t in nodes)
        else:  # a long list: the node indices, then the models counted
            counts: dict[str, int] = {}
            for t in nodes:
                counts[models[t]] = counts.get(models[t], 0) + 1
            listed = (f"{len(nodes)} nodes ({', '.join(map(str, nodes))}): "
                      + ", ".join(f"{c} x {m}" for m, c in counts.items()))
        lines.append(f"process {p}: {listed} ({share:.0f}%)")
    return "\n".join(lines)
