"""What runs inside one graph node's process: setup, train one epoch, evaluate, state.

The worker does not know who launched it (torchrun, or a Ray actor in a search trial):
it is handed its rank's ``DistEnv`` and ``Exchange`` and the already-validated config.
One training step of node t (of M), each part named as in the design:

1. batch     rows k of the epoch's batch plan (drawn by rank 0, broadcast) -> identical augmented batch on every node
2. forward   logits_t (and what the graph's edge kinds need of the node: ``GraphNode.outputs``)
3. exchange  one all-gather of {logits, [what the kinds' ``sends`` name], batch fingerprint}
             -> every node's logits [M, B, C] and sent tensors (``Delivered``)
4. loss      sum over incoming edges s->t and their kinds of gate(loss_kind(...), progress)
5. update    backward + optimiser step, locally (no gradient crosses processes)

Parts 4 and 5 are the node's own (``GraphNode.step``). ``NodeWorker.train_batch`` is parts
2-5; ``EpochTotals`` the running sums on the device. The worker names no edge kind: what
crosses besides the logits is each ``Sendable`` some live edge's kind declares.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Optional

import torch

from actors.batch_order import DX, DY, FLIP, PERM, BatchOrder, batch_fingerprint
from actors.config import RunConfig
from actors.data import Dataset, Split, augment, normalize, to_float
from actors.errors import BatchMismatchError, NonFiniteLossError
from actors.exchange import DistEnv, Exchange
from actors.files import NodeStateFiles
from actors.kinds import SENDABLES
from actors.metrics import NodeEpochMetrics
from actors.node import Delivered, GraphNode, NodeLoss
from actors.progress import EpochProgress
from actors.timing import NO_TIMER

log = logging.getLogger("ktg")


class BatchMaker:
    """Turns plan rows into the float batch a node trains on (same on every node)."""

    def __init__(self, split: Split, crop_pad: int, mean: Optional[torch.Tensor], std: Optional[torch.Tensor],
                 flip: bool = True, channels_last: bool = False, pad_mode: str = "reflect"):
        self.split, self.pad, self.mean, self.std = split, crop_pad, mean, std
        self.flip, self.channels_last, self.pad_mode = flip, channels_last, pad_mode

    def step(self, order: BatchOrder, plan: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``k`` of the epoch ``plan``: its plan rows and batch ``(rows, x, y)``."""
        rows = order.batch(plan, k)
        return (rows, *self(rows))

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rows[:, PERM]
        x = to_float(self.split.x[idx])
        x = augment(x, rows[:, DY : DX + 1], rows[:, FLIP].bool() if self.flip else None, self.pad, self.pad_mode)
        return self._finish(x), self.split.y[idx]

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the float batch a node takes, without augmentation (evaluation):
        the same normalisation and memory format as the training batches."""
        return self._finish(to_float(images))

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = normalize(x, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def build_batch_maker(cfg: RunConfig, data: Dataset, device: torch.device) -> BatchMaker:
    mean = std = None
    if cfg.dataset.normalize:
        mean = torch.tensor(data.info.mean, device=device)
        std = torch.tensor(data.info.std, device=device)
    return BatchMaker(data.train, cfg.dataset.crop_pad, mean, std, cfg.dataset.flip, cfg.train.channels_last,
                      cfg.dataset.pad_mode)


def build_batch_order(cfg: RunConfig, data: Dataset) -> BatchOrder:
    return BatchOrder(len(data.train), cfg.train.batch_size, cfg.seed, cfg.dataset.crop_pad, cfg.dataset.flip)


def steps_per_epoch(cfg: RunConfig, order: BatchOrder) -> int:
    """Steps of one epoch: the whole plan, or ``train.max_steps_per_epoch`` of it."""
    cap = cfg.train.max_steps_per_epoch
    return min(order.steps_per_epoch, cap) if cap else order.steps_per_epoch


def build_node(cfg: RunConfig, data: Dataset, index: int, steps_per_epoch: int, device: torch.device) -> GraphNode:
    return GraphNode(index, cfg.graph, num_classes=data.info.num_classes, in_channels=data.info.in_channels,
                     optim=cfg.optim, epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch, seed=cfg.seed,
                     device=device, precision=cfg.train.precision, channels_last=cfg.train.channels_last,
                     compile=cfg.train.compile)


def pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``n`` rows (as it is when it has ``n`` already)."""
    missing = n - x.shape[0]
    return torch.cat([x, x.new_zeros((missing, *x.shape[1:]))]) if missing > 0 else x


