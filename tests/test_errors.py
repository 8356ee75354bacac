"""A user's input mistake is one clear error (ConfigError: one `error:` line, exit code 2),
found before any process does work: preset and option names on the command line, graph
files, devices the machine does not have, and a node's ConfigError under run_local."""
import pickle

import pytest
import torch

from actors.errors import ConfigError, NonFiniteLossError
from coordinator.hydra_conf import check_overrides, presets
from tests.helpers import small_config

T = "Through"


@pytest.mark.parametrize("args, message", [
    (["graph=nope"], r"^graph=nope: no such preset; available: ctsl_mkt, digits_noisy_searched, dml, dml3, dml4, dml_many, independent, "
                     r"kd, ktg3, mhgd, .*teacher \(or a graph .yaml file\)$"),
    (["dataset=mnist"], r"^dataset=mnist: no such preset; available: cifar10, cifar100, digits, digits_noisy, tiny_imagenet$"),
    (["optim=sgd"], r"^optim=sgd: no such preset; available: cpu, paper$"),
    (["logger=tensorboard"], r"^logger=tensorboard: no such preset; available: none, wandb$"),
    (["mode=search", "search=huge"], r"^search=huge: no such preset; available: paper, small$"),
    (["+experiment=cifar100_nope"], r"^experiment=cifar100_nope: no such preset; available: cifar100_ctsl_mkt, cifar100_dml2, "),
    (["train.foo=1"], r"^train: unknown key\(s\) foo; allowed: epochs, batch_size, "),
    (["optim.learning_rate=0.1"], r"^optim: unknown key\(s\) learning_rate; allowed: lr, momentum, "),
    (["graph.gate.0.0=Through"], r"^graph has unknown keys \['gate'\]; allowed: frozen_bn, gates, "),
    (["graph.nodes.0.modle=convnet"], r"^graph.nodes\[0\] has unknown keys \['modle'\]; "
                                      r"allowed: model, checkpoint, self_checkpoint, attention$"),
    (["search.num_trials=3"], r"^search: unknown key\(s\) num_trials; allowed: name, num_nodes, "),
    (["epochs=5"], r"^epochs: no such option \(did you mean train.epochs\?\); top-level options: mode, seed, device, backend, "
                   r"dist_timeout_s, placement; sections: .*; presets: dataset=, experiment=, graph=, logger=, optim=, search=$"),
])
def test_bad_names_on_the_command_line_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        check_overrides(args)


def test_good_command_lines_pass_the_name_check():
    check_overrides([
        "graph=dml", "dataset=cifar100", "optim=paper", "logger=none", "experiment=null", "search=null",
        "graph=runs/search/x/best_graph.yaml", "graph=dml,ktg3", "seed=1", "device=cpu", "mode=search",
        "train.epochs=5", "+train.epochs=5", "~train.epochs", "graph.nodes.0.model=convnet", "graph.gates.0.1=Linear",
        "search.extra={optim:{lr:[0.05,0.1]}}", "hydra.run.dir=runs/x", "hydra/job_logging=disabled", "+foo=1",
        "--cfg", "job", "-m", "dataset@x=digits",
    ])


def test_every_group_lists_its_presets():
    assert presets("graph")[:3] == ["ctsl_mkt", "digits_noisy_searched", "dml"] and {"ktg3", "mhgd"} <= set(presets("graph"))


