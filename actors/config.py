"""Typed run configuration. Hydra's DictConfig is turned into these plain, picklable
dataclasses once, at the edge (``RunConfig.from_dict``); every field is validated there,
before any training process does work, and an error names the field and the allowed values.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional

from actors.data import DATASETS
from actors.errors import ConfigError
from actors.graph import GraphSpec
from actors.placement import check_form

SCHEDULES = ("multistep", "cosine", "constant")
SCHEDULE_STEPS = ("iteration", "epoch")
PAD_MODES = ("reflect", "zeros")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
NONFINITE = ("stop", "skip")
PRECISIONS = ("fp32", "bf16")
PROGRESS = ("auto", "bar", "lines", "off")


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(value: Any, name: str, integer: bool = True, allow_zero: bool = False) -> None:
    number = (int,) if integer else (int, float)
    ok_type = isinstance(value, number) and not isinstance(value, bool)
    if not ok_type or value < 0 or (value == 0 and not allow_zero):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}; got {value!r}")


@dataclass
class DatasetConfig:
    name: str = "digits"
    """One of the registered datasets: digits, cifar10, cifar100, tiny_imagenet."""
    root: str = "data"
    """Folder that holds the dataset's own folder (e.g. ``data/cifar-10-batches-py``)."""
    download: bool = False
    """Download through torchvision when missing (CIFAR only; needs network)."""
    val_fraction: float = 0.1
    """Fraction of the training set held out for validation (the search's metric); 0 = none."""
    split_seed: int = 0
    """Seed of the train/val split, independent of the run seed."""
    crop_pad: int = 4
    """Padding before the random crop back to the input size; 0 disables cropping."""
    pad_mode: str = "reflect"
    """How the crop's padding is filled: reflect (DCL) or zeros (black pixels, before any
    normalisation: torchvision's ``RandomCrop(padding=4)``, the reimplementation)."""
    flip: bool = True
    """Random horizontal flips."""
    normalize: bool = False
    """Normalise by the dataset's channel mean/std (the DCL code does not)."""
    label_noise: float = 0.0
    """Symmetric label noise, a rate in [0, 1): exactly that fraction of the train and of the
    val labels is replaced by a uniformly drawn other class (the test labels stay clean); the
    draw depends on ``split_seed`` only. 0 = clean labels. See docs/label-noise.md."""

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ConfigError(f"dataset.name: unknown dataset {self.name!r}; known: {', '.join(DATASETS.names())}")
        self.name = DATASETS.canonical(self.name)
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction must be in [0, 1); got {self.val_fraction!r}")
        if isinstance(self.label_noise, bool) or not isinstance(self.label_noise, (int, float)) or not 0 <= self.label_noise < 1:
            raise ConfigError(f"dataset.label_noise must be a number in [0, 1); got {self.label_noise!r}")
        _positive(self.crop_pad, "dataset.crop_pad", allow_zero=True)
        _choice(self.pad_mode, PAD_MODES, "dataset.pad_mode")


