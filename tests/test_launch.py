"""End to end: the real `torchrun launch.py` command line, as a user types it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def run(args, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_trains_a_graph_and_writes_every_output(tmp_path):
    r = run([TORCHRUN, "--standalone", "--nproc_per_node=2", "launch.py", "graph=dml",
             "graph.nodes.0.model=convnet", "graph.nodes.1.model=convnet", "train.epochs=2",
             "logger=wandb", f"hydra.run.dir={tmp_path}"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "final test accuracy: node 0 (convnet)" in out and "node 1 (convnet)" in out
    assert out.count("epoch   2/2 |") == 1  # one progress line per epoch, from rank 0 only
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [n["model"] for n in summary["nodes"]] == ["convnet", "convnet"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "node0.pt").is_file() and (tmp_path / "node1.pt").is_file()
    recorded = json.loads((tmp_path / "run_config.json").read_text())
    assert recorded["train"]["epochs"] == 2 and "train.epochs=2" in recorded["overrides"]
    assert not (tmp_path / ".hydra").exists()  # the config is recorded once the run owns the directory
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run"


def test_process_count_must_match_the_graph(tmp_path):
    r = run([TORCHRUN, "--standalone", "--nproc_per_node=3", "launch.py", "graph=dml", "logger=none",
             f"hydra.run.dir={tmp_path}"])
    assert r.returncode != 0
    err = r.stderr
    assert "error: graph 'dml' has 2 nodes but 3 process(es) were started" in err
    assert err.count("error: graph 'dml'") == 1  # said once, by rank 0
    assert not (tmp_path / "summary.json").exists()


def test_bad_gate_is_refused_before_training(tmp_path):
    r = run([sys.executable, "launch.py", "graph=dml", "graph.gates.0.1=Sometimes", "logger=none",
             f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2
    assert "error: graph.gates[0][1] (edge 1 -> 0): unknown gate 'Sometimes'; known: Correct, Cutoff" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_preset_lists_the_available_ones(tmp_path):
    r = run([sys.executable, "launch.py", "graph=nope", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: graph=nope: no such preset; available: ctsl_mkt, digits_noisy_searched, dml, dml3, dml4, dml_many, independent, "
        "kd, ktg3, mhgd, resnet32, slides3, slides4, teacher (or a graph .yaml file)"]


def test_search_mode_needs_a_search_preset(tmp_path):
    r = run([sys.executable, "launch.py", "mode=search", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2 and "error: mode=search needs a search space: search=<preset>" in r.stderr
    r = run([sys.executable, "launch.py", "mode=serve", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2 and "error: mode must be one of train, search, attention; got 'serve'" in r.stderr


def test_missing_graph_file_is_named(tmp_path):
    r = run([sys.executable, "launch.py", f"graph={tmp_path}/nope.yaml"])
    assert r.returncode == 2 and f"error: graph file {tmp_path}/nope.yaml not found" in r.stderr


def test_graph_file_that_is_not_yaml_is_named_with_the_place(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("name: g\nnodes:\n  - {model: convnet}\n gates: [[Through]]\n")
    r = run([sys.executable, "launch.py", f"graph={bad}"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: graph file {bad} is not valid YAML: expected <block end>, but found '<block mapping start>' (line 4, column 2)"]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
PROJECT_FRAME = re.compile(r'File ".*/(launch\.py|actors/|coordinator/)')


@NO_CUDA
def test_cuda_on_a_machine_without_it_is_one_error_line(tmp_path):
    r = run([sys.executable, "launch.py", "graph=teacher", "graph.nodes.0.model=convnet", "device=cuda", "logger=none",
             f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        "error: device=cuda: no CUDA device is visible here (torch.cuda.is_available() is false); "
        "use device=cpu, or device=auto (CUDA where there is one, else CPU)"]


@NO_CUDA
def test_nccl_on_a_machine_without_cuda_under_torchrun(tmp_path):
    """Rank 0 says why, once; the ranks end with code 2 (but for any that torchrun stops first
    once one has ended); torchrun then reports its failed workers (its own summary, exit code
    1), as for any ConfigError under torchrun."""
    r = run([TORCHRUN, "--standalone", "--nproc_per_node=2", "launch.py", "graph=dml", "graph.nodes.0.model=convnet",
             "graph.nodes.1.model=convnet", "backend=nccl", "logger=none", f"hydra.run.dir={tmp_path}"])
    assert r.returncode != 0
    err = r.stderr
    assert err.count("error: backend=nccl needs a CUDA device and none is visible here") == 1, err[-3000:]
    codes = re.findall(r"exitcode\s*: (-?\d+)", err)
    assert "2" in codes and set(codes) <= {"2", "-15"}, err[-3000:]  # the ConfigError exit (or torchrun's SIGTERM), no crash
    assert not PROJECT_FRAME.search(err), err[-3000:]  # no traceback through the project's code
    assert not (tmp_path / "summary.json").exists()


def test_added_overrides_join_the_users_overrides_around_flags():
    from launch import add_overrides

    extra = ["hydra.output_subdir=null"]
    assert add_overrides(["launch.py", "graph=dml", "--cfg", "job"], extra) == ["launch.py", "graph=dml", *extra, "--cfg", "job"]
    assert add_overrides(["launch.py", "--cfg", "job", "graph=dml"], extra) == ["launch.py", "--cfg", "job", "graph=dml", *extra]
    assert add_overrides(["launch.py"], extra) == ["launch.py", *extra]
