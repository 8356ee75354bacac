"""Multi-process CPU tests with real gloo groups: the exchange, the proof that the
distributed trainer is exactly the method (bitwise-equal to the single-process reference),
determinism, drift detection, and frozen teachers."""
import json

import pytest
import torch

from actors.files import load_model_weights
from actors.preflight import load_data
from coordinator.local import run_local
from coordinator.sequential import train_sequential
from tests.dist_children import drift_child, exchange_child, spawn
from tests.helpers import small_config

T, C = "Through", "Cutoff"


def test_exchange_gathers_named_tensors_of_any_dtype_in_rank_order():
    out = spawn(exchange_child, 3)
    for rank, got, plan, objs in out:
        assert isinstance(got, dict), got  # else: a traceback
        assert got["logits"] == [[[r + 0.5] * 2] * 3 for r in range(3)]
        assert got["ids"] == [[r, 10 * r] for r in range(3)]
        assert got["half"] == [[float(r)] for r in range(3)]
        assert plan == [0, 1, 2, 3, 4]
        assert objs == [{"rank": r} for r in range(3)]


def test_exchange_at_world_size_one():
    out = spawn(exchange_child, 1)
    assert out[0][1]["logits"] == [[[0.5, 0.5]] * 3]


def _assert_same_as_sequential(cfg, run_dir):
    """Every parameter and buffer of every node equals the single-process reference's."""
    run_local(cfg, run_dir, timeout_s=300)
    torch.set_num_threads(1)
    nodes = train_sequential(cfg, load_data(cfg))
    for i, node in enumerate(nodes):
        dist_state, meta = load_model_weights(run_dir / f"node{i}.pt")
        ref = node.model.state_dict()
        assert meta["node"] == i and set(dist_state) == set(ref)
        for k in ref:
            assert torch.equal(dist_state[k], ref[k]), f"node {i} {k} differs"
    return nodes


def test_two_process_group_equals_single_process_reference(tmp_path, one_thread):
    """M=2, mutual learning with Correct and Linear gates: 38 steps (one epoch of 32)."""
    cfg = small_config(["convnet", "resnet20"], [[T, "Correct"], ["Linear", T]], train__epochs=1)
    nodes = _assert_same_as_sequential(cfg, tmp_path)
    init = small_config(["convnet", "resnet20"], [[T, "Correct"], ["Linear", T]])
    from actors.worker import build_node

    untrained = build_node(init, load_data(init), 0, 38, torch.device("cpu"))
    assert not torch.equal(untrained.model.head.weight, nodes[0].model.head.weight)  # it did train


def test_three_process_group_with_frozen_teacher_equals_reference(tmp_path, one_thread):
    """M=3 over every gate kind, mean reduction, KD temperature, and a frozen node."""
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(5)
    from actors.models import build_model

    torch.save(build_model("convnet", 10, 1).state_dict(), teacher)
    cfg = small_config(
        ["convnet", "convnet", {"model": "convnet", "checkpoint": str(teacher)}],
        [["Linear", "NegativeLinear", "Correct"], [T, "Correct", T], [C, C, C]],
        graph={"name": "g3", "nodes": ["convnet", "convnet", {"model": "convnet", "checkpoint": str(teacher)}],
               "gates": [["Linear", "NegativeLinear", "Correct"], [T, "Correct", T], [C, C, C]],
               "temperature": 2.0, "reduction": "mean"},
        train__epochs=1,
    )
    run_dir = tmp_path / "run"
    _assert_same_as_sequential(cfg, run_dir)
    # the frozen teacher is bitwise unchanged, BatchNorm statistics included
    after, _ = load_model_weights(run_dir / "node2.pt")
    before = torch.load(teacher, weights_only=True)
    assert all(torch.equal(after[k], before[k]) for k in before)


def _strip_timing(summary):
    return {k: v for k, v in summary.items() if k not in ("wall_s", "train_s", "images_per_s")}


