"""Edge kinds (graph.kinds): each kind's loss against its paper's formula computed by hand,
the graphs refused before training, what crosses the exchange, the search space, MHGD's
stage 1, and the multi-process group equal to the single-process reference bitwise with
every kind at once."""
import json
import math
from pathlib import Path

import pytest
import torch

from actors.config import RunConfig
from actors.errors import ConfigError
from actors.exchange import DistEnv, Exchange
from actors.files import load_model_weights
from actors.graph import GraphSpec
from actors.losses import rkd_angle_loss, rkd_distance_loss
from actors.mhgd import (
    AttentionModule,
    aligned_vectors,
    clip_ramp,
    graph_loss,
    load_attention,
    receiver_vectors,
    save_attention,
    source_vectors,
    svd_vectors,
)
from actors.models import build_model
from actors.node import GraphNode
from actors.preflight import check_checkpoints, load_data
from actors.worker import NodeWorker
from coordinator.rundir import changed_settings
from coordinator.search_space import SearchConfig
from tests.helpers import make_node, node_loss, small_config

T, C, L, K = "Through", "Cutoff", "Linear", "Correct"


# --- the papers' formulas, by hand (python loops over torch scalars, float64) --------------------

def huber(x):
    """Smooth L1 with delta 1."""
    return 0.5 * x * x if abs(float(x.detach())) < 1 else x.abs() - 0.5


def norm(v):
    return torch.sqrt(sum(c * c for c in v))


def hand_rkd_distance(s, t):
    """RKD distance-wise loss: psi(i, j) = ||e_i - e_j|| / mean_{i != j} ||e_i - e_j||; mean over
    all B^2 entries (the diagonal's are 0) of huber(psi_s - psi_t). Returns the loss and the
    differences."""
    b = s.shape[0]
    if b < 2:
        return s.new_zeros(()), []

    def psi(e):
        d = {(i, j): norm(e[i] - e[j]) for i in range(b) for j in range(b) if i != j}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    ps, pt = psi(s), psi(t)
    diffs = [ps[k] - pt[k] for k in ps]
    return sum(huber(x) for x in diffs) / b ** 2, [float(x.detach()) for x in diffs]


def hand_rkd_angle(s, t):
    """RKD angle-wise loss: cos at vertex i of (e_j - e_i, e_k - e_i), 0 where j == i or k == i;
    mean over all B^3 entries of huber(cos_s - cos_t)."""
    b = s.shape[0]
    if b < 2:
        return s.new_zeros(()), []

    def cos(e, i, j, k):
        if j == i or k == i:
            return e.new_zeros(())
        u, v = e[j] - e[i], e[k] - e[i]
        return sum(x * y for x, y in zip(u, v)) / (norm(u) * norm(v))

    diffs = [cos(s, i, j, k) - cos(t, i, j, k) for i in range(b) for j in range(b) for k in range(b)]
    return sum(huber(x) for x in diffs) / b ** 3, [float(x.detach()) for x in diffs]


def softmax_row(row, temperature=1.0):
    z = [v / temperature for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def kl_rows(p_logits, q_logits, temperature):
    """mean over rows of KL(softmax(p/T) || softmax(q/T))."""
    out = []
    for pr, qr in zip(p_logits.tolist(), q_logits.tolist()):
        p, q = softmax_row(pr, temperature), softmax_row(qr, temperature)
        out.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q)))
    return sum(out) / len(out)


# student: 2-D, an outlier (distance differences beyond Huber's delta); teacher: 3-D, three
# collinear points (an angle of cos -1 where the student's is positive)
S_EMB = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5], [6.0, 5.0]])
T_EMB = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.5, 1.0, 1.0]])


@pytest.mark.parametrize("lib, hand", [(rkd_distance_loss, hand_rkd_distance), (rkd_angle_loss, hand_rkd_angle)],
                         ids=["distance", "angle"])
def test_rkd_losses_are_the_papers_formulas(lib, hand):
    s64 = S_EMB.double().requires_grad_()
    want, diffs = hand(s64, T_EMB.double())
    assert any(abs(x) > 1 for x in diffs) and any(0 < abs(x) < 1 for x in diffs)  # both Huber branches
    want.backward()

    s = S_EMB.clone().requires_grad_()
    t = T_EMB.clone().requires_grad_()
    got = lib(s, t)
    assert got.shape == () and got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    got.backward()
    assert t.grad is None                       # the source learns nothing from the edge
    assert torch.allclose(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("lib, hand", [(rkd_distance_loss, hand_rkd_distance), (rkd_angle_loss, hand_rkd_angle)],
                         ids=["distance", "angle"])
def test_rkd_keep_mask_is_the_loss_of_the_kept_samples(lib, hand):
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])
    kept = [0, 2, 3]
    s64 = S_EMB[kept].double().requires_grad_()
    want, _ = hand(s64, T_EMB[kept].double())
    want.backward()
    s = S_EMB.clone().requires_grad_()
    got = lib(s, T_EMB, keep)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert got.item() != pytest.approx(lib(S_EMB, T_EMB).item(), rel=1e-3)  # the mask matters
    got.backward()
    assert torch.equal(s.grad[1], torch.zeros(2))  # a dropped sample gets no gradient
    assert torch.allclose(s.grad[kept].double(), s64.grad, rtol=1e-4, atol=1e-6)
    # fewer than two kept samples: no relation, loss 0 (and finite gradients)
    for few in ([0.0, 0.0, 1.0, 0.0], [0.0] * 4):
        s = S_EMB.clone().requires_grad_()
        z = lib(s, T_EMB, torch.tensor(few))
        z.backward()
        assert z.item() == 0.0 and torch.isfinite(s.grad).all()


