"""The run directory and its one owner, ``RunDir``: layout, lock, the recorded config and
the settings a resume must keep, each node checkpoint checked as it loads, the metrics
rows kept on resume, the summary, and every write (atomic, with the user's usual file
permissions).

    <run_dir>/
      .lock                        held (flock) by rank 0 of the run that owns the directory
      run_config.json              the resolved config of the run
      run_state.json               {"wandb_id": ...}: what a resume needs besides checkpoints
      metrics.jsonl                one row per node per epoch
      summary.json                 written when the run ends
      node<i>.pt                   node i's final state
      checkpoints/epoch_<E>/node<i>.pt   group checkpoint after epoch E (each file atomic)
      checkpoints/latest.json      {"epoch": E, "nodes": M}: the newest epoch every node saved
      wandb/, pictures/
      replaced/<time>/             the outputs of an earlier run, set aside by a fresh start
      .hydra/, launch.log          hydra's own, rewritten by each command

Nothing here is a collective: where a run starts (fresh, or resumed from which epoch) is
agreed by every rank in ``coordinator.resume``, which reads and writes through ``RunDir``.
The worker never sees the directory: it is handed a ``NodeFiles``, where its node's state
goes.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Optional

from actors.config import RunConfig
from actors.errors import ConfigError
from actors.files import atomic_save, atomic_write_text, load_state
from actors.metrics import read_metrics_file

log = logging.getLogger("ktg")

CONFIG, STATE, METRICS, SUMMARY, LOCK = "run_config.json", "run_state.json", "metrics.jsonl", "summary.json", ".lock"
MARKER = "latest.json"
REPLACED = "replaced"
# what a run writes (set aside as a whole when a fresh run starts in the directory)
OUTPUTS = (CONFIG, STATE, METRICS, SUMMARY, "checkpoints", "wandb", "pictures")
# settings a resumed run must share with the run that wrote the checkpoints (train.epochs
# may change: that extends the run)
KEPT = (("seed",), ("graph",), ("dataset",), ("optim",), ("train", "batch_size"), ("train", "max_steps_per_epoch"),
        ("train", "precision"))
START_OVER = "start over with train.resume=false (the old outputs are moved to replaced/), or use a new hydra.run.dir"


class NodeFiles:
    """Where one node's state goes (what the worker is handed instead of a path)."""

    def __init__(self, run_dir: "RunDir", index: int):
        self.run_dir, self.index = run_dir, index

    def save_epoch(self, epoch: int, state: dict[str, Any]) -> Path:
        """This node's share of the group checkpoint after ``epoch``."""
        path = self.run_dir.checkpoint_path(epoch, self.index)
        atomic_save(state, path)
        return path

    def save_final(self, state: dict[str, Any]) -> Path:
        path = self.run_dir.path / f"node{self.index}.pt"
        atomic_save(state, path)
        return path


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self.tends_own_copy = False  # set by coordinator.resume: this rank keeps a machine's own copy

    def __str__(self) -> str:
        return str(self.path)

    def __getstate__(self) -> dict[str, Any]:
        """Handed to another process (a node's ``NodeFiles``): the path, never the lock."""
        return {"path": self.path, "_lock_fd": None, "tends_own_copy": False}

    def node_files(self, index: int) -> NodeFiles:
        return NodeFiles(self, index)

    # --- ownership -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory and check it can be written (before any process group forms)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):
                pass
        except OSError as e:
            raise ConfigError(f"cannot write to the run directory {self.path} ({type(e).__name__}: {e}); "
                              "choose another with hydra.run.dir=<dir>") from e

    def lock(self) -> None:
        """Own the directory for this process's lifetime (``flock`` on ``.lock``; the kernel
        releases it when the process ends, however it ends, so a killed run never leaves it
        stuck). A second run into the directory is refused at once, naming the holder."""
        self.prepare()
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"the run directory {self.path} is in use by another run ({holder}); wait for it to "
                              "end, or give this run its own directory with hydra.run.dir=<dir>") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {_now()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # --- what is there ---------------------------------------------------------------------------

    def outputs(self) -> list[str]:
        """Names of the run outputs present (see OUTPUTS, plus node<i>.pt)."""
        names = [n for n in OUTPUTS if (self.path / n).exists()]
        return names + sorted(p.name for p in self.path.glob("node*.pt"))

    def set_aside(self, paths: Optional[list[Path]] = None) -> Optional[Path]:
        """Move ``paths`` (default: every output of an earlier run) into ``replaced/<time>/``,
        keeping their place in the directory (nothing is deleted)."""
        names = [str(p.relative_to(self.path)) for p in paths] if paths is not None else self.outputs()
        if not names:
            return None
        dest = self.path / REPLACED / _now().replace(":", "-")
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        for name in names:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path / name, dest / name)
        return dest

    # --- config and state ------------------------------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(json.dumps(config, indent=2, default=str) + "\n", self.path / CONFIG)

    def read_config(self) -> RunConfig:
        """The config of the run that wrote this directory; ConfigError if it is missing or
        unreadable (a checkpoint that cannot be checked is not resumed)."""
        path = self.path / CONFIG
        try:
            return RunConfig.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            why = "is missing" if isinstance(e, FileNotFoundError) else f"is unreadable ({type(e).__name__}: {e})"
            raise ConfigError(f"{path} {why}, so the checkpoints in {self.path / 'checkpoints'} cannot be checked "
                              f"against this run's config; {START_OVER}") from e

    def wandb_id(self) -> str:
        """The wandb run id of this directory's run: made once, kept across resumes and
        restarts so they all log into one wandb run."""
        path = self.path / STATE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        if not isinstance(state, dict) or not isinstance(state.get("wandb_id"), str):
            import secrets

            state = {**(state if isinstance(state, dict) else {}), "wandb_id": secrets.token_hex(4)}
            atomic_write_text(json.dumps(state) + "\n", path)
        return state["wandb_id"]

    # --- group checkpoints -----------------------------------------------------------------------

    def epoch_dir(self, epoch: int) -> Path:
        return self.path / "checkpoints" / f"epoch_{epoch:04d}"

    def checkpoint_path(self, epoch: int, index: int) -> Path:
        return self.epoch_dir(epoch) / f"node{index}.pt"

    def mark_complete(self, epoch: int, num_nodes: int, keep: int = 2) -> None:
        """Rank 0, after every node saved ``epoch``: move the marker, prune old epochs."""
        self.write_marker(epoch, num_nodes)
        self.prune(epoch, keep)

    def write_marker(self, epoch: int, num_nodes: int) -> None:
        """``checkpoints/latest.json``: ``epoch`` is the newest epoch every node saved."""
        atomic_write_text(json.dumps({"epoch": epoch, "nodes": num_nodes}) + "\n", self.path / "checkpoints" / MARKER)

    def prune(self, epoch: int, keep: int = 2) -> None:
        """Remove all but the newest ``keep`` epoch folders (never ``epoch``'s): rank 0, and
        the first rank of each machine whose copy of the directory is its own."""
        root = self.path / "checkpoints"
        epochs = sorted(p for p in root.glob("epoch_*") if p.is_dir())
        for old in epochs[: max(0, len(epochs) - keep)]:
            if old.name != self.epoch_dir(epoch).name:
                shutil.rmtree(old, ignore_errors=True)

    def record_files(self) -> dict[str, str]:
        """The texts of the run's record in this copy (config, marker, run state, metrics):
        what another machine's rank 0 needs to judge and continue the run."""
        names = [CONFIG, STATE, METRICS, f"checkpoints/{MARKER}"]
        return {n: (self.path / n).read_text() for n in names if (self.path / n).is_file()}

    def scan(self) -> dict[str, Any]:
        """What this machine's copy holds: the marker's epoch (or why it does not parse) and
        the epoch folders present."""
        marker = self.path / "checkpoints" / MARKER
        epoch, problem = None, None
        if marker.exists():
            try:
                epoch = int(json.loads(marker.read_text())["epoch"])
            except (OSError, ValueError, TypeError, KeyError) as e:
                problem = f"{marker} does not parse ({type(e).__name__}: {e})"
        epochs = []
        for p in (self.path / "checkpoints").glob("epoch_*"):
            try:
                epochs.append(int(p.name[len("epoch_"):]))
            except ValueError:
                continue
        try:
            owner = (self.path / LOCK).read_text().strip()  # rank 0's lock line, where its copy is seen
        except OSError:
            owner = None
        return {"marker": epoch, "marker_problem": problem, "marker_exists": marker.exists(), "epochs": sorted(epochs),
                "owner": owner, "host": socket.gethostname()}

    def load_checkpoint(self, epoch: int, index: int, model: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """Node ``index``'s state at ``epoch`` if it loads and is what it should be, else
        (None, why)."""
        path = self.checkpoint_path(epoch, index)
        if not path.is_file():
            return None, f"{path} is missing"
        try:
            state = load_state(path)
        except Exception as e:  # any failure to load is a damaged file here; reported by name
            return None, f"{path} does not load ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
        if not isinstance(state, dict) or not {"model", "step", "epoch", "meta"} <= set(state) \
                or not isinstance(state["meta"], dict):
            return None, f"{path} is not a node checkpoint"
        if int(state["epoch"]) != epoch:
            return None, f"{path} holds epoch {state['epoch']}, not {epoch}"
        meta = state["meta"]
        if meta.get("node", index) != index or meta.get("model") != model:
            return None, f"{path} holds node {meta.get('node')} ({meta.get('model')}), not node {index} ({model})"
        return state, None

    # --- metrics and summary -----------------------------------------------------------------------

    def keep_metrics(self, epoch: int, num_nodes: int) -> list[list[dict[str, Any]]]:
        """Keep the rows of epochs 1..``epoch`` (those the checkpoint holds), each (epoch,
        node) once; drop later rows and lines that do not parse. Rewrites the file
        atomically and returns the complete epochs, one list of rows (by node) each."""
        path = self.path / METRICS
        rows, bad = read_metrics_file(path) if path.exists() else ([], [])
        if bad:
            log.warning(f"[resume] {path}: dropped {', '.join(bad)} (not a metrics row)")
        by_key = {(r["epoch"], r["node"]): r for r in rows if r["epoch"] <= epoch and 0 <= r["node"] < num_nodes}
        kept = [by_key[k] for k in sorted(by_key)]
        atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), self.path / METRICS)
        history = [[by_key[(e, i)] for i in range(num_nodes)] for e in range(1, epoch + 1)
                   if all((e, i) in by_key for i in range(num_nodes))]
        if len(history) < epoch:
            log.warning(f"[resume] {self.path / METRICS} lacks some rows of epochs 1..{epoch}: "
                        "the summary covers the epochs it has")
        return history

    def clear_metrics(self) -> None:
        (self.path / METRICS).unlink(missing_ok=True)

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.path / SUMMARY
        atomic_write_text(json.dumps(summary, indent=2) + "\n", path)
        return path


def changed_settings(old: RunConfig, new: RunConfig) -> list[str]:
    """Settings that differ between two runs, of those a resume must keep (KEPT)."""
    a, b = old.to_dict(), new.to_dict()

    def pick(d: dict[str, Any], key: tuple[str, ...]) -> Any:
        for k in key:
            d = d[k]
        return d

    return [".".join(k) for k in KEPT if pick(a, k) != pick(b, k)]


def _now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d_%H:%M:%S")
