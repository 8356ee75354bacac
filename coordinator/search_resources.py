"""What a search's trials need from the Ray cluster, and whether the cluster can give it.

Each trial is one placement group (``trial_bundles``): 1 CPU for its driver, then one
bundle per process of its actor group. A search whose trials no machine, or not the whole
cluster, could ever hold is refused before Tune starts (``check_resources``); the search's
console says what pending trials wait for with the same words (``resources_text``).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from actors.errors import ConfigError
from coordinator.search_space import SearchConfig

log = logging.getLogger("ktg")


def cluster_address(space: SearchConfig) -> Optional[str]:
    """The address of the Ray cluster the search joins (``search.address``, else
    ``RAY_ADDRESS``), or None when the search starts a cluster of its own."""
    return space.address or os.environ.get("RAY_ADDRESS")


def trial_bundles(space: SearchConfig) -> list[dict[str, float]]:
    """Each trial's placement group: 1 CPU for its driver, then one bundle per process. Sets
    ``space.gpus_per_node`` when it is null: 1 if the Ray cluster has GPUs, else 0."""
    import ray

    if space.gpus_per_node is None:
        space.gpus_per_node = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return [{"CPU": 1}] + [{"CPU": space.cpus_per_node, "GPU": space.gpus_per_node}] * space.processes


def total_resources(bundles: list[dict[str, float]]) -> dict[str, float]:
    """What a placement group of ``bundles`` needs in all."""
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0) + v
    return out


def resources_text(r: dict[str, float]) -> str:
    """``{CPU: 2, GPU: 1}``: the CPUs and GPUs of ``r`` (resources Ray counts), zeros left out."""
    shown = {k: v for k, v in r.items() if k in ("CPU", "GPU") and v}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}" if shown else "{}"


def unplaceable(bundles: list[dict[str, float]], machines: list[dict[str, float]]) -> Optional[str]:
    """Why a trial of ``bundles`` can never start on a cluster of ``machines`` (each one's
    total resources), or None: a bundle that no machine can hold, or more in all than the
    cluster has (Tune would keep such a trial pending for good)."""
    need = total_resources(bundles)
    total = {k: sum(m.get(k, 0) for m in machines) for k in need}
    trial = (f"a trial needs {resources_text(need)} (1 CPU for its driver + {len(bundles) - 1} process(es) x "
             f"{resources_text(bundles[-1])})")
    if any(total[k] < v for k, v in need.items() if v):
        return f"{trial}, but the Ray cluster has {resources_text(total)} in all"
    for b in bundles[1:]:
        if not any(all(m.get(k, 0) >= v for k, v in b.items() if v) for m in machines):
            largest = max(machines, key=lambda m: (m.get("GPU", 0), m.get("CPU", 0)), default={})
            return f"{trial}, and no machine of the Ray cluster can hold one process's {resources_text(b)} (the largest has " \
                   f"{resources_text(largest)})"
    return None


def check_resources(bundles: list[dict[str, float]], space: SearchConfig) -> None:
    """Refuse a search whose trials the cluster can never place (``unplaceable``), before
    Tune starts: on a cluster this command started, at once; on a cluster at
    ``search.address``, which an autoscaler may grow, with a warning (and the search's
    status line says what its trials wait for)."""
    import ray

    machines = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    why = unplaceable(bundles, machines)
    if why is None:
        return
    fix = ("set search.gpus_per_node=0 (or null: GPUs only where the cluster has them), fewer search.cpus_per_node or "
           "search.processes_per_trial, or a larger search.num_cpus")
    if not cluster_address(space):
        raise ConfigError(f"{why}: its trials would wait for good; {fix}")
    log.warning(f"[search] {why}: unless the cluster grows, its trials will wait for good; {fix}")