def test_rkd_losses_are_invariant_to_scale_and_shift_as_relations():
    """Relations, not positions: a teacher moved and scaled gives the same distance loss (and
    an identical one gives 0)."""
    moved = T_EMB * 3.0 + 7.0
    assert rkd_distance_loss(S_EMB, moved).item() == pytest.approx(rkd_distance_loss(S_EMB, T_EMB).item(), rel=1e-5)
    assert rkd_angle_loss(S_EMB, moved).item() == pytest.approx(rkd_angle_loss(S_EMB, T_EMB).item(), rel=1e-5)
    assert rkd_distance_loss(T_EMB, T_EMB).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle_loss(T_EMB, T_EMB).item() == pytest.approx(0.0, abs=1e-6)


# --- the node's loss with kinds -------------------------------------------------------------------

def kind_node(graph: GraphSpec, index: int = 0) -> GraphNode:
    return make_node(index, graph)


@pytest.fixture
def self_ckpt(tmp_path):
    torch.manual_seed(11)
    path = tmp_path / "self.pt"
    torch.save({"model": build_model("convnet", 3, 1).state_dict(), "meta": {"model": "convnet"}}, path)
    return path


def test_self_kind_is_ce_plus_weighted_t2_kl_from_the_frozen_stage1_copy(self_ckpt):
    g = GraphSpec(nodes=[{"model": "convnet", "self_checkpoint": str(self_ckpt)}, "convnet"],
                  gates=[[L, T], [T, T]], kinds=[["ce+self", "kl"], ["kl", "ce"]],
                  temperature=3.0, self_temperature=2.0, kind_weights={"self": 0.7})
    node = kind_node(g)
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    all_logits = torch.randn(2, 4, 3)
    self_logits = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    total, terms, _ = node_loss(node, logits, all_logits, y, 0.5, own={"self_logits": self_logits})

    z = logits.tolist()
    ce = sum(-math.log(softmax_row(row)[c]) for row, c in zip(z, y.tolist())) / 4
    self_kl = kl_rows(self_logits, logits, 2.0)                 # T_self = 2 (not graph.temperature)
    label_edge = 0.5 * (ce + 0.7 * 2.0 ** 2 * self_kl)          # both through the diagonal gate (Linear at 0.5)
    cross = 3.0 ** 2 * kl_rows(all_logits[1], logits, 3.0)
    assert total.item() == pytest.approx(label_edge + cross, rel=1e-5)
    assert terms.tolist() == pytest.approx([label_edge, cross], rel=1e-5)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_self_teacher_is_the_checkpoint_frozen_in_eval_mode_and_draws_no_randomness(self_ckpt):
    with_self = GraphSpec(nodes=[{"model": "convnet", "self_checkpoint": str(self_ckpt)}], gates=[[T]],
                          kinds=[["ce+self"]])
    torch.manual_seed(3)
    node = kind_node(with_self)
    after_self = torch.rand(3)
    torch.manual_seed(3)
    plain = kind_node(GraphSpec(nodes=["convnet"], gates=[[T]]))
    assert torch.equal(after_self, torch.rand(3))  # building the self-teacher drew nothing from the global RNG
    own, plain_own = node.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(own[k], plain_own[k]) for k in own)  # the learner starts from its own init, not the checkpoint

    ref = build_model("convnet", 3, 1)
    ref.load_state_dict(load_model_weights(self_ckpt)[0])
    ref.eval()
    x = torch.randn(5, 1, 8, 8)
    out = node.outputs(x)
    teacher = node.kind("self").teacher
    assert node.model.training and not teacher.training
    assert torch.allclose(out["self_logits"], ref(x), atol=1e-6)
    assert not out["self_logits"].requires_grad
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, _, loss = node_loss(node, out["logits"], out["logits"].detach()[None], torch.tensor([0, 1, 2, 0, 1]), 1.0, own=out)
    node.update(loss)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # never trained


def test_pairwise_kinds_in_the_node_loss_are_gated_and_weighted(self_ckpt):
    """kl+rkd_distance+rkd_angle on a Correct edge: the relations of the samples the source
    got right (the Correct mask), times the kinds' default weights 1 and 2; on a Linear edge
    the number is scaled by the progress."""
    g = GraphSpec(nodes=["convnet", "convnet", "convnet"], gates=[[T, K, L], [T, T, T], [T, T, T]],
                  kinds=[["ce", "kl+rkd_distance+rkd_angle", "rkd_angle"], ["kl", "ce", "kl"], ["kl", "kl", "ce"]])
    assert g.kind_weight("rkd_distance") == 1.0 and g.kind_weight("rkd_angle") == 2.0 and g.kind_weight("kl") == 1.0
    node = kind_node(g)
    assert "embedding" in node.model_outputs
    torch.manual_seed(1)
    logits = torch.randn(4, 3, requires_grad=True)
    all_logits = torch.randn(3, 4, 3)
    y = all_logits[1].argmax(1).clone()
    y[1] = (y[1] + 1) % 3                     # source 1 gets sample 1 wrong: Correct keeps 0, 2, 3
    emb = S_EMB.clone().requires_grad_()
    received = {"embedding": [None, T_EMB, T_EMB[[3, 2, 1, 0]]]}
    total, terms, _ = node_loss(node, logits, all_logits, y, 0.25, own={"embedding": emb}, received=received)

    kept = [0, 2, 3]
    mask = [1.0, 0.0, 1.0, 1.0]
    kl_n = []
    for row_p, row_q in zip(all_logits[1].tolist(), logits.tolist()):
        p, q = softmax_row(row_p), softmax_row(row_q)
        kl_n.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q)))
    correct_kl = sum(k * m for k, m in zip(kl_n, mask)) / 4
    s64, t64 = S_EMB.double(), T_EMB.double()
    rel = 1 * hand_rkd_distance(s64[kept], t64[kept])[0].item() + 2 * hand_rkd_angle(s64[kept], t64[kept])[0].item()
    lin = 0.25 * 2 * hand_rkd_angle(s64, t64[[3, 2, 1, 0]])[0].item()
    ce = sum(-math.log(softmax_row(row)[c]) for row, c in zip(logits.tolist(), y.tolist())) / 4
    assert terms.tolist() == pytest.approx([ce, correct_kl + rel, lin], rel=1e-5)
    assert total.item() == pytest.approx(ce + correct_kl + rel + lin, rel=1e-5)
    total.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


