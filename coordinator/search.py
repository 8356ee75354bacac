"""Graph search with Ray Tune + ASHA: each trial is one whole actor group.

The search space (``SearchConfig``) covers the model of every non-target node (from a zoo)
and the gate of each of the M x M edges; the target's model is fixed. Each trial samples a
graph, starts M ``NodeActor``s in its placement group (``coordinator.group``), trains them
epoch by epoch with the same ``NodeWorker`` that torchrun runs, and reports the target
node's **validation** accuracy to ASHA once per epoch (test accuracy is never reported to
Tune, so it cannot be used to choose). The best graph is written as a graph config that
``torchrun launch.py graph=<file>`` retrains on any dataset.

Frozen nodes: a sampled node whose incoming gates are all Cutoff is a frozen teacher. With
``frozen: teachers`` (default) it loads ``<teachers_dir>/<model>/node0.pt``; zoo models with
no such file are never sampled frozen. With ``frozen: exclude`` no frozen node is sampled.
A graph with a frozen target is never trained: the random searcher resamples it; with a
model-based searcher the trial reports 0 without training, so the searcher learns to avoid it.

Resume: a new search records what defines it in ``<experiment>/search_space.json``
(``search_record``); ``search.resume=<experiment>`` with another space, seed, budget or
training config is refused before Ray starts, naming each change (``check_resume``).
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback, Trainable
from ray.tune.result import SHOULD_CHECKPOINT
from ray.tune.search import Searcher

from actors.config import RunConfig
from actors.errors import ConfigError
from actors.files import atomic_write_text
from coordinator.search_space import SearchConfig, _flatten, describe_gates

log = logging.getLogger("ktg")
METRIC = "target_val_acc"
RECORD = "search_space.json"
"""What defines a search, written into the experiment folder when it starts; a resume checks it."""
DEFINING = ("num_nodes", "target_model", "zoo", "models", "gates", "edge_kinds", "frozen", "teachers_dir", "extra",
            "num_samples", "max_epochs", "grace_period", "reduction_factor", "searcher",
            "cpus_per_node", "gpus_per_node", "processes_per_trial")
"""SearchConfig fields recorded and compared on resume: the space, the trial budget, ASHA's
schedule, the sampler, and each trial's resources (a resumed trial keeps its placement group, so
other per-node resources would not fit it). The rest say how this attempt runs and apply to a
resume: name, storage, resume, verbose, num_cpus, address, checkpoint_every, max_failures (to
the trials it starts: a restored trial keeps its own); not max_concurrent, whose first-attempt
limit Tune restores (a change is warned about)."""
TRAINING = ("dataset", "optim", "train.batch_size", "train.max_steps_per_epoch", "train.precision", "train.nonfinite")
"""Parts of the base config recorded with the search: what each trial learns from and how
(``dataset.root`` and ``dataset.download`` say where the data is, not what it is)."""
NOT_TRAINING = ("dataset.root", "dataset.download")


# --- random search with rejection of invalid graphs ---------------------------------------------


class GraphRandomSearch(Searcher):
    """Uniform random graphs (the paper's ASHA + random sampling), resampling any sample
    that is not a valid graph; seeded, and saved with the experiment for resume."""

    def __init__(self, space: SearchConfig, seed: int, metric: str = METRIC, mode: str = "max"):
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.rng = random.Random(seed)
        self.suggested = 0

    def suggest(self, trial_id: str) -> Optional[dict[str, Any]]:
        choices = self.space.choices()
        for _ in range(100_000):
            params = {k: self.rng.choice(v) for k, v in choices.items()}
            if self.space.graph_from(params) is not None:
                self.suggested += 1
                return params
        raise ConfigError("the search space yields no valid graph in 100000 samples (see search.gates, search.frozen)")

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"rng": self.rng.getstate(), "suggested": self.suggested}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.rng.setstate(state["rng"])
        self.suggested = state["suggested"]


# --- one trial: one actor group -------------------------------------------------------------------


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


class GraphTrial(Trainable):
    """One trial: the sampled graph trained as an actor group (``coordinator.group``), one
    Tune step per epoch, the target's val accuracy reported to ASHA.

    Warm groups (``search.warm``, Tune's ``reuse_actors``): when a trial ends (completed,
    stopped by ASHA), Tune hands this trainable the next trial's config (``reset_config``),
    and the same node actors, in the same placement group, rebuild only the models,
    optimisers and gates (``ActorGroup.reset``). A trial whose step fails, or a group that
    cannot run the next graph, is shut down and the next trial starts a fresh one."""

    def setup(self, config: dict[str, Any], base: dict[str, Any], space: SearchConfig, experiment: str) -> None:
        # the trial's driver holds no GPU (its bundle is 1 CPU) and handles states on the host
        # only; Ray 2.60 leaves CUDA_VISIBLE_DEVICES unset for it, so hide the machine's GPUs
        # (a CUDA context here would sit on a GPU of another trial)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.base, self.space, self.experiment = base, space, experiment
        self.group = None
        self.recorder = None
        self._start_trial(config)

    # --- a trial's life ---------------------------------------------------------------------

    def _start_trial(self, params: dict[str, Any]) -> None:
        from ray.util import get_current_placement_group

        from coordinator.group import ActorGroup
        from coordinator.rundir import RunDir

        self.t_start = time.time()
        self.driver, self.recorder, self.start_epoch, self.last_checkpoint = None, None, 0, None
        space = self.space
        graph = space.graph_from(params, name=f"{self.experiment}-{self.trial_id}")
        self.invalid = graph is None  # only from a model-based searcher: report without training
        if self.invalid:
            return
        cfg_dict = copy.deepcopy(self.base)
        cfg_dict["graph"] = graph
        for key, value in params.items():
            if key.startswith("extra:"):
                _set_dotted(cfg_dict, key[len("extra:"):], value)
        cfg_dict.setdefault("logger", {})["group"] = self.experiment
        self.cfg_dict, self.cfg = cfg_dict, RunConfig.from_dict(cfg_dict)
        self.run_dir = RunDir(self._storage.trial_driver_staging_path)
        self.run_dir.write_config(cfg_dict)
        why = self.group.fits(self.cfg, space.processes) if self.group is not None else "no group yet"
        if why is None:
            try:
                self.group.reset(self.cfg, str(self.run_dir))
                self.warm = True
                return
            except Exception:  # e.g. a missing teacher checkpoint: the group may be half reset
                self._discard_group()
                raise
        if self.group is not None:
            log.info(f"[search] trial {self.trial_id}: a new actor group ({why})")
            self._discard_group()
        self.group = ActorGroup(self.cfg, str(self.run_dir), get_current_placement_group(), space.cpus_per_node,
                                space.gpus_per_node,
                                processes=space.processes)
        self.warm = False

    def _driver(self):
        """The trial's epoch loop, made at its first step: after ``load_checkpoint`` when Tune
        restores the trial (a retry, a resumed search), which sets where it starts."""
        if self.driver is None:
            from coordinator.epochs import EpochDriver
            from coordinator.recorder import RunRecorder

            if self.start_epoch:
                history = self.run_dir.keep_metrics(self.start_epoch, self.cfg.graph.num_nodes)
            else:
                history = []
                self.run_dir.clear_metrics()
            self.recorder = RunRecorder(self.cfg, self.run_dir, self.cfg_dict, wandb_name=f"{self.experiment}-{self.trial_id}",
                                        history=history)
            self.driver = EpochDriver(self.group, self.start_epoch, self.cfg.train.epochs, self.space.checkpoint_every,
                                      self.recorder)
        return self.driver

    def step(self) -> dict[str, Any]:
        if self.invalid:
            return {METRIC: 0.0, "epoch": self.space.max_epochs, "invalid": True, "done": True}
        try:
            driver = self._driver()
            r = driver.next()
        except BaseException:
            self._discard_group()  # a failed group is never reused: its actors may be mid-collective
            raise
        target = r.metrics[0]
        metrics = {METRIC: target.val_acc if target.val_acc is not None else 0.0, "epoch": r.epoch,
                   "ensemble_val_acc": target.ensemble_val_acc, "train_loss": target.train_loss}
        if r.first:
            metrics["launch_overhead_s"] = target.first_step_at - self.t_start
            metrics["warm"] = self.warm
        self.last_checkpoint = (r.epoch, r.checkpoint) if r.checkpoint is not None else self.last_checkpoint
        if r.checkpoint is not None:
            metrics[SHOULD_CHECKPOINT] = True
        if driver.done:
            metrics["done"] = True
        return metrics

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """Every node's state (``node<i>.pt``): the group checkpoint of the last epoch when one
        was committed, else fetched from the actors now (at an epoch boundary)."""
        import shutil

        import torch

        if self.invalid:  # nothing was trained (Tune checkpoints a trial when it ends)
            return
        epochs = self.driver.epoch if self.driver is not None else self.start_epoch
        if self.last_checkpoint is not None and self.last_checkpoint[0] == epochs and self.last_checkpoint[1].is_dir():
            for f in sorted(self.last_checkpoint[1].glob("node*.pt")):
                shutil.copyfile(f, Path(checkpoint_dir) / f.name)
            return
        for i, state in enumerate(self.group.states()):
            torch.save(state, Path(checkpoint_dir) / f"node{i}.pt")

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """A retried or resumed trial continues where its checkpoint stopped."""
        from actors.files import load_state

        if self.invalid:
            return
        states = [load_state(Path(checkpoint_dir) / f"node{i}.pt") for i in range(self.cfg.graph.num_nodes)]
        self.group.load_states(states)
        self.start_epoch = int(states[0]["epoch"])
        self.driver = None

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """The next trial on this warm trainable (Tune's ``reuse_actors``)."""
        self._end_trial()
        self._start_trial(new_config)
        return True

    def _end_trial(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        if self.group is not None:
            self.group.drop_checkpoint_dir()

    def _discard_group(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            group.shutdown()

    def cleanup(self) -> None:
        self._end_trial()
        self._discard_group()


# --- the experiment --------------------------------------------------------------------------------


class Progress(Callback):
    """The search's console: one compact line per ended trial (completed, stopped by ASHA,
    failed), and every ``every_s`` seconds a status line (running trials and their epochs,
    trials done, best so far), instead of Tune's tables. A resumed search's counts and best
    include the trials of earlier attempts (``adopt``); its clock starts at this attempt."""

    adopted = False
    """Whether the trials Tune restored have been counted (a class default: a Progress that an
    older version pickled into tuner.pkl has no such attribute)."""
    bundles: Optional[list[dict]] = None
    pending_after_s = 10.0
    stalled_since: Optional[float] = None  # since when trials are pending and none runs
    _told = False  # (class defaults too: what an older tuner.pkl's Progress lacks)

    def __init__(self, total: int, max_epochs: int = 0, every_s: float = 30.0, bundles: Optional[list[dict]] = None,
                 pending_after_s: float = 10.0):
        self.total, self.max_epochs, self.every_s = total, max_epochs, every_s
        self.done, self.best, self.best_trial = 0, -1.0, None
        self.t0 = self.last = time.monotonic()
        self.bundles, self.pending_after_s = bundles, pending_after_s

    def adopt(self, trials) -> None:
        """Count the trials that ended in earlier attempts and take the best val accuracy any
        trial reported then. Tune hands a restored search's trials to the first step and never
        calls on_trial_complete for those that had ended; a new search has none there."""
        self.adopted = True
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        for t in trials:
            r = t.last_result or {}
            top = ((getattr(t, "metric_analysis", None) or {}).get(METRIC) or {}).get("max", r.get(METRIC))
            self._seen(t, {METRIC: top, "invalid": r.get("invalid")})
        self.done += len(ended)
        if ended or self.best_trial:
            best = f"best val {self.best:.2f} ({self.best_trial})" if self.best_trial else "no result yet"
            print(f"[search] resumed: {len(ended)}/{self.total} trials ended in earlier attempts | {best}", flush=True)

    def _seen(self, trial, result) -> None:
        acc = (result or {}).get(METRIC)
        if acc is not None and not (result or {}).get("invalid") and acc > self.best:
            self.best, self.best_trial = acc, trial.trial_id

    def _line(self, trial, status: str) -> None:
        self.done += 1
        r = trial.last_result or {}
        self._seen(trial, r)
        epoch = r.get("epoch", 0)
        if status == "finished" and r.get("invalid"):
            status = "skipped (not a valid graph)"
        elif status == "finished":
            status = "completed" if not self.max_epochs or epoch >= self.max_epochs else "stopped by ASHA"
        acc = r.get(METRIC)
        acc_s = f"{acc:.2f}" if acc is not None else "-"
        print(f"[search] {self.done}/{self.total} trial {trial.trial_id} {status} at epoch "
              f"{epoch}: val {acc_s} (best so far {self.best:.2f})", flush=True)

    def on_step_begin(self, iteration, trials, **info):
        if not self.adopted:
            self.adopt(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._seen(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED")

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        running = [t for t in trials if t.status == "RUNNING"]
        pending = [t for t in trials if t.status == "PENDING"]
        self.stalled_since = (self.stalled_since or now) if pending and not running else None
        if self.stalled_since is not None and now - self.stalled_since >= self.pending_after_s \
                and (now - self.last >= self.every_s or not self._told):
            self._told, self.last = True, now
            print(self._waiting(len(pending), now - self.stalled_since), flush=True)
            return
        if now - self.last < self.every_s:
            return
        self.last = now
        epochs = ", ".join(str((t.last_result or {}).get("epoch", 0)) for t in running[:8]) + (", ..." if len(running) > 8 else "")
        best = f"best val {self.best:.2f} ({self.best_trial})" if self.best_trial else "no result yet"
        el = int(now - self.t0)
        print(f"[search] {el // 3600}:{el % 3600 // 60:02d}:{el % 60:02d} | {len(running)} running"
              + (f" (at epochs {epochs})" if running else "") + f" | {self.done}/{self.total} done | {best}", flush=True)


    def _waiting(self, pending: int, for_s: float) -> str:
        """What the pending trials wait for: their resources, and what the cluster has free."""
        import ray

        need = f"; each needs {_resources(_total(self.bundles))}" if self.bundles else ""
        free = _resources(ray.available_resources())
        return (f"[search] {pending} trial(s) pending and none running for {for_s:.0f} s{need}; the Ray cluster has "
                f"{free} free (a trial waits until its whole placement group fits)")


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _init_ray(space: SearchConfig) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    address = space.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=space.num_cpus, include_dashboard=False, log_to_driver=False)


def trial_bundles(space: SearchConfig) -> list[dict[str, float]]:
    """Each trial's placement group: 1 CPU for its driver, then one bundle per process. Sets
    ``space.gpus_per_node`` when it is null: 1 if the Ray cluster has GPUs, else 0."""
    import ray

    if space.gpus_per_node is None:
        space.gpus_per_node = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return [{"CPU": 1}] + [{"CPU": space.cpus_per_node, "GPU": space.gpus_per_node}] * space.processes


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    """What a placement group of ``bundles`` needs in all."""
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0) + v
    return out


def _resources(r: dict[str, float]) -> str:
    shown = {k: v for k, v in r.items() if k in ("CPU", "GPU") and v}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}" if shown else "{}"


def unplaceable(bundles: list[dict[str, float]], machines: list[dict[str, float]]) -> Optional[str]:
    """Why a trial of ``bundles`` can never start on a cluster of ``machines`` (each one's
    total resources), or None: a bundle that no machine can hold, or more in all than the
    cluster has (Tune would keep such a trial pending for good)."""
    need = _total(bundles)
    total = {k: sum(m.get(k, 0) for m in machines) for k in need}
    trial = (f"a trial needs {_resources(need)} (1 CPU for its driver + {len(bundles) - 1} process(es) x "
             f"{_resources(bundles[-1])})")
    if any(total[k] < v for k, v in need.items() if v):
        return f"{trial}, but the Ray cluster has {_resources(total)} in all"
    for b in bundles[1:]:
        if not any(all(m.get(k, 0) >= v for k, v in b.items() if v) for m in machines):
            largest = max(machines, key=lambda m: (m.get("GPU", 0), m.get("CPU", 0)), default={})
            return f"{trial}, and no machine of the Ray cluster can hold one process's {_resources(b)} (the largest has " \
                   f"{_resources(largest)})"
    return None


def check_resources(bundles: list[dict[str, float]], space: SearchConfig) -> None:
    """Refuse a search whose trials the cluster can never place (``unplaceable``), before
    Tune starts: on a cluster this command started, at once; on a cluster at
    ``search.address``, which an autoscaler may grow, with a warning (and the search's
    status line says what its trials wait for)."""
    import ray

    machines = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    why = unplaceable(bundles, machines)
    if why is None:
        return
    fix = ("set search.gpus_per_node=0 (or null: GPUs only where the cluster has them), fewer search.cpus_per_node or "
           "search.processes_per_trial, or a larger search.num_cpus")
    if not (space.address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError(f"{why}: its trials would wait for good; {fix}")
    log.warning(f"[search] {why}: unless the cluster grows, its trials will wait for good; {fix}")


def _base_dict(base: dict[str, Any]) -> dict[str, Any]:
    """The run config every trial starts from, with paths made absolute (Tune changes the
    working directory of trials)."""
    base = copy.deepcopy(base)
    for key in ("hydra", "search", "mode", "graph"):
        base.pop(key, None)
    ds = base.setdefault("dataset", {})
    ds["root"] = os.path.abspath(ds.get("root", "data"))
    return base


# --- what defines a search: recorded when it starts, checked when it resumes ---------------------


def search_record(space: SearchConfig, base: dict[str, Any], seed: int) -> dict[str, Any]:
    """Everything that defines the search, as ``{dotted name: value}`` (JSON values): the
    DEFINING fields as ``search.<field>``; ``search.teachers``, the zoo models with a teacher
    checkpoint (those may be sampled frozen); the seed (the sampler's; the launcher gives it
    to every trial too); and TRAINING of the base config, less the keys that search.extra
    searches (each trial overrides them)."""
    record: dict[str, Any] = {f"search.{k}": getattr(space, k) for k in DEFINING}
    record["search.teachers"] = sorted(m for m in set(space.zoo) if space.can_freeze(m))
    record["seed"] = seed
    run = RunConfig.from_dict({**base, "graph": {"nodes": [space.target_model], "gates": [["Through"]]}}).to_dict()
    for key in TRAINING:
        section, _, name = key.partition(".")
        value = run[section][name] if name else run[section]
        record.update(_flatten(value, section + ".") if isinstance(value, dict) else {key: value})
    for key in (*NOT_TRAINING, *space.extra):
        record.pop(key, None)
    return json.loads(json.dumps(record))


def write_record(out_dir: Path, record: dict[str, Any], space: SearchConfig) -> None:
    """``<experiment>/search_space.json``: the record, and the setting a resume keeps from the
    first attempt whatever the command says (Tune restores the concurrency limit)."""
    text = json.dumps({"defines": record, "kept": {"search.max_concurrent": space.max_concurrent}}, indent=2)
    atomic_write_text(text + "\n", out_dir / RECORD)


def check_resume(path: Path, record: dict[str, Any], space: SearchConfig) -> None:
    """Refuse to resume the search in ``path`` with other settings than it started with:
    Tune would keep the first attempt's sampler, scheduler and budget, but train the trials
    it starts now with the new config (one experiment, two searches). An experiment with no
    readable record (an older version wrote it) cannot be checked: warn and go on."""
    file = path / RECORD
    try:
        saved = json.loads(file.read_text())
        old, kept = saved["defines"], saved.get("kept", {})
    except FileNotFoundError:
        log.warning(f"[search] {path} has no {RECORD} (an older version started it): cannot check that this "
                    "command has the same search space, seed and trial budget; resuming as Tune recorded it")
        return
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning(f"[search] {file} is unreadable ({e}): cannot check that this command has the same search "
                    "space, seed and trial budget; resuming as Tune recorded it")
        return
    changed = [f"{k}: {json.dumps(old[k])} -> {json.dumps(v)}" for k, v in record.items() if k in old and old[k] != v]
    if changed:
        raise ConfigError(f"search.resume={space.resume}: that search started with other settings ({'; '.join(changed)}); "
                          f"resuming it with these would mix two searches. Resume it with the settings it started with "
                          f"(recorded in {file}), or start a new search without search.resume")
    was = kept.get("search.max_concurrent")
    if was is not None and was != space.max_concurrent:
        log.warning(f"[search] search.max_concurrent={space.max_concurrent} does not apply to a resumed search: "
                    f"Tune keeps the first attempt's limit ({was})")


def _resumable(space: SearchConfig) -> Path:
    """The experiment folder named by search.resume, if Tune can restore it."""
    from ray import tune

    path = Path(space.resume).resolve()
    if not tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"search.resume={space.resume}: no Tune experiment to resume there")
    return path


def _restored_run_config(tuner) -> Optional[Any]:
    """The run config a restored Tuner will run with. Tune unpickles the first attempt's from
    tuner.pkl, callbacks included (a Progress that counts from 0) and its max_failures, so a
    resume sets those anew. None under Ray Client (the tuner is remote)."""
    internal = getattr(tuner, "_local_tuner", None)
    return internal.get_run_config() if internal is not None else None


def run_search(space: SearchConfig, base: dict[str, Any], out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Run (or resume) the search; write the best graph and the trial table into the
    experiment folder; return a summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = _base_dict(base)
    base.setdefault("train", {})["epochs"] = space.max_epochs
    base["train"]["checkpoint_every"] = 0  # trials checkpoint through Tune (search.checkpoint_every)
    base["train"]["progress"] = "off"  # the search prints its own progress (Progress)
    RunConfig.from_dict({**base, "graph": {"nodes": [space.target_model], "gates": [["Through"]]}})  # validate early
    if base.get("placement", "auto") != "auto":
        raise ConfigError(f"placement={base['placement']!r}: a search places each trial's nodes itself; leave placement=auto "
                          "and set search.processes_per_trial (0 = one process per node)")
    space = copy.deepcopy(space)
    record = search_record(space, base, seed)
    space.teachers_dir = os.path.abspath(space.teachers_dir)
    missing = [m for m in space.zoo if not space.can_freeze(m)]
    if space.frozen == "teachers" and missing:
        log.info(f"[search] no teacher checkpoint for {missing} under {space.teachers_dir}: those are never sampled frozen")
    out_dir = Path(out_dir).resolve()
    if space.resume:  # checked before Ray starts: a refusal is immediate
        out_dir = _resumable(space)
        check_resume(out_dir, record, space)
    else:
        write_record(out_dir, record, space)
    experiment = out_dir.name
    _init_ray(space)

    bundles = trial_bundles(space)  # resolves search.gpus_per_node=null for the trials too
    check_resources(bundles, space)
    trainable = tune.with_parameters(GraphTrial, base=base, space=space, experiment=experiment)
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(bundles))

    callbacks = [Progress(space.num_samples, space.max_epochs, bundles=bundles)] if space.verbose else []
    if space.resume:
        log.info(f"[search] resuming {out_dir}")
        tuner = tune.Tuner.restore(str(out_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)
        run_config = _restored_run_config(tuner)
        if run_config is not None:
            run_config.callbacks = callbacks
            run_config.failure_config = tune.FailureConfig(max_failures=space.max_failures)
        else:
            log.warning("[search] under Ray Client the resumed search keeps its first attempt's console and max_failures")
    else:
        if space.searcher == "random":
            search_alg, param_space = GraphRandomSearch(space, seed), {}
        else:
            try:
                from ray.tune.search.optuna import OptunaSearch
            except ImportError as e:
                raise ConfigError("search.searcher=optuna needs optuna: pip install optuna") from e
            search_alg = OptunaSearch(seed=seed)
            param_space = {k: tune.choice(v) for k, v in space.choices().items()}
        if space.max_concurrent:
            from ray.tune.search import ConcurrencyLimiter

            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=space.max_concurrent)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=space.max_epochs, grace_period=space.grace_period,
                                  reduction_factor=space.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, search_alg=search_alg,
                                        num_samples=space.num_samples, trial_dirname_creator=_trial_dirname,
                                        reuse_actors=space.warm),
            run_config=tune.RunConfig(
                name=experiment, storage_path=str(out_dir.parent), verbose=0,
                failure_config=tune.FailureConfig(max_failures=space.max_failures),
                # a trial asks for its checkpoints itself (should_checkpoint: search.checkpoint_every)
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_at_end=False),
                callbacks=callbacks,
            ),
        )
    t0 = time.time()
    grid = tuner.fit()
    return write_results(grid, space, out_dir, time.time() - t0)