@dataclass
class OptimConfig:
    """SGD with an iteration-wise learning-rate schedule."""

    lr: float = 0.1
    """Peak learning rate (after the warm-up)."""
    momentum: float = 0.9
    """SGD momentum (0 = none)."""
    nesterov: bool = True
    """Nesterov momentum (needs momentum > 0)."""
    weight_decay: float = 5e-4
    """L2 weight decay of SGD."""
    schedule: str = "multistep"
    """multistep (x gamma at each milestone epoch), cosine (to 0 at the end), constant."""
    schedule_step: str = "iteration"
    """When the learning rate changes: every iteration (default), or once an epoch (the
    value of the epoch's first step held through it: cosine then equals
    ``CosineAnnealingLR(T_max=epochs)`` stepped once an epoch, as the reimplementation)."""
    milestones: list[int] = field(default_factory=lambda: [60, 120, 180])
    """schedule=multistep: the epochs at which the learning rate is multiplied by gamma (increasing)."""
    gamma: float = 0.1
    """schedule=multistep: the factor applied at each milestone."""
    warmup_epochs: float = 0.0
    """Linear warm-up from 0 over this many epochs (0 = none)."""

    def __post_init__(self) -> None:
        _positive(self.lr, "optim.lr", integer=False)
        _positive(self.momentum, "optim.momentum", integer=False, allow_zero=True)
        _positive(self.weight_decay, "optim.weight_decay", integer=False, allow_zero=True)
        _positive(self.warmup_epochs, "optim.warmup_epochs", integer=False, allow_zero=True)
        _choice(self.schedule, SCHEDULES, "optim.schedule")
        _choice(self.schedule_step, SCHEDULE_STEPS, "optim.schedule_step")
        self.milestones = list(self.milestones or [])
        if any(not isinstance(m, int) or m <= 0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ConfigError(f"optim.milestones must be increasing positive epochs; got {self.milestones!r}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0")


@dataclass
class TrainConfig:
    epochs: int = 200
    """Epochs to train; the learning-rate schedule spans them (the optim= presets set it)."""
    batch_size: int = 64
    """Per step; every node sees the same batch. The last partial batch is dropped."""
    eval_batch_size: int = 500
    """Batch size of the validation and test passes (no effect on the results)."""
    check_batch_every: int = 1
    """Compare every node's batch fingerprint with node 0's every N steps (0 = never)."""
    num_threads: int = 0
    """torch intra-op threads per process (0 = leave torch's/torchrun's default; torchrun
    sets 1 when it starts more than one process)."""
    pin_cpus: bool = True
    """CPU runs under torchrun: each node process binds itself to its own slice of the cores
    it may use (``os.sched_getaffinity``), local rank r of n to the r-th of n disjoint slices
    (faster than leaving the processes to the OS scheduler). Not when there are fewer cores than
    processes on the machine, nor on GPU runs (see ``torchrun --numa-binding``), nor in a
    search's Ray actors. false: leave placing them to the OS (e.g. when the launcher binds them)."""
    log_every: int = 0
    """With progress=lines: a line every N steps on rank 0 (0 = auto: ~5 per epoch when an
    epoch has >= 200 steps). On an accelerator, also how often the batch check is read."""
    progress: str = "auto"
    """Rank 0's progress within an epoch: bar (redrawn in place), lines (every log_every
    steps), off, or auto (bar on a terminal, lines otherwise). Other ranks print nothing."""
    checkpoint_every: int = 1
    """Save the whole group's state (every node: model, optimiser, schedule, step, RNG) every
    N epochs under <run_dir>/checkpoints/ (0 = never); each node's final state is always
    written to <run_dir>/node<i>.pt."""
    keep_checkpoints: int = 2
    """Group checkpoints kept on disk (the newest)."""
    resume: bool = True
    """Continue from <run_dir>/checkpoints/ when it holds a checkpoint (a torchrun restart
    after a failure, or a re-run with hydra.run.dir=<that run>)."""
    nonfinite: str = "stop"
    """A NaN/inf loss: stop (the group ends with a message naming node, step and edge) or
    skip (that node skips the update of that step; counted as skipped_steps)."""
    max_steps_per_epoch: int = 0
    """Cap on the steps of each epoch (0 = the whole training set): a quick look at whether
    a preset starts and runs, e.g. ``train.epochs=1 train.max_steps_per_epoch=3``."""
    precision: str = "fp32"
    """fp32, or bf16: the forward under bf16 autocast (losses, exchange and weights stay fp32)."""
    channels_last: bool = False
    """Models and batches in channels_last memory format (faster convolutions on GPUs)."""
    compile: bool = False
    """torch.compile each node's model (the first steps are slow while it compiles)."""

    def __post_init__(self) -> None:
        _positive(self.epochs, "train.epochs")
        _positive(self.batch_size, "train.batch_size")
        _positive(self.eval_batch_size, "train.eval_batch_size")
        _positive(self.check_batch_every, "train.check_batch_every", allow_zero=True)
        _positive(self.num_threads, "train.num_threads", allow_zero=True)
        _positive(self.log_every, "train.log_every", allow_zero=True)
        _choice(self.progress, PROGRESS, "train.progress")
        _positive(self.checkpoint_every, "train.checkpoint_every", allow_zero=True)
        _positive(self.keep_checkpoints, "train.keep_checkpoints")
        _choice(self.nonfinite, NONFINITE, "train.nonfinite")
        _positive(self.max_steps_per_epoch, "train.max_steps_per_epoch", allow_zero=True)
        _choice(self.precision, PRECISIONS, "train.precision")
        for key in ("channels_last", "compile", "pin_cpus"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"train.{key} must be true or false; got {getattr(self, key)!r}")


@dataclass
class LoggerConfig:
    backend: str = "none"
    """wandb or none. metrics.jsonl and summary.json are written either way."""
    mode: str = "offline"
    """wandb mode: offline (default; ``wandb sync`` later), online, disabled."""
    project: str = "ktg"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (user or team); null = wandb's default."""
    group: Optional[str] = None
    """wandb group of the run (a search groups its trials by the experiment)."""
    tags: list[str] = field(default_factory=list)
    """wandb tags of the run."""

    def __post_init__(self) -> None:
        _choice(self.backend, LOGGERS, "logger.backend")
        _choice(self.mode, WANDB_MODES, "logger.mode")


@dataclass
class RunConfig:
    graph: GraphSpec
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    """Seed of the models' initialisation, the batch order and the augmentation."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu or cuda (one GPU per
    node: cuda:LOCAL_RANK)."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl on cuda, gloo on cpu), gloo or nccl."""
    dist_timeout_s: float = 300.0
    """Timeout of every collective: a node that stops answering ends the group after this."""
    placement: Any = "auto"
    """Which graph nodes each process hosts when fewer processes than nodes are started
    (``torchrun --nproc_per_node=P``, P <= M): auto (one node per process when P = M, else
    balanced), balanced (greedy longest-first on each node's training FLOPs per image), or a
    list of P lists of node indices, e.g. ``'placement=[[0,2],[1]]'``. Node t keeps index t
    everywhere. Not a setting a resume must keep: a run may resume with another P."""

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer; got {self.seed!r}")
        _choice(self.device, DEVICES, "device")
        _choice(self.backend, BACKENDS, "backend")
        if self.backend == "nccl" and self.device == "cpu":
            raise ConfigError("backend=nccl needs device=cuda (or auto on a CUDA machine); use backend=gloo on CPU")
        _positive(self.dist_timeout_s, "dist_timeout_s", integer=False)
        if isinstance(self.placement, (list, tuple)):
            self.placement = [list(nodes) if isinstance(nodes, (list, tuple)) else nodes for nodes in self.placement]
        check_form(self.placement)  # the nodes and the number of lists: check_placement, against the graph and P, at the start

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Optional[str] = None) -> "RunConfig":
        """Build from a plain (resolved) mapping, e.g. ``OmegaConf.to_container(cfg, resolve=True)``.
        Keys the trainer does not use (``hydra``, ``mode``, ...) are ignored at the top level;
        unknown keys inside a section are an error. Relative checkpoint paths are resolved
        against ``base_dir`` (default: the current directory)."""
        kwargs: dict[str, Any] = {}
        if "graph" not in data:
            raise ConfigError("graph is missing: choose a preset with graph=<name> (see conf/graph/)")
        kwargs["graph"] = GraphSpec.from_dict(dict(data["graph"]))
        kwargs["graph"].resolve_paths(base_dir or os.getcwd())
        for key, klass in SECTIONS.items():
            if key in data and data[key] is not None:
                kwargs[key] = _build(klass, data[key], key)
        for key in TOP_LEVEL:
            if key in data:
                kwargs[key] = data[key]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"dataset": DatasetConfig, "optim": OptimConfig, "train": TrainConfig, "logger": LoggerConfig}
"""RunConfig's sections (besides ``graph``): ``<section>.<key>`` on the command line."""
TOP_LEVEL: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "graph" and f.name not in SECTIONS)
"""RunConfig's top-level settings: seed, device, backend, dist_timeout_s, placement."""


def defaults_dict(sections: tuple[str, ...] = ("train",)) -> dict[str, Any]:
    """The defaults of RunConfig's top-level settings and of ``sections``, as a plain mapping
    (YAML-able values): the one source of the defaults that ``conf/config.yaml`` starts from
    (``coordinator.hydra_conf`` registers it with hydra). Sections a config group provides
    (dataset=, optim=, logger=, graph=) are left to their presets by default."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in TOP_LEVEL:
            out[f.name] = f.default
    for name in sections:
        out[name] = dataclasses.asdict(SECTIONS[name]())
    return out


def field_docs(klass: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``klass`` (its source's string
    literal after the field), whitespace-normalised; fields without one are left out."""
    body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
    return {stmt.target.id: " ".join(nxt.value.value.split()) for stmt, nxt in zip(body, body[1:])
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}


def _build(klass: type, data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a mapping; got {data!r}")
    allowed = [f.name for f in dataclasses.fields(klass)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return klass(**data)
