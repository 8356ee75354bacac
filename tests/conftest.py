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


# --- test layers: unit (in-process), process (node processes, torchrun), ray -------------------------
#
# Every collected test gets exactly one layer mark, so ``pytest -m unit`` (or process, ray) runs one
# layer and the three together are the whole suite. A test's layer is, in this order: a layer mark
# written on the test itself; its entry in LAYER_EXCEPTIONS; the heaviest of RAY_FIXTURES and
# PROCESS_FIXTURES among the fixtures it uses; its file's entry in FILE_LAYERS. A test file missing
# from FILE_LAYERS, an exception naming a test its file no longer has, or two layer marks on one test
# stop the collection. A unit test that starts a process (multiprocessing, subprocess, hence Ray) is
# refused the process and fails, naming the layer it belongs to.

LAYERS = ("unit", "process", "ray")
"""Registered in pyproject.toml ([tool.pytest.ini_options] markers)."""

FILE_LAYERS = {
    "test_batch_order.py": "unit", "test_checkpoint.py": "unit", "test_config.py": "unit", "test_cpus.py": "unit",
    "test_data.py": "unit",
    "test_epochs.py": "unit", "test_errors.py": "unit", "test_fast_paths.py": "unit", "test_gates_losses.py": "unit",
    "test_gpu_path.py": "unit", "test_graph.py": "unit", "test_kind_plugin.py": "unit", "test_kinds.py": "unit",
    "test_layering.py": "unit",
    "test_metrics.py": "unit", "test_mhgd_vectors.py": "unit", "test_pictures.py": "unit", "test_placement.py": "unit",
    "test_presets.py": "unit", "test_progress.py": "unit", "test_published_modes.py": "unit", "test_recorder.py": "unit",
    "test_search.py": "unit", "test_search_resume.py": "unit",
    "test_distributed.py": "process", "test_faults.py": "process", "test_hang.py": "process", "test_launch.py": "process",
    "test_machines.py": "process", "test_packing.py": "process", "test_rundir.py": "process", "test_wandb.py": "process",
    "test_group.py": "ray",
}
"""Each test file's layer: that of most of its tests."""

LAYER_EXCEPTIONS = {
    "test_cpus.py": {"process": ["test_started_processes_are_pinned_with_every_thread"]},
    "test_distributed.py": {"unit": ["test_teacher_checkpoint_of_wrong_architecture_is_refused"]},
    "test_errors.py": {"process": ["test_run_local_raises_a_node_config_error"]},
    "test_faults.py": {"unit": ["test_unwritable_run_dir_is_refused", "test_missing_teacher_checkpoint_names_the_fix",
                                "test_resume_refuses_a_run_dir_of_a_quick_look", "test_skipped_steps_count_in_no_metric"]},
    # torch.compile runs the C++ compiler (inductor): seconds with a warm cache, far longer without
    "test_fast_paths.py": {"process": ["test_compiled_nodes_compile_before_the_first_step_and_train_like_eager_ones"]},
    "test_gpu_path.py": {"process": ["test_gpu_check_refuses_without_a_gpu_and_its_dry_run_passes"]},
    "test_hang.py": {"unit": ["test_rank_alone_at_a_tcp_rendezvous_gives_up", "test_rank_whose_peer_never_comes_names_it"]},
    "test_kind_plugin.py": {"process": ["test_a_group_trained_with_a_kind_registered_here_equals_the_single_process_reference"]},
    "test_kinds.py": {"process": ["test_group_with_every_kind_equals_the_single_process_reference_bitwise"]},
    "test_launch.py": {"unit": ["test_added_overrides_join_the_users_overrides_around_flags"]},
    "test_packing.py": {"unit": ["test_placements_that_do_not_fit_are_refused_before_any_process_starts"]},
    "test_pictures.py": {"process": ["test_bad_path_is_a_clear_error"]},
    "test_presets.py": {"process": ["test_paper_preset_runs_under_torchrun"]},
    "test_published_modes.py": {"process": [
        "test_epoch_counted_gates_in_a_run", "test_group_equals_reference_with_train_mode_teacher_epoch_gates_and_zero_loss_skip",
        "test_train_mode_teacher_drifts_its_statistics_not_its_weights_and_resumes_bitwise"]},
    "test_rundir.py": {"unit": [
        "test_a_restored_node_follows_the_schedule_of_its_own_total", "test_checkpoints_without_a_readable_config_are_not_resumed",
        "test_a_crash_during_the_first_group_checkpoint_starts_fresh", "test_a_resume_sets_aside_what_it_will_write_anew",
        "test_a_resume_with_other_settings_is_refused_naming_them"]},
    "test_search_resume.py": {"ray": ["test_an_interrupted_search_resumes_with_its_console_counts"]},
}
"""Tests whose layer is not their file's (by function name: every parametrisation)."""

