"""A new edge kind is one class: declared, registered and trained here, in the test, without
touching the node, the worker or the preflight."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.errors import ConfigError
from actors.files import load_model_weights
from actors.graph import GraphSpec
from actors.kinds import EdgeBatch, EdgeKind, kind_of
from actors.preflight import load_data
from tests.helpers import make_node, node_loss, small_config

T = "Through"
PATH = "tests.test_kind_plugin:L2Logits"


@pytest.fixture(autouse=True)
def registry_as_it_was():
    """The kinds these tests register leave with them (other tests' messages list the known kinds)."""
    from actors import kinds

    saved = dict(kinds.KINDS._items), dict(kinds.KINDS._canonical), list(kinds._ORDER)
    yield
    kinds.KINDS._items, kinds.KINDS._canonical = saved[0], saved[1]
    kinds._ORDER[:] = saved[2]


class L2Logits(EdgeKind):
    """A toy kind: the squared distance of the receiver's logits from each source's, per sample."""

    name, sends, weight, searchable, short = "l2_logits", "logits", 0.5, True, "l2"

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        return (batch.own["logits"] - batch.source_logits).pow(2).sum(dim=-1)  # [S, B]


class Embedding(EdgeKind):
    """A toy relation kind reading the source's embedding: its mean squared distance, one number per edge."""

    name, sends, uses, per_sample = "l2_embedding_mean", "embedding", ("embedding",), False

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        own = batch.own["embedding"]
        d = [min(own.shape[1], e.shape[1]) for e in batch.sent]
        return torch.stack([(own[:, :n] - e[:, :n]).pow(2).mean() for n, e in zip(d, batch.sent)])


@pytest.mark.unit
def test_an_import_path_names_the_kind_and_its_declarations_are_asked():
    g = GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]], kinds=PATH)
    assert kind_of(PATH) is L2Logits and kind_of("l2_logits") is L2Logits  # registered on first use
    assert g.edge_kinds(0, 1) == (PATH,) and g.kind_weight(PATH) == 0.5 and g.kind_weight("l2_logits") == 0.5
    assert g.senders("embedding") == []
    node = make_node(0, g)
    assert node.model_outputs == set()  # it needs the logits only
    torch.manual_seed(0)
    logits, all_logits, y = torch.randn(4, 3, requires_grad=True), torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 0])
    total, terms, _ = node_loss(node, logits, all_logits, y, 0.5)
    l2 = 0.5 * (logits - all_logits[1]).pow(2).sum(1).mean()
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(terms, torch.stack([ce, l2]).detach()) and torch.allclose(total, ce + l2)


@pytest.mark.unit
def test_a_bad_import_path_or_a_non_kind_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"graph.kinds\[0\]\[1\] \(edge 1 -> 0\): edge kind 'tests.nowhere:K': cannot import K from "
                                          r"tests.nowhere \(ModuleNotFoundError"):
        GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]], kinds=[["ce", "tests.nowhere:K"], ["kl", "ce"]])
    with pytest.raises(ConfigError, match=r"graph.kinds: edge kind 'tests.test_kind_plugin:PATH' is not a named EdgeKind subclass"):
        GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]], kinds="tests.test_kind_plugin:PATH")
    with pytest.raises(ConfigError, match=r"graph.kinds\[0\]\[0\] \(node 0's own edge\): tests.test_kind_plugin:L2Logits cannot be on "
                                          r"the diagonal \(a node's own edge\); allowed there: ce, self"):
        GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]], kinds=[[f"ce+{PATH}", "kl"], ["kl", "ce"]])


@pytest.mark.process
def test_a_group_trained_with_a_kind_registered_here_equals_the_single_process_reference(tmp_path, one_thread):
    """Two processes; node 0 learns node 1 through kl + the toy kind on a Correct edge, node 1
    learns node 0 through the toy relation kind (the embedding crosses for it)."""
    from coordinator.local import run_local
    from coordinator.sequential import train_sequential

    nodes, gates = ["convnet", "resnet20"], [[T, "Correct"], ["Linear", T]]
    kinds = [["ce", f"kl+{PATH}"], ["tests.test_kind_plugin:Embedding", "ce"]]
    cfg = small_config(nodes, gates, graph={"name": "plugin", "nodes": nodes, "gates": gates, "kinds": kinds},
                       train={"epochs": 2, "batch_size": 16, "num_threads": 1, "max_steps_per_epoch": 3})
    assert cfg.graph.senders("embedding") == [0]
    ref = train_sequential(cfg, load_data(cfg))
    run_local(cfg, tmp_path / "p2", timeout_s=300, processes=2)
    for i, node in enumerate(ref):
        got, _ = load_model_weights(Path(tmp_path / "p2") / f"node{i}.pt")
        want = node.model.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), f"node {i} differs"
    untouched = [make_node(i, cfg.graph, num_classes=10).model.state_dict() for i in range(2)]
    assert all(not torch.equal(untouched[i][k], ref[i].model.state_dict()[k]) for i in range(2)
               for k in list(untouched[i])[:1])  # both learned


