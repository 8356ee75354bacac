"""One graph node's learning: its model, optimiser, incoming gated edges, and its step.

``GraphNode.outputs`` is the step's forward; ``GraphNode.step`` takes what the exchange
delivered (``Delivered``) and does the rest: the gated loss of every incoming edge (each
edge kind computing all its edges at once, each gate evaluated once for all its edges),
then the update; it returns what the node reports of the step (``NodeLoss``) and keeps
nothing between calls. No data, no distribution: the worker (``actors.worker``) and the
single-process reference (``coordinator.sequential``) both drive nodes through these same
methods.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from actors.config import OptimConfig
from actors.files import load_model_weights
from actors.gates import GATES, Gate, gate_clock
from actors.graph import GraphSpec
from actors.kinds import SENDABLES, EdgeBatch, EdgeKind, Receiver, kind_of, order_key
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


@dataclass
class Delivered:
    """What a step's exchange delivered, the same on every process."""

    logits: torch.Tensor
    """``[M, B, C]``: every node's detached logits, in node order."""
    sent: dict[str, list[Optional[torch.Tensor]]] = field(default_factory=dict)
    """Per ``Sendable`` besides the logits (``embedding``, ``features``...): every node's
    ``[B, width]`` tensor, None for a node that sends none."""


@dataclass
class NodeLoss:
    """A node's step, as it reports it (nothing of it stays on the node)."""

    total: torch.Tensor
    """The node's loss (with gradient)."""
    terms: torch.Tensor
    """``[len(edges)]``: each incoming edge's gated loss (detached; several kinds: their sum)."""
    weights: torch.Tensor
    """``[len(edges)]``: the mean weight each edge's gate put on the batch (the dashboards')."""
    task: Optional[torch.Tensor] = None
    """With a kind whose loss enters the update apart (mhgd's clip): the rest of the loss..."""
    apart: Optional[torch.Tensor] = None
    """...and that kind's gated loss, each as it enters ``total``."""
    apart_kind: Optional[EdgeKind] = None
    skipped: bool = False
    """A non-finite loss skipped (``train.nonfinite=skip``)."""


@dataclass
class _GateGroup:
    """The node's incoming edges behind one gate (the label edge apart): evaluated once a step."""

    gate: Gate
    positions: list[int]
    sources: Optional[torch.Tensor]  # node indices of the sources; None: the label edge


@dataclass
class _Part:
    """The edges of one kind behind one gate group."""

    group: int
    kind_rows: Optional[torch.Tensor]   # rows of the kind's loss (None: all of them, in order)
    group_rows: Optional[torch.Tensor]  # rows of the group's weights (None: all of them, in order)
    positions: torch.Tensor             # the edges' positions among the node's incoming edges


@dataclass
class _KindEdges:
    """One kind's instance on this node, and where its edges sit."""

    kind: EdgeKind
    weight: float
    sources: list[int]
    source_index: Optional[torch.Tensor]  # for a kind that reads the sources' logits
    parts: list[_Part]
    edge_groups: list[tuple[int, int]]    # per edge of the kind: (group, row in the group)
    apart: bool = False                   # its loss enters the update apart (kind.apart(), fixed for the run)


