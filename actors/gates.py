"""Edge gates of the knowledge transfer graph (Minami et al., ACCV 2020).

A gate turns the per-sample losses of one edge ``s -> t`` into the scalar that enters
node t's loss::

    G(l) = (1/B) * sum_n w_n * l_n

with the weight ``w_n`` of the table below. ``progress`` is where training stands, from
``gate_progress`` (the one place both the workers and the single-process reference get
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

Gates are pure functions of explicit inputs; they hold no counters.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from actors.registry import Registry


class Gate(Protocol):
    def __call__(
        self,
        loss: torch.Tensor,
        *,
        source_logits: Optional[torch.Tensor],
        labels: torch.Tensor,
        progress: float,
    ) -> torch.Tensor: ...


GATES: Registry[Gate] = Registry("gate")

#: The gates the paper searches over (ASHA's choices per edge).
PAPER_GATES = ("Through", "Cutoff", "Linear", "Correct")

#: How ``progress`` is counted (``graph.progress``).
PROGRESS_MODES = ("iteration", "epoch")


def gate_progress(step: int, steps_per_epoch: int, total_steps: int, mode: str = "iteration") -> float:
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
    raise ValueError(f"gate progress mode must be one of {', '.join(PROGRESS_MODES)}; got {mode!r}")


@GATES.register("Through")
def through(loss, *, source_logits, labels, progress):
    return loss.mean()


@GATES.register("Cutoff")
def cutoff(loss, *, source_logits, labels, progress):
    return loss.new_zeros(())


@GATES.register("Linear", "PositiveLinear")
def linear(loss, *, source_logits, labels, progress):
    return loss.mean() * float(progress)


@GATES.register("NegativeLinear")
def negative_linear(loss, *, source_logits, labels, progress):
    return loss.mean() * (1.0 - float(progress))


@GATES.register("Correct")
def correct(loss, *, source_logits, labels, progress):
    if source_logits is None:  # label edge: the one-hot source is always correct
        return loss.mean()
    mask = (source_logits.argmax(dim=1) == labels).to(loss.dtype)
    return (loss * mask).sum() / loss.shape[0]


def is_cutoff(name: str) -> bool:
    return GATES.get(name) is cutoff


def is_correct(gate) -> bool:
    """Is ``gate`` (a name or the function) the Correct gate?"""
    return (GATES.get(gate) if isinstance(gate, str) else gate) is correct
