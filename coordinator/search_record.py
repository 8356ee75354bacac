"""What defines a search: recorded in ``<experiment>/search_space.json`` when it starts,
checked when it resumes.

A new search records its space, trial budget, ASHA schedule, sampler, trial resources,
seed and training config (``search_record``, ``write_record``); ``search.resume=<experiment>``
with other settings is refused before Ray starts, naming each change (``check_resume``):
Tune would keep the first attempt's sampler, scheduler and budget but train the trials it
starts now with the new config.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from actors.config import RunConfig
from actors.errors import ConfigError
from actors.files import atomic_write_text
from coordinator.search_space import SearchConfig, _flatten

log = logging.getLogger("ktg")
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


def resumable(space: SearchConfig) -> Path:
    """The experiment folder named by search.resume, if Tune can restore it."""
    from ray import tune

    path = Path(space.resume).resolve()
    if not tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"search.resume={space.resume}: no Tune experiment to resume there")
    return path