class GraphNode:
    """Node ``index`` of a knowledge transfer graph.

    Its loss at one step is, over its incoming non-Cutoff edges s -> t::

        L_t = G_tt(CE(y, z_t)) + sum_{s != t} G_st(T^2 KL(p_s || p_t))     (reduction=sum, DCL)
        L_t = G_tt(CE(y, z_t)) + mean_{s != t} G_st(...)                    (reduction=mean)

    for the default edge kinds; with ``graph.kinds`` each edge sums ``w_k G_st(loss_k)`` over
    its kinds (``actors.kinds``; docs/edge-kinds.md). Each kind computes all of the node's
    incoming edges of its kind at once, and each gate is evaluated once for all its edges,
    so a step's cost does not grow with the number of edges by a few kernels per edge.

    A frozen node (every incoming gate Cutoff) runs under no_grad and is never stepped.
    With ``graph.frozen_bn=eval`` (default) it runs in eval mode, so its BatchNorm
    statistics stay those of its checkpoint; with ``train`` it runs in train mode, as both
    reference codes ran their teachers: BatchNorm normalises with each batch's statistics
    and its running statistics drift (they are buffers of the model, so they are part of
    ``state_dict()`` and of every checkpoint, and a resumed run continues them exactly).

    With ``graph.skip_zero_loss``, a step whose whole loss is exactly 0 takes no optimiser
    step (``zero_loss``), as both reference codes skip it.
    """

    def __init__(self, index: int, graph: GraphSpec, *, num_classes: int, in_channels: int, optim: OptimConfig,
                 epochs: int, steps_per_epoch: int, seed: int = 0, device: torch.device = torch.device("cpu"),
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False):
        self.index = index
        self.model_name = graph.nodes[index].model
        self.frozen = graph.is_frozen(index)
        self.frozen_bn = graph.frozen_bn
        self.skip_zero_loss = graph.skip_zero_loss
        self.clock = graph.progress  # how the gates count progress (iteration or epoch)
        self.reduction = graph.reduction
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self._build_model(graph, num_classes, in_channels, seed, channels_last, compile)
        self.edges = [(s, GATES.get(g), g) for s, g in graph.incoming(index)]
        receiver = Receiver(index, graph, self.model_name, num_classes, in_channels, self.device, channels_last,
                            self._autocast)
        self._plan_edges(graph, receiver)
        # what the step's forward returns besides the logits: what this node's kinds read of it,
        # and what it sends for the kinds of the edges out of it
        self.sends = [SENDABLES.get(n) for n in SENDABLES.names() if n != "logits" and index in graph.senders(n)]
        self.model_outputs = {u for k in self.kinds for u in k.kind.uses} | {s.made_from for s in self.sends}
        self.optimizer = self.scheduler = None
        if self.frozen:
            self.model.train(self.frozen_bn == "train")
            self.model.requires_grad_(False)
        else:
            self._build_optimizer(optim)

    def _build_model(self, graph: GraphSpec, num_classes: int, in_channels: int, seed: int, channels_last: bool,
                     compile: bool) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(node_seed(seed, self.index))
            self.model = build_model(self.model_name, num_classes, in_channels)
        ckpt: Optional[str] = graph.nodes[self.index].checkpoint
        if ckpt:
            state, _ = load_model_weights(ckpt)
            self.model.load_state_dict(state)
        self.model.to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # The module that runs the forward: the model itself, or its torch.compile'd wrapper
        # (state dicts and checkpoints always use self.model, so they do not depend on it).
        self.run_model = torch.compile(self.model) if compile else self.model

    def _plan_edges(self, graph: GraphSpec, receiver: Receiver) -> None:
        """The gate groups and each kind's instance and edges, fixed for the run."""
        dev = self.device
        self.label_position = next((p for p, (s, _, _) in enumerate(self.edges) if s == self.index), None)
        self.cross_positions = torch.tensor([p for p, (s, _, _) in enumerate(self.edges) if s != self.index],
                                            dtype=torch.int64, device=dev)
        keys: dict[tuple[str, bool], list[int]] = {}
        for p, (s, _, g) in enumerate(self.edges):
            keys.setdefault((g, s == self.index), []).append(p)
        self.groups = [_GateGroup(GATES.get(g), ps, None if diag else self._index([self.edges[p][0] for p in ps]))
                       for (g, diag), ps in keys.items()]
        group_of = {p: (i, r) for i, grp in enumerate(self.groups) for r, p in enumerate(grp.positions)}
        # the concatenated groups' rows back in edge order (the gate weights of every edge, in one
        # index; None when they are in edge order already)
        order = [p for grp in self.groups for p in grp.positions]
        self.weight_order = None if order == sorted(order) else self._index([order.index(p) for p in range(len(order))])
        by_kind: dict[str, list[int]] = {}
        for p, (s, _, _) in enumerate(self.edges) if not self.frozen else ():
            for name in graph.edge_kinds(self.index, s):
                by_kind.setdefault(name, []).append(p)
        self.kinds: list[_KindEdges] = []
        for name in sorted(by_kind, key=order_key):  # the kinds' order: the order of each edge's sum
            positions = by_kind[name]
            cls = kind_of(name)
            sources = [self.edges[p][0] for p in positions]
            parts = []
            for i, grp in enumerate(self.groups):
                mine = [(r, p) for r, p in enumerate(positions) if group_of[p][0] == i]
                if mine:
                    kind_rows = [r for r, _ in mine]
                    group_rows = [group_of[p][1] for _, p in mine]
                    parts.append(_Part(i, None if kind_rows == list(range(len(positions))) else self._index(kind_rows),
                                       None if group_rows == list(range(len(grp.positions))) else self._index(group_rows),
                                       self._index([p for _, p in mine])))
            kind = cls(receiver, sources)
            self.kinds.append(_KindEdges(kind, graph.kind_weight(name), sources,
                                         self._index(sources) if cls.sends == "logits" else None, parts,
                                         [group_of[p] for p in positions], kind.apart()))
        self.has_apart = any(k.apart for k in self.kinds)  # a loss that enters the update apart (mhgd's clip)

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _build_optimizer(self, optim: OptimConfig) -> None:
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=optim.lr, momentum=optim.momentum,
            nesterov=optim.nesterov, weight_decay=optim.weight_decay,
        )
        self.lr_schedule = LrSchedule(
            optim.schedule, self.steps_per_epoch, self.total_steps, tuple(optim.milestones), optim.gamma,
            int(round(optim.warmup_epochs * self.steps_per_epoch)), optim.schedule_step == "epoch",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_schedule)

    def kind(self, name: str) -> EdgeKind:
        """This node's instance of kind ``name`` (one of its incoming edges' kinds)."""
        for k in self.kinds:
            if k.kind.name == name:
                return k.kind
        raise KeyError(f"node {self.index} has no incoming {name} edge")

    # --- the forward --------------------------------------------------------------------------

    def gate_clock(self, step: int) -> float:
        """What the gates see at the 1-based global step ``step`` (``gate_clock``): the
        workers and the single-process reference both ask here."""
        return gate_clock(step, self.steps_per_epoch, self.total_steps, self.clock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in float32 (the forward itself runs under bf16 autocast when asked)."""
        return self.outputs(x)["logits"]

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's forward: ``logits`` (float32); what the node's kinds use of its own
        forward (``embedding`` [B, D] float32, ``maps``: its stage feature maps) and add to it
        (``EdgeKind.own``, e.g. ``self_logits``); what it sends for the kinds of the edges out
        of it (``Sendable``: ``embedding``, ``features``)."""
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
        stages = "maps" in self.model_outputs
        with self._autocast():
            out = self.run_model(x, embedding=stages or "embedding" in self.model_outputs, stages=stages)
        out = out if isinstance(out, tuple) else (out,)  # (logits[, embedding[, stage maps]])
        res = {"logits": out[0].float()}
        if len(out) > 1:
            res["embedding"] = out[1].float()
        if len(out) > 2:
            res["maps"] = out[2]
        for sendable in self.sends:
            if sendable.derive is not None:
                res[sendable.name] = sendable.derive(res)
        for k in self.kinds:
            res.update(k.kind.own(x))
        return res

    # --- the step -----------------------------------------------------------------------------

    def step(self, own: dict[str, torch.Tensor], delivered: Delivered, labels: torch.Tensor, step: int,
             skip_nonfinite: bool = False, mark: Optional[Callable[[str], None]] = None) -> Optional[NodeLoss]:
        """Parts 4 and 5 of the global step ``step`` (1-based): the loss from this node's
        forward ``own`` and what the exchange ``delivered``, then the update. Returns the
        loss as reported (None for a frozen node, which learns nothing). ``skip_nonfinite``
        (``train.nonfinite=skip``): a non-finite loss is skipped (a host sync). ``mark``: the
        benchmark's step timer."""
        if self.frozen:
            return None
        result = self.loss(own, delivered, labels, self.gate_clock(step))
        if mark is not None:
            mark("loss")
        if skip_nonfinite and not torch.isfinite(result.total).item():
            result.skipped = True
            self.skip_update()
        else:
            self.update(result, mark)
        return result

    def loss(self, own: dict[str, torch.Tensor], delivered: Delivered, labels: torch.Tensor,
             progress: float) -> NodeLoss:
        """The node's loss: every gate evaluated once for its edges, every kind's loss once
        for its edges, gated, weighted and summed per edge in the kinds' order."""
        like = own["logits"]
        n = len(self.edges)
        gate_w = [g.gate.weights(None if g.sources is None or not g.gate.reads_sources else delivered.logits[g.sources],
                                 labels, progress) for g in self.groups]
        means = [g.gate.mean_weight(w, like, len(g.positions)) for g, w in zip(self.groups, gate_w)]
        weights = means[0] if len(means) == 1 else torch.cat(means)
        weights = (weights if self.weight_order is None else weights[self.weight_order]).detach()
        terms = like.new_zeros(n)
        task = apart = apart_kind = None
        for k in self.kinds:
            gated = self._kind_terms(k, own, delivered, labels, progress, gate_w)
            for part, value in gated:
                terms = terms.index_add(0, part.positions, value)
                if not self.has_apart:
                    continue
                if k.apart:
                    apart, apart_kind = (value.sum() if apart is None else apart + value.sum()), k.kind
                else:
                    task = (like.new_zeros(n) if task is None else task).index_add(0, part.positions, value)
        total = self._combine(terms, like)
        if apart is None:
            return NodeLoss(total, terms.detach(), weights)
        task = self._combine(task if task is not None else like.new_zeros(n), like)
        if self.reduction == "mean":
            apart = apart / len(self.cross_positions)
        return NodeLoss(total, terms.detach(), weights, task, apart, apart_kind)

    def _kind_terms(self, k: _KindEdges, own, delivered: Delivered, labels: torch.Tensor, progress: float,
                    gate_w: list) -> list[tuple[_Part, torch.Tensor]]:
        """One kind's gated, weighted losses, per gate group of its edges."""
        kind = k.kind
        sent = [delivered.sent[kind.sends][s] for s in k.sources] if kind.sends not in (None, "logits") else []
        keep = []
        if not kind.per_sample:  # the Correct gate's masks, for the relations of the kept samples
            keep = [w[r] if isinstance(w := gate_w[g], torch.Tensor) else None for g, r in k.edge_groups]
        source_logits = delivered.logits[k.source_index] if k.source_index is not None else None
        value = kind.loss(EdgeBatch(own, labels, source_logits, sent, keep))
        want = (len(k.sources), labels.shape[0]) if kind.per_sample else (len(k.sources),)
        if tuple(value.shape) != want:  # shapes are known on the host: no sync
            raise ValueError(f"edge kind {kind.name}: loss() returned shape {tuple(value.shape)} for {len(k.sources)} "
                             f"edge(s) into node {self.index}; expected {want} ("
                             + ("one value per edge and sample" if kind.per_sample else "one number per edge") + ")")
        if value.dtype != torch.float32:  # e.g. computed under bf16 autocast: the sums run in float32
            value = value.float()
        out = []
        for part in k.parts:
            gate = self.groups[part.group].gate
            v = value if part.kind_rows is None else value[part.kind_rows]
            if kind.per_sample:
                w = gate_w[part.group]
                if isinstance(w, torch.Tensor) and part.group_rows is not None:
                    w = w[part.group_rows]
                g = gate.reduce(v, w)
            else:  # one number per edge: a time gate scales it (Correct acted through keep)
                g = gate.reduce(v[:, None], gate.weights(None, labels, progress))
            out.append((part, g if k.weight == 1.0 else g * k.weight))
        return out

    def _combine(self, terms: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The label edge plus the cross edges, summed or (``graph.reduction=mean``) averaged."""
        total = terms[self.label_position] if self.label_position is not None else like.new_zeros(())
        if len(self.cross_positions):
            c = terms[self.cross_positions].sum()
            total = total + (c / len(self.cross_positions) if self.reduction == "mean" else c)
        return total

    def zero_loss(self, loss: torch.Tensor) -> bool:
        """With ``graph.skip_zero_loss``: is this step's whole loss exactly 0 (its update is
        then skipped)? Reads the loss (a host sync) only when the option is on."""
        return self.skip_zero_loss and loss.item() == 0.0

    def update(self, loss: NodeLoss, mark: Optional[Callable[[str], None]] = None) -> bool:
        """The step's part 5: backward and optimiser step (the schedule advances with it),
        or, for a zero loss under ``graph.skip_zero_loss``, the schedule's advance only.
        Returns whether the parameters were updated. ``mark(part)`` is called after the
        backward ("backward") and after the optimiser step ("optimizer"): the benchmark's
        step timer."""
        if self.zero_loss(loss.total):
            self.skip_update()
            return False
        self.optimizer.zero_grad(set_to_none=True)
        if loss.apart is not None:  # e.g. mhgd: its gradient clipped to the task gradient's norm
            params = [p for p in self.model.parameters() if p.requires_grad]
            loss.apart_kind.backward(params, loss.task, loss.apart, self.scheduler.last_epoch // self.steps_per_epoch)
        else:
            loss.total.backward()
        if mark is not None:
            mark("backward")
        self.optimizer.step()
        self.scheduler.step()
        if mark is not None:
            mark("optimizer")
        return True

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
