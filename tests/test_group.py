"""The Ray actor group: a graph's nodes as Ray actors run the same worker as torchrun, a
group packed into fewer actors trains the same nodes, and a group rebuilt from its
per-epoch states, in any packing, continues exactly (what a retried or resumed search
trial does), and a warm group (the next search trial on the same actors) trains a graph
exactly as a fresh group does."""
import pytest
import torch

from tests.helpers import small_config

T = "Through"


def test_group_restored_from_states_or_warm_continues_exactly(ray_cluster, tmp_path):
    from coordinator.group import ActorGroup

    cfg = small_config(["convnet", "convnet"], [[T, "Linear"], ["Correct", T]], train__epochs=2)
    straight = ActorGroup(cfg, str(tmp_path / "a"))
    rows_a = [straight.run_epoch(e) for e in range(2)]
    final_a = straight.states()
    straight.shutdown()

    first = ActorGroup(cfg, str(tmp_path / "b"), processes=1)  # packed: both nodes in one actor
    assert len(first.actors) == 1
    rows_first = first.run_epoch(0)
    saved = first.states()
    first.shutdown()  # the trial dies here
    resumed = ActorGroup(cfg, str(tmp_path / "b"), states=saved)  # restored into one actor per node
    rows_b = resumed.run_epoch(1)
    final_b = resumed.states()

    # warm: these actors get a trial with another graph and learning rate, stopped after one
    # epoch (as ASHA stops one), then this graph again: the same epochs as the fresh group
    warm = resumed
    other = small_config(["convnet", "convnet"], [["Linear", "Cutoff"], [T, T]], train__epochs=4, optim__lr=0.2)
    warm.reset(other, str(tmp_path / "c0"))
    warm.run_epoch(0)
    assert warm.fits(cfg) is None and "1 processes instead of 2" in warm.fits(cfg, processes=1)
    slower = small_config(["convnet", "convnet"], [[T, "Linear"], ["Correct", T]], train__epochs=2, dist_timeout_s=77)
    assert "dist_timeout_s changed from 300.0 to 77" in warm.fits(slower)  # fixed when the group formed
    warm.reset(cfg, str(tmp_path / "c"))
    rows_c = [warm.run_epoch(e) for e in range(2)]
    final_c = warm.states()
    warm.shutdown()

    strip = lambda rows: [{k: v for k, v in m.record().items() if not k.endswith("time_s")} for m in rows]  # noqa: E731
    assert strip(rows_first) == strip(rows_a[0]) and strip(rows_b) == strip(rows_a[1])
    assert [strip(r) for r in rows_c] == [strip(r) for r in rows_a]
    for a, b, c in zip(final_a, final_b, final_c):
        assert a["step"] == b["step"] == c["step"] == 2 * (1222 // 32)
        assert all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
        assert all(torch.equal(a["optimizer"]["state"][i]["momentum_buffer"], c["optimizer"]["state"][i]["momentum_buffer"])
                   for i in a["optimizer"]["state"])


def test_a_killed_actor_fails_the_group_fast(ray_cluster, tmp_path):
    """A node actor that dies mid-epoch makes the driver's ray.get raise at once (a Tune
    trial is then marked failed); shutdown leaves no actor of the group alive."""
    import time

    import ray
    from ray.exceptions import RayActorError

    from coordinator.group import ActorGroup

    cfg = small_config(["convnet", "convnet"], [[T, T], [T, T]], train__epochs=50)
    group = ActorGroup(cfg, str(tmp_path))
    pending = [a.run_epoch.remote(0) for a in group.actors]
    time.sleep(0.2)
    ray.kill(group.actors[1], no_restart=True)
    t0 = time.time()
    with pytest.raises(RayActorError):
        ray.get(pending, timeout=120)
    assert time.time() - t0 < 60
    survivor = group.actors[0]
    group.shutdown()
    with pytest.raises(RayActorError):
        ray.get(survivor.states.remote(), timeout=60)

