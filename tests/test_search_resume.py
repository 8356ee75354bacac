"""Resuming a search: a resume with another search space, seed, trial budget or training
config is refused before Ray starts, naming each change; one that only changes how the
search runs goes on. The console of a resumed search counts the trials of earlier attempts
and knows their best (unit, and one real search interrupted and resumed)."""
import csv
import json
import logging
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from actors.errors import ConfigError
from coordinator import search as search_module
from coordinator.search import run_search
from coordinator.search_console import SearchConsole
from coordinator.search_record import RECORD
from coordinator.search_space import SearchConfig
from coordinator.search_trial import METRIC


class RayStarted(Exception):
    """Raised where the search would start Ray: everything checked here happens before."""


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(space):
        raise RayStarted

    monkeypatch.setattr(search_module, "_init_ray", refuse)


def space(tmp_path, **kw) -> SearchConfig:
    s = dict(name="tiny", num_nodes=2, target_model="convnet", zoo=["convnet"], num_samples=6, max_epochs=4,
             num_cpus=3, verbose=0, teachers_dir=str(tmp_path / "no-teachers"), extra={"optim": {"lr": [0.05, 0.1]}})
    s.update(kw)
    return SearchConfig(**s)


def base(**sections) -> dict:
    b = {"dataset": {"name": "digits", "val_fraction": 0.15, "crop_pad": 1, "flip": False},
         "optim": {"lr": 0.05, "momentum": 0.9, "schedule": "cosine", "milestones": [], "warmup_epochs": 0},
         "train": {"batch_size": 64, "num_threads": 1}, "logger": {"backend": "none"}, "seed": 0}
    for key, values in sections.items():
        b[key] = {**b[key], **values}
    return b


def started(tmp_path, seed: int = 0) -> Path:
    """An experiment folder as a search leaves it once started: run_search's record, and
    Tune's tuner.pkl (empty here: nothing reads it before Ray starts)."""
    exp = tmp_path / "exp-tiny-digits"
    with pytest.raises(RayStarted):
        run_search(space(tmp_path), base(), exp, seed=seed)
    exp.mkdir(parents=True, exist_ok=True)  # hydra made it already
    (exp / "tuner.pkl").write_bytes(b"")
    return exp


def resume(tmp_path, exp: Path, seed: int = 0, b: dict | None = None, **kw):
    return run_search(space(tmp_path, resume=str(exp), **kw), b or base(), tmp_path / "resume-attempt", seed=seed)


def test_a_new_search_records_what_defines_it(tmp_path, no_ray):
    exp = started(tmp_path)
    saved = json.loads((exp / RECORD).read_text())
    defines = saved["defines"]
    assert defines["search.num_samples"] == 6 and defines["seed"] == 0 and defines["search.gates"][0] == "Through"
    assert defines["dataset.name"] == "digits" and defines["optim.momentum"] == 0.9 and defines["train.batch_size"] == 64
    assert defines["search.extra"] == {"optim.lr": [0.05, 0.1]}
    # how it runs, where things are, and what the trials override are not part of it
    for key in ("search.verbose", "search.num_cpus", "search.resume", "search.max_failures", "search.checkpoint_every",
                "dataset.root", "optim.lr", "train.num_threads"):
        assert key not in defines, key
    assert saved["kept"] == {"search.max_concurrent": 0}


@pytest.mark.parametrize("change, message", [
    (dict(num_samples=12), r"search.num_samples: 6 -> 12"),
    (dict(seed=1), r"seed: 0 -> 1"),
    (dict(gates=["Through", "Linear"]),
     r'search.gates: \["Through", "Cutoff", "Linear", "Correct"\] -> \["Through", "Linear"\]'),
    (dict(max_epochs=8), r"search.max_epochs: 4 -> 8"),
    (dict(zoo=["convnet", "resnet32"]), r'search.zoo: \["convnet"\] -> \["convnet", "resnet32"\]'),
    (dict(extra={"optim": {"lr": [0.05]}}), r'search.extra: \{"optim.lr": \[0.05, 0.1\]\} -> \{"optim.lr": \[0.05\]\}'),
    (dict(b=base(optim={"momentum": 0.5})), r"optim.momentum: 0.9 -> 0.5"),
    (dict(b=base(dataset={"val_fraction": 0.2})), r"dataset.val_fraction: 0.15 -> 0.2"),
])
def test_a_resume_with_other_settings_is_refused_before_ray_starts(tmp_path, no_ray, change, message):
    exp = started(tmp_path)
    with pytest.raises(ConfigError, match=message) as e:
        resume(tmp_path, exp, **change)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(f"search.resume={exp}: that search started with other settings (")
    assert text.endswith(f"Resume it with the settings it started with (recorded in {exp / RECORD}), "
                         "or start a new search without search.resume")


def test_a_refusal_names_every_change(tmp_path, no_ray):
    exp = started(tmp_path)
    with pytest.raises(ConfigError) as e:
        resume(tmp_path, exp, seed=3, num_samples=7, searcher="optuna")
    changes = re.search(r"\((.*)\); resuming", str(e.value)).group(1).split("; ")
    assert changes == ["search.num_samples: 6 -> 7", 'search.searcher: "random" -> "optuna"', "seed: 0 -> 3"]


