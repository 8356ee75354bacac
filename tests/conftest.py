import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from coordinator.hydra_conf import register_defaults  # noqa: E402

register_defaults()  # conf/config.yaml's ktg_defaults, for the tests that compose with hydra's API


@pytest.fixture
def one_thread():
    """Bitwise comparisons against spawned single-threaded nodes need one thread here too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def ray_cluster():
    """A local Ray cluster of 4 logical CPUs, started once and kept for the tests that come
    after (``ray.init`` costs seconds); started again if a test shut it down."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown():
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()


# --- real runs shared by several test modules (made once per session) ----------------------------

@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    """A real 3-node digits run (convnets, 3 epochs) with an offline wandb run."""
    from coordinator.local import run_local
    from tests.helpers import WANDB_RUN_GATES, small_config

    run_dir = tmp_path_factory.mktemp("wandb-run")
    cfg = small_config(["convnet", "convnet", "convnet"], WANDB_RUN_GATES, train={"epochs": 3, "batch_size": 64, "num_threads": 1},
                       logger={"backend": "wandb", "mode": "offline", "project": "ktg-test", "group": "exp-1"})
    summary = run_local(cfg, run_dir, timeout_s=300)
    return run_dir, summary


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory):
    import ray

    if not ray.is_initialized():  # the cluster of ``ray_cluster``
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    return _tiny_search(tmp_path_factory)


def _tiny_search(tmp_path_factory):
    """6 two-node trials of 4 epochs (8 steps each) sampled by Optuna's TPE, each packed into one actor
    (search.processes_per_trial=1), two at a time on warm groups; learning rate searched too,
    1e6 makes a trial fail; each cross edge's kind too (kl, or kl + rkd_distance)."""
    import csv

    from coordinator.search import SearchConfig, run_search

    out = tmp_path_factory.mktemp("search") / "exp-tiny-digits"
    s = SearchConfig(name="tiny", num_nodes=2, target_model="convnet", zoo=["convnet"], num_samples=6,
                     max_epochs=4, grace_period=1, reduction_factor=2, num_cpus=4, verbose=0,
                     teachers_dir=str(out.parent / "no-teachers"), extra={"optim.lr": [0.05, 0.1, 1.0e6]},
                     processes_per_trial=1, searcher="optuna", edge_kinds=["kl", "kl+rkd_distance"])
    base = {
        "dataset": {"name": "digits", "val_fraction": 0.15, "crop_pad": 1, "flip": False},
        "optim": {"lr": 0.05, "schedule": "cosine", "milestones": [], "warmup_epochs": 0},
        "train": {"batch_size": 64, "num_threads": 1, "max_steps_per_epoch": 8}, "logger": {"backend": "none"}, "seed": 0,
    }
    summary = run_search(s, base, out, seed=1)  # a seed whose 6 samples hold a warm trial, an ASHA stop, a failure
    rows = list(csv.DictReader(open(out / "trials.csv")))
    return summary, rows, out
