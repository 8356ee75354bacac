"""The built-in edge kinds (``actors.kinds`` says what a kind declares and does).

=============  ========  ===================================================================
kind           where     knowledge (what crosses processes for it)
=============  ========  ===================================================================
ce             diagonal  the labels: cross-entropy (nothing)
self           diagonal  self-distillation (CTSL-MKT): T^2 KL from the predictions of the
                         node's own stage-1 copy (``nodes[t].self_checkpoint``, frozen, in
                         the node's process) on the same batch (nothing)
kl             cross     the source's output distribution, T^2 KL (its logits, B x C)
rkd_distance   cross     distance-wise relations of the batch (RKD; its embedding, B x D)
rkd_angle      cross     angle-wise relations of the batch (RKD; its embedding, B x D)
mhgd           cross     the attention graph of a frozen source's features (MHGD; its
                         SVD-compressed features, from frozen sources only)
=============  ========  ===================================================================
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from actors.errors import ConfigError
from actors.files import load_model_weights
from actors.kinds import EdgeBatch, EdgeKind, Receiver, Sendable, register_kind, register_sendable
from actors.losses import kl_loss, label_loss, rkd_angle_loss, rkd_distance_loss
from actors.mhgd import VECTOR_SIGN, aligned_vectors, clip_ramp, graph_loss, load_attention, receiver_vectors, source_vectors, split_vectors
from actors.models import MODELS, build_model, embed_dim, stage_widths

register_sendable(Sendable("logits", None, lambda model, num_classes, in_channels: num_classes))
register_sendable(Sendable("embedding", "embedding", embed_dim))
#: mhgd's: a frozen source's top singular vector per stage, ``[B, sum_i C_i]``
register_sendable(Sendable("features", "maps", lambda *model: sum(stage_widths(*model)),
                           derive=lambda out: source_vectors(out["maps"])))


# --- the diagonal ----------------------------------------------------------------------------------


@register_kind
class CrossEntropy(EdgeKind):
    """The labels: ``CE(y, z_t)`` per sample."""

    name, diagonal, short = "ce", True, "ce"

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        return label_loss(batch.own["logits"], batch.labels)[None]


@register_kind
class SelfDistillation(EdgeKind):
    """CTSL-MKT's self-distillation: ``T_self^2 KL(p_copy || p_t)`` from the node's own
    stage-1 copy (``graph.nodes[t].self_checkpoint``), frozen, always with its stored
    BatchNorm statistics, run in the node's process on the same batch."""

    name, diagonal, short = "self", True, "self"

    @classmethod
    def check_graph(cls, graph) -> None:
        for t, n in enumerate(graph.nodes):
            has_self = "self" in graph.edge_kinds(t, t)
            if has_self and not n.self_checkpoint:
                raise ConfigError(
                    f"graph.kinds[{t}][{t}] has self (self-distillation), which needs graph.nodes[{t}].self_checkpoint: "
                    f"node {t}'s own stage-1 weights ({n.model} trained alone, e.g. graph=teacher "
                    f"graph.nodes.0.model={n.model}; README, 'Edge kinds')"
                )
            if n.self_checkpoint and not has_self:
                raise ConfigError(f"graph.nodes[{t}].self_checkpoint is set but graph.kinds[{t}][{t}] has no self: "
                                  "add self to the diagonal, or drop the checkpoint")

    @classmethod
    def check_data(cls, graph, data, trained: bool = True) -> None:
        from actors.preflight import check_checkpoint

        for t, n in enumerate(graph.nodes):
            if n.self_checkpoint:
                check_checkpoint(t, n.model, "self_checkpoint", n.self_checkpoint, data)

    def __init__(self, receiver: Receiver, sources: list[int]):
        super().__init__(receiver, sources)
        r = receiver
        self.temperature = r.graph.self_temperature or r.graph.temperature
        with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: draw nothing
            self.teacher = build_model(r.model, r.num_classes, r.in_channels)
        state, _ = load_model_weights(r.graph.nodes[r.index].self_checkpoint)
        self.teacher.load_state_dict(state)
        self.teacher.to(r.device).eval().requires_grad_(False)
        if r.channels_last:
            self.teacher.to(memory_format=torch.channels_last)

    def own(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self.receiver.autocast():
            return {"self_logits": self.teacher(x).float()}

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        return kl_loss(batch.own["logits"], batch.own["self_logits"], temperature=self.temperature)[None]


# --- cross edges ------------------------------------------------------------------------------------


@register_kind
class KL(EdgeKind):
    """The source's output distribution: ``T^2 KL(p_s || p_t)`` per sample (Hinton et al.
    2015; DML), every incoming edge at once: one KL over the stacked sources."""

    name, sends, searchable, short = "kl", "logits", True, "kl"

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        return kl_loss(batch.own["logits"], batch.source_logits, temperature=self.receiver.graph.temperature)


class _Relation(EdgeKind):
    """RKD's relations of the batch's penultimate embeddings: one number per edge."""

    sends, uses, per_sample, searchable = "embedding", ("embedding",), False, True
    relation = staticmethod(rkd_distance_loss)

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        own = batch.own["embedding"]
        return torch.stack([self.relation(own, sent, keep) for sent, keep in zip(batch.sent, batch.keep)])


# RKD's base weights (lambda_D = 1, lambda_A = 2: the RKD paper's formulation and its code's
# defaults). Its CIFAR-100 teacher -> student setting, 25 and 50, destabilises peers that
# learn each other's relations from scratch (docs/edge-kinds.md, measured): set it with
# graph.kind_weights when a frozen teacher feeds the relation edges.
@register_kind
class RKDDistance(_Relation):
    name, weight, short = "rkd_distance", 1.0, "rd"
    relation = staticmethod(rkd_distance_loss)


@register_kind
class RKDAngle(_Relation):
    name, weight, short = "rkd_angle", 2.0, "ra"
    relation = staticmethod(rkd_angle_loss)


#: ``graph.mhgd``'s options and their defaults (MHGD's values)
MHGD_DEFAULTS = {"clip": True, "attention_epochs": 40, "attention_lr": 0.1}


def parse_mhgd(value: Any) -> Optional[dict[str, Any]]:
    """``graph.mhgd``: the options set (null when none is)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"graph.mhgd must be a mapping with keys {', '.join(MHGD_DEFAULTS)}; got {value!r}")
    unknown = set(value) - set(MHGD_DEFAULTS)
    if unknown:
        raise ConfigError(f"graph.mhgd has unknown keys {sorted(unknown)}; allowed: {', '.join(MHGD_DEFAULTS)}")
    out = dict(value)
    if "clip" in out and not isinstance(out["clip"], bool):
        raise ConfigError(f"graph.mhgd.clip must be true or false; got {out['clip']!r}")
    e = out.get("attention_epochs", 1)
    if isinstance(e, bool) or not isinstance(e, int) or e < 1:
        raise ConfigError(f"graph.mhgd.attention_epochs must be an integer >= 1; got {e!r}")
    lr = out.get("attention_lr", 1.0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"graph.mhgd.attention_lr must be a number > 0; got {lr!r}")
    return out or None


@register_kind
class MHGD(EdgeKind):
    """MHGD (Lee & Song 2019): the receiver reproduces a frozen source's attention graphs of
    its stage features, through the source's trained attention module (``actors.mhgd``); its
    gradient is clipped apart to the task gradient's norm (``backward``)."""

    name, sends, uses, per_sample, frozen_sources_only, short = "mhgd", "features", ("maps",), False, True, "mhgd"
    knowledge = "the attention graph"

    @classmethod
    def check_graph(cls, graph) -> None:
        for t, n in enumerate(graph.nodes):
            declared = [r for r in range(graph.num_nodes) if r != t and "mhgd" in graph.edge_kinds(r, t)]
            feeds = [r for r in declared if t in dict(graph.incoming(r))]  # live edges (gate not Cutoff)
            if feeds and not n.attention:
                raise ConfigError(
                    f"graph.nodes[{t}] feeds mhgd edges (to node(s) {feeds}) and so needs graph.nodes[{t}].attention: "
                    f"its attention module, trained first by `python launch.py mode=attention graph=<this graph>` "
                    "(README, 'Edge kinds')"
                )
            if n.attention and not declared:
                raise ConfigError(f"graph.nodes[{t}].attention is set but no mhgd edge leaves node {t}")

    @classmethod
    def check_data(cls, graph, data, trained: bool = True) -> None:
        for i in graph.senders("features"):  # a live mhgd edge leaves it
            check_mhgd_widths(graph, i, data)
            if trained:
                check_attention(graph, i, data)

    def __init__(self, receiver: Receiver, sources: list[int]):
        super().__init__(receiver, sources)
        nodes = receiver.graph.nodes
        self.modules = [load_attention(nodes[s].attention, receiver.device)[0] for s in sources]
        self.clip = bool(receiver.graph.mhgd_option("clip"))

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        vectors = receiver_vectors(batch.own["maps"])  # once for all the node's mhgd edges
        out = []
        for module, sent, keep in zip(self.modules, batch.sent, batch.keep):
            source = split_vectors(sent, module.widths)
            out.append(graph_loss(module, aligned_vectors(vectors, source), source, keep))
        return torch.stack(out)

    def apart(self) -> bool:
        return self.clip

    def backward(self, params: list[torch.nn.Parameter], task: torch.Tensor, apart: torch.Tensor, epoch: int) -> None:
        """MHGD's update: per parameter tensor, the task gradient (the loss of every other
        edge, ``task``) plus the mhgd gradient (of ``apart``) clipped to norm
        ``||task gradient|| * clip_ramp(epoch)`` (TensorFlow's ``clip_by_norm``); weight decay
        is added by the optimiser, as the original adds it. A parameter neither loss reaches
        keeps no gradient (the optimiser skips it, as after ``backward``)."""
        none = [None] * len(params)
        grads = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True) if task.requires_grad else none
        dist = torch.autograd.grad(apart, params, allow_unused=True) if apart.requires_grad else none
        ramp = clip_ramp(epoch)
        # every parameter with an mhgd gradient at once (foreach kernels, not ~5 small ones per tensor)
        both = [i for i, gd in enumerate(dist) if gd is not None]
        if both:
            gts = [grads[i] if grads[i] is not None else torch.zeros_like(params[i]) for i in both]
            gds = [dist[i] for i in both]
            bound = torch.stack(torch._foreach_norm(gts)) * ramp
            norm = torch.stack(torch._foreach_norm(gds))
            scale = torch.where(norm > bound, bound / norm.clamp(min=1e-30), torch.ones_like(norm))
            # out of place: autograd.grad may hand back expanded (stride-0) or shared tensors
            gts = torch._foreach_add(gts, torch._foreach_mul(gds, list(scale.unbind())))
            grads = list(grads)
            for i, g in zip(both, gts):
                grads[i] = g
        for p, g in zip(params, grads):
            p.grad = g


