"""What runs inside one graph node's process: setup, train one epoch, evaluate, state.

The worker does not know who launched it (torchrun, or a Ray actor in a search trial):
it is handed its rank's ``DistEnv`` and ``Exchange`` and the already-validated config.
One training step of node t (of M), each part named as in the design:

1. batch     rows k of the coordinator's epoch plan -> identical augmented batch on every node
2. forward   logits_t
3. exchange  one all-gather of {logits, batch fingerprint} -> every node's logits [M, B, C]
4. loss      sum over incoming edges s->t of gate(loss_edge(p_s, logits_t, y), progress)
5. update    backward + optimiser step, locally (no gradient crosses processes)
"""
from __future__ import annotations

import time
from typing import Any, Optional

import torch

from actors.batch_order import DX, DY, FLIP, PERM, BatchOrder, batch_fingerprint
from actors.data import Dataset, Split, augment, to_float
from actors.errors import BatchMismatchError, NonFiniteLossError
from actors.exchange import DistEnv, Exchange
from actors.node import GraphNode
from actors.progress import EpochProgress
from actors.timing import NO_TIMER


class BatchMaker:
    """Turns plan rows into the float batch a node trains on (same on every node)."""

    def __init__(self, split: Split, crop_pad: int, mean: Optional[torch.Tensor], std: Optional[torch.Tensor],
                 flip: bool = True, channels_last: bool = False, pad_mode: str = "reflect"):
        self.split, self.pad, self.mean, self.std = split, crop_pad, mean, std
        self.flip, self.channels_last, self.pad_mode = flip, channels_last, pad_mode

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rows[:, PERM]
        x = to_float(self.split.x[idx])
        x = augment(x, rows[:, DY : DX + 1], rows[:, FLIP].bool() if self.flip else None, self.pad, self.pad_mode)
        if self.mean is not None:
            x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.split.y[idx]


def build_batch_maker(cfg, data: Dataset, device: torch.device) -> BatchMaker:
    mean = std = None
    if cfg.dataset.normalize:
        mean = torch.tensor(data.info.mean, device=device)
        std = torch.tensor(data.info.std, device=device)
    return BatchMaker(data.train, cfg.dataset.crop_pad, mean, std, cfg.dataset.flip, cfg.train.channels_last,
                      cfg.dataset.pad_mode)


def build_batch_order(cfg, data: Dataset) -> BatchOrder:
    return BatchOrder(len(data.train), cfg.train.batch_size, cfg.seed, cfg.dataset.crop_pad, cfg.dataset.flip)


def steps_per_epoch(cfg, order: BatchOrder) -> int:
    """Steps of one epoch: the whole plan, or ``train.max_steps_per_epoch`` of it."""
    cap = cfg.train.max_steps_per_epoch
    return min(order.steps_per_epoch, cap) if cap else order.steps_per_epoch


