"""MHGD: graph-based knowledge distillation by multi-head attention (Lee & Song, BMVC 2019).

Ported from the authors' TensorFlow code (``sseung0703/KD_methods_with_TF``, ``nets/Relation.py``
MHGD, ``nets/SVP.py``, ``op_util.py``; the later version, which their TF2 port follows).
docs/edge-kinds.md lists every difference from it.

Features. At the end of each of a network's stages (``Classifier.stage_maps``) the map
``[B, C, H, W]`` is read per image as ``X: [HW, C]`` and compressed to its top right singular
vector ``v in R^C`` (unit length, no singular value, components summing to >= 0):
``stage_vectors``. The frozen source computes k = 1 and sends ``[B, sum_i C_i]``
(``source_vectors``); the receiver computes its top k = 4 with gradient once a step
(``receiver_vectors``) and keeps, per image, stage and source, the one most parallel to the
source's, sign-aligned (``aligned_vectors``).

The vectors are not ``torch.linalg.svd``'s: on CUDA every SVD (as ``eigh``, ``qr``) reads its
error code on the host, a host-device sync, six or more a step. They are the top eigenvectors
of each image's smaller Gram matrix (``X^T X`` or ``X X^T``), in float64, all stages in one
zero-padded batch, by repeated squaring with deflation (``_TopEigh``: batched matmuls,
elementwise ops and reductions only), with the exact eigenvector derivative as backward: the
SVD's vectors and gradient (within ~1e-7) where its top singular values are simple, and finite
gradients where the SVD's are NaN (rank-deficient maps).

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
VECTOR_SIGN = "sum>=0"   # the sign convention of ``stage_vectors`` (saved with an attention module)

#: squarings per vector: ``G^(2^18)`` parts eigenvalues of ratio ``1 - d`` by ``exp(-2.6e5 d)``,
#: so 1 - |cos| to the exact vector is below 1e-10 once d > 5e-5 (random maps: d > 2.7e-4 in
#: 2560 images of each stage shape); a closer pair comes back mixed, each vector then an exact
#: eigenvector of a matrix within ~1e-5 * |G| of G
SQUARINGS = 18
_RENORM = 6          # squarings between rescalings (float64: the top eigenvalue cannot underflow in 6)
_NULL_TOL = 1e-12    # |P G P| <= this * trace(G): zero singular values (sigma / sigma_1 below ~1e-6)


def _zero_nonfinite(g: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


class _TopEigh(torch.autograd.Function):
    """The top ``k`` eigenvectors (rows, ``[N, k, n]``) and eigenvalues (``[N, k]``, descending)
    of a batch of symmetric positive semi-definite ``[N, n, n]``: per vector, the deflated
    matrix ``P G P`` (``P = I - sum_{j<i} u_j u_j^T``) squared ``SQUARINGS`` times tends to
    ``u_i u_i^T``; its column of largest diagonal, projected by ``P`` and normalised, is
    ``u_i``. Only batched matmuls, elementwise ops and reductions: no host sync. Where ``P G P``
    is at most ``_NULL_TOL * trace(G)`` (Frobenius; the rest of the spectrum is zero singular
    values, whose vectors are arbitrary), the eigenvalue comes back 0 with a zero row. Backward:
    the exact derivative of the vectors (below), not a backward through the squarings."""

    @staticmethod
    def forward(ctx, gram: torch.Tensor, k: int):
        n = gram.shape[-1]
        tiny = torch.finfo(gram.dtype).tiny
        floor = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] * _NULL_TOL     # [N, 1, 1]
        proj = torch.eye(n, dtype=gram.dtype, device=gram.device).expand_as(gram)      # I - sum_{j<i} u_j u_j^T
        us = []
        for i in range(k):
            a = gram if i == 0 else proj @ gram @ proj
            for j in range(SQUARINGS):
                if j % _RENORM == 0:
                    norm = torch.linalg.matrix_norm(a, keepdim=True)
                    if j == 0:
                        ok = norm > floor              # |P G P| >= its top eigenvalue >= |P G P| / sqrt(n)
                    a = a / norm.clamp_min(tiny)
                a = a @ a
            col = a.diagonal(dim1=-2, dim2=-1).argmax(-1)            # |u_col| >= 1/sqrt(n)
            u = a.gather(2, col[:, None, None].expand(-1, n, 1))      # [N, n, 1]
            if i:
                u = proj @ u
            u = torch.where(ok, u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(tiny), 0.0)
            us.append(u)
            proj = torch.baddbmm(proj, u, u.mT, alpha=-1)
        vecs = torch.cat(us, dim=2).mT                                # [N, k, n]
        vals = ((vecs @ gram) * vecs).sum(-1)                         # Rayleigh quotients; 0 on a null row
        ctx.save_for_backward(gram, vecs, vals)
        ctx.mark_non_differentiable(vals)
        return vecs, vals

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_vecs: torch.Tensor, _grad_vals):
        # d u_i = (lam_i I - G)^+ dG u_i, so dL/dG = sym(sum_i w_i u_i^T), w_i = (lam_i I - G)^+ g_i;
        # w_i = P_i w' with (lam_i I - G + lam_1 u_i u_i^T) w' = P_i g_i (P_i = I - u_i u_i^T), a
        # system that is nonsingular where lam_i is a simple eigenvalue > 0
        gram, u, lam = ctx.saved_tensors                                  # [N, n, n], [N, k, n], [N, k]
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        null = (lam <= 0)[..., None]                                       # [N, k, 1]
        g = grad_vecs.masked_fill(null, 0.0)
        g = g - (g * u).sum(-1, keepdim=True) * u
        m = lam[..., None, None] * eye - gram[:, None] + lam[:, :1, None, None] * (u[..., :, None] * u[..., None, :])
        m = torch.where(null[..., None], eye, m)
        w = torch.linalg.solve_ex(m, g[..., None], check_errors=False).result.squeeze(-1)
        w = w - (w * u).sum(-1, keepdim=True) * u
        w = torch.where(torch.isfinite(w).all(-1, keepdim=True), w, 0.0)  # an exactly repeated eigenvalue
        d = w.mT @ u                                                       # sum_i w_i u_i^T
        return (d + d.mT) * 0.5, None


def _complete(v: torch.Tensor, null: torch.Tensor, cols: Optional[torch.Tensor], rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``v`` ``[N, k, C]`` with its ``null`` rows (``[N, k]``; a zero singular value's, whose
    vector is arbitrary) replaced by unit vectors orthogonal to the other rows and to each other
    (within the coordinates ``cols``, ``[N, C]`` 0/1, and the rows ``rows``, ``[N, k]`` bool,
    where given; the others come back 0), without gradient: fixed generic rows, projected off
    the others, orthonormalised by Cholesky (``cholesky_ex``: no sync)."""
    with torch.no_grad():
        keep = v.masked_fill(null[..., None], 0.0)
        null = null if rows is None else null & rows
        k, c = v.shape[-2:]
        i = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)[:, None]
        j = torch.arange(1, c + 1, dtype=v.dtype, device=v.device)
        r = torch.sin(i * j * 0.7548776662 + j * 0.5698402910)         # [k, C], rows independent
        r = r * cols[:, None, :] if cols is not None else r.expand_as(v)
        r = r - (r @ keep.mT) @ keep
        cand = torch.where(null[..., None], r, keep)
        s = cand @ cand.mT
        s.diagonal(dim1=-2, dim2=-1).add_(1e-30)                        # a row past min(HW, C) is 0
        q = torch.linalg.solve_triangular(torch.linalg.cholesky_ex(s).L, cand, upper=False)
    return torch.where(null[..., None], q, v)


