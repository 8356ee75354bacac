"""Edge kinds from outside the trainer, for tests/test_kind_plugin.py: importable by every
process, registered under their names on import."""
from __future__ import annotations

import torch

from actors.kinds import EdgeBatch, EdgeKind, register_kind


class _Scaled(EdgeKind):
    sends, scale = "logits", 1.0

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        return self.scale * (batch.own["logits"] - batch.source_logits).abs().sum(dim=-1)


@register_kind
class Zeta(_Scaled):
    """Registered first, sorted last: 'tests.plugin_kinds:Zeta' > 'tests.plugin_kinds:Alpha'."""

    name, scale = "plugin_zeta", 1.0


@register_kind
class Alpha(_Scaled):
    name, scale = "plugin_alpha", 1e-3


class Apart(_Scaled):
    """A kind whose loss would enter the update apart (as mhgd's clip)."""

    name = "plugin_apart"

    def apart(self) -> bool:
        return True


class WrongShape(EdgeKind):
    name, sends = "plugin_wrong_shape", "logits"

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        return (batch.own["logits"] - batch.source_logits).pow(2).mean(dim=-1).mean(dim=-1)  # [S], per_sample says [S, B]


class Half(EdgeKind):
    name, sends = "plugin_half", "logits"

    def loss(self, batch: EdgeBatch) -> torch.Tensor:
        return (batch.own["logits"] - batch.source_logits).pow(2).sum(dim=-1).to(torch.bfloat16)
