"""The GPU-oriented options (bf16 autocast, channels_last, torch.compile) and the benchmark's
step timer, exercised on CPU: they change speed, not the method."""
import pytest
import torch

from actors.config import ConfigError
from actors.data import load_dataset
from actors.exchange import DistEnv, Exchange, free_port, init_distributed, shutdown
from actors.timing import PARTS, StepTimer
from actors.worker import NodeWorker
from coordinator.sequential import train_sequential
from tests.helpers import small_config

T = "Through"
GRAPH = (["resnet20", "convnet"], [[T, "Linear"], ["Correct", T]])


def _params(nodes):
    return [torch.cat([p.detach().reshape(-1) for p in n.model.parameters()]) for n in nodes]


def _train(steps=3, **train):
    cfg = small_config(*GRAPH, train={"epochs": 1, "batch_size": 32, "num_threads": 1, **train})
    return train_sequential(cfg, load_dataset("digits", val_fraction=0.15), max_steps=steps)


def test_channels_last_trains_the_same_model(one_thread):
    ref, cl = _params(_train()), _params(_train(channels_last=True))
    for a, b in zip(ref, cl):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    nodes = _train(steps=1, channels_last=True)
    w = next(m for m in nodes[0].model.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_keeps_logits_losses_and_weights_fp32(one_thread):
    nodes = _train(precision="bf16")
    x = torch.rand(4, 1, 8, 8)
    assert nodes[0].forward(x).dtype == torch.float32  # exchanged and used in the loss in fp32
    assert all(p.dtype == torch.float32 for n in nodes for p in n.model.parameters())
    assert all(torch.isfinite(p).all() for p in _params(nodes))
    init, ref, one = _params(_train(steps=0)), _params(_train(steps=1)), _params(_train(steps=1, precision="bf16"))
    for w0, a, b in zip(init, ref, one):
        assert torch.isfinite(b).all()
        assert not torch.equal(a, b)  # the forward really ran in bf16
        # ... and took nearly the same first step as fp32 (bf16 rounding aside)
        assert torch.nn.functional.cosine_similarity(a - w0, b - w0, dim=0) > 0.9


def test_compiled_nodes_compile_before_the_first_step_and_train_like_eager_ones(one_thread):
    """``train.compile``: the worker compiles each node's training forward and backward and its
    eval forward before the first step (a process compiling inside the first all-gather would
    time the others out), leaving the node as it was; the steps and the evaluation then
    compile nothing more, and train as the eager model does. Reaching dynamo's recompile
    limit is an error, not a silent fall back to eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from actors.start import _compile

    cfg = small_config(["convnet"], [[T]], train={"epochs": 1, "batch_size": 32, "num_threads": 1, "compile": True,
                                                  "max_steps_per_epoch": 3})
    data = load_dataset("digits", val_fraction=0.15)
    torch._dynamo.reset()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="none")
    compiled = NodeWorker(cfg, env, Exchange(env), data, placement=[[0]])
    node = compiled.nodes[0]
    before = {k: v.clone() for k, v in node.model.state_dict().items()}
    _compile(compiled)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the step's forward and the eval forward (the backward is compiled with the first)
    assert all(torch.equal(v, node.model.state_dict()[k]) for k, v in before.items())  # BatchNorm statistics too
    assert all(p.grad is None for p in node.model.parameters())
    assert torch._dynamo.config.fail_on_recompile_limit_hit
    compiled.train_epoch(0)
    compiled.evaluate()
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled in the steps or the evaluation
    assert node.run_model is not node.model
    assert list(node.state_dict()["model"]) == list(node.model.state_dict())  # no _orig_mod. prefix
    cfg.train.compile = False
    eager = train_sequential(cfg, data, max_steps=3)
    for a, b in zip(_params(eager), _params(compiled.nodes)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("precision", "fp16", "train.precision must be one of fp32, bf16; got 'fp16'"),
    ("compile", "yes", "train.compile must be true or false; got 'yes'"),
    ("max_steps_per_epoch", -1, "train.max_steps_per_epoch must be an integer >= 0; got -1"),
])
def test_bad_fast_path_options_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        small_config(*GRAPH, train={"epochs": 1, key: value})


def test_step_timer_accounts_for_the_whole_step(one_thread):
    """One node (world size 1): every part is timed and the parts add up to the step."""
    cfg = small_config(["convnet"], [["Through"]], train={"epochs": 1, "batch_size": 32, "num_threads": 1,
                                                         "max_steps_per_epoch": 6})
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env = init_distributed(0, 1, 0, "env://", "cpu", "gloo")
    try:
        worker = NodeWorker(cfg, env, Exchange(env), load_dataset("digits", val_fraction=0.15), None)
        worker.timer = StepTimer(env.device)
        worker.train_epoch(0)
    finally:
        shutdown()
    t = worker.timer.summary()
    assert worker.timer.steps == 6
    assert set(PARTS) <= set(t) and all(t[p] >= 0 for p in PARTS)
    assert t["forward"] > 0 and t["backward"] > 0 and t["optimizer"] > 0
    assert t["wait"] == pytest.approx(0.0, abs=1e-3)  # nobody to wait for
    assert sum(t[p] for p in PARTS) == pytest.approx(t["step"], rel=0.02)
