"""The only module that talks to torch.distributed.

``init_distributed`` starts the process group of one actor group (world size = number of
graph nodes; NCCL with one GPU per rank, gloo on CPU: the same code) and returns a
``DistEnv``. ``Exchange`` then offers the group's few collectives:

- ``all_gather(tensors)``: the per-step exchange. A dict of named per-sample tensors
  (today the node's logits and its batch fingerprint; later edge kinds add embeddings)
  is packed into one flat byte buffer and all-gathered in **one** collective; every
  rank receives every node's tensors, stacked along a new leading node dimension. The
  received tensors carry no gradient.
- ``broadcast`` (the coordinator's batch plan, from rank 0), ``gather_objects``
  (per-epoch metrics), ``barrier``.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but CUDA is not available here; use device=cpu (or auto)")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise RuntimeError(f"local rank {local_rank} has no GPU of its own ({n} visible); one GPU per graph node is needed")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(
    rank: int,
    world_size: int,
    local_rank: int,
    init_method: str,
    device: str = "auto",
    backend: str = "auto",
    timeout_s: float = 300.0,
) -> DistEnv:
    """Start this process's membership of the group. ``init_method`` is e.g.
    ``env://`` (torchrun) or ``tcp://host:port`` (Ray actors)."""
    dev = resolve_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before init: NCCL binds this rank to its own GPU
        kwargs["device_id"] = dev
    timeout = datetime.timedelta(seconds=timeout_s)
    # Under torchrun the store outlives a restart of the workers (--max-restarts): keys of
    # the failed attempt (e.g. gloo's peer addresses) would be read by the new one and its
    # connections refused. A prefix per attempt keeps each attempt's keys apart.
    store, rank, world_size = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    store = dist.PrefixStore(f"ktg/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def env_from_torchrun() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a plain ``python``
    process is rank 0 of a group of 1 (a free local port is picked for its store)."""
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor) -> None:
    if hasattr(dist, "all_gather_single"):  # torch >= 2.13: all_gather_into_tensor is deprecated
        dist.all_gather_single(out, inp)
    else:
        dist.all_gather_into_tensor(out, inp)


_ALIGN = 16  # bytes


class _Plan:
    """Buffers of one payload layout: the tensors packed into one flat uint8 send buffer
    (each at a 16-byte aligned offset), an ``[M, bytes]`` receive buffer, and the views of
    it that ``all_gather`` returns: ``name -> [M, *shape]`` in the original dtype. Built
    once per layout, so a step's exchange is one copy per tensor plus the collective."""

    def __init__(self, layout: tuple, world_size: int):
        self.spans: list[tuple[int, int]] = []
        offset = 0
        for _, shape, dtype, _ in layout:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self.spans.append((offset, size))
            offset += size + (-size % _ALIGN)  # keep every tensor's offset aligned for the views
        device = layout[0][3]
        self.send = torch.zeros(offset, dtype=torch.uint8, device=device)
        # a group of one gathers nothing: its receive buffer is its send buffer
        self.recv_flat = self.send if world_size == 1 else torch.empty(world_size * offset, dtype=torch.uint8, device=device)
        recv = self.recv_flat.view(world_size, offset)  # gloo only takes the flat layout
        self.views = {
            name: recv[:, off : off + size].view(dtype).view(world_size, *shape)
            for (name, shape, dtype, _), (off, size) in zip(layout, self.spans)
        }


class Exchange:
    """Collectives of one actor group. Works unchanged at world size 1."""

    def __init__(self, env: DistEnv):
        self.env = env
        self._plans: dict[tuple, _Plan] = {}  # per payload layout: reused send/receive buffers

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def all_gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One all-gather of several named tensors. Every rank must pass the same names,
        shapes and dtypes (true by construction: same graph, same batch size). Returns each
        name stacked over nodes: ``[M, *shape]``, detached.

        The returned tensors are views into a receive buffer that is reused by the next
        call with the same layout: use them within the step (clone to keep them longer)."""
        layout = tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in tensors.items())
        plan = self._plans.get(layout)
        if plan is None:
            plan = self._plans[layout] = _Plan(layout, self.world_size)
        for (off, size), t in zip(plan.spans, tensors.values()):
            plan.send[off : off + size].copy_(t.detach().reshape(-1).view(torch.uint8))
        if self.world_size > 1:
            _all_gather_flat(plan.recv_flat, plan.send)
        return dict(plan.views)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In-place broadcast from ``src``; other ranks pass a buffer of the same shape."""
        dist.broadcast(tensor, src=src)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (on every rank)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()