# --- MHGD ---------------------------------------------------------------------------------------

def random_attention(widths, heads=2, seed=0):
    torch.manual_seed(seed)
    module = AttentionModule(widths, heads)
    with torch.no_grad():  # BatchNorm with stored statistics and affine parameters far from identity
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return module.eval()


def hand_logits(pair, v_prev, v_cur):
    """G[h][a][b] = <key_h(v_cur[a]), query_h(v_prev[b])>, key/query = BatchNorm(W v) on stored
    statistics, feature d of head h at index d * H + h (the original's interleaving)."""
    def lin_bn(seq, v):
        w, bn = seq[0].weight.tolist(), seq[1]
        x = [sum(wi * vi for wi, vi in zip(row, v)) for row in w]
        rm, rv, g, b = bn.running_mean.tolist(), bn.running_var.tolist(), bn.weight.tolist(), bn.bias.tolist()
        return [(xi - m) / math.sqrt(var + bn.eps) * gi + bi for xi, m, var, gi, bi in zip(x, rm, rv, g, b)]

    h, d = pair.heads, pair.d
    keys = [lin_bn(pair.key, v) for v in v_cur.tolist()]
    queries = [lin_bn(pair.query, v) for v in v_prev.tolist()]
    return [[[sum(keys[a][j * h + hh] * queries[b][j * h + hh] for j in range(d)) for b in range(len(queries))]
             for a in range(len(keys))] for hh in range(h)]


def hand_graph_loss(module, target, source):
    """sum_pairs sum_{h, a, b} P_S (log P_S - log P_T), P = softmax_b(tanh(G))."""
    total = 0.0
    for i, pair in enumerate(module.pairs):
        gs, gt = hand_logits(pair, target[i], target[i + 1]), hand_logits(pair, source[i], source[i + 1])
        for hs, ht in zip(gs, gt):
            for rs, rt in zip(hs, ht):
                ps = softmax_row([math.tanh(v) for v in rs])
                pt = softmax_row([math.tanh(v) for v in rt])
                total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(ps, pt))
    return total


def test_mhgd_graph_loss_is_the_kl_of_the_tanh_softmaxed_attention_graphs():
    widths = [2, 3, 4]
    module = random_attention(widths)
    torch.manual_seed(5)
    target = [torch.nn.functional.normalize(torch.randn(5, c), dim=1).requires_grad_() for c in widths]
    source = [torch.nn.functional.normalize(torch.randn(5, c), dim=1).requires_grad_() for c in widths]
    got = graph_loss(module, target, source)
    want = hand_graph_loss(module, target, source)
    assert want > 0 and got.item() == pytest.approx(want, rel=1e-5)
    assert graph_loss(module, source, source).item() == pytest.approx(0.0, abs=1e-6)
    got.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in target)
    assert all(v.grad is None for v in source)  # the source's graph is the fixed target

    # Correct's keep: the graphs of the kept images only
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    kept = [0, 2, 3]
    target, source = [v.detach() for v in target], [v.detach() for v in source]
    sub = graph_loss(module, [v[kept] for v in target], [v[kept] for v in source])
    assert graph_loss(module, target, source, keep).item() == pytest.approx(sub.item(), rel=1e-5)
    assert sub.item() == pytest.approx(hand_graph_loss(module, [v[kept] for v in target], [v[kept] for v in source]),
                                       rel=1e-5)


def test_svd_vectors_and_the_receivers_alignment_to_the_source():
    torch.manual_seed(2)
    c, hw = 5, 6
    v = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]          # right singular vectors (columns)
    u = torch.linalg.qr(torch.randn(hw, c, dtype=torch.float64))[0]
    x = u @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T   # [HW, C]
    fmap = x.T.reshape(1, c, 2, 3).float()                                  # [B, C, H, W]
    top = svd_vectors(fmap, 4)[0]
    assert top.shape == (4, c)
    for i in range(4):
        assert abs(float(top[i].double() @ v[:, i])) == pytest.approx(1.0, abs=1e-5)
    assert svd_vectors(fmap, 1)[0, 0].norm().item() == pytest.approx(1.0, abs=1e-6)
    # the source is closest to -v_2: the receiver keeps its own v_2, with the source's sign
    src = -(0.8 * v[:, 2] + 0.6 * v[:, 0]).float()
    for sign in (1, -1):  # whatever sign the SVD gives v_2, one of the two needs the flip
        [got] = aligned_vectors(receiver_vectors([fmap]), [sign * src[None]])
        assert torch.allclose(got[0].double(), -sign * v[:, 2], atol=1e-5)
    sent = source_vectors([fmap, fmap[:, :3]])
    assert sent.shape == (1, c + 3)


