"""One trial of the graph search: the sampled graph trained as one actor group.

``GraphTrial`` is the Tune class trainable that ``coordinator.search.run_search`` runs:
each trial builds its graph from the sample (``SearchConfig.graph_from``), starts (or, warm,
reuses) its ``ActorGroup`` in the trial's placement group, trains one epoch per Tune step
with the ``EpochDriver`` that torchrun runs use, and reports the target node's validation
accuracy (``METRIC``) to ASHA. Test accuracy is never reported to Tune.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Trainable
from ray.tune.result import SHOULD_CHECKPOINT

from actors.config import RunConfig
from coordinator.search_space import SearchConfig

log = logging.getLogger("ktg")
METRIC = "target_val_acc"
"""What a trial reports to Tune once per epoch, and ASHA and the searcher maximise: the
target node's validation accuracy."""


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
