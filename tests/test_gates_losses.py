"""Gates and edge losses against hand-computed values (docs/method.md, 'The gates')."""
import math

import pytest
import torch

from actors.gates import GATES, is_cutoff
from actors.losses import kl_loss, label_loss

LOSS = torch.tensor([1.0, 2.0, 3.0, 4.0])
LABELS = torch.tensor([0, 1, 2, 0])
# source argmax = [0, 1, 0, 0] -> correct on samples 0, 1, 3
SOURCE = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [5.0, 0, 0]])


def gate(name, loss=LOSS, source=SOURCE, progress=0.25):
    return GATES.get(name)(loss, source_logits=source, labels=LABELS, progress=progress).item()


def test_through_is_batch_mean():
    assert gate("Through") == pytest.approx(2.5)


def test_cutoff_is_zero():
    assert gate("Cutoff") == 0.0
    assert is_cutoff("cutoff") and not is_cutoff("Through")


def test_linear_scales_by_progress():
    # k / k_end = 0.25
    assert gate("Linear", progress=0.25) == pytest.approx(2.5 * 0.25)
    assert gate("PositiveLinear", progress=1.0) == pytest.approx(2.5)


def test_negative_linear():
    assert gate("NegativeLinear", progress=0.25) == pytest.approx(2.5 * 0.75)
    assert gate("NegativeLinear", progress=1.0) == pytest.approx(0.0)


def test_correct_divides_by_batch_not_by_count():
    # samples 0, 1, 3 correct: (1 + 2 + 4) / 4, not / 3
    assert gate("Correct") == pytest.approx(7.0 / 4.0)


def test_correct_on_label_edge_equals_through():
    assert gate("Correct", source=None) == pytest.approx(gate("Through", source=None))


def test_gate_names_are_case_insensitive_and_unknown_lists_known():
    assert GATES.get("through") is GATES.get("THROUGH")
    with pytest.raises(KeyError, match="known: .*Correct.*Cutoff.*Linear.*NegativeLinear.*Through"):
        GATES.get("Sometimes")


def test_label_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    assert label_loss(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kl_matches_hand_computation(T):
    zt = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    zs = torch.tensor([[0.0, 2.0, 1.0], [1.0, -1.0, 0.0]])
    out = kl_loss(zt, zs, temperature=T)
    for n in range(2):
        ps = [math.exp(v / T) for v in zs[n].tolist()]
        pt = [math.exp(v / T) for v in zt[n].tolist()]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        kl = sum(a * math.log(a / b) for a, b in zip(ps, pt)) * T * T
        assert out[n].item() == pytest.approx(kl, rel=1e-5)


def test_kl_gives_no_gradient_to_source():
    zt = torch.randn(4, 5, requires_grad=True)
    zs = torch.randn(4, 5, requires_grad=True)
    kl_loss(zt, zs, temperature=2.0).sum().backward()
    assert zt.grad is not None and zs.grad is None


def test_kl_is_zero_for_identical_outputs():
    z = torch.randn(3, 7)
    assert torch.allclose(kl_loss(z, z, temperature=3.0), torch.zeros(3), atol=1e-6)


def test_kl_over_stacked_sources_is_each_edge_alone_bitwise():
    """kl of several sources at once ([S, B, C]) is, row for row, the kl of each edge alone, and
    with two sources its gradient is bitwise the per-edge one (each row's softmax backward is
    its own; two gradients sum the same in either order): what keeps 2- and 3-node graphs
    training bitwise as they did when each edge was computed apart."""
    torch.manual_seed(0)
    z = torch.randn(16, 10, requires_grad=True)
    sources = torch.randn(3, 16, 10)
    both = kl_loss(z, sources, temperature=2.0)
    alone = torch.stack([kl_loss(z, s, temperature=2.0) for s in sources])
    assert both.shape == (3, 16) and torch.equal(both, alone)
    (g_batched,) = torch.autograd.grad(kl_loss(z, sources[:2], temperature=2.0).mean(dim=-1).sum(), z)
    per_edge = [kl_loss(z, s, temperature=2.0).mean() for s in sources[:2]]
    (g_edges,) = torch.autograd.grad(per_edge[0] + per_edge[1], z)
    assert torch.equal(g_batched, g_edges)
