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


def ray_device(wanted: str, gpu_ids: list, visible: Optional[str]) -> tuple[str, int]:
    """(device, CUDA index) of a node actor, from the GPUs Ray assigned it (``gpu_ids``:
    ``ray.get_gpu_ids()``) and the ``CUDA_VISIBLE_DEVICES`` its process sees (``visible``).

    Ray normally sets ``CUDA_VISIBLE_DEVICES`` to the actor's own GPUs, so its GPU is
    ``cuda:0``; with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` it does not, and the GPU
    is found by its id among those visible (all of them when the variable is unset). An
    actor given no GPU (``search.gpus_per_node=0``) runs on the CPU, even on a GPU machine
    where it would see every GPU (Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` unset for 0-GPU
    workers), unless ``device=cuda`` asks for one, which is refused."""
    from actors.errors import ConfigError

    if not gpu_ids or wanted == "cpu":
        if wanted == "cuda":
            raise ConfigError("device=cuda: Ray gave this node actor no GPU (search.gpus_per_node=0, or a cluster "
                              "without GPUs); set search.gpus_per_node (e.g. 1), or device=auto / device=cpu")
        return "cpu", 0
    mine = str(gpu_ids[0])
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
    if ids is None:
        return "cuda", int(mine)
    if mine not in ids:
        raise RuntimeError(f"Ray gave this actor GPU {mine}, which is not among CUDA_VISIBLE_DEVICES={visible}")
    return "cuda", ids.index(mine)


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
        import os

        import ray

        from actors.start import start_node

        # the device is the GPU Ray gave this actor (none: the CPU), never assumed; one torch
        # thread per actor unless train.num_threads says otherwise
        device, index = ray_device(self.cfg.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.worker = start_node(self.cfg, self.rank, self.world_size, index, init_method, self.files, default_threads=1,
                                 device=device)
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
