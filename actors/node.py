"""One graph node's learning: its model, optimiser, incoming gated edges, and the three
named parts of its step (forward, loss, update). No data, no distribution: the worker
(``actors.worker``) and the single-process reference (``coordinator.sequential``) both
drive nodes through these same methods.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from actors.config import OptimConfig
from actors.files import load_model_weights
from actors.gates import GATES, gate_progress, is_correct
from actors.graph import GraphSpec
from actors.losses import EDGE_LOSSES, PAIRWISE_LOSSES, kl_loss, label_loss
from actors.mhgd import aligned_vectors, clip_ramp, graph_loss, load_attention, receiver_vectors, source_vectors, split_vectors
from actors.models import build_model


def node_seed(seed: int, index: int) -> int:
    """Each node's initial weights depend only on the run seed and its index."""
    return int(seed) * 1_000 + int(index)


@dataclass
class LrSchedule:
    """Learning-rate factor as a function of the optimiser step (0-based), stepped every
    iteration: linear warm-up, then multistep (milestones in epochs), cosine or constant.
    With ``per_epoch`` the factor changes once an epoch only (each step of epoch e, 0-based,
    takes the factor of the epoch's first step): cosine is then ``0.5 (1 + cos(pi e / E))``,
    ``CosineAnnealingLR(T_max=E)`` stepped once an epoch."""

    schedule: str
    steps_per_epoch: int
    total_steps: int
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    per_epoch: bool = False

    def __call__(self, step: int) -> float:
        if self.per_epoch:
            step -= step % self.steps_per_epoch
        f = 1.0
        if self.schedule == "multistep":
            epoch = step // self.steps_per_epoch
            f = self.gamma ** sum(epoch >= m for m in self.milestones)
        elif self.schedule == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        if self.warmup_steps and step < self.warmup_steps:
            f *= (step + 1) / self.warmup_steps
        return f


