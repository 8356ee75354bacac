"""The run directory and its one owner, ``RunDir``: layout, lock, config check, the
verified choice of the epoch to resume from, the metrics rows kept on resume, and every
write (atomic, with the user's usual file permissions).

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

Nothing here is a collective: ``start`` is handed the group's ``gather`` and ``broadcast``
(one object per rank), so the same code serves torchrun and a single process. The worker
never sees the directory: it is handed a ``NodeFiles``, where its node's state goes.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

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


@dataclass
class Start:
    """Where a run starts, agreed by every rank: ``epoch`` epochs are done (0 = fresh), and
    ``states`` are this process's nodes' states at that point, by node (None when fresh)."""

    epoch: int = 0
    states: Optional[dict[int, dict[str, Any]]] = None
    history: list[list[dict[str, Any]]] = field(default_factory=list)  # rank 0: kept metrics, per epoch


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
        self.tends_own_copy = False  # set by start(): this rank keeps a machine's own copy

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
        root = self.path / "checkpoints"
        atomic_write_text(json.dumps({"epoch": epoch, "nodes": num_nodes}) + "\n", root / MARKER)
        self.prune(epoch, keep)

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

    # --- the start of a run: every rank agrees before anything is written ---------------------------

    def start(self, cfg: RunConfig, rank: int, placement: list[list[int]], config: dict[str, Any],
              gather: Callable[[Any], list[Any]], broadcast: Callable[[Any], Any]) -> Start:
        """Decide with every rank where the run starts, then (rank 0) prepare the directory.

        1. Each rank says what it sees; rank 0 judges the directory: with ``train.resume``
           and checkpoints present, the recorded config must be readable and agree (else
           every rank raises the same ConfigError).
        2. From the newest candidate epoch down (never past the marker), each node's file is
           loaded by the rank that hosts it (``placement[rank]``) or, when that rank's copy of
           the directory lacks it (several machines, no shared disk, ranks placed anew), by
           a rank that has it, and sent over; the first epoch that every node has intact
           is the start (each fallback is said). Checkpoints present but none intact: a
           one-line error naming the file.
        3. Only then rank 0 writes: a fresh start sets the earlier run's outputs aside; a
           resume keeps the metrics rows of the epochs it resumes (each once, a cut last
           line dropped); so does the first rank of each machine with its own copy, to its
           copy. Every outcome is gathered, so a failed write stops every rank."""
        seen = gather(self.scan())
        holder = max(range(len(seen)), key=lambda r: (seen[r]["marker"] or 0, r == 0))  # the newest marker; ties: rank 0
        if holder != 0:
            # the run's record (config, marker, metrics) is on another machine's copy, whose
            # rank 0 it was in an earlier attempt: it comes to this rank 0's copy first
            record = gather(self.record_files() if rank == holder else None)[holder]
            if rank == 0:
                for name, text in record.items():
                    atomic_write_text(text, self.path / name)
                log.info(f"[resume] the run's record (config, checkpoint marker, metrics) was on the machine of rank "
                         f"{holder} this time: copied to {self.path}")
            seen[0] = gather(self.scan())[0]
        # ranks whose copy of the directory is not rank 0's (another machine, no shared disk):
        # the first rank of each such copy tends it (sets aside, prunes)
        copies = [None if s["owner"] == seen[0]["owner"] else (s["host"], s["owner"]) for s in seen]
        self.tends_own_copy = copies[rank] is not None and copies.index(copies[rank]) == rank
        verdict = self._judge(cfg, seen) if rank == 0 else None
        verdict = broadcast(verdict)
        for note in verdict["notes"] if rank == 0 else ():
            log.info(note)
        if verdict["error"]:
            raise ConfigError(verdict["error"])
        start = Start()
        problems: list[str] = []
        host_of = {t: r for r, hosted in enumerate(placement) for t in hosted}
        for epoch in verdict["candidates"]:
            present = gather([t for t in range(cfg.graph.num_nodes) if self.checkpoint_path(epoch, t).is_file()])
            provider = {t: host_of[t] if t in present[host_of[t]] else next((r for r, ts in enumerate(present) if t in ts), None)
                        for t in host_of}
            loaded = {t: self.load_checkpoint(epoch, t, cfg.graph.nodes[t].model) for t, r in provider.items() if r == rank}
            mine = [why for _, why in loaded.values() if why]
            if rank == 0:
                mine += [f"{self.checkpoint_path(epoch, t)} is missing" for t, r in provider.items() if r is None]
            whys = [w for ws in gather(mine) for w in ws]
            if not whys:
                states = {t: s for t, (s, _) in loaded.items() if host_of[t] == rank}
                away = {t: s for t, (s, _) in loaded.items() if host_of[t] != rank}
                if any(r != host_of[t] for t, r in provider.items()):  # some node's file is on another machine
                    for sent in gather(away):
                        states.update({t: s for t, s in sent.items() if host_of[t] == rank})
                start = Start(epoch, states)
                break
            problems += whys
        if rank == 0 and problems:
            log.warning("[resume] skipped a damaged checkpoint: " + "; ".join(problems)
                        + (f"; resuming from epoch {start.epoch}, the newest epoch every node has intact"
                           if start.epoch else ""))
        if verdict["candidates"] and not start.epoch:
            if verdict["marker"]:
                raise ConfigError(f"no epoch in {self.path / 'checkpoints'} is intact on every node ({problems[0]}); "
                                  f"{START_OVER}")
            # no marker: no group checkpoint was ever completed (a crash while the first was
            # being written): nothing to resume, so a fresh start (the partial files set aside)
            if rank == 0:
                log.warning(f"[resume] {self.path / 'checkpoints'} holds no complete group checkpoint: starting fresh")
        if start.epoch > cfg.train.epochs:
            raise ConfigError(f"{self.path} holds a run at epoch {start.epoch} but train.epochs={cfg.train.epochs}: "
                              f"a run cannot be shortened; use train.epochs>={start.epoch}, or {START_OVER}")
        outcome = None
        try:
            if rank == 0:
                start.history = self._prepare_writes(cfg, start.epoch, config)
            elif self.tends_own_copy:
                self._prepare_own_copy(cfg, start.epoch)
        except OSError as e:
            outcome = f"cannot prepare the run directory {self.path} ({type(e).__name__}: {e})"
        outcomes = [o for o in gather(outcome) if o]
        outcome = outcomes[0] if outcomes else None
        if outcome:
            raise ConfigError(outcome)
        return start

    def _judge(self, cfg: RunConfig, seen: list[dict[str, Any]]) -> dict[str, Any]:
        """Rank 0: the candidate epochs to try (newest first), notes to print, or an error."""
        mine = seen[0]
        epochs = sorted({e for s in seen for e in s["epochs"]}, reverse=True)
        has_checkpoints = bool(epochs) or mine["marker_exists"]
        verdict: dict[str, Any] = {"error": None, "candidates": [], "notes": [], "marker": mine["marker_exists"]}
        if not cfg.train.resume or not has_checkpoints:
            return verdict
        try:
            previous = self.read_config()
        except ConfigError as e:
            return {**verdict, "error": str(e)}
        for i, (a, b) in enumerate(zip(previous.graph.nodes, cfg.graph.nodes)):
            if a.model != b.model:
                return {**verdict, "error": f"{self.path}/checkpoints holds node {i} as a {a.model}, but the graph says "
                                            f"{b.model}: resume with the same graph, or {START_OVER}"}
        changed = changed_settings(previous, cfg)
        if changed:
            return {**verdict, "error": f"{self.path} holds a checkpoint of a run with other {', '.join(changed)}; "
                                        f"resuming it with this config would mix two experiments: {START_OVER}"}
        if mine["marker_problem"]:
            verdict["notes"].append(f"[resume] {mine['marker_problem']}: trying every epoch folder, newest first")
        elif mine["marker"] is not None:
            if mine["marker"] not in epochs:
                verdict["notes"].append(f"[resume] checkpoints/{MARKER} names epoch {mine['marker']}, whose folder is "
                                        "missing: trying the older ones")
            epochs = [e for e in epochs if e <= mine["marker"]]
        else:
            verdict["notes"].append(f"[resume] checkpoints/{MARKER} is missing: trying every epoch folder, newest first")
        if previous.train.epochs != cfg.train.epochs and epochs:
            verdict["notes"].append(
                f"[resume] extending the run from {previous.train.epochs} to {cfg.train.epochs} epochs: from the resumed "
                f"step on, the learning-rate schedule and the Linear/NegativeLinear gates follow the new total "
                f"(README, 'Extending a run')")
        if not epochs:
            return {**verdict, "error": f"{self.path / 'checkpoints'} holds no epoch folder to resume from; "
                                        f"{START_OVER}"}
        verdict["candidates"] = epochs
        return verdict

    def _prepare_own_copy(self, cfg: RunConfig, epoch: int) -> None:
        """The first rank of a machine with its own copy of the directory: what rank 0 does
        to its copy, for the node files kept here (a fresh start sets them aside; a resume
        sets aside epoch folders past ``epoch`` and the final states of an earlier end)."""
        if epoch == 0:
            stale = [self.path / "checkpoints", *self.path.glob("node*.pt")]
        else:
            stale = [self.epoch_dir(e) for e in self.scan()["epochs"] if e > epoch]
            if epoch < cfg.train.epochs:
                stale += list(self.path.glob("node*.pt"))
        dest = self.set_aside([p for p in stale if p.exists()])
        if dest is not None:
            log.info(f"[run dir] this machine's copy {self.path}: moved the node files of an earlier run to {dest}")

    def _prepare_writes(self, cfg: RunConfig, epoch: int, config: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """Rank 0, once every rank agreed: set aside (fresh) or trim (resume); record the
        config. Returns the kept metrics, one list of rows per epoch."""
        history: list[list[dict[str, Any]]] = []
        if epoch == 0:
            dest = self.set_aside()
            if dest is not None:
                log.info(f"[run dir] {self.path} held the outputs of an earlier run"
                         f"{' (train.resume=false)' if not cfg.train.resume else ''}: moved them to {dest}")
        else:
            history = self.keep_metrics(epoch, cfg.graph.num_nodes)
            stale = [self.epoch_dir(e) for e in self.scan()["epochs"] if e > epoch]  # damaged or never marked
            if epoch < cfg.train.epochs:  # the final outputs of an earlier end (an extended run's)
                stale += [self.path / SUMMARY, *self.path.glob("node*.pt")]
            dest = self.set_aside([p for p in stale if p.exists()])
            if dest is not None:
                log.info(f"[resume] moved what the resumed run will write anew (final outputs of an earlier end, "
                         f"epoch folders past epoch {epoch}) to {dest}")
            atomic_write_text(json.dumps({"epoch": epoch, "nodes": cfg.graph.num_nodes}) + "\n",
                              self.path / "checkpoints" / MARKER)
        self.write_config(config)
        return history

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
