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


# --- symmetric label noise (dataset.label_noise) --------------------------------------------


def test_label_noise_changes_exactly_that_fraction_of_train_and_val_and_no_test_label():
    clean = load_dataset("digits", val_fraction=0.15, split_seed=0)
    for r in (0.1, 0.4, 0.9):
        d = load_dataset("digits", val_fraction=0.15, split_seed=0, label_noise=r)
        n_train, n_val = round(r * len(clean.train)), round(r * len(clean.val))
        assert int((d.train.y != clean.train.y).sum()) == n_train and int((d.val.y != clean.val.y).sum()) == n_val
        assert d.noisy_labels == {"train": n_train, "val": n_val} and d.label_noise == r
        assert torch.equal(d.test.y, clean.test.y) and torch.equal(d.test.x, clean.test.x)  # the test split stays clean
        assert d.test.y_clean is None
        # the clean labels are kept beside the noisy ones
        assert torch.equal(d.train.y_clean, clean.train.y) and torch.equal(d.val.y_clean, clean.val.y)
    d = load_dataset("digits", val_fraction=0.15, split_seed=0, label_noise=0.4)
    assert (d.noisy_labels["train"], d.noisy_labels["val"]) == (489, 86)  # round(0.4 * 1222), round(0.4 * 216)
    assert d.train.y.dtype == torch.int64 and int(d.train.y.min()) >= 0 and int(d.train.y.max()) < 10


def test_label_noise_never_keeps_the_clean_class_and_spreads_over_every_other_class():
    clean = load_dataset("digits", val_fraction=0.15, split_seed=0)
    d = load_dataset("digits", val_fraction=0.15, split_seed=0, label_noise=0.5)
    for noisy, orig in ((d.train.y, clean.train.y), (d.val.y, clean.val.y)):
        changed = noisy != orig
        assert not torch.equal(noisy, orig)
        assert (noisy[changed] != orig[changed]).all()
    changed = d.train.y != clean.train.y
    wrong = d.train.y[changed]
    assert set(wrong.tolist()) == set(range(10))  # every class appears as a wrong label
    for c in range(10):  # and each clean class is sent to every one of the 9 others
        assert set(wrong[clean.train.y[changed] == c].tolist()) == set(range(10)) - {c}
    # roughly uniform: 611 wrong labels over 10 classes, about 61 each
    counts = torch.bincount(wrong, minlength=10)
    assert int(counts.min()) > 30 and int(counts.max()) < 100


def test_label_noise_depends_on_split_seed_only_and_leaves_the_split_alone():
    a = load_dataset("digits", val_fraction=0.15, split_seed=0, label_noise=0.4)
    b = load_dataset("digits", val_fraction=0.15, split_seed=0, label_noise=0.4)
    assert torch.equal(a.train.y, b.train.y) and torch.equal(a.val.y, b.val.y)  # every process draws the same
    other = load_dataset("digits", val_fraction=0.15, split_seed=1, label_noise=0.4)
    other_clean = load_dataset("digits", val_fraction=0.15, split_seed=1)
    assert int((other.train.y != other_clean.train.y).sum()) == round(0.4 * len(other_clean.train))
    # without a val split the samples do not depend on split_seed, the noise does
    s0 = load_dataset("digits", split_seed=0, label_noise=0.4)
    s1 = load_dataset("digits", split_seed=1, label_noise=0.4)
    assert torch.equal(s0.train.x, s1.train.x) and torch.equal(s0.train.y_clean, s1.train.y_clean)
    assert not torch.equal(s0.train.y, s1.train.y)
    assert not torch.equal(s0.train.y != s0.train.y_clean, s1.train.y != s1.train.y_clean)  # other samples chosen
    clean = load_dataset("digits", val_fraction=0.15, split_seed=0)
    # the same samples in train and val, in the same order, with and without noise
    assert torch.equal(a.train.x, clean.train.x) and torch.equal(a.val.x, clean.val.x)
    assert torch.equal(other.train.x, other_clean.train.x) and torch.equal(other.val.x, other_clean.val.x)


def test_no_label_noise_is_bitwise_the_clean_dataset():
    clean = load_dataset("digits", val_fraction=0.15, split_seed=0)
    for d in (load_dataset("digits", val_fraction=0.15, split_seed=0, label_noise=0.0),
              load_dataset("digits", val_fraction=0.15, split_seed=0, label_noise=0)):
        for s, c in ((d.train, clean.train), (d.val, clean.val), (d.test, clean.test)):
            assert torch.equal(s.x, c.x) and torch.equal(s.y, c.y) and s.y_clean is None
        assert d.noisy_labels == {"train": 0, "val": 0} and d.label_noise == 0.0
    # a rate too small to change one label changes none
    tiny = load_dataset("digits", val_fraction=0.15, split_seed=0, label_noise=1e-4)
    assert tiny.noisy_labels == {"train": 0, "val": 0} and torch.equal(tiny.train.y, clean.train.y)


def test_label_noise_without_a_val_split_and_on_device():
    clean = load_dataset("digits", val_fraction=0.0)
    d = load_dataset("digits", val_fraction=0.0, label_noise=0.2)
    assert d.val is None and d.noisy_labels == {"train": round(0.2 * len(clean.train))}
    assert int((d.train.y != clean.train.y).sum()) == d.noisy_labels["train"]
    moved = d.to(torch.device("cpu"))
    assert moved.label_noise == 0.2 and moved.noisy_labels == d.noisy_labels
    assert torch.equal(moved.train.y_clean, clean.train.y)


@pytest.mark.parametrize("rate", [-0.1, 1.0, "a", True])
def test_load_dataset_refuses_a_bad_label_noise(rate):
    with pytest.raises(ValueError, match=r"label_noise must be a number in \[0, 1\)"):
        load_dataset("digits", label_noise=rate)


def test_label_noise_reaches_the_loader_and_the_summary(tmp_path):
    from actors.metrics import NodeEpochMetrics
    from actors.preflight import load_data
    from coordinator.recorder import RunRecorder
    from coordinator.rundir import RunDir
    from tests.helpers import small_config

    cfg = small_config(["convnet"], [["Through"]], dataset__label_noise=0.4)
    data = load_data(cfg)
    assert data.label_noise == 0.4 and data.noisy_labels == {"train": 489, "val": 86}
    rec = RunRecorder(cfg, RunDir(tmp_path), cfg.to_dict())
    rec.log_epoch([NodeEpochMetrics(epoch=1, node=0, model="convnet", frozen=False, train_loss=1.0, train_acc=50.0, lr=0.1,
                                    skipped_steps=0, train_time_s=1.0, val_acc=40.0, ensemble_val_acc=40.0,
                                    test_acc=30.0, ensemble_test_acc=30.0)])
    summary = rec.finish(steps_per_epoch=3)
    assert summary["label_noise"] == 0.4
    assert list(summary)[:4] == ["graph", "dataset", "label_noise", "seed"]
    import json

    assert json.loads((tmp_path / "summary.json").read_text())["label_noise"] == 0.4