def stage_vectors(maps: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per ``[B, C, H, W]`` map, the top ``k`` right singular vectors of each image's
    ``X: [HW, C]``: ``[B, k', C]`` (k' = min(k, HW, C)), float32, unit rows in descending
    singular value, each signed so that its components sum to >= 0 (the top vector of a
    post-ReLU map is then >= 0; a fixed convention, unlike LAPACK's or cuSOLVER's).

    ``torch.linalg.svd`` (as ``eigh``, ``qr``) reads its error code on the host: on CUDA a
    host-device sync per call. Here instead: the eigenvectors of the smaller Gram matrix
    (``X^T X`` when C <= HW, else ``X X^T`` and ``v = X^T u / |X^T u|``), in float64, every
    map's zero-padded into one batch (``_TopEigh``: matmuls only, no sync; the op count does
    not grow with the maps). Its gradient is the SVD's where the top k' singular values are
    simple and nonzero.

    A zero singular value (a map of rank below k': dead pixels, channels, a dead stage): its
    vector is some unit vector orthogonal to the others, as the SVD's, and gets no gradient;
    the others get their exact, finite gradient. (The SVD's gradient is NaN for the whole
    image as soon as two of its min(HW, C) singular values are 0, even with only the top k'
    vectors used, and was zeroed as the authors' ``removenan``.) Whatever is not finite in the
    maps' gradient (an exactly repeated nonzero singular value) is still zeroed."""
    with torch.autocast(maps[0].device.type, enabled=False):
        xs, grams = [], []
        for m in maps:
            x = m.float().flatten(2).transpose(1, 2)            # [B, HW, C]
            if x.requires_grad:
                x.register_hook(_zero_nonfinite)
            x = x.double()
            xs.append(x)
            grams.append(x.mT @ x if x.shape[2] <= x.shape[1] else x @ x.mT)
        b, sizes, widths = maps[0].shape[0], [g.shape[-1] for g in grams], [x.shape[2] for x in xs]
        n, c = max(sizes), max(widths)
        gram = torch.cat([g if s == n else F.pad(g, (0, n - s, 0, n - s)) for g, s in zip(grams, sizes)])
        u, lam = _TopEigh.apply(gram, min(k, n))
        vs = []
        for x, v, s in zip(xs, torch.split(u, b), sizes):
            v = v if s == n else v[..., :s]
            if x.shape[2] > x.shape[1]:                           # v = X^T u / |X^T u|
                v = F.normalize(v @ x, dim=-1, eps=1e-150)
            vs.append(v if v.shape[2] == c else F.pad(v, (0, c - v.shape[2])))
        cols = rows = None
        if min(widths) < c:                                      # each map's channels of the padded C
            j = torch.arange(c, device=u.device)
            cols = torch.cat([(j < w).expand(b, c) for w in widths]).to(u.dtype)
        if min(sizes) < u.shape[1]:                              # each map's k' of the padded k
            j = torch.arange(u.shape[1], device=u.device)
            rows = torch.cat([(j < s).expand(b, u.shape[1]) for s in sizes])
        v = _complete(torch.cat(vs), lam <= 0, cols, rows)
        v = torch.where(v.sum(-1, keepdim=True) < 0, -v, v).float()
        return [v if (v.shape[1], v.shape[2]) == (min(k, s), w) else v[:, :min(k, s), :w]
                for v, s, w in zip(torch.split(v, b), sizes, widths)]


def svd_vectors(fmap: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> the top ``k`` right singular vectors of each image's ``[HW, C]``:
    ``[B, k', C]`` (k' = min(k, HW, C)), unit length (``stage_vectors`` of one map)."""
    return stage_vectors([fmap], k)[0]


def source_vectors(maps: list[torch.Tensor]) -> torch.Tensor:
    """What a frozen source sends: its top singular vector per stage, ``[B, sum_i C_i]``."""
    with torch.no_grad():
        return torch.cat([v[:, 0] for v in stage_vectors(maps, SOURCE_K)], dim=1)


def receiver_vectors(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The receiver's top ``TARGET_K`` singular vectors per stage (with gradient),
    ``[B, k', C_i]``: computed once a step, for all its mhgd edges (``aligned_vectors``)."""
    return stage_vectors(maps, TARGET_K)


def split_vectors(flat: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, widths, dim=1))


def aligned_vectors(vectors: list[torch.Tensor], source: list[torch.Tensor]) -> list[torch.Tensor]:
    """The receiver's vector per stage for one source: of its top singular vectors
    (``receiver_vectors``, ``[B, k, C]`` per stage) the one with the largest |cos| to the
    source's, times the sign of that cos."""
    out = []
    for vs, vt in zip(vectors, source):
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
    # the module reads the source's vectors with their sign (its BatchNorm is not odd):
    # VECTOR_SIGN records the convention it was trained on
    atomic_save({"attention": module.state_dict(),
                 "meta": {**meta, "widths": module.widths, "heads": HEADS, "vector_sign": VECTOR_SIGN}}, path)
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
