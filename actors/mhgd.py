"""MHGD: graph-based knowledge distillation by multi-head attention (Lee & Song, BMVC 2019).

Ported from the authors' TensorFlow code (``sseung0703/KD_methods_with_TF``, ``nets/Relation.py``
MHGD, ``nets/SVP.py``, ``op_util.py``; the later version, which their TF2 port follows).
docs/edge-kinds.md lists every difference from it.

Features. At the end of each of a network's stages (``Classifier.stage_maps``) the map
``[B, C, H, W]`` is read per image as ``X: [HW, C]`` and compressed to its top right singular
vector ``v in R^C`` (unit length, no singular value): ``svd_vectors``. The frozen source
computes k = 1 and sends ``[B, sum_i C_i]`` (``source_vectors``); the receiver computes its top
k = 4 with gradient and keeps, per image and stage, the one most parallel to the source's,
sign-aligned (``aligned_vectors``).

Graph. For each pair of consecutive stages (i-1, i) an ``AttentionPair`` maps the deeper
stage's vectors (keys) and the earlier stage's (queries) through Linear (no bias) +
BatchNorm to H = 8 heads of D = (C_{i-1} + C_i) // 2 each; the logits of head h are
``G[h, a, b] = <key_h(v_i[a]), query_h(v_{i-1}[b])>`` (no 1/sqrt(D)): ``[H, B, B]``.

Stage 1 (``train_attention``, ``python launch.py mode=attention``): on the frozen source
alone, an estimator predicts each image's deeper-stage vector from the earlier stage's
vectors of the batch through the row-softmaxed graph, with about half of each row's heads
dropped at random: ``v_hat = normalise(f2(concat_h(drop(softmax(G))_h @ f1(v_{i-1}))))``,
f1 = Linear + BatchNorm + ReLU, f2 = Linear with bias; loss ``sum_pairs mean_b (1 - <v_hat,
v_i>)``. Only the attention module learns (SGD, Nesterov momentum 0.9, and the original's L2
term 5e-4 * sum(v^2): weight decay 1e-3).

Stage 2 (the ``mhgd`` edge): the attention module frozen (BatchNorm on its stored
statistics), the receiver learns to reproduce the source's graphs::

    L = sum_pairs sum_{h, a, b} P_S log(P_S / P_T),   P = softmax_b(tanh(G))

(KL of the receiver's row distributions from the source's, summed, not averaged), and its
gradient is clipped per parameter tensor to the norm of the task gradient (every other
edge of the node) times ``sigmoid(e)``, e the 0-based epoch: ``GraphNode.update``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = 8
SOURCE_K = 1   # singular vectors the source keeps per stage
TARGET_K = 4   # the receiver's candidates, aligned to the source's


def svd_vectors(fmap: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> the top ``k`` right singular vectors of each image's ``[HW, C]``:
    ``[B, k', C]`` (k' = min(k, HW, C)), unit length."""
    x = fmap.float().flatten(2).transpose(1, 2)          # [B, HW, C]
    if x.requires_grad:
        # the SVD's gradient is undefined where singular values repeat (a map of rank below
        # min(HW, C), e.g. a dead stage): it comes back NaN there; zero it, as the authors'
        # code does with its own SVD gradient (``removenan``)
        x.register_hook(lambda g: torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0))
    vh = torch.linalg.svd(x, full_matrices=False).Vh     # [B, min(HW, C), C]
    return vh[:, :k]


def source_vectors(maps: list[torch.Tensor]) -> torch.Tensor:
    """What a frozen source sends: its top singular vector per stage, ``[B, sum_i C_i]``."""
    with torch.no_grad():
        return torch.cat([svd_vectors(m, SOURCE_K)[:, 0] for m in maps], dim=1)


def split_vectors(flat: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, widths, dim=1))


def aligned_vectors(maps: list[torch.Tensor], source: list[torch.Tensor]) -> list[torch.Tensor]:
    """The receiver's vector per stage (with gradient): of its top ``TARGET_K`` singular
    vectors the one with the largest |cos| to the source's, times the sign of that cos."""
    out = []
    for m, vt in zip(maps, source):
        vs = svd_vectors(m, TARGET_K)                                 # [B, k, C]
        cos = torch.einsum("bkc,bc->bk", vs, vt)
        pick = cos.abs().argmax(dim=1)
        sign = torch.sign(cos.gather(1, pick[:, None]))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        out.append(vs[torch.arange(vs.shape[0], device=vs.device), pick] * sign)
    return out