def test_clip_ramp_is_the_sigmoid_of_the_epoch_and_reaches_1():
    assert clip_ramp(0) == 0.5
    assert clip_ramp(1) == pytest.approx(1 / (1 + math.exp(-1)))
    ramps = [clip_ramp(e) for e in range(40)]
    assert ramps == sorted(ramps) and ramps[-1] == 1.0 and clip_ramp(18) < 1.0 == clip_ramp(19)


def test_clipped_backward_adds_the_distillation_gradient_clipped_to_the_task_gradient():
    """Per parameter tensor: task grad + clip_by_norm(mhgd grad, ||task grad|| * clip_ramp(epoch))."""
    from actors.edge_kinds import MHGD

    node = kind_node(GraphSpec(nodes=["convnet"], gates=[[T]]))
    params = [p for p in node.model.parameters()]
    torch.manual_seed(4)
    a = [torch.randn_like(p) for p in params]
    d = [torch.randn_like(p) for p in params]
    d[0] = d[0] * 100 / d[0].norm() * a[0].norm()    # far larger than its task gradient: clipped
    d[1] = d[1] * 0.01 / d[1].norm() * a[1].norm()   # smaller: kept whole
    no_dist, no_task = 2, 3                           # p2 has no mhgd gradient, p3 no task gradient

    def run(epoch):
        task = sum((ai * p).sum() for i, (ai, p) in enumerate(zip(a, params)) if i != no_task)
        transfer = sum((di * p).sum() for i, (di, p) in enumerate(zip(d, params)) if i != no_dist)
        MHGD.backward(None, params, task, transfer, epoch)
        return [p.grad.clone() for p in params]

    for epoch, ramp in ((0, 0.5), (1, 1 / (1 + math.exp(-1))), (30, 1.0)):
        grads = run(epoch)
        bound = a[0].norm() * ramp
        assert torch.allclose(grads[0], a[0] + d[0] * bound / d[0].norm(), atol=1e-5), epoch
        assert torch.allclose(grads[1], a[1] + d[1], atol=1e-6)
        assert torch.allclose(grads[no_dist], a[no_dist], atol=1e-6)
        assert torch.equal(grads[no_task], torch.zeros_like(params[no_task]))  # bound 0: nothing of the mhgd grad
        for i in range(4, len(params)):
            assert torch.allclose(grads[i], a[i] + d[i] * torch.clamp(a[i].norm() * ramp / d[i].norm(), max=1.0),
                                  atol=1e-5)


# --- refusals before training ---------------------------------------------------------------------

def two(kinds=None, nodes=("convnet", "convnet"), gates=((T, T), (T, T)), **kw):
    return GraphSpec(nodes=[dict(n) if isinstance(n, dict) else {"model": n} for n in nodes],
                     gates=[list(r) for r in gates], kinds=kinds, **kw)


FROZEN = {"model": "resnet20", "checkpoint": "t.pt", "attention": "a.pt"}
CROSS = "kl, rkd_distance, rkd_angle, mhgd"
ALL = "ce, self, kl, rkd_distance, rkd_angle, mhgd, or an import path package.module:Class"


@pytest.mark.parametrize("kwargs, message", [
    (dict(kinds=[["ce", "kl"]]), r"graph.kinds must be a 2x2 matrix like graph.gates .*got rows \[2\]"),
    (dict(kinds=[["ce", "kl", "kl"], ["kl", "ce", "kl"]]), r"graph.kinds must be a 2x2 matrix"),
    (dict(kinds=[["ce", "self"], ["kl", "ce"]]),
     rf"graph.kinds\[0\]\[1\] \(edge 1 -> 0\): self cannot be on a cross edge; allowed there: {CROSS}$"),
    (dict(kinds=[["ce+kl", "kl"], ["kl", "ce"]]),
     r"graph.kinds\[0\]\[0\] \(node 0's own edge\): kl cannot be on the diagonal \(a node's own edge\); "
     r"allowed there: ce, self$"),
    (dict(kinds=[["ce", "kl"], ["attn", "ce"]]), rf"graph.kinds\[1\]\[0\] \(edge 0 -> 1\): unknown edge kind 'attn'; known: {ALL}$"),
    (dict(kinds=[["ce", "kl+kl"], ["kl", "ce"]]), r"graph.kinds\[0\]\[1\] \(edge 1 -> 0\) names a kind twice: 'kl\+kl'"),
    (dict(kinds=[["ce", ""], ["kl", "ce"]]), r"graph.kinds\[0\]\[1\] \(edge 1 -> 0\) must name at least one kind"),
    (dict(kinds=[["ce", 3], ["kl", "ce"]]), r"graph.kinds\[0\]\[1\] \(edge 1 -> 0\) must be a kind name, a list of them"),
    (dict(kinds="kl+self"), r"graph.kinds='kl\+self': one entry stands for every cross edge, so it may hold only the "
                            rf"cross-edge kinds {CROSS}; put self on the diagonal"),
    (dict(kinds="mhgd+foo"), rf"graph.kinds: unknown edge kind 'foo'; known: {ALL}$"),
    (dict(kinds=[["ce", "mhgd"], ["kl", "ce"]], nodes=("convnet", {"model": "convnet", "attention": "a.pt"})),
     r"graph.kinds\[0\]\[1\] \(edge 1 -> 0\): mhgd transfers the attention graph of a frozen teacher, and node 1 is "
     r"not frozen \(graph.gates\[1\] is not all Cutoff\); allowed from a learning node: kl, rkd_distance, rkd_angle"),
    (dict(kinds=[["ce+self", "kl"], ["kl", "ce"]]),
     r"graph.kinds\[0\]\[0\] has self \(self-distillation\), which needs graph.nodes\[0\].self_checkpoint"),
    (dict(nodes=({"model": "convnet", "self_checkpoint": "s.pt"}, "convnet")),
     r"graph.nodes\[0\].self_checkpoint is set but graph.kinds\[0\]\[0\] has no self"),
    (dict(kinds=[["ce", "mhgd"], ["kl", "ce"]], nodes=("resnet20", {"model": "resnet20", "checkpoint": "t.pt"}),
          gates=((T, T), (C, C))),
     r"graph.nodes\[1\] feeds mhgd edges \(to node\(s\) \[0\]\) and so needs graph.nodes\[1\].attention: .*"
     r"python launch.py mode=attention"),
    (dict(nodes=("resnet20", FROZEN), gates=((T, T), (C, C))),
     r"graph.nodes\[1\].attention is set but no mhgd edge leaves node 1"),
    (dict(kind_weights={"rkd": 1.0}), rf"graph.kind_weights: unknown edge kind 'rkd'; known: {ALL}$"),
    (dict(kind_weights={"rkd_angle": -1}), r"graph.kind_weights.rkd_angle must be a number >= 0; got -1"),
    (dict(kind_weights={"kl": True}), r"graph.kind_weights.kl must be a number >= 0; got True"),
    (dict(kind_weights=[1, 2]), r"graph.kind_weights must be a mapping kind -> weight"),
    (dict(mhgd={"clipping": True}), r"graph.mhgd has unknown keys \['clipping'\]; allowed: clip, attention_epochs, attention_lr"),
    (dict(mhgd={"clip": "yes"}), r"graph.mhgd.clip must be true or false; got 'yes'"),
    (dict(mhgd={"attention_epochs": 0}), r"graph.mhgd.attention_epochs must be an integer >= 1; got 0"),
    (dict(mhgd={"attention_lr": 0}), r"graph.mhgd.attention_lr must be a number > 0; got 0"),
    (dict(self_temperature=0), r"graph.self_temperature must be a number > 0 or null; got 0"),
])
def test_bad_kinds_are_refused_naming_the_field_and_the_allowed_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        two(**kwargs)