def write_results(grid, space: SearchConfig, out_dir: Path, wall_s: float) -> dict[str, Any]:
    """trials.csv (every trial), best_graph.yaml, search_summary.json."""
    rows = []
    # Tune's trial states as saved with the experiment (TERMINATED, ERROR, PENDING, ...)
    try:
        from ray.tune import ExperimentAnalysis

        trial_states = {t.trial_id: t.status for t in ExperimentAnalysis(str(out_dir)).trials}
    except Exception as e:  # the table is still written from the results; say why the states are missing
        log.warning(f"could not read the trials' states from {out_dir} ({type(e).__name__}: {e}); "
                    "a trial that did not end is then reported by its epochs only")
        trial_states = {}
    interrupted = len(grid) < space.num_samples or any(st not in ("TERMINATED", "ERROR") for st in trial_states.values())
    for r in grid:
        df = r.metrics_dataframe
        cfg = r.config or {}
        graph = space.graph_from(cfg) if cfg else None
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df and len(df) else 0
        invalid = bool(r.metrics.get("invalid")) if r.metrics else False
        vals = df[METRIC].tolist() if df is not None and METRIC in df else []
        if r.error is not None:
            why = str(r.error).strip()
            status = f"failed: {type(r.error).__name__}: {why.splitlines()[-1][:160]}" if why else "failed"
        elif invalid:
            status = "invalid graph (not trained)"
        elif trial_states.get(Path(r.path).name[len("trial_"):] if r.path else "", "TERMINATED") not in ("TERMINATED", "ERROR"):
            status = "unfinished (search interrupted)"
        elif epochs < space.max_epochs:
            status = "stopped by ASHA"
        else:
            status = "completed"
        overhead = df["launch_overhead_s"].dropna().tolist() if df is not None and "launch_overhead_s" in df else []
        warm = df["warm"].dropna().tolist() if df is not None and "warm" in df else []
        rows.append({
            "trial": Path(r.path).name if r.path else "?",
            "models": ", ".join(n["model"] + ("*" if "checkpoint" in n else "") for n in graph["nodes"]) if graph else "",
            "gates": describe_gates(graph["gates"]) if graph else "",
            "extra": json.dumps({k[6:]: v for k, v in cfg.items() if k.startswith("extra:")}) if cfg else "",
            "kinds": " / ".join(" ".join(e for e in row) for row in graph["kinds"]) if graph and graph.get("kinds") else "",
            "epochs": epochs,
            "last_val_acc": round(vals[-1], 3) if vals else None,
            "best_val_acc": round(max(vals), 3) if vals else None,
            "status": status,
            "launch_overhead_s": round(overhead[0], 3) if overhead else None,
            "warm": bool(warm[0]) if warm else None,
            "_graph": graph, "_cfg": cfg,
        })
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = [k for k in rows[0] if not k.startswith("_")] if rows else ["trial"]
    with open(out_dir / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in sorted(rows, key=lambda r: (-(r["best_val_acc"] or -1))):
            w.writerow({k: r[k] for k in fields})
    if interrupted:
        print(render_table(rows), flush=True)
        print(f"[search] interrupted with {sum(r['status'].startswith('unfinished') for r in rows)} unfinished trial(s) "
              f"of {space.num_samples}; continue it with the command that started it plus search.resume={out_dir}, "
              f"e.g. python launch.py mode=search search={space.name} search.resume={out_dir}", flush=True)
        return {"experiment": str(out_dir), "interrupted": True, "trials": len(rows)}
    trained = [r for r in rows if r["last_val_acc"] is not None and r["status"] in ("completed", "stopped by ASHA")]
    if not trained:
        raise RuntimeError(f"no trial of the search trained to a result (see {out_dir / 'trials.csv'})")
    top = max(r["epochs"] for r in trained)
    best = max((r for r in trained if r["epochs"] == top), key=lambda r: r["last_val_acc"])
    best_path = export_graph(best["_graph"], best["_cfg"], space, out_dir / "best_graph.yaml", best)
    overheads = [r["launch_overhead_s"] for r in rows if r["launch_overhead_s"] is not None]
    by_start = {w: [r["launch_overhead_s"] for r in rows if r["launch_overhead_s"] is not None and r["warm"] is w]
                for w in (False, True)}
    summary = {
        "experiment": str(out_dir),
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_by_asha": sum(r["status"] == "stopped by ASHA" for r in rows),
        "failed": sum(r["status"].startswith("failed") for r in rows),
        "invalid": sum(r["status"].startswith("invalid") for r in rows),
        "interrupted": False,
        "best_trial": best["trial"], "best_val_acc": best["last_val_acc"], "best_graph": str(best_path),
        "best_models": best["models"], "best_gates": best["gates"],
        "wall_s": wall_s,
        "launch_overhead_s_mean": sum(overheads) / len(overheads) if overheads else None,
        # trial start -> first training step, by how the trial's group started
        "cold_starts": len(by_start[False]), "warm_starts": len(by_start[True]),
        "cold_start_s_mean": sum(by_start[False]) / len(by_start[False]) if by_start[False] else None,
        "warm_start_s_mean": sum(by_start[True]) / len(by_start[True]) if by_start[True] else None,
        # ASHA's schedule, for the search picture's rungs (drawing.figures.draw_search)
        "grace_period": space.grace_period,
        "reduction_factor": space.reduction_factor,
        "max_epochs": space.max_epochs,
    }
    (out_dir / "search_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(render_table(rows), flush=True)
    print(f"[search] best: trial {best['trial']} val {best['last_val_acc']:.2f} after {best['epochs']} epochs; "
          f"graph written to {best_path}\n[search] retrain it: torchrun --standalone "
          f"--nproc_per_node={space.num_nodes} launch.py graph={best_path}", flush=True)
    return summary


def render_table(rows: list[dict[str, Any]]) -> str:
    kinds = any(r.get("kinds") for r in rows)  # a search over edge kinds too
    head = "| trial | models | gates (rows = receiver) |" + (" kinds (rows = receiver) |" if kinds else "")
    lines = [head + " epochs | last val | best val | status |", "|---|---|---|" + ("---|" if kinds else "") + "---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-(r["best_val_acc"] or -1))):
        lv = "-" if r["last_val_acc"] is None else f"{r['last_val_acc']:.2f}"
        bv = "-" if r["best_val_acc"] is None else f"{r['best_val_acc']:.2f}"
        k = f" {r.get('kinds', '')} |" if kinds else ""
        lines.append(f"| {r['trial'][-14:]} | {r['models']} | {r['gates']} |{k} {r['epochs']} | {lv} | {bv} | {r['status']} |")
    return "\n".join(lines)


def export_graph(graph: dict[str, Any], cfg: dict[str, Any], space: SearchConfig, path: Path, row: dict[str, Any]) -> Path:
    """Write the graph as a config for ``graph=<file>``. A frozen node's checkpoint becomes
    ``<teachers_dir>/<model>/node0.pt`` with the dataset left as ``${dataset.name}`` when the
    teachers folder is per dataset, so the graph transfers to another dataset."""
    import yaml

    g = copy.deepcopy(graph)
    g["name"] = "searched"
    dataset = space.dataset_name
    for n in g["nodes"]:
        if "checkpoint" in n and dataset:
            n["checkpoint"] = n["checkpoint"].replace(f"/{dataset}/", "/${dataset.name}/")
    header = (f"# Found by the search in {path.parent}\n# trial {row['trial']}: target val acc {row['last_val_acc']} "
              f"after {row['epochs']} epochs\n# retrain: torchrun --standalone --nproc_per_node={len(g['nodes'])} "
              f"launch.py graph={path}\n")
    extra = {k[6:]: v for k, v in cfg.items() if k.startswith("extra:")}
    if extra:
        header += f"# searched alongside (not part of the graph; pass as overrides): {extra}\n"
    path.write_text(header + yaml.safe_dump(g, sort_keys=False, default_flow_style=None))
    return path

