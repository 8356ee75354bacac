"""Pictures (drawing.figures, the ``drawing.draw`` command) drawn from a real run
and a real search: the files exist, are real PNG/SVG of a plausible size, and the SVG holds
the labels the picture must show."""
import subprocess
import sys
from pathlib import Path

import pytest

from drawing.draw import main as draw_main
from drawing.figures import asha_rungs, draw_graph, draw_search, load_graph_file
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
    for r in rows:  # one line per trial that reported an epoch, identified by its trial id
        if int(r["epochs"] or 0) > 0:
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