def test_kind_weights_override_the_defaults_kind_by_kind():
    g = two(kind_weights={"rkd_angle": 0, "kl": 2})
    assert g.kind_weights == {"rkd_angle": 0.0, "kl": 2.0}
    assert g.kind_weight("kl") == 2.0 and g.kind_weight("rkd_angle") == 0.0 and g.kind_weight("rkd_distance") == 1.0


def test_graphs_without_kinds_mean_what_they_meant():
    for kinds in (None, "kl", [["ce", "kl"], ["kl", "ce"]], [["ce", ["kl"]], [("kl",), "ce"]]):
        g = two(kinds)
        assert g.kinds is None, kinds
        assert g.edge_kinds(0, 0) == ("ce",) and g.edge_kinds(0, 1) == ("kl",)
        assert g.senders("embedding") == [] and g.senders("features") == []
    assert "[" not in two("kl").describe()  # no kind notes on a default graph
    # one entry for every cross edge, in the kinds' canonical order; the diagonal stays ce
    g = two("rkd_angle + kl")
    assert g.kinds == [[["ce"], ["kl", "rkd_angle"]], [["kl", "rkd_angle"], ["ce"]]]
    assert g.senders("embedding") == [0, 1] and g.receivers("embedding") == [0, 1]
    assert "1:Through[kl+rkd_angle]" in g.describe()
    # a run directory's config from before kinds existed (no kind keys) reads as the same run
    cfg = small_config(["convnet", "convnet"], [[T, T], [T, T]])
    old = cfg.to_dict()
    for key in ("kinds", "kind_weights", "self_temperature", "mhgd"):
        del old["graph"][key]
    for n in old["graph"]["nodes"]:
        del n["self_checkpoint"], n["attention"]
    assert changed_settings(RunConfig.from_dict(old), cfg) == []
    # and a graph with kinds survives the run directory's round trip (to_dict -> from_dict)
    kinded = two([["ce+self", "kl+rkd_distance"], ["rkd_angle", "ce"]],
                 nodes=({"model": "convnet", "self_checkpoint": "s.pt"}, "convnet"),
                 kind_weights={"self": 0.5}, self_temperature=4, mhgd={"clip": False})
    again = GraphSpec.from_dict(json.loads(json.dumps(kinded.to_dict())))
    assert again == kinded and again.self_temperature == 4.0 and again.mhgd_option("clip") is False
    assert again.mhgd_option("attention_epochs") == 40


@pytest.mark.parametrize("edge_kinds, message", [
    (["kl", "mhgd"], r"search.edge_kinds\[1\]: mhgd cannot be searched; allowed: kl, rkd_distance, rkd_angle"),
    (["kl+self"], r"search.edge_kinds\[0\]: self cannot be searched; allowed: kl, rkd_distance, rkd_angle"),
    (["kl", "rkd"], r"search.edge_kinds\[1\]: unknown edge kind 'rkd'; known: "),
    ([], r"search.edge_kinds must be a non-empty list of cross-edge kinds"),
    ("kl", r"search.edge_kinds must be a non-empty list of cross-edge kinds"),
    (["kl+rkd_angle", "rkd_angle+kl"], r"search.edge_kinds lists a choice twice: \['kl\+rkd_angle', 'kl\+rkd_angle'\]"),
])
def test_bad_search_edge_kinds_are_refused(edge_kinds, message):
    with pytest.raises(ConfigError, match=message):
        SearchConfig(num_nodes=3, target_model="convnet", zoo=["convnet"], edge_kinds=edge_kinds)


# --- the search space -----------------------------------------------------------------------------