class AttentionPair(nn.Module):
    """The attention heads of one pair of consecutive stages, and (stage 1 only) the
    estimator that trains them."""

    def __init__(self, c_prev: int, c_cur: int, heads: int = HEADS):
        super().__init__()
        self.heads, self.d = heads, (c_prev + c_cur) // 2
        self.key = nn.Sequential(nn.Linear(c_cur, self.d * heads, bias=False), nn.BatchNorm1d(self.d * heads))
        self.query = nn.Sequential(nn.Linear(c_prev, self.d * heads, bias=False), nn.BatchNorm1d(self.d * heads))
        self.f1 = nn.Sequential(nn.Linear(c_prev, self.d, bias=False), nn.BatchNorm1d(self.d), nn.ReLU())
        self.f2 = nn.Linear(self.d * heads, c_cur)

    def logits(self, v_prev: torch.Tensor, v_cur: torch.Tensor) -> torch.Tensor:
        """``[H, B, B]``: rows the deeper stage's images, columns the earlier stage's."""
        b = v_cur.shape[0]
        k = self.key(v_cur).view(b, self.d, self.heads)       # head-interleaved, as the original
        q = self.query(v_prev).view(b, self.d, self.heads)
        return torch.einsum("adh,bdh->hab", k, q)

    def estimate(self, v_prev: torch.Tensor, logits: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Stage 1: the deeper stage's vectors predicted through the graph, heads dropped."""
        h, b, _ = logits.shape
        noise = torch.randn((h, b, 1), generator=generator, device=logits.device)
        keep = (noise - noise.mean(dim=0, keepdim=True) > 0).to(logits.dtype)
        g = torch.softmax(logits, dim=-1) * keep                              # [H, B, B]
        agg = g @ self.f1(v_prev)                                             # [H, B, D]
        return F.normalize(self.f2(agg.transpose(0, 1).reshape(b, h * self.d)), dim=-1)


class AttentionModule(nn.Module):
    """One ``AttentionPair`` per pair of consecutive stages of the source's network."""

    def __init__(self, widths: list[int], heads: int = HEADS):
        super().__init__()
        self.widths = list(widths)
        self.pairs = nn.ModuleList(AttentionPair(a, b, heads) for a, b in zip(widths[:-1], widths[1:]))

    def estimation_loss(self, vectors: list[torch.Tensor], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        loss = vectors[0].new_zeros(())
        for i, pair in enumerate(self.pairs):
            v_hat = pair.estimate(vectors[i], pair.logits(vectors[i], vectors[i + 1]), generator)
            loss = loss + (1 - (v_hat * vectors[i + 1]).sum(dim=1)).mean()
        return loss


def graph_loss(module: AttentionModule, target: list[torch.Tensor], source: list[torch.Tensor],
               keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The stage-2 transfer loss: ``sum_pairs sum KL(P_S || P_T)`` of the row-softmaxed
    ``tanh`` graphs. ``keep`` ([B] 0/1, the Correct gate): the graphs of the kept images only
    (columns masked out of the softmax, rows out of the sum; the module's BatchNorm runs on
    stored statistics, so each image's graph entries do not depend on the others)."""
    loss = target[0].new_zeros(())
    for i, pair in enumerate(module.pairs):
        gs = torch.tanh(pair.logits(target[i], target[i + 1]))
        with torch.no_grad():
            gt = torch.tanh(pair.logits(source[i], source[i + 1]))
        if keep is not None:
            cols = keep.bool().view(1, 1, -1)
            gs = gs.masked_fill(~cols, -1e4)
            gt = gt.masked_fill(~cols, -1e4)
        log_ps, log_pt = F.log_softmax(gs, dim=-1), F.log_softmax(gt, dim=-1)
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(dim=-1)               # [H, B]
        if keep is not None:
            kl = kl * keep.view(1, -1)
        loss = loss + kl.sum()
    return loss


def clip_ramp(epoch: int) -> float:
    """The clipping bound's factor at the 0-based epoch of the receiver's training: the
    original's ``sigmoid(epoch - init_epoch)``, 1 once within 1e-8 of it."""
    r = 1.0 / (1.0 + math.exp(-epoch))
    return 1.0 if r > 1 - 1e-8 else r


# --- files ------------------------------------------------------------------------------------

def save_attention(path: str | Path, module: AttentionModule, meta: dict[str, Any]) -> Path:
    from actors.files import atomic_save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"attention": module.state_dict(), "meta": {**meta, "widths": module.widths, "heads": HEADS}}, path)
    return path


def load_attention(path: str | Path, device: torch.device = torch.device("cpu")) -> tuple[AttentionModule, dict]:
    blob = torch.load(path, map_location=device, weights_only=True)
    meta = blob["meta"]
    module = AttentionModule(meta["widths"], meta.get("heads", HEADS))
    module.load_state_dict(blob["attention"])
    module.to(device).eval().requires_grad_(False)
    return module, meta


# --- stage 1 ----------------------------------------------------------------------------------

def train_attention(teacher: nn.Module, batches: Callable[[int], Any], epochs: int, lr: float, seed: int,
                    log: Callable[[str], None] = print, device: torch.device = torch.device("cpu")) -> tuple[AttentionModule, list[float]]:
    """Stage 1: the attention module of the frozen ``teacher``, trained ``epochs`` epochs on
    ``batches(epoch)`` (an iterable of image batches). Returns it (frozen) and the mean loss
    of each epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = AttentionModule(teacher.stage_widths).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    # the original adds 5e-4 * sum(v^2) to the loss: a gradient of 1e-3 * v, PyTorch's weight_decay=1e-3
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    teacher.eval()
    losses = []
    for epoch in range(epochs):
        t0, total, n = time.perf_counter(), 0.0, 0
        module.train()
        for x in batches(epoch):
            with torch.no_grad():
                _, _, maps = teacher(x, stages=True)
                vectors = split_vectors(source_vectors(maps), teacher.stage_widths)
            loss = module.estimation_loss(vectors, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        losses.append(total / max(1, n))
        log(f"attention epoch {epoch + 1}/{epochs}: estimation loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f}s)")
    module.eval().requires_grad_(False)
    return module, losses
