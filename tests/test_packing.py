"""Several graph nodes per process: every placement computes exactly what one node per
process computes (bitwise, gloo on CPU), and a packed run resumes exactly, even on
another placement."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import small_config

GATES = [["Through", "Linear", "Correct", "Cutoff"],
         ["Through", "Through", "Cutoff", "Linear"],
         ["Correct", "Cutoff", "Through", "Through"],
         ["Linear", "Through", "Through", "Through"]]
MODELS = [{"model": "resnet20"}, {"model": "convnet"}, {"model": "convnet"}, {"model": "resnet20"}]


def config(placement="auto", epochs=2):
    return small_config(MODELS, GATES, placement=placement,
                        train={"epochs": epochs, "batch_size": 32, "num_threads": 1, "max_steps_per_epoch": 3})


def states(run_dir):
    return [torch.load(Path(run_dir) / f"node{i}.pt", weights_only=True) for i in range(len(MODELS))]


def assert_same_nodes(a, b):
    for i, (sa, sb) in enumerate(zip(a, b)):
        assert sa["model"].keys() == sb["model"].keys()
        for k in sa["model"]:  # parameters and buffers (BatchNorm statistics included)
            assert torch.equal(sa["model"][k], sb["model"][k]), f"node {i}: {k}"
        assert sa["step"] == sb["step"] and sa["meta"]["node"] == sb["meta"]["node"] == i


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_per_process(tmp_path_factory):
    from coordinator.local import run_local

    run_dir = tmp_path_factory.mktemp("p4")
    run_local(config(), run_dir, timeout_s=300)
    return run_dir


@pytest.mark.parametrize("placement, processes", [
    ("auto", 1),              # the single-process reference: every node in one process
    ([[0, 2], [1], [3]], 3),  # by hand, uneven
])
def test_every_placement_trains_bitwise_the_same_nodes(tmp_path, one_per_process, placement, processes):
    from coordinator.local import run_local

    run_local(config(placement), tmp_path, timeout_s=300, processes=processes)
    assert_same_nodes(states(tmp_path), states(one_per_process))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]  # noqa: E731
    assert strip(metrics(tmp_path)) == strip(metrics(one_per_process))  # node t keeps index t in the record


def test_a_balanced_run_trains_the_same_nodes_and_resumes_bitwise_on_another_placement(tmp_path, one_per_process):
    """A balanced 2-process run trains bitwise the same nodes; stopped after epoch 1 (its epoch-2 checkpoint and outputs gone, as a
    crash leaves it) is resumed by a 1-process run: the same weights as uninterrupted."""
    from coordinator.local import run_local

    run_local(config("balanced"), tmp_path, timeout_s=300, processes=2)  # greedy on the nodes' training FLOPs
    assert_same_nodes(states(tmp_path), states(one_per_process))
    shutil.rmtree(tmp_path / "checkpoints" / "epoch_0002")
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"epoch": 1, "nodes": len(MODELS)}) + "\n")
    for f in ["summary.json", *(f"node{i}.pt" for i in range(len(MODELS)))]:
        (tmp_path / f).unlink()
    run_local(config([[0, 1, 2, 3]]), tmp_path, timeout_s=300, processes=1)
    assert_same_nodes(states(tmp_path), states(one_per_process))
    assert [r["epoch"] for r in metrics(tmp_path)] == [1] * 4 + [2] * 4


def test_placements_that_do_not_fit_are_refused_before_any_process_starts(tmp_path):
    from actors.errors import ConfigError
    from coordinator.local import run_local

    with pytest.raises(ConfigError, match="placement lists 2 processes but 3 were started"):
        run_local(config([[0, 1], [2, 3]]), tmp_path, processes=3)
    with pytest.raises(ConfigError, match="has 4 nodes but 5 process"):
        run_local(config(), tmp_path, processes=5)
    assert not (tmp_path / "checkpoints").exists()