def test_search_edge_kinds_sample_cross_edges_only_into_a_valid_graph(tmp_path):
    s = SearchConfig(num_nodes=3, target_model="convnet", zoo=["convnet", "resnet20"], frozen="exclude",
                     edge_kinds=["kl", "rkd_angle + kl", "rkd_distance"], teachers_dir=str(tmp_path))
    space = s.choices()
    kind_keys = sorted(k for k in space if k.startswith("kind_"))
    assert kind_keys == sorted(f"kind_{t}_{u}" for t in range(3) for u in range(3) if t != u)
    assert all(space[k] == ["kl", "kl+rkd_angle", "rkd_distance"] for k in kind_keys)
    params = {k: v[0] for k, v in space.items()}
    params.update(model_1="resnet20", model_2="convnet", kind_0_1="kl+rkd_angle", kind_2_0="rkd_distance",
                  kind_1_2="rkd_distance")
    params.update({f"gate_{t}_{u}": T for t in range(3) for u in range(3)})
    params["gate_1_0"] = C
    graph = GraphSpec.from_dict(s.graph_from(params))
    assert [graph.edge_kinds(t, t) for t in range(3)] == [("ce",)] * 3
    assert graph.edge_kinds(0, 1) == ("kl", "rkd_angle") and graph.edge_kinds(2, 0) == ("rkd_distance",)
    assert graph.edge_kinds(0, 2) == ("kl",)
    assert graph.senders("embedding") == [0, 1, 2] and graph.receivers("embedding") == [0, 1, 2]
    # without edge_kinds: the paper's space, every edge kl
    plain = SearchConfig(num_nodes=3, target_model="convnet", zoo=["convnet"], frozen="exclude")
    assert not any(k.startswith("kind_") for k in plain.choices())
    g = plain.graph_from({**{k: v[0] for k, v in plain.choices().items()}})
    assert "kinds" not in g and GraphSpec.from_dict(g).kinds is None


