"""Per-sample edge losses. Each returns a ``[B]`` tensor; the edge's gate reduces it.

Label edge (the self-loop t -> t)::

    l_n = CE(y_n, z_t,n) = KL(onehot(y_n) || softmax(z_t,n))

Cross edge s -> t, ``kl`` (Hinton et al. 2015; DML, Zhang et al. 2018)::

    l_n = T^2 * KL( softmax(z_s,n / T) || softmax(z_t,n / T) )

``z_s`` is the source node's logits as received from the exchange (detached: only the
receiving node t learns from the edge).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from actors.registry import Registry


class EdgeLoss(Protocol):
    def __call__(self, target_logits: torch.Tensor, source_logits: torch.Tensor, *, temperature: float) -> torch.Tensor: ...


EDGE_LOSSES: Registry[EdgeLoss] = Registry("edge loss")


def label_loss(target_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the node's logits against the labels, per sample."""
    return F.cross_entropy(target_logits, labels, reduction="none")


@EDGE_LOSSES.register("kl")
def kl_loss(target_logits: torch.Tensor, source_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_s || p_t)`` per sample, p = softmax(logits / T); no gradient to the source."""
    t = float(temperature)
    log_p_s = F.log_softmax(source_logits.detach().float() / t, dim=1)
    log_p_t = F.log_softmax(target_logits.float() / t, dim=1)
    return F.kl_div(log_p_t, log_p_s, reduction="none", log_target=True).sum(dim=1) * (t * t)