def test_graph_files_that_are_not_yaml_or_not_a_mapping(tmp_path):
    import launch

    def load_graph_file(path):  # graph=<file> on the command line
        launch.use_graph_files([f"graph={path}"])

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: g\nnodes:\n  - {model: convnet}\n gates: [[Through]]\n")
    with pytest.raises(ConfigError, match=rf"^graph file {bad} is not valid YAML: expected <block end>, but found "
                                          r"'<block mapping start>' \(line 4, column 2\)$"):
        load_graph_file(str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list.yaml must be a mapping \(name, nodes, gates, ...\); it is a list$"):
        load_graph_file(str(listed))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty.yaml must be a mapping .*; it is empty$"):
        load_graph_file(str(empty))
    with pytest.raises(ConfigError, match=r"graph file .*nope.yaml not found"):
        load_graph_file(str(tmp_path / "nope.yaml"))


# --- devices the machine does not have ---------------------------------------------------------

def _no_cuda(monkeypatch, gpus=0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def test_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    from actors.preflight import check_device, preflight

    _no_cuda(monkeypatch)
    cfg = small_config(["convnet"], [[T]], device="cuda")
    with pytest.raises(ConfigError, match=r"^device=cuda: no CUDA device is visible here .*; use device=cpu, or device=auto"):
        preflight(cfg, 1)  # the check every node runs before the process group forms
    with pytest.raises(ConfigError, match=r"^backend=nccl needs a CUDA device and none is visible here .*; use backend=gloo"):
        check_device(small_config(["convnet"], [[T]], backend="nccl"))
    check_device(small_config(["convnet"], [[T]], device="auto", backend="auto"), local_world_size=3)  # CPU: fine


def test_more_nodes_on_a_machine_than_gpus_is_a_config_error(monkeypatch):
    from actors.preflight import check_device

    _no_cuda(monkeypatch, gpus=2)
    cfg = small_config(["convnet"] * 3, [[T] * 3] * 3, device="cuda")
    with pytest.raises(ConfigError, match=r"^device=cuda needs one GPU per graph node, but 3 processes run on this machine "
                                          r"and 2 CUDA device\(s\) are visible; use device=cpu"):
        check_device(cfg, local_world_size=3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's count
    with pytest.raises(ConfigError, match=r"^device=auto \(CUDA here\) needs one GPU per graph node, but 3 processes"):
        check_device(small_config(["convnet"] * 3, [[T] * 3] * 3))
    check_device(cfg, local_world_size=2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    check_device(cfg)  # a Ray actor: sees its own GPUs only, not checked


# --- run_local: a node's error reaches the caller as itself ---------------------------------------

class _Unpicklable(RuntimeError):
    def __init__(self, what, extra):  # pickles, but does not unpickle (two arguments)
        super().__init__(what)


def test_a_node_error_is_sent_as_itself_or_as_its_text():
    from coordinator.local import _failure

    e = ConfigError("dataset=cifar10: missing\nsecond line")
    sent, text = _failure(e, "ConfigError: ...traceback...")
    back, _ = pickle.loads(pickle.dumps((sent, text)))
    assert type(back) is ConfigError and str(back) == str(e) and text.endswith("traceback...")
    sent, text = _failure(_Unpicklable("odd", 1), "_Unpicklable: odd\nTraceback ...")
    assert type(sent) is RuntimeError and str(sent) == "_Unpicklable: odd" and text.startswith("_Unpicklable: odd\n")


def test_the_caller_raises_a_config_error_as_itself_and_names_other_failures():
    from coordinator.local import _raise_failure

    e = ConfigError("graph.nodes[1].checkpoint=x: file not found\nmore")
    with pytest.raises(ConfigError) as info:
        _raise_failure({1: (e, "ConfigError: ...")})
    assert info.value is e
    cause = NonFiniteLossError("non-finite training loss on node 1")
    with pytest.raises(RuntimeError, match=r"^node\(s\) \[0, 1\] failed; node 0: NonFiniteLossError: non-finite") as info:
        _raise_failure({1: (None, "process exited with code -9 without reporting"),
                        0: (cause, "NonFiniteLossError: non-finite training loss on node 1\nTraceback")})
    assert info.value.__cause__ is cause


def test_run_local_raises_a_node_config_error(tmp_path):
    """A ConfigError found in a node's process (its preflight) reaches run_local's caller."""
    from coordinator.local import run_local

    cfg = small_config(["convnet"], [[T]], dataset={"name": "cifar10", "root": str(tmp_path / "no-data")})
    with pytest.raises(ConfigError, match=r"^dataset=cifar10: cifar10: expected torchvision.s extracted archive at "
                                          r".*no-data/cifar-10-batches-py"):
        run_local(cfg, tmp_path / "run", timeout_s=120)


def test_cuda_is_refused_by_run_local_before_it_starts_a_process(monkeypatch, tmp_path):
    from coordinator.local import run_local

    _no_cuda(monkeypatch, gpus=1)
    with pytest.raises(ConfigError, match=r"^device=cuda needs one GPU per graph node, but 2 processes"):
        run_local(small_config(["convnet"] * 2, [[T] * 2] * 2, device="cuda"), tmp_path, timeout_s=60)
    assert not list(tmp_path.iterdir())


# --- no broad except that turns a failure into "no answer" -------------------------------------------

def test_launcher_start_time_lets_unexpected_errors_through(monkeypatch):
    import launch

    monkeypatch.setattr(launch.os, "getppid", lambda: 2 ** 22 + 12345)  # no such process: no start time
    assert launch._launcher_start_time() is None

    def broken(name):
        raise TypeError("unexpected")

    monkeypatch.setattr(launch.os, "getppid", lambda: 1)
    monkeypatch.setattr(launch.os, "sysconf", broken)
    with pytest.raises(TypeError):
        launch._launcher_start_time()
