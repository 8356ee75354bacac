"""A graph's nodes as Ray actors: one actor per node, all in one placement group.

Each ``NodeActor`` wraps the very same ``NodeWorker`` that torchrun runs (setup, train one
epoch, evaluate, state); actor 0 picks the rendezvous address, all actors join one
torch.distributed group over ``tcp://`` (gloo on CPU, NCCL with one GPU each), and the
driver (a Tune trial, or any Ray task) steps them through epochs with ``ray.get``.
Killing the driver's trial kills its actors, so nothing of a stopped trial keeps running.
"""
from __future__ import annotations

from typing import Any, Optional

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import RunConfig


class NodeActor:
    """Graph node ``rank`` of a group of ``world_size`` actors."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, run_dir: Optional[str]):
        self.cfg, self.rank, self.world_size, self.run_dir = cfg, rank, world_size, run_dir
        self.worker = None

    def rendezvous(self) -> str:
        from actors.exchange import free_port

        return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"

    def setup(self, init_method: str, state: Optional[dict[str, Any]] = None) -> int:
        import torch

        from actors.exchange import Exchange, init_distributed
        from actors.preflight import preflight
        from actors.worker import NodeWorker
        from coordinator.rundir import RunDir

        cfg = self.cfg
        torch.set_num_threads(cfg.train.num_threads or 1)
        data = preflight(cfg, self.world_size)
        # Ray gives each actor its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES), hence local rank 0.
        env = init_distributed(self.rank, self.world_size, 0, init_method, cfg.device, cfg.backend, cfg.dist_timeout_s)
        files = RunDir(self.run_dir).node_files(self.rank) if self.run_dir else None
        self.worker = NodeWorker(cfg, env, Exchange(env), data, files)
        if state is not None:
            self.worker.load_state(state)
        return self.worker.steps_per_epoch

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        return self.worker.run_epoch(epoch)

    def state(self) -> dict[str, Any]:
        return self.worker.state()

    def save_final(self) -> Optional[str]:
        return self.worker.save_checkpoint()

    def close(self) -> None:
        from actors.exchange import shutdown

        shutdown()


class ActorGroup:
    """Start, drive and stop the M node actors of one graph.

    ``placement_group``: the trial's group (bundle 0 is the driver, bundles 1..M the nodes);
    None schedules the actors anywhere (a standalone run)."""

    def __init__(self, cfg: RunConfig, run_dir: Optional[str], placement_group=None,
                 cpus_per_node: float = 1, gpus_per_node: float = 0,
                 states: Optional[list[dict[str, Any]]] = None):
        m = cfg.graph.num_nodes
        self.cfg = cfg
        remote = ray.remote(NodeActor)
        self.actors = []
        for i in range(m):
            opts: dict[str, Any] = {"num_cpus": cpus_per_node, "num_gpus": gpus_per_node, "max_restarts": 0}
            if placement_group is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=i + 1)
            self.actors.append(remote.options(**opts).remote(cfg, i, m, run_dir))
        init_method = ray.get(self.actors[0].rendezvous.remote())
        self.steps_per_epoch = ray.get([a.setup.remote(init_method, states[i] if states else None)
                                        for i, a in enumerate(self.actors)])[0]

    def run_epoch(self, epoch: int) -> list[dict[str, Any]]:
        """Every node's metrics row for ``epoch`` (raises if any node fails)."""
        return ray.get([a.run_epoch.remote(epoch) for a in self.actors])

    def states(self) -> list[dict[str, Any]]:
        return ray.get([a.state.remote() for a in self.actors])

    def save_final(self) -> None:
        """Each node writes its final state to <run_dir>/node<i>.pt."""
        ray.get([a.save_final.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
