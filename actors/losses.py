"""Per-sample edge losses. Each returns a ``[B]`` tensor; the edge's gate reduces it.

Label edge (the self-loop t -> t)::

    l_n = CE(y_n, z_t,n) = KL(onehot(y_n) || softmax(z_t,n))

Cross edge s -> t, ``kl`` (Hinton et al. 2015; DML, Zhang et al. 2018)::

    l_n = T^2 * KL( softmax(z_s,n / T) || softmax(z_t,n / T) )

``z_s`` is the source node's logits as received from the exchange (detached: only the
receiving node t learns from the edge). These are the formulas; the edge kinds that use
them (``actors.edge_kinds``) say where and how.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def label_loss(target_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the node's logits against the labels, per sample."""
    return F.cross_entropy(target_logits, labels, reduction="none")


def kl_loss(target_logits: torch.Tensor, source_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_s || p_t)`` per sample, p = softmax(logits / T); no gradient to the source.
    ``target_logits`` [B, C]; ``source_logits`` [B, C] (-> [B]) or several sources stacked,
    [S, B, C] (-> [S, B]: the target's softmax computed once, each row as it is alone)."""
    t = float(temperature)
    source = source_logits.detach().float()
    target = target_logits.float()
    if source.dim() > target.dim():
        # the target's logits repeated per source *before* its softmax: each row's forward and
        # backward are then exactly those of one edge alone, and the S gradients meet in one sum
        target = target.expand_as(source)
    log_p_s = F.log_softmax(source / t, dim=-1)
    log_p_t = F.log_softmax(target / t, dim=-1)
    return F.kl_div(log_p_t, log_p_s, reduction="none", log_target=True).sum(dim=-1) * (t * t)


# --- relation losses (pairwise: one number per batch) ----------------------------------------
#
# Park et al., "Relational Knowledge Distillation", CVPR 2019. With e_i the penultimate
# embeddings of the batch (the source's t_i detached, the receiver's s_i):
#
#   distance  psi_D(e_i, e_j) = ||e_i - e_j||_2 / mu,   mu = mean_{i != j} ||e_i - e_j||_2
#             L_D = mean_{i, j} huber(psi_D(s_i, s_j) - psi_D(t_i, t_j))            (B^2 terms)
#   angle     psi_A(e_i, e_j, e_k) = <n(e_j - e_i), n(e_k - e_i)>,   n(v) = v / ||v||
#             L_A = mean_{i, j, k} huber(psi_A(s_i, s_j, s_k) - psi_A(t_i, t_j, t_k))  (B^3 terms)
#
# huber = smooth L1 with delta 1. The means run over all B^2 (B^3) entries, degenerate ones
# (i == j; a zero vector normalises to 0) included, as the RKD authors' code does. ``keep``
# (a [B] 0/1 float mask, the Correct gate) restricts everything to the kept samples: the mean
# distance, and the mean over the n^2 (n^3) entries of the n kept samples; with fewer than
# two kept samples the loss is 0. Written with masks, not indexing, so no step waits for the
# device to count the kept samples.

_EPS = 1e-12


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` Euclidean distances, 0 on the diagonal (RKD's ``pdist``)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=_EPS).sqrt()
    return d * (1 - torch.eye(e.shape[0], dtype=e.dtype, device=e.device))


def _pair_mask(keep: Optional[torch.Tensor], b: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if keep is None:
        keep = like.new_ones(b)
    return keep, keep.unsqueeze(1) * keep.unsqueeze(0)


def _normalised_distances(e: torch.Tensor, pairs_off: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    mu = (d * pairs_off).sum() / pairs_off.sum().clamp(min=1)
    return d / mu.clamp(min=_EPS)


def rkd_distance_loss(target_emb: torch.Tensor, source_emb: torch.Tensor,
                      keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RKD distance-wise loss of the receiver's embeddings ``[B, D_t]`` against the
    source's ``[B, D_s]`` (detached); D_t and D_s may differ."""
    s, t = target_emb.float(), source_emb.detach().float()
    b = s.shape[0]
    keep, pairs = _pair_mask(keep, b, s)  # B^2 entries only: the mask costs nothing that shows
    off = pairs * (1 - torch.eye(b, dtype=s.dtype, device=s.device))
    with torch.no_grad():
        rt = _normalised_distances(t, off)
    rs = _normalised_distances(s, off)
    h = F.smooth_l1_loss(rs, rt, reduction="none")
    return (h * pairs).sum() / pairs.sum().clamp(min=1)


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = e.unsqueeze(0) - e.unsqueeze(1)                    # [i, j] = e_j - e_i
    n = F.normalize(diff, p=2, dim=2)
    return torch.bmm(n, n.transpose(1, 2))                    # [i, j, k] = <n(e_j - e_i), n(e_k - e_i)>


def rkd_angle_loss(target_emb: torch.Tensor, source_emb: torch.Tensor,
                   keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RKD angle-wise loss (``[B, B, B]`` angles, built here on the receiver)."""
    s, t = target_emb.float(), source_emb.detach().float()
    with torch.no_grad():
        at = _angles(t)
    if keep is None:  # every sample: the plain mean over the B^3 entries, no mask to build
        return F.smooth_l1_loss(_angles(s), at)
    keep, pairs = _pair_mask(keep, s.shape[0], s)
    triples = pairs.unsqueeze(2) * keep.view(1, 1, -1)
    h = F.smooth_l1_loss(_angles(s), at, reduction="none")
    n = keep.sum()  # one kept sample: its only entry (i, i, i) is degenerate, 0
    return (h * triples).sum() / (n * n * n).clamp(min=1)
