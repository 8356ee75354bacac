"""Graph spec validation: every bad graph is refused with a message naming the field."""
import pytest
import torch

from actors.errors import ConfigError
from actors.graph import GraphSpec
from tests.helpers import make_node, node_loss

T, C = "Through", "Cutoff"


def spec(nodes=("resnet32", "resnet32"), gates=((T, T), (T, T)), **kw):
    return GraphSpec(nodes=[{"model": m} if isinstance(m, str) else m for m in nodes], gates=[list(r) for r in gates], **kw)


def test_valid_graph_and_its_structure():
    g = spec(nodes=("resnet32", {"model": "ResNet110", "checkpoint": "t.pt"}), gates=((T, "Linear"), (C, C)))
    assert g.num_nodes == 2
    assert g.nodes[1].model == "resnet110"  # canonical spelling
    assert g.is_frozen(1) and not g.is_frozen(0)
    assert g.incoming(0) == [(0, "Through"), (1, "Linear")]
    assert g.incoming(1) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gates=((T, "Maybe"), (T, T))), r"graph.gates\[0\]\[1\] \(edge 1 -> 0\): unknown gate 'Maybe'; known: .*Through"),
        (dict(nodes=("resnet32", "vgg99")), r"graph.nodes\[1\].model: unknown model 'vgg99'; known: .*resnet110.*wrn28_2"),
        (dict(gates=((T, T),)), r"graph.gates must be a 2x2 matrix"),
        (dict(gates=((T, T, T), (T, T, T))), r"graph.gates must be a 2x2 matrix"),
        (dict(gates=((C, C), (T, T))), r"target node 0 has every incoming edge Cutoff"),
        (dict(gates=((T, T), (C, C))), r"graph.nodes\[1\] \(resnet32\) is frozen .* needs graph.nodes\[1\].checkpoint"),
        (dict(reduction="max"), r"graph.reduction must be one of sum, mean; got 'max'"),
        (dict(temperature=0), r"graph.temperature must be a number > 0"),
        (dict(loss="mse"), r"graph.loss: unknown edge kind 'mse'; known cross-edge kinds: kl, rkd_distance, rkd_angle, mhgd"),
            (dict(loss="ce"), r"graph.loss='ce' is a kind of the diagonal; it names the kind of every cross edge"),
        (dict(frozen_bn="fixed"), r"graph.frozen_bn must be one of eval, train; got 'fixed'"),
        (dict(progress="step"), r"graph.progress must be one of iteration, epoch; got 'step'"),
        (dict(skip_zero_loss="yes"), r"graph.skip_zero_loss must be true or false; got 'yes'"),
    ],
)
def test_bad_graphs_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        spec(**kwargs)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown keys \['gate'\]; allowed: frozen_bn, gates, kind_weights, kinds, loss, mhgd, "
                                          r"name, nodes, progress, reduction, self_temperature, skip_zero_loss, temperature"):
        GraphSpec.from_dict({"nodes": [{"model": "resnet32"}], "gate": [[T]]})


def _node(gates, index=0, reduction="sum"):
    g = GraphSpec(nodes=[{"model": "convnet"}] * len(gates), gates=gates, reduction=reduction)
    return make_node(index, g)


def test_node_loss_sums_gated_edges():
    """L_t = G_tt(CE) + sum_s G_st(KL): checked against the edge functions by hand."""
    from actors.losses import kl_loss, label_loss

    node = _node([[T, "Linear", "Correct"], [T, T, T], [T, T, T]])
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    all_logits = torch.randn(3, 4, 3)
    y = torch.tensor([0, 1, 2, 1])
    total, terms, _ = node_loss(node, logits, all_logits, y, 0.5)
    ce = label_loss(logits, y).mean()
    lin = kl_loss(logits, all_logits[1], temperature=1.0).mean() * 0.5
    mask = (all_logits[2].argmax(1) == y).float()
    cor = (kl_loss(logits, all_logits[2], temperature=1.0) * mask).sum() / 4
    assert torch.allclose(total, ce + lin + cor)
    assert torch.allclose(terms, torch.stack([ce, lin, cor]).detach())


def test_node_loss_mean_reduction_averages_cross_edges():
    node_sum = _node([[T, T, T], [T, T, T], [T, T, T]])
    node_mean = _node([[T, T, T], [T, T, T], [T, T, T]], reduction="mean")
    logits, all_logits, y = torch.randn(4, 3), torch.randn(3, 4, 3), torch.tensor([0, 1, 2, 1])
    s, terms, _ = node_loss(node_sum, logits, all_logits, y, 0.3)
    m, _, _ = node_loss(node_mean, logits, all_logits, y, 0.3)
    assert torch.allclose(m, terms[0] + (terms[1] + terms[2]) / 2)
    assert torch.allclose(s, terms.sum())


def test_large_graph_shorthands_expand_to_the_full_lists():
    g = GraphSpec.from_dict({"name": "many", "nodes": {"model": "convnet", "count": 12}, "gates": "Through"})
    assert g.num_nodes == 12 and all(n.model == "convnet" for n in g.nodes)
    assert g.gates == [["Through"] * 12 for _ in range(12)]
    assert g.describe().splitlines()[1] == "  nodes: 12 x convnet; every edge Through"
    with pytest.raises(ConfigError, match="graph.nodes.count must be an integer >= 1; got 0"):
        GraphSpec.from_dict({"nodes": {"model": "convnet", "count": 0}, "gates": "Through"})
    with pytest.raises(ConfigError, match=r"takes exactly those keys; got \['count', 'size'\]"):
        GraphSpec.from_dict({"nodes": {"count": 3, "size": 2}, "gates": "Through"})
