"""What the first GPU run needs, checked on a CPU: states handed over on the host, the device
of a Ray actor asked from Ray, fractional GPUs and bf16 refused where they cannot work,
evaluation through the training forward, frozen nodes evaluated once, a warm reset that
frees the old graph first, compilation before the first collective, and a search that asks
for resources the cluster does not have refused at start (or its wait explained). The NCCL
monitor's tests are in tests/test_hang.py; tests/test_mhgd_vectors.py checks mhgd's
sync-free singular vectors."""
import weakref

import pytest
import torch

from actors.errors import ConfigError
from actors.exchange import DistEnv, Exchange
from actors.preflight import check_device, load_data
from actors.worker import NodeWorker
from tests.helpers import small_config, write_cifar

T = "Through"


def local_worker(cfg, placement=None):
    """Every node of ``cfg`` in this process, no process group (as the single-process reference)."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="none")
    return NodeWorker(cfg, env, Exchange(env), load_data(cfg), placement=placement or [list(range(cfg.graph.num_nodes))])


class OnGpu(torch.Tensor):
    """A tensor that says it lives on cuda:0 (what a GPU node's state dict holds) and copies
    to a plain CPU tensor on ``.cpu()``."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def cpu(self):
        return self.as_subclass(torch.Tensor).clone()


def _on_gpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(OnGpu)
    if isinstance(obj, dict):
        return {k: _on_gpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_on_gpu(v) for v in obj]
    return obj


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_states_leave_the_worker_on_the_host(monkeypatch):
    """A search trial's driver holds no GPU: the states a GPU node hands over (to be pickled
    and written there) must be plain CPU tensors, not CUDA ones it would have to open a CUDA
    context on another trial's GPU to unpickle."""
    from actors.node import GraphNode

    cfg = small_config(["convnet", "convnet"], [[T, T], [T, T]], train={"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2})
    worker = local_worker(cfg)
    worker.train_epoch(0)  # momentum buffers too
    real = GraphNode.state_dict
    monkeypatch.setattr(GraphNode, "state_dict", lambda self: _on_gpu(real(self)))
    states = worker.states()
    tensors = list(_tensors(states))
    assert len(tensors) > 10
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)
    ref = real(worker.nodes[1])["model"]
    assert all(torch.equal(states[1]["model"][k], v) for k, v in ref.items())


@pytest.mark.parametrize("wanted,gpu_ids,visible,expected", [
    ("auto", [], None, ("cpu", 0)),                       # no GPU from Ray: the CPU, even where every GPU is visible
    ("auto", [], "0,1,2,3", ("cpu", 0)),
    ("auto", ["2"], "2", ("cuda", 0)),                    # Ray set CUDA_VISIBLE_DEVICES to the actor's own GPU
    ("cuda", [2], "2", ("cuda", 0)),
    ("auto", [3], None, ("cuda", 3)),                     # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES, nothing set
    ("auto", ["3"], "0,1,2,3", ("cuda", 3)),              # ... or the variable inherited as it was
    ("auto", ["GPU-b"], "GPU-a,GPU-b", ("cuda", 1)),      # GPUs named by UUID
    ("cpu", ["1"], "1", ("cpu", 0)),
])
def test_a_node_actor_runs_on_the_gpu_ray_gave_it(wanted, gpu_ids, visible, expected):
    from actors.node_actor import ray_device

    assert ray_device(wanted, gpu_ids, visible) == expected


def test_a_node_actor_without_a_gpu_is_refused_device_cuda():
    from actors.node_actor import ray_device

    with pytest.raises(ConfigError, match=r"device=cuda: Ray gave this node actor no GPU \(search.gpus_per_node=0"):
        ray_device("cuda", [], "0,1")


def test_node_actor_setup_asks_ray_for_its_gpu(monkeypatch):
    """``NodeActor.setup`` starts its node on the device from ``ray.get_gpu_ids()``, not on an
    assumed ``cuda:0`` (two actors of a trial on one GPU, or every 0-GPU actor on GPU 0)."""
    import ray

    import actors.start
    from actors.node_actor import NodeActor

    seen = {}

    class Started:
        steps_per_epoch = 7

    def fake_start(cfg, rank, world_size, local_rank, init_method, files, default_threads, device):
        seen.update(local_rank=local_rank, device=device)
        return Started()

    monkeypatch.setattr(actors.start, "start_node", fake_start)
    cfg = small_config(["convnet"], [[T]])
    for ids, visible, want in (([], None, ("cpu", 0)), (["5"], "4,5", ("cuda", 1))):
        monkeypatch.setattr(ray, "get_gpu_ids", lambda ids=ids: ids)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert NodeActor(cfg, 0, 1, None).setup("tcp://127.0.0.1:1") == 7
        assert (seen["device"], seen["local_rank"]) == want


def test_fractional_gpus_with_several_processes_per_trial_are_refused():
    from coordinator.search_space import SearchConfig

    with pytest.raises(ConfigError, match=r"search.gpus_per_node=0.5 with 3 processes per trial \(search.processes_per_trial=0: "
                                          r"one per node, search.num_nodes=3\): Ray may give two processes of one trial the "
                                          r"same GPU, and NCCL cannot run two ranks of one group on one GPU"):
        SearchConfig(num_nodes=3, gpus_per_node=0.5)
    with pytest.raises(ConfigError, match=r"search.gpus_per_node=0.25 with 2 processes per trial \(search.processes_per_trial=2\)"):
        SearchConfig(num_nodes=3, gpus_per_node=0.25, processes_per_trial=2)
    with pytest.raises(ConfigError, match=r"search.gpus_per_node must be null .* or a number from 0 to 1 \(a node process uses "
                                          r"one GPU\); got 2"):
        SearchConfig(num_nodes=3, gpus_per_node=2)
    assert SearchConfig(num_nodes=3, gpus_per_node=0.5, processes_per_trial=1).gpus_per_node == 0.5  # one process: fine


def test_bf16_on_a_gpu_without_native_bf16_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    cfg = small_config(["convnet"], [[T]], train={"epochs": 1, "precision": "bf16"})
    with pytest.raises(ConfigError, match=r"train.precision=bf16: this GPU \(Tesla V100-SXM2-16GB, compute capability 7.0\) "
                                          r"has no native bfloat16 .*; use train.precision=fp32"):
        check_device(cfg, local_world_size=1)
    check_device(cfg, device="cpu")  # a node on the CPU (e.g. a Ray actor given no GPU) may use bf16
    check_device(small_config(["convnet"], [[T]]), local_world_size=1)  # fp32 on that GPU is fine


class Spy(torch.nn.Module):
    """Stands for the module a node's step runs (``run_model``): records how it is called."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, **kw):
        self.calls.append({"training": self.model.training,
                           "channels_last": x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                           "autocast": torch.is_autocast_enabled("cpu"), "rows": x.shape[0]})
        return self.model(x, **kw)


def test_evaluation_runs_the_training_forward_with_its_speed_settings(tmp_path):
    """Evaluation goes through the module the step runs (the compiled one, with
    ``train.compile``), under the step's bf16 autocast and on channels_last batches (of
    3-channel images: a 1-channel batch is laid out the same either way)."""
    write_cifar(tmp_path, 10)
    cfg = small_config(["convnet"], [[T]], train={"epochs": 1, "batch_size": 8, "precision": "bf16", "channels_last": True,
                                                  "eval_batch_size": 4, "max_steps_per_epoch": 1},
                       dataset={"name": "cifar10", "root": str(tmp_path), "val_fraction": 0.2})
    worker = local_worker(cfg)
    node = worker.nodes[0]
    node.run_model = spy = Spy(node.model)
    worker.train_epoch(0)
    train_calls = list(spy.calls)
    spy.calls.clear()
    [row] = worker.evaluate()
    assert train_calls and all(c["training"] and c["channels_last"] and c["autocast"] for c in train_calls)
    assert spy.calls and all(not c["training"] and c["channels_last"] and c["autocast"] for c in spy.calls)
    assert node.model.training  # left as it was
    assert 0 <= row["val_acc"] <= 100


def test_a_compiled_run_evaluates_batches_of_one_shape():
    """With ``train.compile`` the last, partial eval batch is padded to ``eval_batch_size``
    (one shape, one compilation), and the padding does not reach the accuracy."""
    cfg = small_config(["convnet"], [[T]], train={"epochs": 1, "batch_size": 32, "eval_batch_size": 100})
    worker = local_worker(cfg)
    node = worker.nodes[0]
    node.run_model = spy = Spy(node.model)
    plain = worker.evaluate()
    rows_plain = [c["rows"] for c in spy.calls]
    spy.calls.clear()
    worker.cfg.train.compile = True
    padded = worker.evaluate()
    assert len(set(rows_plain)) > 1 and {c["rows"] for c in spy.calls} == {100}
    assert padded == plain


def test_a_frozen_node_with_stored_statistics_is_evaluated_once(tmp_path):
    """A frozen teacher in eval mode (``graph.frozen_bn=eval``) gives the same logits every
    epoch: evaluated at the first epoch only. With ``frozen_bn=train`` its statistics drift,
    and it is evaluated every epoch."""
    from actors.models import build_model

    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": build_model("convnet", 10, 1).state_dict(), "meta": {"model": "convnet"}}, ckpt)
    nodes = [{"model": "convnet"}, {"model": "convnet", "checkpoint": str(ckpt)}]
    for mode, expected in (("eval", [2, 0]), ("train", [2, 2])):  # forward passes: val and test, one batch each
        cfg = small_config(nodes, [[T, T], ["Cutoff", "Cutoff"]],
                           graph={"name": "kd", "nodes": nodes, "gates": [[T, T], ["Cutoff", "Cutoff"]], "frozen_bn": mode},
                           train={"epochs": 2, "batch_size": 32, "max_steps_per_epoch": 2})
        worker = local_worker(cfg)
        teacher = worker.nodes[1]
        teacher.run_model = spy = Spy(teacher.model)
        rows, passes = [], []
        for epoch in range(2):
            worker.train_epoch(epoch)
            spy.calls.clear()
            rows.append(worker.evaluate()[1])
            passes.append(len(spy.calls))
        assert passes == expected, mode
        own = [{k: r[k] for k in ("val_acc", "test_acc")} for r in rows]  # the ensemble's change: the student learns
        assert own[0] == own[1] or mode == "train"


def test_a_warm_reset_frees_the_old_graph_before_building_the_next(monkeypatch):
    """The next trial's models are built only once the previous trial's models, optimisers,
    exchange buffers (and, with another dataset, its data) are gone: the device never holds
    two graphs. Compiled models' caches are reset too (another graph would count as
    recompiles of the same code and, past dynamo's limit, run uncompiled)."""
    import torch._dynamo

    import actors.start
    from actors.start import restart_node

    cfg = small_config(["convnet", "convnet"], [[T, T], [T, T]], train={"epochs": 1, "batch_size": 32, "compile": True,
                                                                       "max_steps_per_epoch": 1})
    old = local_worker(cfg)
    old.exchange.all_gather({"logits": torch.zeros(4, 10)})
    gone = [weakref.ref(n.model) for n in old.nodes] + [weakref.ref(n.optimizer) for n in old.nodes]
    seen = {}
    real = actors.start.NodeWorker

    def built(*args, **kw):
        seen["alive"] = [r() is not None for r in gone]
        seen["plans"] = len(old.exchange._plans)
        return real(*args, **kw)

    resets = []
    monkeypatch.setattr(actors.start, "NodeWorker", built)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    nxt = small_config(["convnet", "convnet"], [["Linear", T], [T, T]], train={"epochs": 1, "batch_size": 32})
    new = restart_node(nxt, old)
    assert seen == {"alive": [False] * 4, "plans": 0}
    assert resets == [1]
    assert new.exchange is not None and len(new.nodes) == 2


def test_the_exchange_keeps_the_buffers_of_a_few_layouts_only():
    from actors.exchange import MAX_PLANS

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="none")
    ex = Exchange(env)
    for b in range(1, 3 * MAX_PLANS):
        ex.all_gather({"logits": torch.zeros(b, 3)})
    assert len(ex._plans) == MAX_PLANS
    ex.release()
    assert not ex._plans


