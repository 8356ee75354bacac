"""The wandb run of a real graph run (offline, as on a machine with no network): one run
for the whole graph, holding every node's metrics, every edge's gated loss and gate
weight, the ensemble accuracy, the graph as an image and a summary table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import WANDB_RUN_GATES as GATES

WANDB = str(Path(sys.executable).parent / "wandb")


def read_offline_run(run_dir: Path) -> tuple[list[dict], dict, Path]:
    """History rows and summary of the single offline wandb run under ``run_dir``."""
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # one run for the whole graph, not one per process
    log = next(runs[0].glob("run-*.wandb"))
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(log)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    history, summary = [], {}
    for line in out.stdout.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "history":
            history.append(rec["history"]["item"])
        elif rec.get("type") == "summary":
            summary.update(rec["summary"].get("update", {}) if isinstance(rec["summary"], dict) else {})
    return history, summary, runs[0]


def test_offline_run_holds_every_metric(real_run):
    run_dir, _ = real_run
    history, _, _ = read_offline_run(run_dir)
    epochs = [h for h in history if h.get("epoch", 0) >= 1]  # epoch 0: the graph image, before training
    assert [h["epoch"] for h in epochs] == [1, 2, 3]
    for h in epochs:
        for i in range(3):
            for k in ("train_loss", "train_acc", "val_acc", "test_acc", "lr"):
                assert f"node{i}/{k}" in h, (i, k, sorted(h))
        assert "ensemble/val_acc" in h and "ensemble/test_acc" in h
        for t, row in enumerate(GATES):
            for s, gate in enumerate(row):
                present = gate != "Cutoff"
                assert (f"edge_loss/{s}->{t} {gate}" in h) == present, (s, t, gate)
                assert (f"gate_weight/{s}->{t} {gate}" in h) == present, (s, t, gate)
    # the gate weights are what the gates say: Through 1, Linear = k/k_end (grows),
    # Correct = the source's training accuracy on the batch (in [0, 1])
    assert all(h["gate_weight/0->0 Through"] == 1.0 for h in epochs)
    linear = [h["gate_weight/1->0 Linear"] for h in epochs]
    assert 0 < linear[0] < linear[1] < linear[2] < 1
    assert all(0 <= h["gate_weight/0->1 Correct"] <= 1 for h in epochs)
    assert epochs[-1]["gate_weight/0->1 Correct"] > epochs[0]["gate_weight/0->1 Correct"]  # node 0 learned


def test_offline_run_holds_the_graph_image_and_the_summary_table(real_run):
    run_dir, summary = real_run
    history, final, run = read_offline_run(run_dir)
    images = [h for h in history if h.get("graph._type") == "image-file"]
    assert len(images) == 1 and "node 0 convnet" in images[0]["graph.caption"]
    assert (run / "files" / images[0]["graph.path"]).stat().st_size > 5000
    assert (run_dir / "pictures" / "graph.png").stat().st_size > 5000
    tables = [h for h in history if h.get("summary_table._type") == "table-file"]
    assert len(tables) == 1 and (tables[0]["summary_table.nrows"], tables[0]["summary_table.ncols"]) == (3, 7)
    table = json.loads((run / "files" / tables[0]["summary_table.path"]).read_text())
    assert table["columns"][:3] == ["node", "model", "frozen"] and len(table["data"]) == 3
    assert [row[3] for row in table["data"]] == [n["final_test_acc"] for n in summary["nodes"]]
    assert final.get("target_test_acc") == pytest.approx(summary["target_test_acc"])
