"""Placement (actors/placement.py): which graph nodes each process hosts; the costs it balances
on, the hand-written placements it refuses, and the ``placement`` setting from the command line."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import launch  # noqa: F401  (registers the run-dir resolver)
from actors.config import RunConfig
from actors.errors import ConfigError
from actors.graph import GraphSpec
from actors.placement import balanced, check_placement, describe_placement, node_cost, resolve_placement

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_costs_are_deterministic_ordered_and_leave_the_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    costs = {m: node_cost(m, 10, 1, 8) for m in ("resnet110", "resnet32", "convnet", "wrn28_2")}
    assert torch.equal(torch.rand(3), expected)  # the global RNG is where it was
    assert costs["resnet110"] > costs["resnet32"] > costs["convnet"] > 0
    node_cost.cache_clear()
    assert {m: node_cost(m, 10, 1, 8) for m in costs} == costs  # counted anew: the same numbers
    assert node_cost("resnet32", 100, 3, 32) > 10 * costs["resnet32"]  # 16x the pixels


def test_balanced_puts_the_big_model_alone():
    costs = [node_cost(m, 10, 1, 8) for m in ("resnet32", "resnet32", "resnet110")]
    assert balanced(costs, 2) == [[2], [0, 1]]
    assert balanced(costs, 1) == [[0, 1, 2]]
    assert balanced(costs, 3) == [[2], [0], [1]]  # longest first; resolve_placement keeps [[0],[1],[2]] at P = M


def test_balanced_splits_equal_nodes_evenly_and_deterministically():
    assert balanced([1.0] * 32, 2) == [list(range(0, 32, 2)), list(range(1, 32, 2))]
    assert [len(p) for p in balanced([1.0] * 7, 3)] == [3, 2, 2]
    assert balanced([0.0] * 3, 3) == [[0], [1], [2]]  # zero costs too: every process gets a node
    with pytest.raises(ConfigError, match="3 processes for 2 nodes"):
        balanced([1.0, 2.0], 3)


def test_every_process_gets_a_node():
    for processes in range(1, 9):
        placement = balanced([100.0] + [1.0] * 7, processes)
        assert all(placement) and sorted(t for p in placement for t in p) == list(range(8))


def test_resolve_placement():
    models = ["resnet32", "resnet32", "resnet110"]
    for spec in ("auto", "balanced"):
        assert resolve_placement(spec, models, 10, 1, 8, 3) == [[0], [1], [2]]
        assert resolve_placement(spec, models, 10, 1, 8, 2) == [[2], [0, 1]]
        assert resolve_placement(spec, models, 10, 1, 8, 1) == [[0, 1, 2]]
    assert resolve_placement([[2, 0], [1]], models, 10, 1, 8, 2) == [[0, 2], [1]]
    with pytest.raises(ConfigError, match="4 processes for 3 nodes"):
        resolve_placement("auto", models, 10, 1, 8, 4)


def test_describe_placement():
    text = describe_placement([[0, 2], [1]], [1.0, 1.0, 2.0], ["resnet32", "convnet", "resnet110"])
    assert text == "process 0: 0 resnet32, 2 resnet110 (75%)\nprocess 1: 1 convnet (25%)"


@pytest.mark.parametrize("spec, message", [
    ([[0, 1], [2]], r"^placement lists 2 processes but 3 were started$"),
    ([[0, 1, 2]], r"^placement lists 1 process but 3 were started$"),
    ([[0], [1], [1]], r"^placement: node 1 appears twice$"),
    ([[0], [1], [3]], r"^placement: node 3 does not exist \(the graph has nodes 0..2\)$"),
    ([[0], [1], [-1]], r"^placement: node -1 does not exist"),
    ([[0], [1], []], r"^placement: process 2 hosts no node$"),
    ([[0], [1], ["2"]], r"^placement: process 2 lists '2', not a node index$"),
    ([[0], [1], [1.0]], r"^placement: process 2 lists 1.0, not a node index$"),
    ([[0], [1], 2], r"^placement must be auto, balanced, or a list of lists"),
    ("auto", r"^placement must be a list of lists of node indices here; got 'auto'$"),
])
def test_refused_hand_written_placements(spec, message):
    with pytest.raises(ConfigError, match=message):
        check_placement(spec, 3, 3)


def test_missing_nodes_are_named():
    with pytest.raises(ConfigError, match=r"^placement: node 2 is missing$"):
        check_placement([[0], [1]], 3, 2)
    with pytest.raises(ConfigError, match=r"^placement: nodes 1, 3 are missing$"):
        check_placement([[0], [2]], 4, 2)


def test_run_config_takes_the_three_forms():
    graph = GraphSpec.from_dict({"nodes": ["convnet", "convnet", "resnet32"], "gates": [["Through"] * 3] * 3})
    assert RunConfig(graph=graph).placement == "auto"
    assert RunConfig(graph=graph, placement="balanced").placement == "balanced"
    assert RunConfig(graph=graph, placement=[(0, 2), (1,)]).placement == [[0, 2], [1]]
    with pytest.raises(ConfigError, match=r"^placement must be auto, balanced, or a list of lists of node indices.*got 'even'$"):
        RunConfig(graph=graph, placement="even")
    with pytest.raises(ConfigError, match=r"^placement: process 1 hosts no node$"):
        RunConfig(graph=graph, placement=[[0], []])
    with pytest.raises(ConfigError, match=r"^placement must be .*got \[\]$"):
        RunConfig(graph=graph, placement=[])


@pytest.mark.parametrize("override, expected", [
    ("placement=[[0,2],[1]]", [[0, 2], [1]]),
    ("placement=balanced", "balanced"),
    (None, "auto"),
])
def test_placement_from_the_command_line(override, expected):
    from coordinator.hydra_conf import check_overrides

    overrides = [override] if override else []
    check_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    assert RunConfig.from_dict(OmegaConf.to_container(cfg, resolve=True)).placement == expected


def test_placement_does_not_forbid_a_resume():
    """A run may resume with another number of processes (read only: coordinator/rundir.py)."""
    from coordinator.rundir import changed_settings

    graph = GraphSpec.from_dict({"nodes": ["convnet", "convnet", "resnet32"], "gates": [["Through"] * 3] * 3})
    assert changed_settings(RunConfig(graph=graph), RunConfig(graph=graph, placement=[[0, 2], [1]])) == []