# --- what crosses the exchange --------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints for digits (10 classes, 1 channel): a resnet20 self-teacher, a frozen
    resnet20 teacher and a freshly initialised attention module of it."""
    d = tmp_path_factory.mktemp("kinds")
    for name, seed in (("self", 1), ("teacher", 2)):
        torch.manual_seed(seed)
        torch.save({"model": build_model("resnet20", 10, 1).state_dict(), "meta": {"model": "resnet20"}}, d / f"{name}.pt")
    torch.manual_seed(3)
    save_attention(d / "attention.pt", AttentionModule([16, 32, 64]), {"model": "resnet20"})
    return d


def worker(cfg, rank=0, placement=None):
    world = len(placement) if placement else cfg.graph.num_nodes
    env = DistEnv(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"), backend="none")
    return NodeWorker(cfg, env, Exchange(env), load_data(cfg), placement=placement)


def exchange_config(nodes, gates, kinds, batch=8):
    return small_config(nodes, gates, graph={"name": "x", "nodes": nodes, "gates": gates, "kinds": kinds},
                        train={"epochs": 1, "batch_size": batch, "num_threads": 1})


def test_a_kl_graph_exchanges_logits_only(files):
    gates = [[T, T, C], [T, T, T], [T, T, T]]
    for kinds in (None, [["ce", "kl", "rkd_angle"], ["kl", "ce", "kl"], ["kl", "kl", "ce"]]):  # rkd on a Cutoff edge
        w = worker(exchange_config(["convnet", "convnet", "resnet20"], gates, kinds), placement=[[0, 1, 2]])
        assert w.exchange_bytes() == {"logits": 3 * 8 * 10 * 4}
        outs = [n.outputs(torch.randn(8, 1, 8, 8)) for n in w.nodes]
        assert all(set(o) == {"logits"} for o in outs)  # no embedding computed either
        assert set(w._payload(outs)) == {"logits"}


def test_relation_and_mhgd_graphs_exchange_embeddings_and_features_padded_to_the_widest(files):
    """Node 0 (resnet20, D 64) and node 1 (convnet, D 128) feed relation edges, node 2 (a frozen
    resnet20) an mhgd edge: embeddings [width, B, 128], features [width, B, 16+32+64]."""
    nodes = ["resnet20", "convnet", {"model": "resnet20", "checkpoint": str(files / "teacher.pt"),
                                     "attention": str(files / "attention.pt")}]
    gates = [[T, T, T], [T, T, T], [C, C, C]]
    kinds = [["ce", "rkd_angle", "mhgd"], ["rkd_distance", "ce", "kl"], ["kl", "kl", "ce"]]
    b = 8
    cfg = exchange_config(nodes, gates, kinds, b)
    one_each = worker(cfg)  # rank 0 of 3, one node per process
    assert one_each.exchange_bytes() == {"logits": b * 10 * 4, "embedding": b * 128 * 4, "features": b * 112 * 4}

    x = torch.randn(b, 1, 8, 8)
    for rank, hosted in ((0, [1]), (1, [0, 2])):
        w = worker(cfg, rank, placement=[[1], [0, 2]])   # width 2
        assert w.hosted == hosted
        assert w.exchange_bytes() == {"logits": 2 * b * 10 * 4, "embedding": 2 * b * 128 * 4, "features": 2 * b * 112 * 4}
        outs = [n.outputs(x) for n in w.nodes]
        payload = w._payload(outs)
        assert payload["embedding"].shape == (2, b, 128) and payload["features"].shape == (2, b, 112)
        for j, (t, o) in enumerate(zip(hosted, outs)):
            d = {0: 64, 1: 128}.get(t, 0)
            if d:
                assert torch.equal(payload["embedding"][j, :, :d], o["embedding"])
            assert payload["embedding"][j, :, d:].eq(0).all()
            if t == 2:
                assert torch.equal(payload["features"][j], o["features"])
            else:
                assert payload["features"][j].eq(0).all()
        assert payload["embedding"][len(hosted):].eq(0).all() and payload["features"][len(hosted):].eq(0).all()


# --- the group equals the single-process reference, every kind at once ------------------------------

def every_kind_config(files, placement="auto"):
    nodes = [{"model": "resnet20", "self_checkpoint": str(files / "self.pt")}, "convnet",
             {"model": "resnet20", "checkpoint": str(files / "teacher.pt"), "attention": str(files / "attention.pt")}]
    gates = [[T, K, L], [L, T, T], [C, C, C]]
    kinds = [["ce+self", "kl+rkd_distance+rkd_angle", "mhgd"], ["rkd_distance", "ce", "kl"], ["kl", "kl", "ce"]]
    return small_config(nodes, gates, placement=placement,
                        graph={"name": "every-kind", "nodes": nodes, "gates": gates, "kinds": kinds, "temperature": 2.0,
                               "self_temperature": 3.0},
                        train={"epochs": 2, "batch_size": 16, "num_threads": 1, "max_steps_per_epoch": 3})


def assert_same_states(run_dir, ref):
    for i, node in enumerate(ref):
        got, _ = load_model_weights(Path(run_dir) / f"node{i}.pt")
        want = node.model.state_dict()  # parameters and buffers (BatchNorm statistics included)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), f"node {i} {k} differs"


def test_group_with_every_kind_equals_the_single_process_reference_bitwise(files, tmp_path, one_thread):
    """node 0 (resnet20) learns from its labels + itself (self), from node 1 (convnet) through a
    Correct edge of kl + both RKD relations, and from the frozen resnet20 node 2 through mhgd
    (clipped, on a Linear edge); node 1 learns node 0's distances. 2 processes, one of them
    packed ([[1], [0, 2]]: every kind's tensors cross processes, and node rows come out of
    node order), against the reference. (One node per process is the same code with a width
    of 1; tests/test_distributed.py runs it for kl graphs.)"""
    from coordinator.local import run_local
    from coordinator.sequential import train_sequential

    cfg = every_kind_config(files, [[1], [0, 2]])
    ref = train_sequential(cfg, load_data(cfg))
    run_local(cfg, tmp_path / "p2", timeout_s=300, processes=2)
    assert_same_states(tmp_path / "p2", ref)
    # every kind was live: the edges' recorded losses are non-zero, and the teacher did not move
    rows = [json.loads(line) for line in (tmp_path / "p2" / "metrics.jsonl").read_text().splitlines()]
    n0 = [r for r in rows if r["node"] == 0]
    assert all(r["edge_1_to_0_Correct"] > 0 and r["edge_2_to_0_Linear"] > 0 for r in n0)
    teacher, _ = load_model_weights(files / "teacher.pt")
    assert all(torch.equal(v, teacher[k]) for k, v in ref[2].model.state_dict().items())


# --- MHGD stage 1: mode=attention ---------------------------------------------------------------

def mhgd_config(files, attention, receiver="resnet20"):
    nodes = [receiver, {"model": "resnet20", "checkpoint": str(files / "teacher.pt"), "attention": str(attention)}]
    gates = [[T, T], [C, C]]
    return small_config(nodes, gates,
                        graph={"name": "mhgd", "nodes": nodes, "gates": gates, "kinds": [["ce", "mhgd"], ["kl", "ce"]],
                               "mhgd": {"attention_epochs": 1, "attention_lr": 0.05}},
                        train={"epochs": 1, "batch_size": 16, "num_threads": 1, "max_steps_per_epoch": 2})


def test_run_attention_writes_the_module_once_and_preflight_then_accepts_the_graph(files, tmp_path):
    from coordinator.attention import run_attention

    path = tmp_path / "att" / "mhgd_attention.pt"
    cfg = mhgd_config(files, path)
    data = load_data(cfg)
    with pytest.raises(ConfigError, match=rf"graph.nodes\[1\].attention={path}: file not found. Train it first .*"
                                          r"python launch.py mode=attention"):
        check_checkpoints(cfg, data)

    said = []
    out = run_attention(cfg, say=said.append)
    assert list(out) == [1] and out[1]["path"] == str(path) and len(out[1]["losses"]) == 1
    assert path.is_file() and any("attention epoch 1/1" in s for s in said)
    module, meta = load_attention(path)
    assert module.widths == [16, 32, 64] and meta["model"] == "resnet20" and meta["epochs"] == 1
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    fresh = AttentionModule([16, 32, 64])
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in module.state_dict().items())  # it learned
    check_checkpoints(cfg, data)  # preflight accepts the graph now

    written = path.read_bytes()
    with pytest.raises(ConfigError, match=r"graph.nodes\[1\].attention=.* exists already; it is never overwritten"):
        run_attention(cfg, say=said.append)
    assert path.read_bytes() == written

    # a receiver whose stage widths differ (convnet 32/64/128) is refused, naming the fitting models
    with pytest.raises(ConfigError, match=r"graph.kinds\[0\]\[1\] \(edge 1 -> 0\): mhgd compares the two networks' stage "
                                          r"features, so they need the same stage widths; node 1 \(resnet20\) has "
                                          r"\[16, 32, 64\], node 0 \(convnet\) has \[32, 64, 128\]\. Models with "
                                          r"\[16, 32, 64\]: .*resnet32"):
        check_checkpoints(mhgd_config(files, path, receiver="convnet"), data)
    # a module trained on another network is refused
    other = tmp_path / "other.pt"
    save_attention(other, AttentionModule([16, 32, 64]), {"model": "resnet32"})
    with pytest.raises(ConfigError, match=r"was trained on a resnet32 \(stage widths \[16, 32, 64\]\), not on node 1's "
                                          r"resnet20"):
        check_checkpoints(mhgd_config(files, other), data)
    # a module from before the stage vectors had a fixed sign (it reads their sign) is refused
    blob = torch.load(path, weights_only=True)
    del blob["meta"]["vector_sign"]
    old = tmp_path / "old.pt"
    torch.save(blob, old)
    with pytest.raises(ConfigError, match=r"attention=.*old.pt was trained by an older version, on stage vectors of another "
                                          r"sign convention .*; move it aside and train it again: `python launch.py mode=attention"):
        check_checkpoints(mhgd_config(files, old), data)
    # ... and mode=attention refuses it before training anything
    with pytest.raises(ConfigError, match=r"mhgd compares the two networks' stage features"):
        run_attention(mhgd_config(files, tmp_path / "never.pt", receiver="convnet"), say=said.append)
    assert not (tmp_path / "never.pt").exists()
    # a graph without mhgd edges has nothing to train
    with pytest.raises(ConfigError, match=r"mode=attention trains the attention modules of mhgd edges, and graph 'test' has none"):
        run_attention(small_config(["convnet", "convnet"], [[T, T], [T, T]]))
    # a teacher checkpoint retrained in place: its module is stale, and refused
    import shutil

    teacher = tmp_path / "teacher.pt"
    shutil.copy(files / "teacher.pt", teacher)
    moved = mhgd_config(files, tmp_path / "att2.pt")
    moved.graph.nodes[1].checkpoint = str(teacher)
    run_attention(moved, say=said.append)
    check_checkpoints(moved, data)
    torch.manual_seed(9)
    torch.save({"model": build_model("resnet20", 10, 1).state_dict(), "meta": {"model": "resnet20"}}, teacher)
    with pytest.raises(ConfigError, match=r"was trained on another version of graph.nodes\[1\].checkpoint=.*train it again"):
        check_checkpoints(moved, data)


def test_an_mhgd_kind_on_a_cutoff_edge_is_inert(files):
    """A kind on a Cutoff edge carries nothing: an mhgd entry there needs no attention module,
    sends no features, and mode=attention has nothing to train."""
    from coordinator.attention import attention_nodes

    nodes = ["resnet20", {"model": "resnet20", "checkpoint": str(files / "teacher.pt")}]
    cfg = exchange_config(nodes, [[T, C], [C, C]], [["ce", "mhgd"], ["kl", "ce"]])
    assert cfg.graph.senders("features") == [] and attention_nodes(cfg) == []
    check_checkpoints(cfg, load_data(cfg))
    assert worker(cfg, placement=[[0, 1]]).exchange_bytes() == {"logits": 2 * 8 * 10 * 4}


def test_the_clip_treats_apart_exactly_the_mhgd_share_of_the_loss_under_mean_reduction(files):
    """graph.reduction=mean averages the cross edges: the loss holds mhgd / n, and the share the
    clipped backward separates from the task gradient is that, not the whole mhgd value."""
    nodes = ["resnet20", "convnet", {"model": "resnet20", "checkpoint": str(files / "teacher.pt"),
                                     "attention": str(files / "attention.pt")}]
    gates, kinds = [[T, T, T], [T, T, T], [C, C, C]], [["ce", "kl", "mhgd"], ["kl", "ce", "kl"], ["kl", "kl", "ce"]]
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    parts = {}
    for reduction in ("sum", "mean"):
        cfg = small_config(nodes, gates, graph={"name": "m", "nodes": nodes, "gates": gates, "kinds": kinds,
                                                "reduction": reduction}, train={"epochs": 1, "batch_size": 8})
        w = worker(cfg, placement=[[0, 1, 2]])
        outs = [n.outputs(x) for n in w.nodes]
        all_logits = torch.stack([o["logits"].detach() for o in outs])  # what one process's exchange returns
        received = {"features": [None, None, outs[2]["features"]]}
        node = w.nodes[0]
        loss, terms, parts_of = node_loss(node, outs[0]["logits"], all_logits, y, 0.5, own=outs[0], received=received)
        ce, kl, mhgd = terms.tolist()
        assert math.isclose(loss.item(), ce + (kl + mhgd) / (2 if reduction == "mean" else 1), rel_tol=1e-5)
        assert math.isclose(parts_of.apart.item(), mhgd / (2 if reduction == "mean" else 1), rel_tol=1e-5)
        assert math.isclose(parts_of.task.item(), ce + kl / (2 if reduction == "mean" else 1), rel_tol=1e-5)
        parts[reduction] = mhgd
    assert parts["sum"] == pytest.approx(parts["mean"]) and parts["sum"] > 0


def test_the_vectors_gradient_of_a_rank_deficient_map_is_finite():
    """A stage map of rank below its size (here a 2 x 2 map with two dead pixels) has repeated
    (zero) singular values, where the SVD's gradient is NaN for the whole image: the vectors'
    gradient is finite, and that image learns too."""
    torch.manual_seed(0)
    fmap = torch.randn(3, 8, 2, 2)
    fmap[0, :, 0, :] = 0.0                          # image 0: two of its four pixels dead
    fmap.requires_grad_()
    source = [torch.nn.functional.normalize(torch.randn(3, 8), dim=1)]
    v = aligned_vectors(receiver_vectors([fmap]), source)[0]
    (v * torch.randn(3, 8)).sum().backward()
    assert torch.isfinite(fmap.grad).all() and fmap.grad[1:].abs().sum() > 0 and fmap.grad[0].abs().sum() > 0
