"""Pictures (drawing.figures, the ``drawing.draw`` command) drawn from a real run
and a real search: the files exist, are real PNG/SVG of a plausible size, and the SVG holds
the labels the picture must show."""
import subprocess
import sys
from pathlib import Path

import pytest

from actors.graph_file import load_graph_file
from drawing.draw import main as draw_main
from drawing.figures import asha_rungs, draw_graph, draw_search
from tests.helpers import WANDB_RUN_GATES

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_files(paths, min_png=8_000):
    paths = [Path(p) for p in paths]
    pngs = [p for p in paths if p.suffix == ".png"]
    svgs = [p for p in paths if p.suffix == ".svg"]
    assert pngs and svgs and len(pngs) == len(svgs)
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > min_png, p
    for p in svgs:
        assert p.read_text().lstrip().startswith(("<?xml", "<svg")) and p.stat().st_size > 5_000, p
    return {p.stem: p.read_text() for p in svgs}


def test_run_pictures_show_the_graph_and_every_nodes_curves(real_run, tmp_path, capsys):
    run_dir, _ = real_run
    assert draw_main([str(run_dir), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    svg = check_files(printed)
    graph = svg["graph"]
    assert graph.count("ConvNet") >= 3 and all(f"{i}: ConvNet" in graph for i in range(3))
    for gate in ("Through", "Linear", "Correct"):
        assert gate in graph
    assert "Cutoff" not in graph  # Cutoff edges are left out, and not named
    curves = svg["curves"]
    for i in range(3):
        assert f"n{i} convnet" in curves
    assert "ensemble" in curves
    # every non-Cutoff edge has its line in the edge panels (gated loss and gate weight)
    for t, row in enumerate(WANDB_RUN_GATES):
        for s, gate in enumerate(row):
            if gate != "Cutoff":
                assert f"{s}\u2192{t} {gate}" in curves, (s, t, gate)
    assert "gate weight" in curves


def test_search_pictures_show_trials_rungs_and_the_best_graph(tiny_search, capsys):
    summary, rows, out = tiny_search
    assert draw_main([str(out)]) == 0  # default folder: <search>/pictures
    files = capsys.readouterr().out.split()
    assert all(Path(f).parent == out / "pictures" for f in files)
    svg = check_files(files)
    search = svg["search"]
    assert (summary["grace_period"], summary["reduction_factor"], summary["max_epochs"]) == (1, 2, 4)  # recorded
    assert search.count("rung ") == len(asha_rungs(1, 2, 4)) == 2  # rungs at epochs 1 and 2 (max 4)
    # the legend counts the trials of each kind (the best one is counted as "best")
    drawn = [r for r in rows if int(r["epochs"] or 0) > 0 and r["trial"] != summary["best_trial"]]
    for label, status in (("stopped by ASHA", "stopped by ASHA"), ("failed", "failed")):
        n = sum(r["status"].startswith(status) for r in drawn)
        assert (f"{label} ({n})" in search) == (n > 0), (label, n)
    n = sum(r["status"].startswith("failed") and int(r["epochs"] or 0) == 0 for r in rows)
    assert (f"failed before their first epoch ({n})" in search) == (n > 0), n
    assert summary["best_trial"] in search
    for r in rows:  # one line per trial that trained an epoch (not an untrained invalid graph), by its trial id
        if int(r["epochs"] or 0) > 0 and not r["status"].startswith("invalid"):
            assert f'id="{r["trial"]}"' in search, r["trial"]
    best = svg["search_best_graph"]
    assert "0: ConvNet" in best and "1: ConvNet" in best


def test_an_interrupted_search_draws_from_its_trials_alone(tiny_search, tmp_path):
    """No search_summary.json, no best_graph.yaml (an interrupted search): ASHA's max epochs
    come from the trials' run_config.json; the best trial is never a failed one."""
    import csv
    import shutil

    _, rows, out = tiny_search
    for f in ["trials.csv", *[str(p.relative_to(out)) for p in out.glob("trial_*/*.json*")]]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / f, tmp_path / f)
    files = draw_search(tmp_path, tmp_path / "pictures" / "s", grace=1, rf=2)
    svg = check_files(files)["s"]
    assert [Path(f).name for f in files] == ["s.png", "s.svg"]  # no best graph to draw
    assert svg.count("rung ") == 2 and "(max 4)" in svg
    failed = {r["trial"] for r in csv.DictReader(open(tmp_path / "trials.csv")) if r["status"].startswith("failed")}
    best = svg.split("best: ", 1)[1].split(",", 1)[0]
    assert best.startswith("trial_") and best not in failed


def test_frozen_nodes_are_marked_and_cutoff_edges_left_out(tmp_path):
    graph = load_graph_file(ROOT / "conf" / "graph" / "kd.yaml")  # ${dataset.name} in a path: fine
    svg = check_files(draw_graph(graph, tmp_path / "kd"))["kd"]
    assert "0: ResNet32" in svg and "1: ResNet110*" in svg and "frozen" in svg
    assert "Cutoff" not in svg and svg.count(">Through<") + svg.count("Through</text>") >= 1


def test_every_preset_draws(tmp_path):
    for preset in sorted((ROOT / "conf" / "graph").glob("*.yaml")):
        assert draw_main([preset.stem, "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("graph_*.png"))) == len(list((ROOT / "conf" / "graph").glob("*.yaml")))


@pytest.mark.parametrize("arg", ["no/such/path", "README.md"])
def test_bad_path_is_a_clear_error(arg, tmp_path):
    r = subprocess.run([sys.executable, "-m", "drawing.draw", arg], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {arg} ") and "a run directory" in r.stderr and "Traceback" not in r.stderr


# --- graphs of more than LARGE nodes: a gate matrix and summarised curves -----------------------


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    import struct

    head = Path(path).read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def synthetic_run(run_dir: Path, m: int = 16, epochs: int = 4) -> list[list[str]]:
    """A run directory as a run of ``m`` nodes would leave it (run_config.json + metrics.jsonl
    with every node's every edge), written without training: nodes 0-11 convnet, the rest
    resnet20; label edges Through, the other edges Through, Linear or Cutoff. Returns the gates."""
    import json
    import random

    from actors.metrics import EDGE_LOSS, GATE_WEIGHT, edge_key

    rng = random.Random(0)
    models = ["convnet" if i < 12 else "resnet20" for i in range(m)]
    gates = [["Through" if s == t else ("Linear", "Through", "Cutoff")[(s + t) % 3] for s in range(m)] for t in range(m)]
    run_dir.mkdir(parents=True, exist_ok=True)
    graph = {"name": f"synthetic{m}", "nodes": [{"model": x} for x in models], "gates": gates}
    (run_dir / "run_config.json").write_text(json.dumps({"graph": graph, "dataset": {"name": "digits"}}))
    lines = []
    for t in range(m):
        for e in range(1, epochs + 1):
            row = {"epoch": e, "node": t, "model": models[t], "frozen": False, "train_loss": 3 / e + rng.random(),
                   "train_acc": 50.0, "lr": 0.01, "skipped_steps": 0, "train_time_s": 1.0,
                   "val_acc": 100 - 60 / e - 10 * rng.random(), "test_acc": 100 - 60 / e - 10 * rng.random(),
                   "ensemble_val_acc": 100 - 50 / e, "ensemble_test_acc": 100 - 50 / e}
            for s, gate in enumerate(gates[t]):
                if gate != "Cutoff":
                    row[edge_key(EDGE_LOSS, s, t, gate)] = (2.0 if s == t else 0.1) / e * (1 + rng.random())
                    row[edge_key(GATE_WEIGHT, s, t, gate)] = 1.0 if gate == "Through" else e / epochs
            lines.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return gates


def test_a_large_run_draws_a_gate_matrix_and_summarised_curves(tmp_path, capsys):
    """16 nodes: the graph is its gate matrix, every node labelled on both axes; the curves
    show the target, a band per model and the edges by kind (a handful of legend entries,
    none per node or per edge), in a figure as tall as a small graph's."""
    from drawing.figures import LARGE

    m = 16
    assert m > LARGE
    gates = synthetic_run(tmp_path / "run", m)
    assert draw_main([str(tmp_path / "run"), "--out", str(tmp_path / "pictures")]) == 0
    files = capsys.readouterr().out.split()
    svg = check_files(files)
    graph = svg["graph"]
    for i in range(m):  # tick labels on both axes (rows and columns)
        label = f"{i}: {'ConvNet' if i < 12 else 'ResNet20'}"
        assert graph.count(f">{label}<") == 2, label
    assert "rows: receiving node t, columns: sending node s" in graph
    assert "receiving node t" in graph and "sending node s" in graph and "synthetic16" in graph
    for entry in ("Through", "Linear", "Cutoff (no edge)", "label edge (diagonal)", "node 0: target"):
        assert entry in graph, entry
    assert "NegativeLinear" not in graph and "Correct" not in graph  # only the gates present
    assert "arrow s" not in graph  # not the small graphs' picture

    curves = svg["curves"]
    assert "n0 convnet (target)" in curves
    assert "nodes 1\u201311 convnet: mean, min\u2013max (11)" in curves
    assert "nodes 12\u201315 resnet20: mean, min\u2013max (4)" in curves
    assert "ensemble (mean softmax)" in curves
    assert "Through, 16 label edges t\u2192t: mean, min\u2013max" in curves
    n_through = sum(g == "Through" for t, row in enumerate(gates) for s, g in enumerate(row) if s != t)
    assert f"Through, {n_through} edges s\u2192t, s\u2260t: mean, min\u2013max" in curves
    assert "Linear, " in curves and "the target" in curves
    assert "n5 convnet" not in curves and "15\u219214" not in curves and "0\u21921 " not in curves  # no line per node/edge
    # the bands in the legends: 2 models in each node panel, 3 kinds of edge (label; Through, Linear) in each edge panel
    assert curves.count("mean, min\u2013max") == 3 * 2 + 2 * 3
    width, height = png_size(tmp_path / "pictures" / "curves.png")
    assert height < 1600 and width < 1600, (width, height)  # the old picture: one legend entry per edge, 5000+ px
    width, height = png_size(tmp_path / "pictures" / "graph.png")
    assert height < 1600 and width < 1600, (width, height)


def test_a_large_graph_file_draws_as_a_matrix(tmp_path):
    import yaml

    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump({"name": "many", "nodes": {"model": "convnet", "count": 16}, "gates": "Through"}))
    svg = check_files(draw_graph(load_graph_file(path), tmp_path / "many"))["many"]
    assert "rows: receiving node t, columns: sending node s" in svg
    assert ">0: ConvNet<" in svg and ">15: ConvNet<" in svg and "Through" in svg
    assert "Cutoff" not in svg  # no Cutoff edge: not in the legend
    assert png_size(tmp_path / "many.png")[1] < 1600
    # 40 nodes: a tick label every other node
    path.write_text(yaml.safe_dump({"name": "many", "nodes": {"model": "convnet", "count": 40}, "gates": "Through"}))
    svg = check_files(draw_graph(load_graph_file(path), tmp_path / "many40"))["many40"]
    assert ">38: ConvNet<" in svg and ">39: ConvNet<" not in svg


def test_a_search_of_large_graphs_draws(tmp_path):
    """A search whose trials are 16-node graphs: the best trial's legend entry counts the
    models and gates instead of listing a 16 x 16 matrix; its best graph is a gate matrix."""
    import csv

    import yaml

    from coordinator.search_space import describe_gates

    rows = []
    for k in range(3):
        gates = synthetic_run(tmp_path / f"trial_{k:03d}", 16, epochs=2 + k)
        rows.append({"trial": f"trial_{k:03d}", "models": ", ".join(["convnet"] * 12 + ["resnet20"] * 4),
                     "gates": describe_gates(gates), "epochs": 2 + k, "status": "completed" if k == 2 else "stopped by ASHA"})
    with open(tmp_path / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "best_graph.yaml").write_text(yaml.safe_dump({"name": "best", "nodes": {"model": "convnet", "count": 16},
                                                               "gates": "Through"}))
    files = draw_search(tmp_path, tmp_path / "pictures" / "search", grace=1, rf=2, max_epochs=4)
    svg = check_files(files)
    search = svg["search"]
    assert "best: trial_002" in search and "16 nodes: 12 x convnet, 4 x resnet20; gates" in search
    assert "T T T" not in search  # not the whole matrix
    assert "rows: receiving node t" in svg["search_best_graph"]
    assert png_size(tmp_path / "pictures" / "search.png")[0] < 2000