def predict(node: GraphNode, split: Split, batch_size: int, batch_maker: BatchMaker, fixed: bool = False) -> torch.Tensor:
    """Logits of a whole split in eval mode, without augmentation, through the node's own
    forward (``GraphNode.predict``: the compiled model, autocast, the batches' memory
    format). ``fixed``: the last, partial batch is padded to ``batch_size`` (a compiled model
    then sees one shape, and compiles once)."""
    outs = []
    for i in range(0, len(split), batch_size):
        images = split.x[i : i + batch_size]
        n = images.shape[0]
        outs.append(node.predict(batch_maker.plain(pad_rows(images, batch_size) if fixed else images))[:n])
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item() * 100.0


class EpochTotals:
    """One node's running sums of an epoch, kept on its device (no host sync in the step):
    loss, each incoming edge's gated loss and gate weight, correct predictions; the first
    non-finite step and its edges. Read at the end of the epoch."""

    def __init__(self, num_edges: int, device: torch.device, track_nonfinite: bool = True):
        self.tracking = track_nonfinite  # train.nonfinite=error: find the first bad step (skip mode skips it)
        self.loss = torch.zeros((), device=device)
        self.edge_loss = torch.zeros(num_edges, device=device)
        self.gate_weight = torch.zeros(num_edges, device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.trained = 0  # steps whose loss was computed and not skipped (host counter)
        self.skipped = 0  # steps skipped for a non-finite loss (train.nonfinite=skip)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_edges = torch.zeros(num_edges, dtype=torch.bool, device=device)

    def add(self, step: int, logits: torch.Tensor, labels: torch.Tensor, loss: Optional[NodeLoss]) -> None:
        """The node's step ``step`` (1-based): its logits, and its loss (None: a frozen node)."""
        self.correct += (logits.detach().argmax(1) == labels).sum()
        if loss is None:
            return
        if loss.skipped:
            self.skipped += 1
            return
        if self.tracking:
            self.track_nonfinite(step, loss.terms)
        self.loss += loss.total.detach()
        self.edge_loss += loss.terms
        self.gate_weight += loss.weights
        self.trained += 1

    def mean_loss(self) -> float:
        """The epoch's mean loss so far (a host sync: progress lines only)."""
        return self.loss.item() / max(1, self.trained)

    def track_nonfinite(self, step: int, terms: torch.Tensor) -> None:
        """Remember the first step at which some edge's gated loss was NaN/inf, and which."""
        finite = torch.isfinite(terms)
        newly = (self.first_bad < 0) & ~finite.all()
        self.first_bad = torch.where(newly, step, self.first_bad)
        self.bad_edges = torch.where(newly, ~finite, self.bad_edges)

    def metrics(self, node: GraphNode, epoch: int, steps: int, batch_size: int, train_time_s: float) -> NodeEpochMetrics:
        trained = max(1, steps - self.skipped)
        return NodeEpochMetrics(
            epoch=epoch, node=node.index, model=node.model_name, frozen=node.frozen,
            train_loss=self.loss.item() / trained if not node.frozen else None,
            train_acc=self.correct.item() * 100.0 / (steps * batch_size),
            lr=node.lr, skipped_steps=self.skipped, train_time_s=train_time_s,
            edges=[(s, g) for s, _, g in node.edges],
            edge_loss=[v / trained for v in self.edge_loss.tolist()],
            gate_weight=[v / trained for v in self.gate_weight.tolist()],
        )


class BatchCheck:
    """The first step at which some process's batch fingerprint differed from process 0's,
    and which processes, tracked on the device (no sync); read by ``mismatch``."""

    def __init__(self, processes: int, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.differ = torch.zeros(processes, dtype=torch.bool, device=device)

    def track(self, step: int, fingerprints: torch.Tensor) -> None:
        differ = (fingerprints != fingerprints[0]).any(dim=1)
        newly = (self.step < 0) & differ.any()
        self.step = torch.where(newly, step, self.step)
        self.differ = torch.where(newly, differ, self.differ)

    def mismatch(self) -> Optional[tuple[int, list[int]]]:
        """(step, processes) of the first mismatch, or None (a host sync)."""
        step = int(self.step)
        return None if step < 0 else (step, [i for i, b in enumerate(self.differ.tolist()) if b])


def to_host(obj: Any) -> Any:
    """``obj`` (nested dicts, lists, tuples of tensors and plain values) with every tensor on
    the CPU: a device tensor is copied, a CPU one kept as it is; containers keep their type,
    and a state dict its ``_metadata`` (module versions, read by ``load_state_dict``)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if isinstance(obj, dict):
        out = type(obj)((k, to_host(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(to_host(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def one_node_per_process(num_nodes: int) -> list[list[int]]:
    return [[t] for t in range(num_nodes)]


class NodeWorker:
    """Process ``env.rank`` of a group of ``env.world_size``, hosting the graph nodes
    ``placement[env.rank]`` (default: one node per process, node t = rank t).

    Every hosted node trains on the process's one batch, one node after another on its
    device; the step's exchange is one all-gather per process carrying the logits of all
    its nodes (padded to the most any process hosts), reordered into ``[M, B, C]`` by node
    index, so each node computes its gated loss from every node's logits exactly as when
    each node has its own process."""

    def __init__(self, cfg: RunConfig, env: DistEnv, exchange: Exchange, data: Dataset,
                 files: Optional[Callable[[int], NodeStateFiles]] = None, placement: Optional[list[list[int]]] = None):
        """``files(t)``: where node t's state goes (the run directory's ``node_files``); None
        writes nothing."""
        self.cfg, self.env, self.exchange = cfg, env, exchange
        m = cfg.graph.num_nodes
        self.placement = placement or one_node_per_process(m)
        if len(self.placement) != env.world_size:
            raise ValueError(f"a placement for {len(self.placement)} processes in a group of {env.world_size}")
        self.rank = env.rank
        self.hosted = list(self.placement[self.rank])
        self.skip_nonfinite = cfg.train.nonfinite == "skip"
        self.device = env.device
        self.files = {t: files(t) for t in self.hosted} if files is not None else None
        self.data = data.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): pick the fastest kernels once
        self.order = build_batch_order(cfg, data)
        self.steps_per_epoch = steps_per_epoch(cfg, self.order)
        self.batches = build_batch_maker(cfg, self.data, self.device)
        self.nodes = [build_node(cfg, self.data, t, self.steps_per_epoch, self.device) for t in self.hosted]
        # row of node t in the gathered [P * width] rows: process p's j-th node sits at p * width + j
        self.width = max(len(p) for p in self.placement)
        rows = {t: p * self.width + j for p, nodes in enumerate(self.placement) for j, t in enumerate(nodes)}
        self.node_rows = torch.tensor([rows[t] for t in range(m)], device=self.device)
        # what crosses besides the logits, only when a live edge's kind sends it (``Sendable``:
        # the embeddings [B, D_s] of the nodes that feed relation edges, mhgd's compressed stage
        # features [B, sum_i C_i] of frozen nodes...), each padded to the widest sender's, as one
        # all-gather takes a block of one size from every process
        info = data.info
        models = [n.model for n in cfg.graph.nodes]
        self.extra_dims = {}
        for name in SENDABLES.names():
            senders = cfg.graph.senders(name) if name != "logits" else []
            if senders:
                width = SENDABLES.get(name).width
                self.extra_dims[name] = {s: width(models[s], info.num_classes, info.in_channels) for s in senders}
        # progress lines on rank 0: every train.log_every steps; by default ~5 per epoch on long epochs
        self.log_every = cfg.train.log_every or (self.steps_per_epoch // 5 if self.steps_per_epoch >= 200 else 0)
        self.step = 0  # global optimiser steps taken so far (k - 1 for the next step k)
        self.epoch = 0  # epochs completed
        self.first_step_at: Optional[float] = None  # wall clock (time.time) of the first step
        self.timer = NO_TIMER  # the benchmark attaches an actors.timing.StepTimer
        self._frozen_logits: dict[tuple[int, str], torch.Tensor] = {}  # (node, split) -> eval logits of a frozen node

    @property
    def node(self) -> GraphNode:
        """The process's only node (one node per process)."""
        if len(self.nodes) != 1:
            raise AttributeError(f"process {self.rank} hosts nodes {self.hosted}: use .nodes")
        return self.nodes[0]

    def gather_nodes(self, values: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Every node's tensor of each name, ``[M, *shape]`` in node order, from each hosted
        node's (``values[name][j]`` for ``self.hosted[j]``): one all-gather."""
        payload = {k: self._pad(torch.stack(v)) for k, v in values.items()}
        got = self.exchange.all_gather(payload)
        return {k: got[k].flatten(0, 1)[self.node_rows] for k in values}

    def _pad(self, stacked: torch.Tensor) -> torch.Tensor:
        return pad_rows(stacked, self.width)

    # --- training -------------------------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> torch.Tensor:
        """Rank 0 draws the plan; everyone receives its copy (one broadcast per epoch)."""
        if self.rank == 0:
            plan = self.order.epoch_plan(epoch).to(self.device)
        else:
            plan = torch.empty(self.order.num_samples, 4, dtype=torch.int64, device=self.device)
        return self.exchange.broadcast(plan, src=0)

    def train_epoch(self, epoch: int) -> list[NodeEpochMetrics]:
        """One pass over the training set's plan for ``epoch``: the five steps, k times.
        Returns each hosted node's metrics.

        No host-device synchronisation inside the step (on an accelerator): the running
        sums, NaN and batch-mismatch tracking stay on the device (``EpochTotals``,
        ``BatchCheck``) and are read at progress lines (every ``train.log_every`` steps) and
        at the end of the epoch. The exceptions: ``train.nonfinite=skip`` reads each step's
        loss, and an attached ``StepTimer`` (benchmark) synchronises to time each part."""
        cfg = self.cfg
        t0 = time.perf_counter()
        plan = self._epoch_plan(epoch)
        totals = [EpochTotals(len(n.edges), self.device, not self.skip_nonfinite) for n in self.nodes]
        check = BatchCheck(self.env.world_size, self.device)
        if self.first_step_at is None:
            self.first_step_at = time.time()
        bar = None
        if self.rank == 0 and cfg.train.progress != "off":
            bar = EpochProgress(cfg.train.progress, epoch + 1, cfg.train.epochs, self.steps_per_epoch,
                                cfg.train.batch_size, self.log_every, read_loss=totals[0].mean_loss,
                                loss_is_free=self.device.type == "cpu")
        for k in range(self.steps_per_epoch):
            self._step(plan, k, totals, check)
            if self.log_every and (k + 1) % self.log_every == 0 and self.device.type != "cpu":
                self._raise_on_mismatch(check)
            if bar is not None:
                bar.update(k + 1)
        if bar is not None:
            bar.close()
        self.epoch = epoch + 1
        self._raise_on_mismatch(check)
        self._check_finite(totals, epoch)
        elapsed = time.perf_counter() - t0
        return [tot.metrics(n, epoch + 1, self.steps_per_epoch, cfg.train.batch_size, elapsed)
                for n, tot in zip(self.nodes, totals)]

    def _step(self, plan: torch.Tensor, k: int, totals: list[EpochTotals], check: BatchCheck) -> None:
        """Step k of the epoch (the global step ``self.step + 1``) of every hosted node."""
        self.timer.start()
        rows, x, y = self.batches.step(self.order, plan, k)            # 1. batch
        self.timer.mark("batch")
        self.train_batch(rows, x, y, totals, check)

    def train_batch(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor, totals: list[EpochTotals],
                    check: BatchCheck) -> None:
        """Parts 2-5 of a step on the batch ``x, y`` (plan rows ``rows``): forward every hosted
        node, one exchange, then each node's own step (loss and update)."""
        tm = self.timer
        outs = [node.outputs(x) for node in self.nodes]                 # 2. forward
        tm.mark("forward")
        delivered = self._exchange(rows, x, y, outs, check)             # 3. exchange
        self.step += 1
        for node, out, tot in zip(self.nodes, outs, totals):            # 4. loss, 5. update
            loss = node.step(out, delivered, y, self.step, self.skip_nonfinite, mark=tm.mark)
            tot.add(self.step, out["logits"], y, loss)
            tm.mark("tally")
        tm.end_step()

    def _payload(self, outs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """What this process sends at a step (before the occasional batch fingerprint)."""
        payload = {"logits": self._pad(torch.stack([o["logits"].detach() for o in outs]))}
        b = outs[0]["logits"].shape[0]
        for need, dims in self.extra_dims.items():
            e = outs[0]["logits"].new_zeros((self.width, b, max(dims.values())))
            for j, (t, o) in enumerate(zip(self.hosted, outs)):
                if t in dims:
                    e[j, :, : dims[t]] = o[need].detach()
            payload[need] = e
        return payload

    def exchange_bytes(self) -> dict[str, int]:
        """Bytes this process sends per step, by what they carry (the all-gather takes the
        same block from every process; the batch fingerprint's 32 bytes cross only every
        ``train.check_batch_every`` steps)."""
        b, c = self.cfg.train.batch_size, self.data.info.num_classes
        out = {"logits": self.width * b * c * 4}
        for need, dims in self.extra_dims.items():
            out[need] = self.width * b * max(dims.values()) * 4
        return out

    def _exchange(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor, outs: list[dict[str, torch.Tensor]],
                  check: BatchCheck) -> Delivered:
        """The one all-gather of the step: every node's detached logits [M, B, C]; what the
        kinds of live edges need sent (``extra_dims``), returned per node (``[B, width]``,
        None for a node that sends none); and every ``train.check_batch_every`` steps every process's batch
        fingerprint, compared with process 0's (at once on the CPU, where reading costs
        nothing; on an accelerator tracked on the device and read at progress lines and at
        the end of the epoch)."""
        tm = self.timer
        payload = self._payload(outs)
        every = self.cfg.train.check_batch_every
        checking = every > 0 and self.step % every == 0
        if checking:
            payload["batch"] = batch_fingerprint(rows, x, y, self.step)
        if tm.enabled:
            payload["arrival"] = tm.arrival(self.device)
        got = self.exchange.all_gather(payload)
        tm.exchanged(got.get("arrival"))
        if checking:
            check.track(self.step + 1, got["batch"])
            if self.device.type == "cpu":
                self._raise_on_mismatch(check)
        sent: dict[str, list[Optional[torch.Tensor]]] = {}
        for need, dims in self.extra_dims.items():
            every = got[need].flatten(0, 1)[self.node_rows]
            sent[need] = [every[t, :, : dims[t]] if t in dims else None for t in range(self.cfg.graph.num_nodes)]
        return Delivered(got["logits"].flatten(0, 1)[self.node_rows], sent)

    def _raise_on_mismatch(self, check: BatchCheck) -> None:
        """Read the batch mismatch tracked so far (a host sync on an accelerator)."""
        found = check.mismatch()
        if found is not None:
            step, processes = found
            nodes = sorted(t for p in processes for t in self.placement[p])
            raise BatchMismatchError(
                f"node(s) {nodes} hold a different batch than node {self.placement[0][0]} at step {step}; a node has "
                "drifted from rank 0's batch plan, so the run stops instead of training on mismatched batches"
            )

    def _check_finite(self, totals: list[EpochTotals], epoch: int) -> None:
        """One small all-gather per epoch: if any node's loss went NaN/inf, every process
        raises the same error, naming the node, step and edges where it started, so the
        whole group stops together."""
        m = self.cfg.graph.num_nodes
        rows = []
        for node, tot in zip(self.nodes, totals):
            mask = torch.zeros(m, dtype=torch.int64, device=self.device)  # which sources' edges were bad
            if len(node.edges):
                src = torch.tensor([s for s, _, _ in node.edges], device=self.device)
                mask[src] = tot.bad_edges.to(torch.int64)
            rows.append(torch.cat([tot.first_bad.reshape(1), mask]))
        every = self.gather_nodes({"bad": rows})["bad"].tolist()
        bad = [(row[0], i, row[1:]) for i, row in enumerate(every) if row[0] >= 0]
        if bad:
            step, node, edge_mask = min(bad)
            edges = ", ".join("label edge" if s == node else f"edge {s} -> {node}" for s, b in enumerate(edge_mask) if b)
            raise NonFiniteLossError(
                f"non-finite training loss on node {node} at step {step} (epoch {epoch + 1}) in {edges or 'its loss'}"
                + (f"; later also on node(s) {sorted({i for _, i, _ in bad} - {node})}" if len(bad) > 1 else "")
                + "; lower optim.lr, or set train.nonfinite=skip to skip such steps"
            )

    def run_epoch(self, epoch: int, checkpoint: bool = False) -> list[NodeEpochMetrics]:
        """Train one epoch and evaluate; with ``checkpoint``, then write each hosted node's
        share of the group checkpoint. Returns each hosted node's metrics of the epoch."""
        with self.named_failures():
            trained = self.train_epoch(epoch)
            evaluated = self.evaluate()
        metrics = [dataclasses.replace(m, **e, first_step_at=self.first_step_at) for m, e in zip(trained, evaluated)]
        if checkpoint:
            self.save_group_checkpoint()
        return metrics

    def compile(self) -> None:
        """``train.compile``: compile every hosted node's forward and backward, and its eval
        forward, on batches of the run's shapes now (``GraphNode.warm_up``), before the first
        step, so that no process compiles while the others wait in a collective; the nodes
        are left as they were. Dynamo's recompile limit is raised to what the hosted nodes
        need, and reaching it is an error, never a silent fall back to eager."""
        import torch._dynamo

        t0 = time.perf_counter()
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 8 * len(self.nodes))
        config.fail_on_recompile_limit_hit = True
        b = self.cfg.train.batch_size
        rows = torch.zeros(b, 4, dtype=torch.int64, device=self.device)  # the first b images, not augmented
        rows[:, PERM] = torch.arange(b, device=self.device)
        batch, _ = self.batches(rows)  # through the step's own batch path: the same shapes and strides
        n = self.cfg.train.eval_batch_size  # evaluation pads its last batch to this shape too (predict(fixed=True))
        eval_batch = self.batches.plain(pad_rows(self.data.train.x[:n], n))
        for node in self.nodes:
            node.warm_up(batch, eval_batch)
        if self.rank == 0:
            log.info(f"train.compile: compiled node(s) {self.hosted} in {time.perf_counter() - t0:.1f} s"
                     + (f"; waiting for the other {self.env.world_size - 1} process(es) to compile theirs"
                        if self.env.world_size > 1 else ""))

    def release(self) -> None:
        """Let go of the nodes (models, optimisers), the data and the exchange's buffers: a
        warm process's next worker is built once this one's tensors are gone."""
        self.nodes = []
        self._frozen_logits = {}
        self.data = self.batches = None
        self.exchange.release()

    @contextlib.contextmanager
    def named_failures(self):
        """Under NCCL, once the collective monitor has aborted a stalled group, the collectives
        that were in flight hand back garbage, and whatever that makes fail first (a batch
        mismatch, a NaN, an allocation) is not the cause: raise the monitor's error, which
        names the rank that stopped answering, in its place."""
        try:
            yield
        except Exception as e:
            failure = self.exchange.failure()
            if failure is not None and failure is not e:
                raise failure from e
            raise

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> list[dict[str, Any]]:
        """Val and test accuracy of each hosted node, and of the ensemble (mean softmax of
        all nodes, through one all-gather of the eval logits)."""
        splits = {k: s for k, s in {"val": self.data.val, "test": self.data.test}.items() if s is not None}
        logits = {k: [self._predict(n, k, s) for n in self.nodes] for k, s in splits.items()}
        every = self.gather_nodes(logits)
        ensemble = {k: accuracy(torch.softmax(every[k].float(), dim=2).mean(0), s.y) for k, s in splits.items()}
        out = []
        for j in range(len(self.nodes)):
            row: dict[str, Any] = {"val_acc": None, "ensemble_val_acc": None}
            for k, s in splits.items():
                row[f"{k}_acc"] = accuracy(logits[k][j], s.y)
                row[f"ensemble_{k}_acc"] = ensemble[k]
            out.append(row)
        return out

    def _predict(self, node: GraphNode, name: str, split: Split) -> torch.Tensor:
        """A node's logits on split ``name``. A frozen node whose BatchNorm keeps its stored
        statistics (``graph.frozen_bn=eval``) never changes: it is evaluated once per run."""
        kept = node.frozen and node.frozen_bn == "eval"
        if kept and (node.index, name) in self._frozen_logits:
            return self._frozen_logits[(node.index, name)]
        out = predict(node, split, self.cfg.train.eval_batch_size, self.batches, fixed=self.cfg.train.compile)
        if kept:
            self._frozen_logits[(node.index, name)] = out
        return out

    # --- state ----------------------------------------------------------------------------------

    def meta(self, node: GraphNode) -> dict[str, Any]:
        return {
            "model": node.model_name,
            "num_classes": self.data.info.num_classes,
            "in_channels": self.data.info.in_channels,
            "dataset": self.data.name,
            "node": node.index,
            "frozen": node.frozen,
        }

    def states(self) -> dict[int, dict[str, Any]]:
        """Each hosted node's whole state, by node index, on the host: it travels to a search
        trial's driver, which has no GPU (and must not open a CUDA context on another trial's
        GPU to unpickle one), and is written to disk from there."""
        rng = torch.get_rng_state()
        return {n.index: to_host({**n.state_dict(), "step": self.step, "epoch": self.epoch, "meta": self.meta(n),
                                  "torch_rng": rng})
                for n in self.nodes}

    def load_states(self, states: dict[int, dict[str, Any]]) -> None:
        """Continue from ``states()`` of an earlier run of the same nodes (same config; any
        placement)."""
        for n in self.nodes:
            n.load_state_dict(states[n.index])
        first = states[self.hosted[0]]
        self.step, self.epoch = int(first["step"]), int(first["epoch"])
        if "torch_rng" in first:
            torch.set_rng_state(first["torch_rng"])

    def save_checkpoint(self) -> list[str]:
        """Write each hosted node's final state (atomically; ``<run_dir>/node<i>.pt``)."""
        if self.files is None:
            return []
        return [str(self.files[t].save_final(state)) for t, state in self.states().items()]

    def save_group_checkpoint(self) -> None:
        """Each hosted node's share of the group checkpoint at the current epoch boundary."""
        if self.files is not None:
            for t, state in self.states().items():
                self.files[t].save_epoch(self.epoch, state)
