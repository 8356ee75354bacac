"""Where a run starts, agreed by every rank before anything in the run directory is written.

``agree_start`` runs three steps on the group's ``gather`` and ``broadcast`` (one object per
rank, so the same code serves torchrun and a group of one: ``lambda x: [x]``, ``lambda x: x``):

1. ``agree_on_record``: each rank scans its copy of the directory; when the newest checkpoint
   marker is on another machine's copy (no shared disk, ranks placed anew), the run's record
   comes to rank 0's copy first. Rank 0 judges it (``judge``: with ``train.resume`` and
   checkpoints present, the recorded config must be readable and agree) and broadcasts the
   candidate epochs, newest first, or an error every rank raises alike.
2. ``choose_epoch``: from the newest candidate down, each node's file is loaded by the rank
   that hosts it or, when that rank's copy lacks it, by a rank that has it, and sent over;
   the first epoch every node has intact is the start (each fallback is said).
3. ``prepare_writes``: only then rank 0 writes (a fresh start sets the earlier outputs aside;
   a resume trims the metrics and what it will write anew), and so does the first rank of
   each machine with its own copy, to its copy. Every outcome is gathered, so a failed write
   stops every rank.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from actors.config import RunConfig
from actors.errors import ConfigError
from actors.files import atomic_write_text
from coordinator.rundir import MARKER, START_OVER, SUMMARY, RunDir, changed_settings

log = logging.getLogger("ktg")

Gather = Callable[[Any], list[Any]]


@dataclass
class Start:
    """Where a run starts, agreed by every rank: ``epoch`` epochs are done (0 = fresh), and
    ``states`` are this process's nodes' states at that point, by node (None when fresh)."""

    epoch: int = 0
    states: Optional[dict[int, dict[str, Any]]] = None
    history: list[list[dict[str, Any]]] = field(default_factory=list)  # rank 0: kept metrics, per epoch


def agree_start(rd: RunDir, cfg: RunConfig, rank: int, placement: list[list[int]], config: dict[str, Any],
                gather: Gather, broadcast: Callable[[Any], Any]) -> Start:
    """Decide with every rank where the run starts (``placement[rank]``: the nodes this rank
    hosts), then prepare the directory for it; ``config`` is what run_config.json records."""
    verdict = agree_on_record(rd, cfg, rank, gather, broadcast)
    start = choose_epoch(rd, cfg, rank, placement, verdict, gather)
    start.history = prepare_writes(rd, cfg, rank, start.epoch, config, gather)
    return start


def agree_on_record(rd: RunDir, cfg: RunConfig, rank: int, gather: Gather,
                    broadcast: Callable[[Any], Any]) -> dict[str, Any]:
    """Step 1: every rank's view of the directory, the record on rank 0's copy, rank 0's
    verdict on it (``judge``) on every rank. Sets ``rd.tends_own_copy``."""
    seen = gather(rd.scan())
    holder = max(range(len(seen)), key=lambda r: (seen[r]["marker"] or 0, r == 0))  # the newest marker; ties: rank 0
    if holder != 0:
        # the run's record (config, marker, metrics) is on another machine's copy, whose
        # rank 0 it was in an earlier attempt: it comes to this rank 0's copy first
        record = gather(rd.record_files() if rank == holder else None)[holder]
        if rank == 0:
            for name, text in record.items():
                atomic_write_text(text, rd.path / name)
            log.info(f"[resume] the run's record (config, checkpoint marker, metrics) was on the machine of rank "
                     f"{holder} this time: copied to {rd.path}")
        seen[0] = gather(rd.scan())[0]
    # ranks whose copy of the directory is not rank 0's (another machine, no shared disk):
    # the first rank of each such copy tends it (sets aside, prunes)
    copies = [None if s["owner"] == seen[0]["owner"] else (s["host"], s["owner"]) for s in seen]
    rd.tends_own_copy = copies[rank] is not None and copies.index(copies[rank]) == rank
    verdict = broadcast(judge(rd, cfg, seen) if rank == 0 else None)
    for note in verdict["notes"] if rank == 0 else ():
        log.info(note)
    if verdict["error"]:
        raise ConfigError(verdict["error"])
    return verdict


def judge(rd: RunDir, cfg: RunConfig, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0: the candidate epochs to try (newest first), notes to print, or an error."""
    mine = seen[0]
    epochs = sorted({e for s in seen for e in s["epochs"]}, reverse=True)
    has_checkpoints = bool(epochs) or mine["marker_exists"]
    verdict: dict[str, Any] = {"error": None, "candidates": [], "notes": [], "marker": mine["marker_exists"]}
    if not cfg.train.resume or not has_checkpoints:
        return verdict
    try:
        previous = rd.read_config()
    except ConfigError as e:
        return {**verdict, "error": str(e)}
    for i, (a, b) in enumerate(zip(previous.graph.nodes, cfg.graph.nodes)):
        if a.model != b.model:
            return {**verdict, "error": f"{rd.path}/checkpoints holds node {i} as a {a.model}, but the graph says "
                                        f"{b.model}: resume with the same graph, or {START_OVER}"}
    changed = changed_settings(previous, cfg)
    if changed:
        return {**verdict, "error": f"{rd.path} holds a checkpoint of a run with other {', '.join(changed)}; "
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
        return {**verdict, "error": f"{rd.path / 'checkpoints'} holds no epoch folder to resume from; {START_OVER}"}
    verdict["candidates"] = epochs
    return verdict


def choose_epoch(rd: RunDir, cfg: RunConfig, rank: int, placement: list[list[int]], verdict: dict[str, Any],
                 gather: Gather) -> Start:
    """Step 2: the newest candidate epoch every node has intact, with this rank's nodes'
    states; a fresh start when there is none and no marker (no group checkpoint was ever
    completed), else a ConfigError naming a damaged file."""
    start = Start()
    problems: list[str] = []
    host_of = {t: r for r, hosted in enumerate(placement) for t in hosted}
    for epoch in verdict["candidates"]:
        states, whys = _load_epoch(rd, cfg, rank, epoch, host_of, gather)
        if not whys:
            start = Start(epoch, states)
            break
        problems += whys
    if rank == 0 and problems:
        log.warning("[resume] skipped a damaged checkpoint: " + "; ".join(problems)
                    + (f"; resuming from epoch {start.epoch}, the newest epoch every node has intact"
                       if start.epoch else ""))
    if verdict["candidates"] and not start.epoch:
        if verdict["marker"]:
            raise ConfigError(f"no epoch in {rd.path / 'checkpoints'} is intact on every node ({problems[0]}); "
                              f"{START_OVER}")
        # no marker: no group checkpoint was ever completed (a crash while the first was
        # being written): nothing to resume, so a fresh start (the partial files set aside)
        if rank == 0:
            log.warning(f"[resume] {rd.path / 'checkpoints'} holds no complete group checkpoint: starting fresh")
    if start.epoch > cfg.train.epochs:
        raise ConfigError(f"{rd.path} holds a run at epoch {start.epoch} but train.epochs={cfg.train.epochs}: "
                          f"a run cannot be shortened; use train.epochs>={start.epoch}, or {START_OVER}")
    return start


def _load_epoch(rd: RunDir, cfg: RunConfig, rank: int, epoch: int, host_of: dict[int, int],
                gather: Gather) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """This rank's nodes' states at ``epoch`` and, on every rank alike, why some node's file
    is not intact (nothing: the epoch is the start). A node's file is loaded by the rank
    hosting it or, when that rank's copy lacks it, by the first rank whose copy has it, and
    then sent over."""
    present = gather([t for t in range(cfg.graph.num_nodes) if rd.checkpoint_path(epoch, t).is_file()])
    provider = {t: host_of[t] if t in present[host_of[t]] else next((r for r, ts in enumerate(present) if t in ts), None)
                for t in host_of}
    loaded = {t: rd.load_checkpoint(epoch, t, cfg.graph.nodes[t].model) for t, r in provider.items() if r == rank}
    mine = [why for _, why in loaded.values() if why]
    if rank == 0:
        mine += [f"{rd.checkpoint_path(epoch, t)} is missing" for t, r in provider.items() if r is None]
    whys = [w for ws in gather(mine) for w in ws]
    if whys:
        return {}, whys
    states = {t: s for t, (s, _) in loaded.items() if host_of[t] == rank}
    away = {t: s for t, (s, _) in loaded.items() if host_of[t] != rank}
    if any(r != host_of[t] for t, r in provider.items()):  # some node's file is on another machine
        for sent in gather(away):
            states.update({t: s for t, s in sent.items() if host_of[t] == rank})
    return states, []


def prepare_writes(rd: RunDir, cfg: RunConfig, rank: int, epoch: int, config: dict[str, Any],
                   gather: Gather) -> list[list[dict[str, Any]]]:
    """Step 3, once every rank agreed on ``epoch``: rank 0 prepares the directory (returns the
    kept metrics, one list of rows per epoch), the first rank of a machine with its own copy
    that copy; a failed write on any rank is a ConfigError on every rank."""
    history: list[list[dict[str, Any]]] = []
    outcome = None
    try:
        if rank == 0:
            history = _prepare_run_dir(rd, cfg, epoch, config)
        elif rd.tends_own_copy:
            _prepare_own_copy(rd, cfg, epoch)
    except OSError as e:
        outcome = f"cannot prepare the run directory {rd.path} ({type(e).__name__}: {e})"
    outcomes = [o for o in gather(outcome) if o]
    if outcomes:
        raise ConfigError(outcomes[0])
    return history


def _prepare_run_dir(rd: RunDir, cfg: RunConfig, epoch: int, config: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Rank 0: set aside (fresh) or trim (resume); record the config. Returns the kept
    metrics, one list of rows per epoch."""
    history: list[list[dict[str, Any]]] = []
    if epoch == 0:
        dest = rd.set_aside()
        if dest is not None:
            log.info(f"[run dir] {rd.path} held the outputs of an earlier run"
                     f"{' (train.resume=false)' if not cfg.train.resume else ''}: moved them to {dest}")
    else:
        history = rd.keep_metrics(epoch, cfg.graph.num_nodes)
        stale = [rd.epoch_dir(e) for e in rd.scan()["epochs"] if e > epoch]  # damaged or never marked
        if epoch < cfg.train.epochs:  # the final outputs of an earlier end (an extended run's)
            stale += [rd.path / SUMMARY, *rd.path.glob("node*.pt")]
        dest = rd.set_aside([p for p in stale if p.exists()])
        if dest is not None:
            log.info(f"[resume] moved what the resumed run will write anew (final outputs of an earlier end, "
                     f"epoch folders past epoch {epoch}) to {dest}")
        rd.write_marker(epoch, cfg.graph.num_nodes)
    rd.write_config(config)
    return history


def _prepare_own_copy(rd: RunDir, cfg: RunConfig, epoch: int) -> None:
    """The first rank of a machine with its own copy of the directory: what rank 0 does
    to its copy, for the node files kept here (a fresh start sets them aside; a resume
    sets aside epoch folders past ``epoch`` and the final states of an earlier end)."""
    if epoch == 0:
        stale = [rd.path / "checkpoints", *rd.path.glob("node*.pt")]
    else:
        stale = [rd.epoch_dir(e) for e in rd.scan()["epochs"] if e > epoch]
        if epoch < cfg.train.epochs:
            stale += list(rd.path.glob("node*.pt"))
    dest = rd.set_aside([p for p in stale if p.exists()])
    if dest is not None:
        log.info(f"[run dir] this machine's copy {rd.path}: moved the node files of an earlier run to {dest}")