def test_a_search_the_cluster_cannot_place_is_refused_at_start(monkeypatch, tmp_path):
    """``search.gpus_per_node=1`` on a machine without GPUs: Tune would keep every trial
    pending for good, printing nothing. Refused before Tune starts, saying what a trial needs
    and what the cluster has."""
    import ray
    from ray import tune

    import coordinator.search as search
    from coordinator.search_space import SearchConfig

    def started(self):
        raise AssertionError("Tune started trials that can never be placed")

    monkeypatch.setattr(tune.Tuner, "fit", started)  # (it would wait for them for good)
    monkeypatch.setattr(search, "_init_ray", lambda space: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0, "memory": 1e9}}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    space = SearchConfig(name="t", num_nodes=3, zoo=["convnet"], target_model="convnet", gpus_per_node=1, num_samples=2,
                         max_epochs=2, teachers_dir=str(tmp_path / "none"))
    base = {"dataset": {"name": "digits"}, "logger": {"backend": "none"}}
    with pytest.raises(ConfigError, match=r"a trial needs \{CPU: 4, GPU: 3\} \(1 CPU for its driver \+ 3 process\(es\) x "
                                          r"\{CPU: 1, GPU: 1\}\), but the Ray cluster has \{CPU: 8\} in all: its trials would "
                                          r"wait for good; set search.gpus_per_node=0"):
        search.run_search(space, base, tmp_path / "exp")


