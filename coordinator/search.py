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
(``coordinator.search_record``); ``search.resume=<experiment>`` with another space, seed,
budget or training config is refused before Ray starts, naming each change.

This module is the entry point (``run_search``) and the random searcher; the parts:

- ``coordinator.search_space``: the space and settings (``SearchConfig``, no Ray);
- ``coordinator.search_trial``: one trial, the Tune trainable (``GraphTrial``, ``METRIC``);
- ``coordinator.search_console``: the console, a Tune callback (``SearchConsole``);
- ``coordinator.search_record``: what defines a search, recorded and checked on resume;
- ``coordinator.search_resources``: each trial's placement group, refused if it never fits;
- ``coordinator.search_results``: trials.csv (``actors.trial_row.TrialRow``), best_graph.yaml,
  search_summary.json.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune.search import Searcher

from actors.config import RunConfig
from actors.errors import ConfigError
from coordinator.search_console import SearchConsole
from coordinator.search_record import check_resume, resumable, search_record, write_record
from coordinator.search_resources import check_resources, cluster_address, trial_bundles
from coordinator.search_results import write_results
from coordinator.search_space import SearchConfig
from coordinator.search_trial import METRIC, GraphTrial

log = logging.getLogger("ktg")

Progress = SearchConsole
"""The console's name before it was ``SearchConsole``: the tuner.pkl of a search started
then refers to ``coordinator.search.Progress``, and a resume unpickles it."""


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


# --- the experiment --------------------------------------------------------------------------------


def run_search(space: SearchConfig, base: dict[str, Any], out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Run (or resume) the search; write the best graph and the trial table into the
    experiment folder; return a summary."""
    from ray import tune

    base = _trial_base(base, space)
    space = copy.deepcopy(space)
    record = search_record(space, base, seed)
    space.teachers_dir = os.path.abspath(space.teachers_dir)
    missing = [m for m in space.zoo if not space.can_freeze(m)]
    if space.frozen == "teachers" and missing:
        log.info(f"[search] no teacher checkpoint for {missing} under {space.teachers_dir}: those are never sampled frozen")
    out_dir = Path(out_dir).resolve()
    if space.resume:  # checked before Ray starts: a refusal is immediate
        out_dir = resumable(space)
        check_resume(out_dir, record, space)
    else:
        write_record(out_dir, record, space)
    _init_ray(space)

    bundles = trial_bundles(space)  # resolves search.gpus_per_node=null for the trials too
    check_resources(bundles, space)
    trainable = tune.with_parameters(GraphTrial, base=base, space=space, experiment=out_dir.name)
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(bundles))
    callbacks = [SearchConsole(space.num_samples, space.max_epochs, bundles=bundles)] if space.verbose else []
    if space.resume:
        tuner = _restored_tuner(out_dir, trainable, callbacks, space)
    else:
        tuner = _new_tuner(out_dir, trainable, callbacks, space, seed)
    t0 = time.time()
    grid = tuner.fit()
    return write_results(grid, space, out_dir, time.time() - t0)


def _trial_base(base: dict[str, Any], space: SearchConfig) -> dict[str, Any]:
    """The run config every trial starts from: paths made absolute (Tune changes the working
    directory of trials), trained for the search's max epochs, checkpointed and reported by
    the search; refused here if it is not valid."""
    base = copy.deepcopy(base)
    for key in ("hydra", "search", "mode", "graph"):
        base.pop(key, None)
    ds = base.setdefault("dataset", {})
    ds["root"] = os.path.abspath(ds.get("root", "data"))
    base.setdefault("train", {})["epochs"] = space.max_epochs
    base["train"]["checkpoint_every"] = 0  # trials checkpoint through Tune (search.checkpoint_every)
    base["train"]["progress"] = "off"  # the search prints its own console (SearchConsole)
    RunConfig.from_dict({**base, "graph": {"nodes": [space.target_model], "gates": [["Through"]]}})  # validate early
    if base.get("placement", "auto") != "auto":
        raise ConfigError(f"placement={base['placement']!r}: a search places each trial's nodes itself; leave placement=auto "
                          "and set search.processes_per_trial (0 = one process per node)")
    return base


def _restored_tuner(out_dir: Path, trainable, callbacks: list, space: SearchConfig):
    """The Tuner of the interrupted search in ``out_dir``, with this attempt's console and
    max_failures."""
    from ray import tune

    log.info(f"[search] resuming {out_dir}")
    tuner = tune.Tuner.restore(str(out_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)
    run_config = _restored_run_config(tuner)
    if run_config is not None:
        run_config.callbacks = callbacks
        run_config.failure_config = tune.FailureConfig(max_failures=space.max_failures)
    else:
        log.warning("[search] under Ray Client the resumed search keeps its first attempt's console and max_failures")
    return tuner


def _new_tuner(out_dir: Path, trainable, callbacks: list, space: SearchConfig, seed: int):
    """The Tuner of a new search: the searcher, ASHA, the experiment stored at ``out_dir``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    search_alg, param_space = _searcher(space, seed)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=space.max_epochs, grace_period=space.grace_period,
                              reduction_factor=space.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, search_alg=search_alg,
                                    num_samples=space.num_samples, trial_dirname_creator=_trial_dirname,
                                    reuse_actors=space.warm),
        run_config=tune.RunConfig(
            name=out_dir.name, storage_path=str(out_dir.parent), verbose=0,
            failure_config=tune.FailureConfig(max_failures=space.max_failures),
            # a trial asks for its checkpoints itself (should_checkpoint: search.checkpoint_every)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_at_end=False),
            callbacks=callbacks,
        ),
    )


def _searcher(space: SearchConfig, seed: int) -> tuple[Searcher, dict[str, Any]]:
    """search.searcher (random: ``GraphRandomSearch``; optuna: TPE over ``space.choices()``),
    limited to search.max_concurrent trials at once; and the param_space Tune samples."""
    from ray import tune

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
    return search_alg, param_space


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _init_ray(space: SearchConfig) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    address = cluster_address(space)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=space.num_cpus, include_dashboard=False, log_to_driver=False)


def _restored_run_config(tuner) -> Optional[Any]:
    """The run config a restored Tuner will run with. Tune unpickles the first attempt's from
    tuner.pkl, callbacks included (a console that counts from 0) and its max_failures, so a
    resume sets those anew. None under Ray Client (the tuner is remote)."""
    internal = getattr(tuner, "_local_tuner", None)
    return internal.get_run_config() if internal is not None else None
