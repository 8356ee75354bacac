"""The coordinator's batch order: one seeded source of truth, and a fingerprint that
tells two different batches apart."""
import torch

from actors.batch_order import DX, DY, FLIP, PERM, BatchOrder, batch_fingerprint


def test_plan_depends_only_on_seed_and_epoch():
    o = BatchOrder(100, 16, seed=3, crop_pad=4, flip=True)
    assert torch.equal(o.epoch_plan(2), BatchOrder(100, 16, seed=3, crop_pad=4, flip=True).epoch_plan(2))
    assert not torch.equal(o.epoch_plan(2), o.epoch_plan(3))
    assert not torch.equal(o.epoch_plan(2), BatchOrder(100, 16, seed=4, crop_pad=4, flip=True).epoch_plan(2))


def test_plan_is_a_permutation_with_valid_augmentation():
    o = BatchOrder(100, 16, seed=0, crop_pad=4, flip=True)
    p = o.epoch_plan(0)
    assert sorted(p[:, PERM].tolist()) == list(range(100))
    assert p[:, DY:DX + 1].min() >= 0 and p[:, DY:DX + 1].max() <= 8
    assert set(p[:, FLIP].tolist()) == {0, 1}
    assert o.steps_per_epoch == 6  # drop_last
    assert o.batch(p, 5).shape == (16, 4)


def test_no_augmentation_when_disabled():
    p = BatchOrder(10, 2, seed=0).epoch_plan(0)
    assert p[:, DY:].abs().sum() == 0


def test_fingerprint_tells_batches_apart():
    rows = BatchOrder(50, 8, seed=0).epoch_plan(0)[:8]
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,))
    fp = batch_fingerprint(rows, x, y, step=5)
    assert torch.equal(fp, batch_fingerprint(rows.clone(), x.clone(), y.clone(), step=5))
    x2 = x.clone()
    x2[3, 0, 1, 2] = torch.nextafter(x2[3, 0, 1, 2], torch.tensor(2.0))  # one ulp on one pixel
    assert not torch.equal(fp, batch_fingerprint(rows, x2, y, step=5))
    assert not torch.equal(fp, batch_fingerprint(rows.flip(0), x, y, step=5))  # same samples, other order
    assert not torch.equal(fp, batch_fingerprint(rows, x, y, step=6))