class GraphNode:
    """Node ``index`` of a knowledge transfer graph.

    Its loss at one step is, over its incoming non-Cutoff edges s -> t::

        L_t = G_tt(CE(y, z_t)) + sum_{s != t} G_st(T^2 KL(p_s || p_t))     (reduction=sum, DCL)
        L_t = G_tt(CE(y, z_t)) + mean_{s != t} G_st(...)                    (reduction=mean)

    for the default edge kinds; with ``graph.kinds`` each edge sums ``w_k G_st(loss_k)`` over
    its kinds (``ce``/``self`` on the diagonal; ``kl``, ``rkd_distance``, ``rkd_angle``,
    ``mhgd`` across; docs/edge-kinds.md), and an ``mhgd`` term's gradient is clipped apart
    (``_clipped_backward``).

    A frozen node (every incoming gate Cutoff) runs under no_grad and is never stepped.
    With ``graph.frozen_bn=eval`` (default) it runs in eval mode, so its BatchNorm
    statistics stay those of its checkpoint; with ``train`` it runs in train mode, as both
    reference codes ran their teachers: BatchNorm normalises with each batch's statistics
    and its running statistics drift (they are buffers of the model, so they are part of
    ``state_dict()`` and of every checkpoint, and a resumed run continues them exactly).

    With ``graph.skip_zero_loss``, a step whose whole loss is exactly 0 takes no optimiser
    step (``zero_loss``), as both reference codes skip it.
    """

    def __init__(self, index: int, graph: GraphSpec, num_classes: int, in_channels: int, optim: OptimConfig, epochs: int,
                 steps_per_epoch: int, seed: int, device: torch.device, precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False):
        self.index = index
        self.model_name = graph.nodes[index].model
        self.frozen = graph.is_frozen(index)
        self.frozen_bn = graph.frozen_bn
        self.skip_zero_loss = graph.skip_zero_loss
        self.progress_mode = graph.progress
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(node_seed(seed, index))
            self.model = build_model(self.model_name, num_classes, in_channels)
        ckpt: Optional[str] = graph.nodes[index].checkpoint
        if ckpt:
            state, _ = load_model_weights(ckpt)
            self.model.load_state_dict(state)
        self.model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # The module that runs the forward: the model itself, or its torch.compile'd wrapper
        # (state dicts and checkpoints always use self.model, so they do not depend on it).
        self.run_model = torch.compile(self.model) if compile else self.model
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.edges = [(s, GATES.get(g), g) for s, g in graph.incoming(index)]
        self.edge_kinds = [graph.edge_kinds(index, s) for s, _ in graph.incoming(index)]
        self.kind_weights = {k: graph.kind_weight(k) for ks in self.edge_kinds for k in ks}
        # the penultimate embedding: computed when an edge of this node's or out of it needs it
        self.needs_embedding = index in graph.senders("embedding") or index in graph.receivers("embedding")
        # mhgd: a frozen source sends its compressed stage features; a receiver reads its own
        # stage maps (with gradient) and holds each source's trained attention module, frozen
        self.sends_features = index in graph.senders("features")
        self.attention = {}
        if not graph.is_frozen(index):
            self.attention = {s: load_attention(graph.nodes[s].attention, device)[0]
                              for (s, _, _), k in zip(self.edges, self.edge_kinds) if "mhgd" in k}
        self.needs_stages = self.sends_features or bool(self.attention)
        self.mhgd_clip = bool(self.attention) and graph.mhgd_option("clip")
        # this step's mhgd loss and the rest of its loss (the task loss), kept apart for the clip
        self._transfer: Optional[torch.Tensor] = None
        self._task: Optional[torch.Tensor] = None
        self.edge_loss = EDGE_LOSSES.get(graph.loss)
        # self-distillation (a live ``self`` kind on the diagonal): a frozen copy of this very
        # model as trained alone in stage 1, always with its stored BatchNorm statistics
        self.self_teacher = None
        self.self_temperature = graph.self_temperature or graph.temperature
        if any(s == index and "self" in k for (s, _, _), k in zip(self.edges, self.edge_kinds)):
            with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: draw nothing
                self.self_teacher = build_model(self.model_name, num_classes, in_channels)
            state, _ = load_model_weights(graph.nodes[index].self_checkpoint)
            self.self_teacher.load_state_dict(state)
            self.self_teacher.to(device).eval().requires_grad_(False)
            if channels_last:
                self.self_teacher.to(memory_format=torch.channels_last)
        self.temperature = graph.temperature
        self.reduction = graph.reduction
        self.optimizer = self.scheduler = None
        if self.frozen:
            self.model.train(self.frozen_bn == "train")
            self.model.requires_grad_(False)
        else:
            self.optimizer = torch.optim.SGD(
                self.model.parameters(), lr=optim.lr, momentum=optim.momentum,
                nesterov=optim.nesterov, weight_decay=optim.weight_decay,
            )
            self.lr_schedule = LrSchedule(
                optim.schedule, steps_per_epoch, self.total_steps, tuple(optim.milestones), optim.gamma,
                int(round(optim.warmup_epochs * steps_per_epoch)), optim.schedule_step == "epoch",
            )
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_schedule)

    # --- the step, in named parts -----------------------------------------------------------

    def progress(self, step: int) -> float:
        """What the gates see at the 1-based global step ``step`` (``gate_progress``): the
        workers and the single-process reference both ask here."""
        return gate_progress(step, self.steps_per_epoch, self.total_steps, self.progress_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in float32 (the forward itself runs under bf16 autocast when asked)."""
        return self.outputs(x)["logits"]

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's forward: ``logits`` (float32); ``embedding`` ([B, D], float32) when an
        edge of the graph needs this node's; ``maps`` (its stage feature maps) and, from a
        frozen mhgd source, ``features`` (their SVD vectors) for mhgd edges; ``self_logits``
        (its stage-1 copy's) for a ``self`` kind."""
        if self.frozen:
            # eval: stored statistics; train: batch statistics, running ones updated (evaluation
            # switches the model to eval and back, so set the mode on every step)
            self.model.train(self.frozen_bn == "train")
            with torch.no_grad():
                return self._run(x)
        self.model.train()
        return self._run(x)

    def warm_up(self, batch: torch.Tensor, eval_batch: torch.Tensor) -> None:
        """Run the step's forward (and, learning, a backward) and the evaluation's forward
        once, so that a compiled model compiles all its graphs now; the node is left as it
        was: BatchNorm statistics restored, no gradient kept, no random number drawn."""
        saved = [b.clone() for b in self.model.buffers()]
        devices = [self.device] if self.device_type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            out = self.outputs(batch)
            if not self.frozen:
                leaves = [t for v in out.values() for t in (v if isinstance(v, list) else [v]) if t.requires_grad]
                torch.stack([t.float().sum() for t in leaves]).sum().backward()
                self.model.zero_grad(set_to_none=True)
            self.predict(eval_batch)
        with torch.no_grad():
            for b, v in zip(self.model.buffers(), saved):
                b.copy_(v)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits (float32) through the module the training step runs (the compiled
        one with ``train.compile``) under the same autocast, on a batch in the training
        batches' memory format (``BatchMaker.plain``): evaluation is as fast as the step."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                return self.run_model(x).float()
        finally:
            self.model.train(was_training)

    def _autocast(self):
        """bf16 autocast with ``train.precision=bf16``, else a context that does nothing."""
        return torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._autocast():
            out = self.run_model(x, embedding=self.needs_embedding or self.needs_stages, stages=self.needs_stages)
        out = out if isinstance(out, tuple) else (out,)  # (logits[, embedding[, stage maps]])
        res = {"logits": out[0].float()}
        if len(out) > 1:
            res["embedding"] = out[1].float()
        if len(out) > 2:
            res["maps"] = out[2]
            if self.sends_features:
                res["features"] = source_vectors(out[2])
        if self.self_teacher is not None:
            with torch.no_grad(), self._autocast():
                res["self_logits"] = self.self_teacher(x).float()
        return res

    def loss(self, logits: torch.Tensor, all_logits: torch.Tensor, labels: torch.Tensor, progress: float,
             own: Optional[dict[str, torch.Tensor]] = None,
             received: Optional[dict[str, list[Optional[torch.Tensor]]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``all_logits``: [M, B, C] (every node's detached logits of this step); ``own``: this
        node's ``outputs`` (its embedding and stage maps, with gradient); ``received``: per
        need (``embedding``, ``features``) every node's detached tensor (None where a node
        sends none). Returns
        the node's total loss and the gated loss of each incoming edge (detached,
        [len(edges)]; an edge of several kinds: their sum)."""
        terms, label_term, cross = [], None, []
        task_cross: list[torch.Tensor] = []  # with mhgd clipping: each cross edge without its mhgd term
        self._transfer = self._task = None
        if self.attention and own is not None:  # the receiver's singular vectors, once for all its mhgd edges
            own = {**own, "vectors": receiver_vectors(own["maps"])}
        for (s, gate, _), kinds in zip(self.edges, self.edge_kinds):
            src = None if s == self.index else all_logits[s]
            g = task = None
            for kind in kinds:
                value = self._kind_loss(kind, s, gate, logits, src, labels, progress, own, received)
                g = value if g is None else g + value
                if self.mhgd_clip and kind != "mhgd":
                    task = value if task is None else task + value
            if s == self.index:
                label_term = g
            else:
                cross.append(g)
                task_cross.append(task if task is not None else logits.new_zeros(()))
            terms.append(g)
        total = self._combine(label_term, cross, logits)
        if self.mhgd_clip and self._transfer is not None:
            # the clip needs the task loss and the mhgd loss apart, each as it enters the total
            self._task = self._combine(label_term, task_cross, logits)
            if self.reduction == "mean":
                self._transfer = self._transfer / len(cross)
        return total, torch.stack([t.detach() for t in terms]) if terms else logits.new_zeros(0)

    def _combine(self, label_term: Optional[torch.Tensor], cross: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The label edge plus the cross edges, summed or (``graph.reduction=mean``) averaged."""
        total = label_term if label_term is not None else like.new_zeros(())
        if cross:
            c = torch.stack(cross).sum()
            total = total + (c / len(cross) if self.reduction == "mean" else c)
        return total

    def _kind_loss(self, kind: str, s: int, gate, logits: torch.Tensor, src: Optional[torch.Tensor],
                   labels: torch.Tensor, progress: float, own, received) -> torch.Tensor:
        """One kind's gated, weighted loss on the edge s -> this node (docs/edge-kinds.md)."""
        w = self.kind_weights[kind]
        if kind == "ce":
            g = gate(label_loss(logits, labels), source_logits=None, labels=labels, progress=progress)
            return g if w == 1.0 else g * w
        if kind == "kl":
            per_sample = self.edge_loss(logits, src, temperature=self.temperature)
            g = gate(per_sample, source_logits=src, labels=labels, progress=progress)
            return g if w == 1.0 else g * w
        if kind == "self":
            per_sample = kl_loss(logits, own["self_logits"], temperature=self.self_temperature)
            return gate(per_sample, source_logits=None, labels=labels, progress=progress) * w
        # the pairwise kinds (rkd_*, mhgd) are one number per batch: Correct keeps the samples the
        # source got right when the relations are built; a time gate scales the number
        keep = (src.argmax(dim=1) == labels).to(logits.dtype) if is_correct(gate) else None
        if kind == "mhgd":
            module = self.attention[s]
            source = split_vectors(received["features"][s], module.widths)
            value = graph_loss(module, aligned_vectors(own["vectors"], source), source, keep)
        else:
            value = PAIRWISE_LOSSES[kind](own["embedding"], received["embedding"][s], keep)
        g = gate(value.reshape(1), source_logits=None, labels=labels, progress=progress) * w
        if kind == "mhgd":
            self._transfer = g if self._transfer is None else self._transfer + g
        return g

    def gate_weights(self, all_logits: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        """The mean weight each incoming edge's gate put on this step's samples
        (``[len(edges)]``): 1 for Through, k/k_end for Linear, the fraction of samples the
        source got right for Correct. For the dashboards; no host sync."""
        if not self.edges:
            return all_logits.new_zeros(0)
        ones = all_logits.new_ones(labels.shape[0])
        return torch.stack([
            gate(ones, source_logits=None if s == self.index else all_logits[s], labels=labels, progress=progress)
            for s, gate, _ in self.edges
        ]).detach()

    def zero_loss(self, loss: torch.Tensor) -> bool:
        """With ``graph.skip_zero_loss``: is this step's whole loss exactly 0 (its update is
        then skipped)? Reads the loss (a host sync) only when the option is on."""
        return self.skip_zero_loss and loss.item() == 0.0

    def update(self, loss: torch.Tensor, mark: Optional[Callable[[str], None]] = None) -> bool:
        """The step's part 5: backward and optimiser step (the schedule advances with it),
        or, for a zero loss under ``graph.skip_zero_loss``, the schedule's advance only.
        Returns whether the parameters were updated. ``mark(part)`` is called after the
        backward ("backward") and after the optimiser step ("optimizer"): the benchmark's
        step timer."""
        if self.zero_loss(loss):
            self.skip_update()
            return False
        self.optimizer.zero_grad(set_to_none=True)
        if self.mhgd_clip and self._transfer is not None:
            self._clipped_backward(self._task, self._transfer)
        else:
            loss.backward()
        if mark is not None:
            mark("backward")
        self.optimizer.step()
        self.scheduler.step()
        if mark is not None:
            mark("optimizer")
        return True

    def _clipped_backward(self, task: torch.Tensor, transfer: torch.Tensor) -> None:
        """MHGD's update: per parameter tensor, the task gradient (the loss of every other
        edge, ``task``) plus the mhgd gradient (of ``transfer``) clipped to norm
        ``||task gradient|| * clip_ramp(epoch)`` (TensorFlow's ``clip_by_norm``); weight decay
        is added by the optimiser, as the original adds it. A parameter neither loss reaches
        keeps no gradient (the optimiser skips it, as after ``backward``)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        none = [None] * len(params)
        grads = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True) if task.requires_grad else none
        dist = torch.autograd.grad(transfer, params, allow_unused=True) if transfer.requires_grad else none
        ramp = clip_ramp(self.scheduler.last_epoch // self.steps_per_epoch)
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

    def skip_update(self) -> None:
        """A skipped step (non-finite loss, or a zero loss under ``graph.skip_zero_loss``):
        no parameter update, but the schedule advances so the run stays aligned with the
        other nodes."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # skipping the optimiser step is the point here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()

    # --- state --------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state.get("scheduler"):
            # The schedule is a function of this run's config (its total steps follow
            # train.epochs), not of the checkpoint: restore the scheduler's position only,
            # and the learning rate of the next step from this run's schedule. For a plain
            # resume that is the very same value; a run extended to more epochs continues
            # on the schedule of the new total instead of the old one's end (lr 0).
            sched = {**state["scheduler"], "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)}
            self.scheduler.load_state_dict(sched)
            for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * fn(self.scheduler.last_epoch)
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
