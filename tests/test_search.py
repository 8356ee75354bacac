"""The ASHA graph search: its space and sampler (unit), and a real tiny search on digits
where each trial is a Ray actor group (integration)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.errors import ConfigError
from coordinator.search import GraphRandomSearch
from coordinator.search_space import SearchConfig, describe_gates

ROOT = Path(__file__).resolve().parents[1]


def space(**kw):
    base = dict(num_nodes=3, target_model="resnet32", zoo=["resnet32", "convnet"], num_samples=4, max_epochs=4)
    base.update(kw)
    return SearchConfig(**base)


@pytest.mark.parametrize("kwargs, message", [
    (dict(zoo=["resnet32", "vgg"]), r"search.zoo\[1\]: unknown model 'vgg'; known: "),
    (dict(target_model="alexnet"), r"search.target_model: unknown model 'alexnet'"),
    (dict(gates=["Cutoff"]), r"search.gates=\['Cutoff'\] leaves no valid graph"),
    (dict(gates=["Through", "Often"]), r"search.gates\[1\]: unknown gate 'Often'"),
    (dict(searcher="bohb"), r"search.searcher must be one of random, optuna"),
    (dict(frozen="sometimes"), r"search.frozen must be one of teachers, exclude"),
    (dict(grace_period=5, max_epochs=4), r"search.grace_period=5 exceeds search.max_epochs=4"),
    (dict(reduction_factor=1), r"search.reduction_factor must be >= 2"),
    (dict(warm="maybe"), r"search.warm must be true or false; got 'maybe'"),
    (dict(processes_per_trial=4), r"search.processes_per_trial must be an integer from 0 \(one per node\) to search.num_nodes=3"),
])
def test_bad_search_spaces_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        space(**kwargs)


def _params(gates, models=("convnet", "resnet32")):
    p = {f"model_{i + 1}": m for i, m in enumerate(models)}
    for t, row in enumerate(gates):
        for s, g in enumerate(row):
            p[f"gate_{t}_{s}"] = g
    return p


def test_fixed_models_search_the_gates_only():
    s = space(models=["resnet32", "ResNet110", "resnet32"], num_nodes=7, target_model="convnet")
    assert (s.num_nodes, s.target_model) == (3, "resnet32")
    sampler = GraphRandomSearch(s, seed=0)
    graphs = [s.graph_from(sampler.suggest(str(i))) for i in range(10)]
    assert all([n["model"] for n in g["nodes"]] == ["resnet32", "resnet110", "resnet32"] for g in graphs)
    assert len({describe_gates(g["gates"]) for g in graphs}) == 10  # the gates vary
    with pytest.raises(ConfigError, match=r"search.models\[1\]: unknown model 'vgg'"):
        space(models=["resnet32", "vgg"])


def test_a_trials_csv_row_reads_back_as_it_was_written(tmp_path):
    """trials.csv (what users read, and the search picture reads back): its columns, a
    missing value as an empty cell; a file with only some columns reads with the defaults."""
    from actors.trial_row import TrialRow, read_trials, write_trials

    rows = [TrialRow("trial_a", "convnet, resnet32*", "T L / X T", '{"optim.lr": 0.05}', "ce kl / kl ce", 4, 58.333,
                     60.5, "completed", 0.049, True),
            TrialRow("trial_b", status="failed: ValueError: no", warm=False)]
    write_trials(tmp_path / "trials.csv", rows)
    assert (tmp_path / "trials.csv").read_text().splitlines() == [
        "trial,models,gates,extra,kinds,epochs,last_val_acc,best_val_acc,status,launch_overhead_s,warm",
        'trial_a,"convnet, resnet32*",T L / X T,"{""optim.lr"": 0.05}",ce kl / kl ce,4,58.333,60.5,completed,0.049,True',
        "trial_b,,,,,0,,,failed: ValueError: no,,False"]
    assert read_trials(tmp_path / "trials.csv") == rows
    assert TrialRow.from_csv({"trial": "trial_c", "status": "completed"}) == TrialRow("trial_c", status="completed")
    write_trials(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text().splitlines() == ["trial"] and read_trials(tmp_path / "empty.csv") == []


def test_search_console_names_how_each_trial_ended(capsys):
    from types import SimpleNamespace

    from coordinator.search_console import SearchConsole
    from coordinator.search_trial import METRIC

    p = SearchConsole(total=4, max_epochs=8, every_s=0.0)
    t = lambda i, ep, acc, st="TERMINATED": SimpleNamespace(trial_id=f"t{i}", status=st, last_result={"epoch": ep, METRIC: acc})  # noqa: E731
    p.on_trial_complete(0, [], t(1, 2, 50.0))
    p.on_trial_complete(0, [], t(2, 8, 70.0))
    invalid = t(4, 8, 0.0)
    invalid.last_result["invalid"] = True
    p.on_trial_complete(0, [], invalid)
    p.on_trial_result(0, [], t(3, 3, 75.0, "RUNNING"), {"epoch": 3, METRIC: 75.0})
    p.on_step_end(0, [t(3, 3, 75.0, "RUNNING")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[search] 1/4 trial t1 stopped by ASHA at epoch 2: val 50.00 (best so far 50.00)"
    assert out[1] == "[search] 2/4 trial t2 completed at epoch 8: val 70.00 (best so far 70.00)"
    assert out[2].startswith("[search] 3/4 trial t4 skipped (not a valid graph)")
    assert out[3].endswith("| 1 running (at epochs 3) | 3/4 done | best val 75.00 (t3)"), out[3]


def test_frozen_target_is_never_a_graph():
    s = space()
    assert s.graph_from(_params([["Cutoff"] * 3, ["Through"] * 3, ["Through"] * 3])) is None
    g = s.graph_from(_params([["Through", "Linear", "Cutoff"], ["Correct"] * 3, ["Through"] * 3]))
    assert g["nodes"][1] == {"model": "convnet"} and describe_gates(g["gates"]) == "T L X / C C C / T T T"


def test_frozen_nodes_follow_the_teacher_policy(tmp_path):
    frozen_row = _params([["Through"] * 3, ["Cutoff"] * 3, ["Through"] * 3])
    assert space(teachers_dir=str(tmp_path)).graph_from(frozen_row) is None  # no teacher file
    (tmp_path / "convnet").mkdir()
    torch.save({}, tmp_path / "convnet" / "node0.pt")
    g = space(teachers_dir=str(tmp_path)).graph_from(frozen_row)
    assert g["nodes"][1]["checkpoint"] == str(tmp_path / "convnet" / "node0.pt")
    assert space(teachers_dir=str(tmp_path), frozen="exclude").graph_from(frozen_row) is None


def test_random_search_samples_valid_graphs_reproducibly(tmp_path):
    a, b = GraphRandomSearch(space(), seed=3), GraphRandomSearch(space(), seed=3)
    sa = [a.suggest(str(i)) for i in range(20)]
    assert sa == [b.suggest(str(i)) for i in range(20)]
    assert all(space().graph_from(p) is not None for p in sa)
    assert len({tuple(sorted(p.items())) for p in sa}) > 15
    a.save(str(tmp_path / "s.pkl"))  # a resumed search continues the same sequence
    c = GraphRandomSearch(space(), seed=99)
    c.restore(str(tmp_path / "s.pkl"))
    assert c.suggest("x") == a.suggest("x")


def test_a_placement_list_is_refused_for_a_search(tmp_path):
    from coordinator.search import run_search

    s = space(processes_per_trial=1, num_cpus=2, verbose=0)
    with pytest.raises(ConfigError, match="a search places each trial's nodes itself"):
        run_search(s, {"placement": [[0, 1, 2]], "logger": {"backend": "none"}}, tmp_path / "refused", seed=0)


def test_asha_stops_trials_early_and_failures_do_not_stop_the_search(tiny_search):
    """A real search (Optuna's TPE, a regular dependency): ASHA stops trials, a failed trial
    does not stop the search, every trial is a real actor group."""
    summary, rows, out = tiny_search
    assert len(rows) == 6 and summary["trials"] == 6
    statuses = [r["status"] for r in rows]
    assert "stopped by ASHA" in statuses, statuses
    stopped = [r for r in rows if r["status"] == "stopped by ASHA"]
    assert all(int(r["epochs"]) < 4 for r in stopped)
    failed = [r for r in rows if r["status"].startswith("failed")]
    assert failed and all('"optim.lr": 1000000.0' in r["extra"] for r in failed)
    assert any("non-finite training loss" in r["status"] for r in failed), [r["status"] for r in failed]
    # a graph with a frozen target (no teachers here) is reported as 0 untrained, for TPE to learn from
    invalid = [r for r in rows if r["status"].startswith("invalid")]
    assert all(r["epochs"] == "4" and float(r["last_val_acc"]) == 0 and r["warm"] == "" for r in invalid), invalid
    ok = [r for r in rows if not r["status"].startswith(("failed", "invalid"))]
    assert ok and all(float(r["best_val_acc"]) > 0 for r in ok)
    assert summary["best_val_acc"] == max(float(r["last_val_acc"]) for r in ok if r["epochs"] == "4")
    # each trial is a real actor group: every node wrote its own checkpoint in the trial dir
    best_dir = out / summary["best_trial"]
    assert (best_dir / "node0.pt").is_file() and (best_dir / "node1.pt").is_file()
    assert float(rows[0]["launch_overhead_s"]) > 0
    # the edge kinds were searched too: every trained trial's kinds, ce on the diagonal
    assert all(r["kinds"].split(" / ")[0].split()[0] == "ce" for r in rows if r["kinds"]) and any(r["kinds"] for r in ok)
    assert "kinds:" in Path(summary["best_graph"]).read_text()


def test_warm_trials_start_fast_and_train_as_cold_ones(tiny_search, tmp_path):
    """search.warm (default): trials after the first on a group reuse its actors; one starts in a
    fraction of a cold start, and trains exactly (bitwise on CPU) as the same graph run cold."""
    import json

    from actors.config import RunConfig
    from coordinator.local import run_local

    summary, rows, out = tiny_search
    warm = [r for r in rows if r["warm"] == "True" and not r["status"].startswith("failed")]
    cold = [r for r in rows if r["warm"] == "False"]
    assert warm and cold, [(r["trial"], r["warm"], r["status"]) for r in rows]
    assert summary["warm_starts"] == len([r for r in rows if r["warm"] == "True"]) and summary["cold_starts"] == len(cold)
    assert max(float(r["launch_overhead_s"]) for r in warm) < 0.5 < min(float(r["launch_overhead_s"]) for r in cold)
    trial = max(warm, key=lambda r: int(r["epochs"]))
    cfg = RunConfig.from_dict(json.loads((out / trial["trial"] / "run_config.json").read_text()))
    run_local(cfg, tmp_path / "cold", timeout_s=300, processes=1)
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.endswith("time_s")}  # noqa: E731
    got = [strip(line) for line in (out / trial["trial"] / "metrics.jsonl").read_text().splitlines()]
    want = [strip(line) for line in (tmp_path / "cold" / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == 2 * int(trial["epochs"]) and got == want[: len(got)]
    if trial["status"] == "completed":
        a = torch.load(out / trial["trial"] / "node0.pt", weights_only=True)
        b = torch.load(tmp_path / "cold" / "node0.pt", weights_only=True)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_exported_graph_retrains_under_torchrun(tiny_search, tmp_path):
    summary, _, _ = tiny_search
    best = Path(summary["best_graph"])
    text = best.read_text()
    assert "gates:" in text and "retrain: torchrun" in text
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                        "launch.py", f"graph={best}", "train.epochs=1", "logger=none", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "graph 'searched'" in r.stdout and (tmp_path / "summary.json").is_file()


def test_a_failed_trial_is_retried_from_its_last_checkpoint(tmp_path, ray_cluster):
    """search.max_failures=1: a node actor SIGKILLed mid-trial; the trial restarts from its
    last per-epoch checkpoint, not from epoch 1, and every epoch is recorded once."""
    import json
    import signal
    import threading
    import time

    from coordinator.search import run_search

    out = tmp_path / "exp-retry-digits"
    s = SearchConfig(name="retry", num_nodes=2, target_model="convnet", zoo=["convnet"], gates=["Through"],
                     num_samples=1, max_epochs=6, num_cpus=4, verbose=0, max_failures=1,
                     teachers_dir=str(tmp_path / "none"), warm=False)  # one trial: the cold path (no actor reuse)
    base = {"dataset": {"name": "digits", "crop_pad": 1, "flip": False},
            "optim": {"lr": 0.05, "schedule": "cosine", "milestones": [], "warmup_epochs": 0},
            "train": {"batch_size": 64, "num_threads": 1}, "logger": {"backend": "none"}}
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline:
            files = list(out.glob("trial_*/metrics.jsonl"))
            if files and sum(1 for _ in files[0].open()) >= 2 * 3:
                pids = subprocess.run(["pgrep", "-f", "ray::NodeActor"], capture_output=True, text=True).stdout.split()
                if pids:
                    os.kill(int(pids[0]), signal.SIGKILL)
                    killed["epochs_done"] = sum(1 for _ in files[0].open()) // 2
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run_search(s, base, out, seed=0)
    t.join(timeout=1)
    assert killed, "no actor was killed"
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert rows[0]["status"] == "completed" and rows[0]["epochs"] == "6"
    lines = [json.loads(l) for l in next(out.glob("trial_*/metrics.jsonl")).read_text().splitlines()]  # noqa: E741
    assert sorted((r["epoch"], r["node"]) for r in lines) == [(e, n) for e in range(1, 7) for n in range(2)]
    assert summary["failed"] == 0
    # Tune's own record: epochs 1..6 reported once each, so the retry did not start over
    reported = [json.loads(l)["epoch"] for l in next(out.glob("trial_*/result.json")).read_text().splitlines()]  # noqa: E741
    assert reported == list(range(1, 7)), reported