def test_a_resume_may_change_how_the_search_runs(tmp_path, no_ray, caplog):
    """Execution knobs, where the data is, and keys that search.extra overrides anyway."""
    exp = started(tmp_path)
    b = base(dataset={"root": str(tmp_path / "elsewhere")}, optim={"lr": 0.2}, train={"num_threads": 2})
    with caplog.at_level(logging.WARNING, logger="ktg"), pytest.raises(RayStarted):
        resume(tmp_path, exp, b=b, verbose=1, num_cpus=4, max_failures=2, checkpoint_every=2, name="other")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="ktg"), pytest.raises(RayStarted):
        resume(tmp_path, exp, max_concurrent=2)
    assert [r.getMessage() for r in caplog.records] == [
        "[search] search.max_concurrent=2 does not apply to a resumed search: Tune keeps the first attempt's limit (0)"]


def test_a_resume_of_a_search_without_a_record_warns_and_goes_on(tmp_path, no_ray, caplog):
    exp = tmp_path / "older"
    exp.mkdir()
    (exp / "tuner.pkl").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ktg"), pytest.raises(RayStarted):
        resume(tmp_path, exp, num_samples=99)
    assert any(f"{exp} has no {RECORD}" in r.getMessage() and "cannot check" in r.getMessage() for r in caplog.records)


def test_a_resume_of_a_folder_that_is_not_a_search_is_refused(tmp_path, no_ray):
    (tmp_path / "not-a-search").mkdir()
    with pytest.raises(ConfigError, match=r"search.resume=.*not-a-search: no Tune experiment to resume there"):
        resume(tmp_path, tmp_path / "not-a-search")


def _trial(i, status, epoch, acc, best=None, **extra):
    r = {"epoch": epoch, METRIC: acc, **extra}
    analysis = {METRIC: {"max": best if best is not None else acc, "last": acc}} if acc is not None else {}
    return SimpleNamespace(trial_id=f"t{i}", status=status, last_result=r, metric_analysis=analysis)


def test_the_console_of_a_resumed_search_counts_earlier_trials(capsys):
    """Tune hands the restored trials to the first step; the ended ones count as done and the
    best result any of them reported (not only their last) is the best so far."""
    p = SearchConsole(total=6, max_epochs=4, every_s=0.0)
    restored = [
        _trial(1, "TERMINATED", 4, 60.0, best=81.0),   # reached 81 at an earlier epoch
        _trial(2, "TERMINATED", 1, 40.0),              # stopped by ASHA
        _trial(3, "ERROR", 2, 10.0),                   # failed
        _trial(4, "TERMINATED", 4, 0.0, invalid=True),
        _trial(5, "PENDING", 2, 50.0),                 # unfinished: resumed now, not done
    ]
    p.on_step_begin(0, restored)
    p.on_trial_complete(0, restored, _trial(5, "TERMINATED", 4, 70.0))
    p.on_step_begin(1, restored)  # counted once
    p.on_step_end(1, [_trial(6, "RUNNING", 1, 20.0)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[search] resumed: 4/6 trials ended in earlier attempts | best val 81.00 (t1)"
    assert out[1] == "[search] 5/6 trial t5 completed at epoch 4: val 70.00 (best so far 81.00)"
    assert out[2].endswith("| 1 running (at epochs 1) | 5/6 done | best val 81.00 (t1)"), out[2]
    assert len(out) == 3


def test_the_console_of_a_new_search_starts_from_zero(capsys):
    p = SearchConsole(total=2, max_epochs=4, every_s=0.0)
    p.on_step_begin(0, [])
    p.on_step_begin(1, [_trial(1, "PENDING", 0, None)])
    p.on_trial_complete(1, [], _trial(1, "TERMINATED", 4, 30.0))
    assert capsys.readouterr().out.splitlines() == ["[search] 1/2 trial t1 completed at epoch 4: val 30.00 (best so far 30.00)"]


def test_an_interrupted_search_resumes_with_its_console_counts(tmp_path, capsys, monkeypatch):
    """A real search of 3 one-epoch trials (one at a time), stopped by Tune's stop signal once
    the first has ended, then resumed with the same settings: the resumed console goes on at
    2/3 with the first trial's result in its best so far, once per trial (Tune's unpickled
    console from the first attempt is replaced, not added to)."""
    import ray

    out = tmp_path / "exp-resume-digits"
    s = dict(num_samples=3, max_epochs=1, grace_period=1, gates=["Through", "Linear"], extra=None, verbose=1,
             num_cpus=3)
    complete = SearchConsole.on_trial_complete

    def stop_after_first(self, iteration, trials, trial, **info):
        complete(self, iteration, trials, trial, **info)
        os.kill(os.getpid(), signal.SIGUSR1)  # what Ctrl-C does to a search: Tune stops and saves

    monkeypatch.setattr(SearchConsole, "on_trial_complete", stop_after_first)
    try:
        first = run_search(space(tmp_path, **s), base(), out, seed=0)
        monkeypatch.setattr(SearchConsole, "on_trial_complete", complete)
        capsys.readouterr()
        assert first["interrupted"], first
        with open(out / "trials.csv") as f:
            earlier = [r for r in csv.DictReader(f) if not r["status"].startswith("unfinished")]
        assert len(earlier) == 1
        summary = run_search(space(tmp_path, resume=str(out), **s), base(), tmp_path / "resume-attempt", seed=0)
    finally:
        ray.shutdown()
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[search] ")]  # noqa: E741
    assert summary["trials"] == 3 and not summary["interrupted"], summary
    first_val = float(earlier[0]["best_val_acc"])
    first = f"[search] resumed: 1/3 trials ended in earlier attempts | best val {first_val:.2f} ({earlier[0]['trial'][6:]})"
    assert lines[0] == first, lines
    ended = [line for line in lines if re.match(r"\[search\] \d/3 trial ", line)]
    assert [line.split()[1] for line in ended] == ["2/3", "3/3"], lines
    for line in ended:
        assert float(re.search(r"best so far ([\d.]+)", line).group(1)) >= first_val - 0.005, line