def test_a_trial_larger_than_any_machine_or_than_the_cluster_cannot_be_placed():
    from coordinator.search_resources import unplaceable

    trial = [{"CPU": 1}, {"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert unplaceable(trial, [{"CPU": 16, "GPU": 2}]) is None
    assert unplaceable(trial, [{"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1}]) is None  # spread over two machines
    assert "in all" in unplaceable(trial, [{"CPU": 16, "GPU": 1}])
    assert "no machine of the Ray cluster can hold one process's {CPU: 1, GPU: 1} (the largest has {CPU: 8, GPU: 0.5})" \
        in unplaceable(trial, [{"CPU": 8, "GPU": 0.5}] * 4)


def test_the_search_console_says_what_pending_trials_wait_for(monkeypatch, capsys):
    import ray

    from coordinator.search_console import SearchConsole

    class Trial:
        def __init__(self, status):
            self.status, self.last_result, self.trial_id = status, {}, "t"

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 3.0})
    p = SearchConsole(4, 2, bundles=[{"CPU": 1}, {"CPU": 1, "GPU": 1}], pending_after_s=0.0)
    p.on_step_end(0, [Trial("PENDING")] * 2)
    p.on_step_end(1, [Trial("PENDING")] * 2)
    out = capsys.readouterr().out
    assert "[search] 2 trial(s) pending and none running for 0 s; each needs {CPU: 2, GPU: 1}; the Ray cluster has " \
           "{CPU: 3} free" in out
    p.on_step_end(2, [Trial("RUNNING"), Trial("PENDING")])
    assert p.stalled_since is None


def test_gpu_check_refuses_without_a_gpu_and_its_dry_run_passes(tmp_path):
    """``scripts/gpu_check.sh`` on a machine without a GPU says so and exits 2; its dry run
    (the same checks on the CPU over gloo) passes, here its ``packed`` check."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "gpu_check: no CUDA GPU is visible here" in r.stderr and "--dry-run" in r.stderr
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--only", "packed", "--out", str(tmp_path)],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [row] = json.loads((tmp_path / "gpu_check.json").read_text())
    assert row["name"] == "packed" and row["status"] == "pass", row
    assert "| packed | pass | 4 nodes on 2 process(es)" in r.stdout
