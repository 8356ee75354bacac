"""Datasets as uint8 tensors, and augmentation done on the tensor's own device.

A dataset is loaded once per node process into ``[N, C, H, W]`` uint8 (+ int64 labels)
and moved to the node's device. Augmentation (reflect- or zero-pad + random crop, horizontal flip)
is applied per sample *with parameters from the epoch's batch plan* (drawn by rank 0; see
``actors.batch_order``), so every node of a graph holds bitwise the same augmented
batch, and no DataLoader worker sits in the hot path.

Datasets:

- ``digits``: scikit-learn's bundled 8x8 greyscale digits (1797 images, 10 classes). No
  download. A fixed 20% is the test split.
- ``cifar10`` / ``cifar100``: torchvision's on-disk format (``cifar-10-batches-py/``,
  ``cifar-100-python/`` under ``root``), read directly; downloaded through torchvision
  when ``download`` is true and the network allows.
- ``tiny_imagenet``: the standard ``tiny-imagenet-200/`` folder layout; the labelled
  ``val/`` split serves as the test set. Decoded once into a tensor cache beside it.

The validation split is carved from the training set with ``split_seed`` (independent of
the run seed, so it is the same for every run).

``label_noise`` (symmetric label noise, off by default): after the split, exactly
``round(r * n)`` labels of the training split and of the validation split are replaced by a
class drawn uniformly from the *other* classes; the test split stays clean. The draw depends
on ``split_seed`` only (its own generator, so the split itself does not move): every node and
process holds the same labels. See docs/label-noise.md.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from actors.registry import Registry


class DatasetError(RuntimeError):
    """A dataset is missing or malformed; the message names the expected path."""


@dataclass
class Split:
    x: torch.Tensor  # [N, C, H, W] uint8
    y: torch.Tensor  # [N] int64: the labels trained and evaluated on (noisy under label_noise)
    y_clean: Optional[torch.Tensor] = None  # [N] int64: the original labels, set only when label noise changed y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device), self.y_clean.to(device) if self.y_clean is not None else None)


@dataclass
class DatasetInfo:
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Dataset:
    name: str
    info: DatasetInfo
    train: Split
    val: Optional[Split]
    test: Split
    label_noise: float = 0.0
    """The symmetric label-noise rate applied to train and val (0 = clean labels)."""
    noisy_labels: dict[str, int] = field(default_factory=dict)
    """How many labels label noise changed, per split: ``{"train": k, "val": k}`` (val only
    when there is a validation split; 0 without noise; the test split is never changed)."""

    def to(self, device: torch.device) -> "Dataset":
        return Dataset(self.name, self.info, self.train.to(device), self.val.to(device) if self.val else None,
                       self.test.to(device), self.label_noise, dict(self.noisy_labels))


# name -> (info, loader(root, download) -> (train Split, test Split))
DATASETS: Registry[tuple[DatasetInfo, Callable[[str, bool], tuple[Split, Split]]]] = Registry("dataset")


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name)[0]


# the label-noise generator is seeded with split_seed + this offset: its own stream, so the
# train/val split (seeded with split_seed) is the same with and without noise
LABEL_NOISE_SEED_OFFSET = 0x4E015E


def corrupt_labels(y: torch.Tensor, rate: float, num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Symmetric label noise: exactly ``round(rate * len(y))`` samples (a random permutation's
    first) get a label drawn uniformly from the other ``num_classes - 1`` classes. Returns
    the new labels (a copy) and how many were changed."""
    n = int(y.shape[0])
    k = int(round(rate * n))
    out = y.clone()
    if k == 0 or num_classes < 2:
        return out, 0
    chosen = torch.randperm(n, generator=generator)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=generator, dtype=y.dtype)  # 1..C-1: never the same class
    out[chosen] = (y[chosen] + shift) % num_classes
    return out, k


