"""Checks that need the data or the checkpoints, run by every process *before* the process
group forms, so a bad input ends every rank the same way with one clear message."""
from __future__ import annotations

import os
from typing import Optional

import torch

from actors.config import RunConfig
from actors.data import Dataset, DatasetError, load_dataset
from actors.errors import ConfigError
from actors.files import load_model_weights
from actors.kinds import kind_of
from actors.models import build_model
from actors.placement import check_placement, resolve_placement


def check_world_size(cfg: RunConfig, world_size: int) -> None:
    m = cfg.graph.num_nodes
    if not 1 <= world_size <= m:
        raise ConfigError(
            f"graph {cfg.graph.name!r} has {m} nodes but {world_size} process(es) were started: a process hosts one "
            f"or more nodes, so run `torchrun --standalone --nproc_per_node=P launch.py ...` with 1 <= P <= {m} "
            f"(P = {m}: one node per process)"
        )
    if not isinstance(cfg.placement, str):
        check_placement(cfg.placement, m, world_size)


def check_device(cfg: RunConfig, local_world_size: Optional[int] = None, device: Optional[str] = None) -> None:
    """``device=cuda`` and ``backend=nccl`` need a CUDA device here, a CUDA run one GPU per
    process on this machine, and ``train.precision=bf16`` on CUDA a GPU with native bf16.
    ``local_world_size``: the processes on this machine (default: torchrun's
    ``LOCAL_WORLD_SIZE``; unknown, e.g. in a Ray actor that sees only its own GPUs: not
    checked). ``device``: the device this process will use when its launcher chose it (a Ray
    actor: from the GPUs Ray gave it), instead of ``cfg.device``."""
    cuda = torch.cuda.is_available()
    wanted = device or cfg.device
    if wanted == "cuda" and not cuda:
        raise ConfigError("device=cuda: no CUDA device is visible here (torch.cuda.is_available() is false); "
                          "use device=cpu, or device=auto (CUDA where there is one, else CPU)")
    if cfg.backend == "nccl" and (not cuda or wanted == "cpu"):
        raise ConfigError("backend=nccl needs a CUDA device and none is visible here (torch.cuda.is_available() is false); "
                          "use backend=gloo, or backend=auto (nccl on CUDA, gloo on CPU)")
    if local_world_size is None and os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
    on_cuda = cuda and wanted in ("cuda", "auto")
    if on_cuda and local_world_size is not None:
        gpus = torch.cuda.device_count()
        if local_world_size > gpus:
            picked = "device=cuda" if cfg.device == "cuda" else "device=auto (CUDA here)"
            raise ConfigError(
                f"{picked} needs one GPU per graph node, but {local_world_size} processes run on this machine and "
                f"{gpus} CUDA device(s) are visible; use device=cpu, or run the graph where there are {local_world_size} GPUs"
            )
    if on_cuda and cfg.train.precision == "bf16" and not torch.version.hip:
        index = int(os.environ.get("LOCAL_RANK", "0"))  # this process's GPU (a Ray actor sees its own first)
        index = index if index < torch.cuda.device_count() else 0
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:
            raise ConfigError(
                f"train.precision=bf16: this GPU ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor}) "
                "has no native bfloat16 (compute capability 8.0 or newer has: A100, H100, L4, RTX 30xx and later); use "
                "train.precision=fp32"
            )


def load_data(cfg: RunConfig) -> Dataset:
    d = cfg.dataset
    try:
        data = load_dataset(d.name, d.root, d.val_fraction, d.split_seed, d.download, d.label_noise)
    except DatasetError as e:
        raise ConfigError(f"dataset={d.name}: {e}") from e
    if cfg.train.batch_size > len(data.train):
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training split of {d.name} "
            f"({len(data.train)} images after holding out dataset.val_fraction={d.val_fraction}); "
            f"use train.batch_size <= {len(data.train)}"
        )
    return data


def check_checkpoints(cfg: RunConfig, data: Dataset, attention: bool = True) -> None:
    """Every node checkpoint exists and matches its node's architecture and class count; then
    every kind on a live edge checks what it reads (``EdgeKind.check_data``: a self-teacher,
    mhgd's attention modules). ``attention`` False: stage-1 outputs (mhgd's attention modules)
    are what is being made, and are not checked."""
    for i, n in enumerate(cfg.graph.nodes):
        if n.checkpoint:
            check_checkpoint(i, n.model, "checkpoint", n.checkpoint, data)
    for name in cfg.graph.live_kinds():
        kind_of(name).check_data(cfg.graph, data, trained=attention)


def check_checkpoint(i: int, model: str, key: str, path: str, data: Dataset) -> None:
    """``graph.nodes[i].<key>`` exists, and holds a ``model`` for the dataset's classes."""
    where = f"graph.nodes[{i}].{key}={path}"
    if not os.path.isfile(path):
        raise ConfigError(
            f"{where}: file not found. Pretrain it first (README, 'Teachers'), e.g. "
            f"`torchrun --standalone --nproc_per_node=1 launch.py graph=teacher graph.nodes.0.model={model} "
            f"dataset={data.name} hydra.run.dir=<dir>` and point at <dir>/node0.pt"
        )
    try:
        state, meta = load_model_weights(path)
    except Exception as e:
        raise ConfigError(f"{where}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if meta.get("model") and meta["model"] != model:
        raise ConfigError(f"{where} holds a {meta['model']} but node {i} is a {model}")
    if meta.get("num_classes") not in (None, data.info.num_classes):
        raise ConfigError(
            f"{where} was trained for {meta['num_classes']} classes but dataset {data.name} has {data.info.num_classes}"
        )
    net = build_model(model, data.info.num_classes, data.info.in_channels)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{where} does not fit a {model} for {data.name}: {' '.join(first[:3])[:400]}") from e


def file_digest(path: str) -> str:
    """SHA-256 of a file (what an attention module records of its teacher's checkpoint)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def preflight(cfg: RunConfig, world_size: int, device: Optional[str] = None) -> Dataset:
    """All input checks; returns the loaded (CPU) dataset for the worker to use. ``device``:
    the device chosen by the launcher (``check_device``)."""
    check_world_size(cfg, world_size)
    check_device(cfg, device=device)
    data = load_data(cfg)
    check_checkpoints(cfg, data)
    return data


def place_nodes(cfg: RunConfig, data: Dataset, world_size: int) -> list[list[int]]:
    """Which nodes each of the ``world_size`` processes hosts (``placement``; the same on
    every process: the costs are counted, not timed)."""
    models = [n.model for n in cfg.graph.nodes]
    info = data.info
    return resolve_placement(cfg.placement, models, info.num_classes, info.in_channels, info.image_size, world_size)
