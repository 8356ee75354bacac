"""A graph's nodes as Ray actors (a search trial's group): one ``actors.node_actor.NodeActor``
per node, all in the trial's placement group.

Actor 0 picks the rendezvous address, all actors join one torch.distributed group over
``tcp://`` (gloo on CPU, NCCL with one GPU each), and the trial's driver steps them through
epochs (``coordinator.epochs.drive_epochs``) with ``ray.get``. The group checkpoints travel
to the driver as states (``ray.get``), so they reach the trial's storage from any machine.
Killing the driver's trial kills its actors, so nothing of a stopped trial keeps running.

A group is warm once formed: ``reset`` hands its actors the next trial's graph, and they
rebuild only the models, optimisers and gates (``NodeActor.reset``), keeping their
processes, imports, data and process group.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import RunConfig
from actors.metrics import NodeEpochMetrics
from actors.node_actor import NodeActor
from coordinator.rundir import RunDir


class ActorGroup:
    """Start, drive and stop the actors of one graph: one per node, or ``processes`` actors
    that host the M nodes between them (placed by ``placement=auto``: balanced FLOPs).

    ``placement_group``: the trial's group (bundle 0 is the driver, bundles 1..P the actors);
    None schedules the actors anywhere (a standalone run). ``run_dir``: where each node
    writes its final state (None: nowhere)."""

    def __init__(self, cfg: RunConfig, run_dir: Optional[str], placement_group=None,
                 cpus_per_node: float = 1, gpus_per_node: float = 0,
                 states: Optional[list[dict[str, Any]]] = None, processes: Optional[int] = None):
        m = processes or cfg.graph.num_nodes
        self.cfg, self.processes = cfg, m
        remote = ray.remote(NodeActor)
        rd = RunDir(run_dir) if run_dir else None
        self.actors = []
        for i in range(m):
            opts: dict[str, Any] = {"num_cpus": cpus_per_node, "num_gpus": gpus_per_node, "max_restarts": 0}
            if placement_group is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=i + 1)
            self.actors.append(remote.options(**opts).remote(cfg, i, m, rd.node_files if rd else None))
        init_method = ray.get(self.actors[0].rendezvous.remote())
        self.steps_per_epoch = ray.get([a.setup.remote(init_method, self._every(states)) for a in self.actors])[0]
        self._checkpoint_dir: Optional[tempfile.TemporaryDirectory] = None

    @staticmethod
    def _every(states: Optional[list[dict[str, Any]]]):
        """Every node's state for every actor, which loads those of the nodes it hosts."""
        return ray.put(dict(enumerate(states))) if states else None

    def fits(self, cfg: RunConfig, processes: Optional[int] = None) -> Optional[str]:
        """Why this group cannot run ``cfg`` warm (None: it can)."""
        from actors.start import warm_mismatch

        if self.actors == []:
            return "the group was shut down"
        m = processes or cfg.graph.num_nodes
        if m != self.processes:
            return f"{m} processes instead of {self.processes}"
        return warm_mismatch(self.cfg, cfg)

    def reset(self, cfg: RunConfig, run_dir: Optional[str]) -> None:
        """Run another graph (``fits``) on these warm actors: each rebuilds its nodes'
        models, optimisers and gates in the process group it has formed."""
        self.drop_checkpoint_dir()
        files = RunDir(run_dir).node_files if run_dir else None
        self.cfg = cfg
        self.steps_per_epoch = ray.get([a.reset.remote(cfg, files) for a in self.actors])[0]

    def load_states(self, states: list[dict[str, Any]]) -> None:
        """Continue from every node's state (a restored trial)."""
        every = self._every(states)
        ray.get([a.load_states.remote(every) for a in self.actors])

    def run_epoch(self, epoch: int, checkpoint: bool = False) -> list[NodeEpochMetrics]:
        """Every node's metrics for ``epoch`` (raises if any node fails). The nodes write no
        checkpoint themselves: ``commit_checkpoint`` fetches their states."""
        return sorted((m for ms in ray.get([a.run_epoch.remote(epoch) for a in self.actors]) for m in ms),
                      key=lambda m: m.node)

    def states(self) -> list[dict[str, Any]]:
        """Every node's state, by node."""
        every = {t: s for states in ray.get([a.states.remote() for a in self.actors]) for t, s in states.items()}
        return [every[t] for t in sorted(every)]

    def commit_checkpoint(self, epochs_done: int) -> Path:
        """Every node's state, written to a fresh temporary folder on the driver
        (``node<i>.pt``), for the trial to report to Tune; the previous one is removed."""
        self.drop_checkpoint_dir()
        self._checkpoint_dir = tempfile.TemporaryDirectory(prefix=f"ktg-epoch{epochs_done}-")
        folder = Path(self._checkpoint_dir.name)
        for i, state in enumerate(self.states()):
            torch.save(state, folder / f"node{i}.pt")
        return folder

    def save_final(self) -> None:
        """Each node writes its final state to <run_dir>/node<i>.pt."""
        ray.get([a.save_final.remote() for a in self.actors])

    def drop_checkpoint_dir(self) -> None:
        if self._checkpoint_dir is not None:
            self._checkpoint_dir.cleanup()
            self._checkpoint_dir = None

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        self.drop_checkpoint_dir()