def load_dataset(name: str, root: str = "data", val_fraction: float = 0.0, split_seed: int = 0, download: bool = False,
                 label_noise: float = 0.0) -> Dataset:
    """Load a registered dataset as CPU uint8 tensors with a seeded train/val split, and
    ``label_noise`` (a rate in [0, 1)) applied to the train and val labels."""
    if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) or not 0 <= label_noise < 1:
        raise ValueError(f"label_noise must be a number in [0, 1); got {label_noise!r}")
    info, loader = DATASETS.get(name)
    train, test = loader(root, download)
    val = None
    if val_fraction > 0:
        g = torch.Generator().manual_seed(int(split_seed))
        perm = torch.randperm(len(train), generator=g)
        n_val = int(round(len(train) * val_fraction))
        vi, ti = perm[:n_val].sort().values, perm[n_val:].sort().values
        train, val = Split(train.x[ti], train.y[ti]), Split(train.x[vi], train.y[vi])
    noisy_labels = {"train": 0, **({"val": 0} if val is not None else {})}
    if label_noise > 0:
        g = torch.Generator().manual_seed(int(split_seed) + LABEL_NOISE_SEED_OFFSET)
        y, noisy_labels["train"] = corrupt_labels(train.y, label_noise, info.num_classes, g)
        train = Split(train.x, y, train.y)
        if val is not None:
            y, noisy_labels["val"] = corrupt_labels(val.y, label_noise, info.num_classes, g)
            val = Split(val.x, y, val.y)
    return Dataset(DATASETS.canonical(name), info, train, val, test, float(label_noise), noisy_labels)


# --- digits -------------------------------------------------------------------------------


def _load_digits(root: str, download: bool) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)  # [1797,1,8,8]
    y = torch.from_numpy(d.target.astype(np.int64))
    # digits has no official test split: a fixed 20% (seed 0, independent of any run seed)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
    return Split(x[tr], y[tr]), Split(x[te], y[te])


DATASETS.register("digits")((DatasetInfo(10, 1, 8, (0.305,), (0.386,)), _load_digits))


# --- CIFAR-10 / CIFAR-100 (torchvision's python pickle format) ----------------------------

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "CIFAR100"),
}


def _read_cifar_files(folder: Path, files: list[str], label_key: bytes) -> Split:
    xs, ys = [], []
    for f in files:
        path = folder / f
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            labels = np.asarray(entry[label_key], dtype=np.int64)
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated pickle, wrong keys, ...
            raise DatasetError(f"{path} is not a readable CIFAR batch file ({type(e).__name__}: {e}); delete it and download again") from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DatasetError(f"{path}: expected data of shape [N, 3072] and N labels, got {data.shape} and {len(labels)}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def _cifar_loader(name: str) -> Callable[[str, bool], tuple[Split, Split]]:
    sub, train_files, test_files, key, tv_class = _CIFAR[name]

    def load(root: str, download: bool) -> tuple[Split, Split]:
        folder = Path(root) / sub
        missing = [f for f in train_files + test_files if not (folder / f).is_file()]
        if missing and download:
            try:
                import torchvision

                getattr(torchvision.datasets, tv_class)(root=root, train=True, download=True)
            except Exception as e:  # no network, bad proxy, ...
                raise DatasetError(
                    f"{name}: {folder} is missing {', '.join(missing)} and the download failed ({type(e).__name__}: {e}). "
                    f"Put the extracted torchvision archive there, or point dataset.root at its parent."
                ) from e
            missing = [f for f in train_files + test_files if not (folder / f).is_file()]
        if missing:
            raise DatasetError(
                f"{name}: expected torchvision's extracted archive at {folder.resolve()} ({', '.join(missing)} missing). "
                f"Set dataset.download=true on a machine with network, or dataset.root=<parent of {sub}>."
            )
        return _read_cifar_files(folder, train_files, key), _read_cifar_files(folder, test_files, key)

    return load


DATASETS.register("cifar10")((DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), _cifar_loader("cifar10")))
DATASETS.register("cifar100")((DatasetInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), _cifar_loader("cifar100")))