def check_mhgd_widths(graph, i: int, data) -> None:
    """Every node that learns from node i through mhgd has node i's stage widths."""
    n = graph.nodes[i]
    info = data.info
    widths = stage_widths(n.model, info.num_classes, info.in_channels)
    for t in range(graph.num_nodes):
        if t != i and "mhgd" in graph.edge_kinds(t, i):
            got = stage_widths(graph.nodes[t].model, info.num_classes, info.in_channels)
            if got != widths:
                raise ConfigError(
                    f"graph.kinds[{t}][{i}] (edge {i} -> {t}): mhgd compares the two networks' stage features, so they "
                    f"need the same stage widths; node {i} ({n.model}) has {widths}, node {t} "
                    f"({graph.nodes[t].model}) has {got}. Models with {widths}: "
                    + ", ".join(m for m in MODELS.names() if stage_widths(m, info.num_classes, info.in_channels) == widths)
                )


def check_attention(graph, i: int, data) -> None:
    """``graph.nodes[i].attention``: a readable attention module trained on node i's very
    checkpoint (the file's digest, recorded by ``mode=attention``) and dataset, and every node
    that learns from it through mhgd has the same stage widths."""
    from actors.preflight import file_digest

    check_mhgd_widths(graph, i, data)
    n = graph.nodes[i]
    where = f"graph.nodes[{i}].attention={n.attention}"
    widths = stage_widths(n.model, data.info.num_classes, data.info.in_channels)
    again = f"`python launch.py mode=attention graph=<this graph> dataset={data.name}`"
    if not os.path.isfile(n.attention):
        raise ConfigError(f"{where}: file not found. Train it first (stage 1 of MHGD): {again}")
    try:
        _, meta = load_attention(n.attention)
    except Exception as e:
        raise ConfigError(f"{where}: not a readable attention module ({type(e).__name__}: {e})") from e
    if list(meta.get("widths", [])) != widths or meta.get("model") not in (None, n.model):
        raise ConfigError(f"{where} was trained on a {meta.get('model')} (stage widths {meta.get('widths')}), "
                          f"not on node {i}'s {n.model} (stage widths {widths}); train it again with mode=attention")
    if meta.get("vector_sign") != VECTOR_SIGN:
        raise ConfigError(f"{where} was trained by an older version, on stage vectors of another sign convention (the "
                          f"module reads their sign); move it aside and train it again: {again}")
    if meta.get("checkpoint_sha256") not in (None, file_digest(n.checkpoint)):
        raise ConfigError(f"{where} was trained on another version of graph.nodes[{i}].checkpoint={n.checkpoint} "
                          f"(the file changed since); move the old module aside and train it again: {again}")
    if meta.get("dataset") not in (None, data.name):
        raise ConfigError(f"{where} was trained on dataset {meta['dataset']}, this run is on {data.name}; "
                          f"train one for {data.name}: {again}")
