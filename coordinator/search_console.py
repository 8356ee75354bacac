"""The graph search's console: a Tune callback that prints one line per ended trial and a
status line every 30 s (``search.verbose=1``) instead of Tune's tables."""
from __future__ import annotations

import time
from typing import Optional

from ray.tune import Callback

from coordinator.search_resources import resources_text, total_resources
from coordinator.search_trial import METRIC


class SearchConsole(Callback):
    """The search's console: one compact line per ended trial (completed, stopped by ASHA,
    failed), and every ``every_s`` seconds a status line (running trials and their epochs,
    trials done, best so far), instead of Tune's tables. A resumed search's counts and best
    include the trials of earlier attempts (``adopt``); its clock starts at this attempt."""

    adopted = False
    """Whether the trials Tune restored have been counted (a class default: a console that an
    older version pickled into tuner.pkl, as ``coordinator.search.Progress``, has no such
    attribute)."""
    bundles: Optional[list[dict]] = None
    pending_after_s = 10.0
    stalled_since: Optional[float] = None  # since when trials are pending and none runs
    _told = False  # (class defaults too: what an older tuner.pkl's console lacks)

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

        need = f"; each needs {resources_text(total_resources(self.bundles))}" if self.bundles else ""
        free = resources_text(ray.available_resources())
        return (f"[search] {pending} trial(s) pending and none running for {for_s:.0f} s{need}; the Ray cluster has "
                f"{free} free (a trial waits until its whole placement group fits)")