def build_node(cfg, data: Dataset, index: int, steps_per_epoch: int, device: torch.device) -> GraphNode:
    return GraphNode(index, cfg.graph, data.info.num_classes, data.info.in_channels, cfg.optim,
                     cfg.train.epochs, steps_per_epoch, cfg.seed, device, cfg.train.precision,
                     cfg.train.channels_last, cfg.train.compile)


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, batch_size: int, batch_maker: BatchMaker) -> torch.Tensor:
    """Logits of a whole split in eval mode, without augmentation."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(split), batch_size):
        x = to_float(split.x[i : i + batch_size])
        if batch_maker.mean is not None:
            x = (x - batch_maker.mean.view(1, -1, 1, 1)) / batch_maker.std.view(1, -1, 1, 1)
        outs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item() * 100.0


class NodeWorker:
    """Graph node ``env.rank`` of a group of ``env.world_size`` processes."""

    def __init__(self, cfg, env: DistEnv, exchange: Exchange, data: Dataset, files=None):
        """``files``: where this node's state goes (``save_epoch(epoch, state)`` for the group
        checkpoint, ``save_final(state)``), e.g. ``coordinator.rundir.NodeFiles``; None
        writes nothing."""
        self.cfg, self.env, self.exchange = cfg, env, exchange
        self.index = env.rank
        self.device = env.device
        self.files = files
        self.data = data.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): pick the fastest kernels once
        self.order = build_batch_order(cfg, data)
        self.steps_per_epoch = steps_per_epoch(cfg, self.order)
        self.batches = build_batch_maker(cfg, self.data, self.device)
        self.node = build_node(cfg, self.data, self.index, self.steps_per_epoch, self.device)
        # progress lines on rank 0: every train.log_every steps; by default ~5 per epoch on long epochs
        self.log_every = cfg.train.log_every or (self.steps_per_epoch // 5 if self.steps_per_epoch >= 200 else 0)
        self.step = 0  # global optimiser steps taken so far (k - 1 for the next step k)
        self.epoch = 0  # epochs completed
        self.first_step_at: Optional[float] = None  # wall clock (time.time) of the first step
        self.timer = NO_TIMER  # the benchmark attaches an actors.timing.StepTimer

    # --- training -------------------------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> torch.Tensor:
        """Rank 0 draws the plan; everyone receives its copy (one broadcast per epoch)."""
        if self.index == 0:
            plan = self.order.epoch_plan(epoch).to(self.device)
        else:
            plan = torch.empty(self.order.num_samples, 4, dtype=torch.int64, device=self.device)
        return self.exchange.broadcast(plan, src=0)

    def _track_batches(self, fingerprints: torch.Tensor) -> None:
        """Remember (on the device, no sync) the first step at which some node's batch
        fingerprint differed from node 0's, and which nodes."""
        differ = (fingerprints != fingerprints[0]).any(dim=1)
        newly = (self._mismatch_step < 0) & differ.any()
        self._mismatch_step = torch.where(newly, self.step + 1, self._mismatch_step)
        self._mismatch_nodes = torch.where(newly, differ, self._mismatch_nodes)

    def _raise_on_mismatch(self) -> None:
        """Read the mismatch tracked on an accelerator (a host sync): at progress lines and
        at the end of the epoch."""
        step = int(self._mismatch_step)
        if step >= 0:
            self._mismatch_error(step, [i for i, b in enumerate(self._mismatch_nodes.tolist()) if b])

    def _check_batch(self, fingerprints: torch.Tensor) -> None:
        differ = (fingerprints != fingerprints[0]).any(dim=1).tolist()
        if any(differ):
            self._mismatch_error(self.step + 1, [i for i, b in enumerate(differ) if b])

    def _mismatch_error(self, step: int, nodes: list[int]) -> None:
        raise BatchMismatchError(
            f"node(s) {nodes} hold a different batch than node 0 at step {step}; a node has drifted "
            "from the coordinator's batch order, so the run stops instead of training on mismatched batches"
        )

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training set's plan for ``epoch``. Returns this node's metrics.

        No host-device synchronisation inside the step (on an accelerator): losses, edge
        terms, accuracy, NaN and batch-mismatch tracking all stay on the device and are read
        at progress lines (every ``train.log_every`` steps) and at the end of the epoch. The
        exceptions: ``train.nonfinite=skip`` reads each step's loss, and an attached
        ``StepTimer`` (benchmark) synchronises to time each part."""
        cfg, node, tm = self.cfg, self.node, self.timer
        t0 = time.perf_counter()
        plan = self._epoch_plan(epoch)
        m = len(self.cfg.graph.nodes)
        loss_sum = torch.zeros((), device=self.device)
        edge_sum = torch.zeros(len(node.edges), device=self.device)
        weight_sum = torch.zeros(len(node.edges), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        # first non-finite step of this epoch and its edges, tracked on the device (no sync)
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        bad_edges = torch.zeros(len(node.edges), dtype=torch.bool, device=self.device)
        self._mismatch_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._mismatch_nodes = torch.zeros(m, dtype=torch.bool, device=self.device)
        on_host = self.device.type == "cpu"
        skip = cfg.train.nonfinite == "skip"
        skipped = 0
        every = cfg.train.check_batch_every
        if self.first_step_at is None:
            self.first_step_at = time.time()
        bar = None
        if self.index == 0 and cfg.train.progress != "off":
            done = self.step  # loss_sum covers the steps of this epoch only
            bar = EpochProgress(cfg.train.progress, epoch + 1, cfg.train.epochs, self.steps_per_epoch,
                                cfg.train.batch_size, self.log_every,
                                read_loss=lambda: loss_sum.item() / max(1, self.step - done - skipped),
                                loss_is_free=on_host)
        for k in range(self.steps_per_epoch):
            tm.start()
            rows = self.order.batch(plan, k)
            x, y = self.batches(rows)                                   # 1. batch
            tm.mark("batch")
            logits = node.forward(x)                                    # 2. forward
            tm.mark("forward")
            payload = {"logits": logits.detach()}
            check = every > 0 and self.step % every == 0
            if check:
                payload["batch"] = batch_fingerprint(rows, x, y, self.step)
            if tm.enabled:
                payload["arrival"] = tm.arrival(self.device)
            got = self.exchange.all_gather(payload)                     # 3. exchange
            tm.exchanged(got.get("arrival"))
            if check:
                if on_host:  # reading the fingerprints costs nothing on the CPU: check at once
                    self._check_batch(got["batch"])
                else:
                    self._track_batches(got["batch"])
            self.step += 1
            if not node.frozen:
                progress = node.progress(self.step)  # the one helper the reference uses too
                loss, terms = node.loss(logits, got["logits"], y, progress)  # 4. loss
                weights = node.gate_weights(got["logits"], y, progress)
                tm.mark("loss")
                if skip and not torch.isfinite(loss).item():  # host sync, only in skip mode
                    skipped += 1
                    node.skip_update()
                elif node.zero_loss(loss):  # graph.skip_zero_loss: a loss of exactly 0 takes no step
                    node.skip_update()
                    edge_sum += terms
                    weight_sum += weights
                else:
                    if not skip:
                        finite = torch.isfinite(terms)
                        newly = (first_bad < 0) & ~finite.all()
                        first_bad = torch.where(newly, self.step, first_bad)
                        bad_edges = torch.where(newly, ~finite, bad_edges)
                    node.backward(loss)                                 # 5. update
                    tm.mark("backward")
                    node.step()
                    tm.mark("optimizer")
                    loss_sum += loss.detach()
                    edge_sum += terms
                    weight_sum += weights
            correct += (logits.detach().argmax(1) == y).sum()
            tm.end_step()
            if self.log_every and (k + 1) % self.log_every == 0 and not on_host:
                self._raise_on_mismatch()
            if bar is not None:
                bar.update(k + 1)
        if bar is not None:
            bar.close()
        self.epoch = epoch + 1
        n = self.steps_per_epoch
        self._raise_on_mismatch()
        self._check_finite(first_bad, bad_edges, epoch)
        trained = max(1, n - skipped)
        edges = {f"edge_{s}_to_{self.index}_{g}": v / trained for (s, _, g), v in zip(node.edges, edge_sum.tolist())}
        weights = {f"gate_{s}_to_{self.index}_{g}": v / trained for (s, _, g), v in zip(node.edges, weight_sum.tolist())}
        return {
            "epoch": epoch + 1,
            "node": self.index,
            "model": node.model_name,
            "frozen": node.frozen,
            "train_loss": loss_sum.item() / trained if not node.frozen else None,
            "train_acc": correct.item() * 100.0 / (n * cfg.train.batch_size),
            "lr": node.lr,
            "skipped_steps": skipped,
            "train_time_s": time.perf_counter() - t0,
            **edges,
            **weights,
        }

    def _check_finite(self, first_bad: torch.Tensor, bad_edges: torch.Tensor, epoch: int) -> None:
        """One small all-gather per epoch: if any node's loss went NaN/inf, every node raises
        the same error, naming the node, step and edges where it started, so the whole group
        stops together."""
        m = len(self.cfg.graph.nodes)
        mask = torch.zeros(m, dtype=torch.int64, device=self.device)  # which sources' edges were bad
        if len(self.node.edges):
            src = torch.tensor([s for s, _, _ in self.node.edges], device=self.device)
            mask[src] = bad_edges.to(torch.int64)
        info = torch.cat([first_bad.reshape(1), mask])
        every = self.exchange.all_gather({"bad": info})["bad"].tolist()
        bad = [(row[0], i, row[1:]) for i, row in enumerate(every) if row[0] >= 0]
        if bad:
            step, node, edge_mask = min(bad)
            edges = ", ".join("label edge" if s == node else f"edge {s} -> {node}" for s, b in enumerate(edge_mask) if b)
            raise NonFiniteLossError(
                f"non-finite training loss on node {node} at step {step} (epoch {epoch + 1}) in {edges or 'its loss'}"
                + (f"; later also on node(s) {sorted({i for _, i, _ in bad} - {node})}" if len(bad) > 1 else "")
                + "; lower optim.lr, or set train.nonfinite=skip to skip such steps"
            )

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch and evaluate: this node's row of the epoch's metrics."""
        metrics = self.train_epoch(epoch)
        metrics.update(self.evaluate())
        metrics["_first_step_at"] = self.first_step_at  # "_": for the driver, not recorded
        return metrics

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Val and test accuracy of this node, and of the ensemble (mean softmax of all
        nodes, through one all-gather of the eval logits)."""
        bs = self.cfg.train.eval_batch_size
        splits = {"val": self.data.val, "test": self.data.test}
        logits = {k: predict(self.node.model, s, bs, self.batches) for k, s in splits.items() if s is not None}
        every = self.exchange.all_gather(logits)
        out: dict[str, Any] = {"val_acc": None, "ensemble_val_acc": None}
        for k, s in splits.items():
            if s is None:
                continue
            out[f"{k}_acc"] = accuracy(logits[k], s.y)
            out[f"ensemble_{k}_acc"] = accuracy(torch.softmax(every[k].float(), dim=2).mean(0), s.y)
        return out

    # --- state ----------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {
            "model": self.node.model_name,
            "num_classes": self.data.info.num_classes,
            "in_channels": self.data.info.in_channels,
            "dataset": self.data.name,
            "node": self.index,
            "frozen": self.node.frozen,
        }

    def state(self) -> dict[str, Any]:
        return {**self.node.state_dict(), "step": self.step, "epoch": self.epoch, "meta": self.meta(),
                "torch_rng": torch.get_rng_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()`` of an earlier run of the same node (same config)."""
        self.node.load_state_dict(state)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self) -> Optional[str]:
        """Write this node's final state (atomically; ``<run_dir>/node<i>.pt``)."""
        return None if self.files is None else str(self.files.save_final(self.state()))

    def save_group_checkpoint(self) -> None:
        """This node's share of the group checkpoint at the current epoch boundary."""
        if self.files is not None:
            self.files.save_epoch(self.epoch, self.state())
