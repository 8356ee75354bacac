"""The Ray actor that hosts one graph node (a search trial's group, ``coordinator.group``).

It runs in the node's own process and wraps the very same ``NodeWorker`` that a torchrun
rank runs, started by the same ``start_node``; the trial's driver steps it through epochs.
A warm actor outlives its trial: ``reset`` gives it the next trial's graph in the process
group it has already formed (``actors.start.restart_node``), from the global RNG state a
fresh process starts with, so a warm trial trains exactly as a cold one.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from actors.config import RunConfig
from actors.files import NodeStateFiles
from actors.metrics import NodeEpochMetrics


class NodeActor:
    """Graph node ``rank`` of a group of ``world_size`` actors."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, files: Optional[Callable[[int], NodeStateFiles]]):
        import torch

        self.cfg, self.rank, self.world_size, self.files = cfg, rank, world_size, files
        self.worker = None
        self.fresh_rng = torch.get_rng_state()  # what torch's global RNG holds in a new process

    def rendezvous(self) -> str:
        """A ``tcp://`` address on this actor's machine for the group to form at."""
        import ray

        from actors.exchange import free_port

        return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"

    def setup(self, init_method: str, states: Optional[dict[int, dict[str, Any]]] = None) -> int:
        from actors.start import start_node

        # Ray gives each actor its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES), hence local rank 0;
        # one torch thread per actor unless train.num_threads says otherwise.
        self.worker = start_node(self.cfg, self.rank, self.world_size, 0, init_method, self.files, default_threads=1)
        if states is not None:
            self.worker.load_states(states)
        return self.worker.steps_per_epoch

    def reset(self, cfg: RunConfig, files: Optional[Callable[[int], NodeStateFiles]]) -> int:
        """Host the nodes of another graph (the next trial) in this warm process: new models,
        optimisers and gates; the process group, imports and data stay."""
        import torch

        from actors.start import restart_node

        previous, self.worker = self.worker, None
        if previous is None:
            raise RuntimeError("reset before setup: this actor never joined a group")
        torch.set_rng_state(self.fresh_rng)
        self.cfg, self.files = cfg, files
        self.worker = restart_node(cfg, previous, files, default_threads=1)
        del previous
        return self.worker.steps_per_epoch

    def load_states(self, states: dict[int, dict[str, Any]]) -> None:
        self.worker.load_states(states)

    def run_epoch(self, epoch: int, checkpoint: bool = False) -> list[NodeEpochMetrics]:
        return self.worker.run_epoch(epoch, checkpoint)

    def states(self) -> dict[int, dict[str, Any]]:
        return self.worker.states()

    def save_final(self) -> list[str]:
        return self.worker.save_checkpoint()

    def close(self) -> None:
        from actors.exchange import shutdown

        shutdown()
