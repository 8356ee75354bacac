"""Datasets read from their real on-disk formats (small files written here), the digits
default, clear errors for missing data, and on-device augmentation."""

import numpy as np
import pytest
import torch

from actors.data import DatasetError, augment, load_dataset, to_float
from actors.errors import ConfigError
from tests.helpers import write_cifar


def test_digits_splits_are_fixed_and_disjoint():
    a = load_dataset("digits", val_fraction=0.15, split_seed=0)
    b = load_dataset("digits", val_fraction=0.15, split_seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (1222, 216, 359)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert a.train.x.dtype == torch.uint8 and a.train.x.shape[1:] == (1, 8, 8)
    assert a.info.num_classes == 10 and set(a.train.y.tolist()) == set(range(10))
    # no image appears in two splits
    rows = lambda s: {tuple(r) for r in s.x.view(len(s), -1).tolist()}  # noqa: E731
    assert not (rows(a.val) & rows(a.test))


def test_digits_val_split_depends_on_split_seed_only():
    a = load_dataset("digits", val_fraction=0.2, split_seed=0)
    b = load_dataset("digits", val_fraction=0.2, split_seed=1)
    assert not torch.equal(a.val.y, b.val.y)
    assert torch.equal(a.test.y, b.test.y)  # the test split never moves


@pytest.mark.parametrize("n_classes", [10, 100])
def test_cifar_reads_torchvision_format(tmp_path, n_classes):
    expected = write_cifar(tmp_path, n_classes)
    d = load_dataset(f"cifar{n_classes}", root=str(tmp_path))
    n_train = 30 if n_classes == 10 else 6
    assert len(d.train) == n_train and len(d.test) == 5
    assert d.train.x.shape[1:] == (3, 32, 32) and d.info.num_classes == n_classes
    first = "data_batch_1" if n_classes == 10 else "train"
    data, labels = expected[first]
    # channel-major rows: pixel (c, h, w) is data[c*1024 + h*32 + w]
    assert torch.equal(d.train.x[0], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert d.train.y[: len(labels)].tolist() == labels


def test_cifar_missing_names_expected_path(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py.*data_batch_1.*missing.*dataset.download=true"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar_corrupt_file_is_named(tmp_path):
    write_cifar(tmp_path, 100)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"cifar-100-python/train is not a readable CIFAR batch file"):
        load_dataset("cifar100", root=str(tmp_path))


def _write_tiny(root, wnids=("n01", "n02"), per_class=3):
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(1)
    for w in wnids:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{i}.JPEG")
    lines = []
    for i, w in enumerate(list(wnids) * 2):
        name = f"val_{i}.JPEG"
        Image.fromarray(np.full((64, 64, 3), 10 * i, dtype=np.uint8)).save(base / "val" / "images" / name)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_reads_standard_layout_and_caches(tmp_path):
    _write_tiny(tmp_path)
    d = load_dataset("tiny_imagenet", root=str(tmp_path))
    assert len(d.train) == 6 and len(d.test) == 4
    assert d.train.x.shape[1:] == (3, 64, 64) and d.info.num_classes == 200
    assert d.train.y.tolist() == [0, 0, 0, 1, 1, 1] and d.test.y.tolist() == [0, 1, 0, 1]
    cache = tmp_path / "tiny-imagenet-200" / "ktg-tensors.pt"
    assert cache.is_file()
    again = load_dataset("tiny_imagenet", root=str(tmp_path))
    assert torch.equal(again.train.x, d.train.x)


def test_tiny_imagenet_missing_names_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"tiny-imagenet-200/wnids.txt not found.*train/<wnid>/images"):
        load_dataset("tiny_imagenet", root=str(tmp_path))


def test_missing_dataset_is_a_config_error_before_training(tmp_path):
    from actors.preflight import load_data
    from tests.helpers import small_config

    cfg = small_config(["convnet"], [["Through"]], dataset={"name": "cifar10", "root": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"dataset=cifar10: .*cifar-10-batches-py"):
        load_data(cfg)


def test_batch_larger_than_dataset_is_refused():
    from actors.preflight import load_data
    from tests.helpers import small_config

    cfg = small_config(["convnet"], [["Through"]], train__batch_size=5000)
    with pytest.raises(ConfigError, match=r"train.batch_size=5000 is larger than the training split of digits \(1222"):
        load_data(cfg)


def test_augment_crops_and_flips_per_sample():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = augment(x, torch.tensor([[1, 1], [2, 0]]), torch.tensor([False, True]), pad=1)
    assert torch.equal(out[0], x[0])                        # offset (pad, pad) = identity crop
    padded = torch.nn.functional.pad(x[1:], (1, 1, 1, 1), mode="reflect")[0]
    assert torch.equal(out[1], padded[:, 2:6, 0:4].flip(2))  # shifted by (+1, -1), mirrored
    assert torch.equal(augment(x, torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.bool), 0), x)


def test_to_float_scales_uint8():
    assert torch.equal(to_float(torch.tensor([[[[0, 255]]]], dtype=torch.uint8)), torch.tensor([[[[0.0, 1.0]]]]))