# --- Tiny-ImageNet (standard folder layout) -----------------------------------------------

TINY_DIR = "tiny-imagenet-200"
TINY_CACHE = "ktg-tensors.pt"


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (64, 64, 3):
        raise DatasetError(f"{path}: expected a 64x64 image, got {arr.shape[:2]}")
    return arr.transpose(2, 0, 1)


def _load_tiny_imagenet(root: str, download: bool) -> tuple[Split, Split]:
    folder = Path(root) / TINY_DIR
    cache = folder / TINY_CACHE
    if cache.is_file():
        d = torch.load(cache, weights_only=True)
        return Split(d["train_x"], d["train_y"]), Split(d["test_x"], d["test_y"])
    wnids_file, ann_file = folder / "wnids.txt", folder / "val" / "val_annotations.txt"
    for p in (wnids_file, ann_file, folder / "train"):
        if not p.exists():
            raise DatasetError(
                f"tiny_imagenet: {p.resolve()} not found. Expected the standard layout under {folder.resolve()}: "
                "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt "
                "(unzip tiny-imagenet-200.zip into dataset.root)."
            )
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    train_x, train_y = [], []
    for w in wnids:
        files = sorted((folder / "train" / w / "images").glob("*.JPEG"))
        if not files:
            raise DatasetError(f"tiny_imagenet: no images in {folder / 'train' / w / 'images'}")
        for f in files:
            train_x.append(_read_image(f))
            train_y.append(index[w])
    test_x, test_y = [], []
    for line in ann_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise DatasetError(f"{ann_file}: class {parts[1]!r} of {parts[0]} is not in wnids.txt")
        test_x.append(_read_image(folder / "val" / "images" / parts[0]))
        test_y.append(index[parts[1]])
    d = {
        "train_x": torch.from_numpy(np.stack(train_x)),
        "train_y": torch.tensor(train_y, dtype=torch.int64),
        "test_x": torch.from_numpy(np.stack(test_x)),
        "test_y": torch.tensor(test_y, dtype=torch.int64),
    }
    try:  # cache the decoded tensors (atomically) so later runs skip 110k JPEG decodes
        from actors.files import atomic_save

        atomic_save(d, cache)
    except OSError:
        pass
    return Split(d["train_x"], d["train_y"]), Split(d["test_x"], d["test_y"])


DATASETS.register("tiny_imagenet", "tinyimagenet")(
    (DatasetInfo(200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)), _load_tiny_imagenet)
)


# --- augmentation on device ---------------------------------------------------------------


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float in [0, 1]."""
    return x.float().div_(255.0)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A float batch [B,C,H,W] normalised by per-channel ``mean`` and ``std`` ([C] each)."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment(x: torch.Tensor, offsets: torch.Tensor, flips: Optional[torch.Tensor], pad: int,
            pad_mode: str = "reflect") -> torch.Tensor:
    """Per-sample pad + crop and horizontal flip of a float batch, on its device. The padding
    is ``reflect`` (DCL) or ``zeros`` (black pixels of the [0, 1] image, as torchvision's
    ``RandomCrop(padding=...)``; normalisation comes after).

    ``offsets``: [B, 2] int64 crop corners (dy, dx) in [0, 2*pad]; ``flips``: [B] bool, or
    None for no flipping. The parameters come from the batch plan (rank 0's), so the result is
    identical on every node. No host-device synchronisation.
    """
    b, _, h, w = x.shape
    if pad > 0:
        if pad_mode == "reflect":
            xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        elif pad_mode == "zeros":
            xp = F.pad(x, (pad, pad, pad, pad), mode="constant", value=0.0)
        else:
            raise ValueError(f"pad_mode must be reflect or zeros; got {pad_mode!r}")
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # [B, H]
        cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # [B, W]
        bi = torch.arange(b, device=x.device)[:, None, None]
        # advanced indices around a slice: result is [B, H, W, C]
        x = xp[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if flips is not None:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
    return x