# --- what a graph stores, and the same order in every process ---------------------------------------------

PLUG = "tests.plugin_kinds"


@pytest.mark.unit
def test_a_kind_named_by_its_registered_name_is_stored_by_its_import_path():
    kind_of(f"{PLUG}:Zeta"), kind_of(f"{PLUG}:Alpha")  # registered by name (the fixture drops them after the test)

    g = GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]], kinds="kl+plugin_alpha",
                  kind_weights={"plugin_alpha": 2.0})
    assert g.edge_kinds(0, 1) == ("kl", f"{PLUG}:Alpha")  # what a spawned process can import
    assert g.kind_weight(f"{PLUG}:Alpha") == 2.0
    builtin = GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]], kinds="actors.edge_kinds:KL")
    assert builtin.kinds is None  # a built-in named by its path is the built-in: the default graph


@pytest.mark.unit
def test_several_kinds_on_an_edge_sum_in_one_order_whatever_was_registered_first():
    """Zeta registers before Alpha, and a process may meet them in any order: the sum's order is
    the built-ins', then the import paths' (Alpha before Zeta), everywhere."""
    kind_of(f"{PLUG}:Zeta"), kind_of(f"{PLUG}:Alpha")
    for entry in (f"{PLUG}:Zeta+kl+{PLUG}:Alpha", f"plugin_alpha+{PLUG}:Zeta+kl"):
        g = GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]], kinds=entry)
        assert g.edge_kinds(0, 1) == ("kl", f"{PLUG}:Alpha", f"{PLUG}:Zeta")
    node = make_node(0, g)
    assert [k.kind.name for k in node.kinds] == ["ce", "kl", "plugin_alpha", "plugin_zeta"]


@pytest.mark.unit
def test_a_built_in_kind_named_by_its_path_still_runs_its_checks():
    with pytest.raises(ConfigError, match=r"graph.kinds\[0\]\[0\] has self \(self-distillation\), which needs "
                                          r"graph.nodes\[0\].self_checkpoint"):
        GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]],
                  kinds=[["ce+actors.edge_kinds:SelfDistillation", "kl"], ["kl", "ce"]])


@pytest.mark.unit
def test_kinds_a_node_cannot_take_are_refused_before_training():
    g = dict(nodes=["convnet", "convnet", "convnet"], gates=[[T, T, T], [T, T, T], [T, T, T]])
    with pytest.raises(ConfigError, match=r"graph.kinds\[0\]: node 0 learns through mhgd and plugin_apart, whose losses "
                                          r"each enter the update apart"):
        frozen = {"model": "resnet20", "checkpoint": "t.pt", "attention": "a.pt"}
        GraphSpec(nodes=["resnet20", "convnet", frozen], gates=[[T, T, T], [T, T, T], ["Cutoff"] * 3],
                  kinds=[["ce", f"{PLUG}:Apart", "mhgd"], ["kl", "ce", "kl"], ["kl", "kl", "ce"]])
    with pytest.raises(ConfigError, match=r"graph.kind_weights: edge kind 'nowhere.mod:K': cannot import K"):
        GraphSpec(**g, kind_weights={"nowhere.mod:K": 1.0})
    with pytest.raises(ConfigError, match=r"graph.loss: unknown edge kind 'l3'; known cross-edge kinds: .* or an import path"):
        GraphSpec(**g, loss="l3")


@pytest.mark.unit
def test_a_kinds_loss_of_the_wrong_shape_is_named_and_another_dtype_is_taken_as_float32():
    torch.manual_seed(0)
    logits, all_logits, y = torch.randn(4, 3, requires_grad=True), torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 0])
    wrong = make_node(0, GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]], kinds=f"{PLUG}:WrongShape"))
    with pytest.raises(ValueError, match=r"edge kind plugin_wrong_shape: loss\(\) returned shape \(1,\) for 1 edge\(s\) "
                                         r"into node 0; expected \(1, 4\) \(one value per edge and sample\)"):
        node_loss(wrong, logits, all_logits, y, 0.5)
    half = make_node(0, GraphSpec(nodes=["convnet", "convnet"], gates=[[T, T], [T, T]], kinds=f"{PLUG}:Half"))
    total, terms, _ = node_loss(half, logits, all_logits, y, 0.5)
    assert total.dtype == torch.float32 and terms.dtype == torch.float32


@pytest.mark.unit
def test_a_search_may_put_a_searchable_kind_named_by_its_path_on_its_edges():
    from coordinator.search_space import SearchConfig

    space = SearchConfig(num_nodes=2, target_model="convnet", zoo=["convnet"], frozen="exclude",
                         edge_kinds=["kl", f"kl+{PATH}"])
    assert space.edge_kinds == ["kl", f"kl+{PATH}"]
    with pytest.raises(ConfigError, match=r"search.edge_kinds\[0\]: plugin_half cannot be searched"):
        SearchConfig(num_nodes=2, target_model="convnet", zoo=["convnet"], frozen="exclude", edge_kinds=[f"{PLUG}:Half"])