RAY_FIXTURES = ("ray_cluster", "tiny_search")
PROCESS_FIXTURES = ("real_run", "finished", "one_per_process", "uninterrupted")
"""Fixtures that start Ray, or node processes (a test using one is in that layer at least)."""

IN_PROCESS_TOOLS = ("git",)
"""Programs a unit test may run: short-lived tools, not node processes."""


def _layer(item: pytest.Item) -> str:
    marked = sorted({m.name for m in item.iter_markers() if m.name in LAYERS})
    if len(marked) > 1:
        raise pytest.UsageError(f"{item.nodeid}: more than one test layer ({', '.join(marked)}); a test has one")
    if marked:
        return marked[0]
    file = item.path.name
    name = getattr(item, "originalname", item.name)
    for layer, names in LAYER_EXCEPTIONS.get(file, {}).items():
        if name in names:
            return layer
    fixtures = set(getattr(item, "fixturenames", ()))
    if fixtures & set(RAY_FIXTURES):
        return "ray"
    if fixtures & set(PROCESS_FIXTURES):
        return "process"
    if file not in FILE_LAYERS:
        raise pytest.UsageError(f"{item.nodeid}: {file} has no test layer: add it to FILE_LAYERS in tests/conftest.py")
    return FILE_LAYERS[file]


def _check_exceptions(items: list[pytest.Item]) -> None:
    """Every name in LAYER_EXCEPTIONS is a test of its file (a renamed test would fall back to its
    file's layer unseen)."""
    modules = {item.path.name: item.module for item in items if isinstance(item, pytest.Function)}
    for file, layers in LAYER_EXCEPTIONS.items():
        module = modules.get(file)
        stale = [n for names in layers.values() for n in names if module is not None and not hasattr(module, n)]
        if stale:
            raise pytest.UsageError(f"tests/conftest.py LAYER_EXCEPTIONS names tests {file} does not have: {', '.join(stale)}")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by the marks
def pytest_collection_modifyitems(config, items):
    _check_exceptions(items)
    for item in items:
        layer = _layer(item)
        item.stash[_LAYER] = layer
        if not item.get_closest_marker(layer):
            item.add_marker(layer)


_LAYER = pytest.StashKey[str]()


class StartedAProcess(RuntimeError):
    """A unit test tried to start a process."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around a unit test (its fixtures included): one torch thread (the tests are small, and on a
    machine whose cores are busy torch's thread pool waits for them: the unit layer took 4 minutes
    instead of 1.5 on 2 busy cores), and starting a process is refused; the test fails even if it
    caught the refusal."""
    if item.stash.get(_LAYER, None) != "unit":
        yield
        return
    import multiprocessing.process
    import subprocess

    started: list[str] = []

    def refuse(what: str) -> None:
        started.append(what)
        raise StartedAProcess(f"{item.nodeid} is a unit test but starts a process ({what}): give it the process "
                              "(or ray) layer in tests/conftest.py LAYER_EXCEPTIONS")

    def start(self):
        refuse(f"multiprocessing {type(self).__name__}")

    execute_child = subprocess.Popen._execute_child

    def execute(self, args, *rest, **kwargs):
        program = os.path.basename(str(args if isinstance(args, (str, bytes)) else args[0]))
        if program not in IN_PROCESS_TOOLS:
            refuse(f"subprocess {program}")
        return execute_child(self, args, *rest, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(multiprocessing.process.BaseProcess, "start", start)
    patch.setattr(subprocess.Popen, "_execute_child", execute)
    item.stash[_STARTED] = started
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        patch.undo()


_STARTED = pytest.StashKey[list]()


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request):
    yield
    started = request.node.stash.get(_STARTED, [])
    if started:
        pytest.fail(f"a unit test started a process ({started[0]}): give it the process (or ray) layer in "
                    "tests/conftest.py LAYER_EXCEPTIONS", pytrace=False)
