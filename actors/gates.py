"""Edge gates of the knowledge transfer graph (Minami et al., ACCV 2020).

A gate turns the per-sample losses of one edge ``s -> t`` into the scalar that enters
node t's loss::

    G(l) = (1/B) * sum_n w_n * l_n

with the weight ``w_n`` of the table below. ``progress`` is where training stands, from
``gate_clock`` (the one place both the workers and the single-process reference get
it from): by default ``k / k_end`` with k the 1-based global training iteration and k_end
the total number of iterations (DCL); with ``graph.progress=epoch``, ``e / (E - 1)`` with e
the 0-based epoch and E the number of epochs (the reimplementation: 0 through all of
epoch 1, 1 through the last epoch).

=============== ==========================================================================
Through         1
Cutoff          0 (the edge is absent; nodes skip computing it at all)
Linear          progress                  (alias PositiveLinear, the reimplementation's name)
Correct         1 if the *source* node's argmax equals the label, else 0; divided by B,
                not by the number of correct samples. On the label edge the source is the
                one-hot label, which is always right, so Correct == Through there.
NegativeLinear  1 - progress              (reimplementation only)
=============== ==========================================================================

Gates are stateless objects (``Gate``) of explicit inputs; they hold no counters.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from actors.registry import Registry


class Gate:
    """An edge gate, evaluated once per step for all the edges it sits on.

    ``weights(source_logits, labels, progress)`` is the gate's per-sample weight ``w_n``: None
    (every sample 1), a Python float (the same for every sample: a time gate), or a float
    tensor ``[..., B]`` (one row per edge: the Correct gate's 0/1 mask). ``reduce(loss, w)``
    turns per-sample losses ``[..., B]`` into the gated scalars ``[...]``, one per edge.
    ``mean_weight(w, like)`` is the mean weight put on the batch (the dashboards'
    ``gate_weight``), from the same ``w``. A gate is a stateless object registered by name
    in ``GATES``; calling it (``gate(loss, source_logits=..., labels=..., progress=...)``)
    is both steps at once."""

    name = ""
    reads_sources = False
    """Do its weights read the sources' logits (``weights`` gets None otherwise)?"""

    def weights(self, source_logits: Optional[torch.Tensor], labels: torch.Tensor,
                progress: float) -> Union[None, float, torch.Tensor]:
        return None

    def reduce(self, loss: torch.Tensor, weights: Union[None, float, torch.Tensor]) -> torch.Tensor:
        if weights is None:
            return loss.mean(dim=-1)
        if isinstance(weights, float):
            return loss.mean(dim=-1) * weights
        return (loss * weights).sum(dim=-1) / loss.shape[-1]  # divided by B, not by the kept count

    def mean_weight(self, weights: Union[None, float, torch.Tensor], like: torch.Tensor, edges: int) -> torch.Tensor:
        """``[edges]``: the mean of ``weights`` over the batch, for each edge."""
        if weights is None:
            return like.new_ones(edges)
        if isinstance(weights, float):
            return like.new_full((edges,), weights)
        return weights.sum(dim=-1) / weights.shape[-1]

    def __call__(self, loss: torch.Tensor, *, source_logits: Optional[torch.Tensor], labels: torch.Tensor,
                 progress: float) -> torch.Tensor:
        return self.reduce(loss, self.weights(source_logits, labels, progress))

    def __repr__(self) -> str:
        return f"<gate {self.name}>"


GATES: Registry[Gate] = Registry("gate")

#: The gates the paper searches over (ASHA's choices per edge).
PAPER_GATES = ("Through", "Cutoff", "Linear", "Correct")

#: How the gates' clock, ``progress``, is counted (the config key ``graph.progress``).
GATE_CLOCKS = ("iteration", "epoch")


def gate_clock(step: int, steps_per_epoch: int, total_steps: int, mode: str = "iteration") -> float:
    """The ``progress`` the gates see at the 1-based global step ``step``.

    ``iteration`` (DCL): ``step / total_steps``, exactly as a Python float.
    ``epoch`` (the reimplementation): ``e / (E - 1)``, e = ``(step - 1) // steps_per_epoch``
    the 0-based epoch of the step and E = ``total_steps // steps_per_epoch`` the epochs of
    the run: 0 for every step of epoch 1, 1 for every step of the last. A one-epoch run
    (E = 1) is all "last epoch": 1.
    """
    if mode == "iteration":
        return step / total_steps
    if mode == "epoch":
        epochs = total_steps // steps_per_epoch
        if epochs <= 1:
            return 1.0
        return min((step - 1) // steps_per_epoch, epochs - 1) / (epochs - 1)
    raise ValueError(f"the gate clock (graph.progress) must be one of {', '.join(GATE_CLOCKS)}; got {mode!r}")


class Through(Gate):
    """Every sample at weight 1."""


class Cutoff(Gate):
    """The edge is absent; nodes skip computing it at all (never evaluated on a live edge)."""

    def reduce(self, loss, weights):
        return loss.new_zeros(loss.shape[:-1])


class Linear(Gate):
    def weights(self, source_logits, labels, progress):
        return float(progress)


class NegativeLinear(Gate):
    def weights(self, source_logits, labels, progress):
        return 1.0 - float(progress)


class Correct(Gate):
    """1 where the source's argmax is the label; on the label edge (no source) every sample."""

    reads_sources = True

    def weights(self, source_logits, labels, progress):
        if source_logits is None:  # label edge: the one-hot source is always correct
            return None
        return (source_logits.argmax(dim=-1) == labels).to(torch.float32)


for _gate, _names in ((Through(), ("Through",)), (Cutoff(), ("Cutoff",)), (Linear(), ("Linear", "PositiveLinear")),
                      (NegativeLinear(), ("NegativeLinear",)), (Correct(), ("Correct",))):
    _gate.name = _names[0]
    GATES.register(*_names)(_gate)


def is_cutoff(name: str) -> bool:
    return isinstance(GATES.get(name), Cutoff)