def test_same_seed_same_summary_and_metrics(tmp_path):
    cfg = small_config(["convnet", "convnet"], [[T, T], [T, T]], train__epochs=2)
    a = run_local(cfg, tmp_path / "a", timeout_s=300)
    b = run_local(cfg, tmp_path / "b", timeout_s=300)
    assert _strip_timing(a) == _strip_timing(b)
    rows = lambda d: [{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")}  # noqa: E731
                      for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert rows("a") == rows("b") and len(rows("a")) == 4
    c = run_local(small_config(["convnet", "convnet"], [[T, T], [T, T]], train__epochs=2, seed=1), tmp_path / "c", timeout_s=300)
    assert _strip_timing(c) != _strip_timing(a)


def test_a_node_with_a_different_batch_stops_the_run():
    cfg = small_config(["convnet", "convnet"], [[T, T], [T, T]])
    out = spawn(drift_child, 2, cfg)
    for rank, message, step in out:
        assert message.startswith("BatchMismatchError: node(s) [1] hold a different batch than node 0 at step 1"), message
        assert step == 0  # stopped before any update


def test_outputs_of_a_run(tmp_path):
    cfg = small_config(["convnet", "convnet"], [[T, T], [C, T]], train__epochs=2)
    s = run_local(cfg, tmp_path, timeout_s=300)
    assert [n["index"] for n in s["nodes"]] == [0, 1]
    assert {"model", "final_test_acc", "best_val_acc"} <= set(s["nodes"][0])
    for key in ("target_test_acc", "ensemble_test_acc", "wall_s", "images_per_s"):
        assert isinstance(s[key], float) and s[key] > 0
    assert s["target_test_acc"] == s["nodes"][0]["final_test_acc"]
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]  # noqa: E741
    assert [(r["epoch"], r["node"]) for r in lines] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all({"train_loss", "val_acc", "test_acc"} <= set(r) for r in lines)
    assert "edge_1_to_0_Through" in lines[0] and "edge_0_to_1_Through" not in lines[1]
    for i in range(2):
        state, meta = load_model_weights(tmp_path / f"node{i}.pt")
        assert meta["model"] == "convnet" and meta["num_classes"] == 10
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert s["target_test_acc"] > 50  # two epochs on digits learn something


def test_pretrained_teacher_feeds_kd(tmp_path):
    """The documented teacher workflow: a 1-node run's node0.pt is the frozen node of kd."""
    teacher_cfg = small_config(["resnet20"], [[T]], train__epochs=2)
    t = run_local(teacher_cfg, tmp_path / "teacher", timeout_s=300)
    kd = small_config(["convnet", {"model": "resnet20", "checkpoint": str(tmp_path / "teacher" / "node0.pt")}],
                      [[T, T], [C, C]], graph__temperature=2.0, train__epochs=1)
    s = run_local(kd, tmp_path / "kd", timeout_s=300)
    # the frozen teacher's test accuracy is exactly its pretrained one, every epoch
    assert s["nodes"][1]["final_test_acc"] == t["target_test_acc"]
    assert s["nodes"][1]["frozen"] is True


def test_teacher_checkpoint_of_wrong_architecture_is_refused(tmp_path):
    from actors.errors import ConfigError
    from actors.models import build_model
    from actors.preflight import preflight

    path = tmp_path / "t.pt"
    torch.save(build_model("resnet20", 10, 1).state_dict(), path)
    cfg = small_config(["convnet", {"model": "convnet", "checkpoint": str(path)}], [[T, T], [C, C]])
    with pytest.raises(ConfigError, match=r"does not fit a convnet for digits"):
        preflight(cfg, 2)
    torch.save(build_model("convnet", 100, 1).state_dict(), path)
    with pytest.raises(ConfigError, match=r"does not fit a convnet"):
        preflight(cfg, 2)
    with pytest.raises(ConfigError, match=r"has 2 nodes but 3 process\(es\) were started.*--nproc_per_node=P .* with 1 <= P <= 2"):
        preflight(cfg, 3)
