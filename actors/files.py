"""File primitives for run outputs: atomic writes (a crash mid-write never leaves a
truncated file behind) with the permissions of any other file the user writes, the safe
reading of a model checkpoint (``weights_only``: a planted file cannot run code), and
``NodeStateFiles``: what a node's worker is handed to write its state (the run
directory's layout is the coordinator's, ``coordinator.rundir``)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Protocol

import torch


def _read_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); elsewhere
    set and restored at once, here at import, before any thread of ours runs."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _file_mode() -> int:
    """0666 less the process's umask: what ``open(path, "w")`` would give. ``mkstemp``
    creates 0600 files, which would hide checkpoints from the user's group."""
    return 0o666 & ~_read_umask()


def _atomic_write(path: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``
    (``os.replace`` is atomic on POSIX): readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def load_state(path: str | os.PathLike) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``: tensors, containers and plain
    values only, never arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a node checkpoint (or a bare state_dict): returns (state_dict, meta)."""
    obj = load_state(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"], obj.get("meta", {})
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(f"{path} holds neither a node checkpoint nor a state_dict")


class NodeStateFiles(Protocol):
    """Where one node's state goes; the worker calls these and knows no paths."""

    def save_epoch(self, epoch: int, state: dict[str, Any]) -> Path:
        """This node's share of the group checkpoint after ``epoch`` epochs."""
        ...

    def save_final(self, state: dict[str, Any]) -> Path:
        """This node's final state."""
        ...
