"""What the published runs computed, as options: frozen teachers with BatchNorm in train mode
(batch statistics, drifting running statistics, checkpointed and resumed exactly), Linear
gates counted in epochs, the skip of an optimiser step whose whole loss is exactly 0, the
learning rate stepped once an epoch, zero padding; and the repository's docs stand alone."""
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

from actors.data import augment
from actors.files import load_model_weights
from actors.gates import gate_clock
from actors.models import build_model
from actors.node import LrSchedule
from actors.preflight import load_data
from coordinator.local import run_local
from coordinator.sequential import ReferenceTrainer, train_sequential
from tests.helpers import small_config

ROOT = Path(__file__).resolve().parents[1]
T, C, L = "Through", "Cutoff", "Linear"
CONST = {"lr": 0.05, "schedule": "constant", "milestones": [], "warmup_epochs": 0}


def teacher_file(path: Path, seed: int = 5) -> Path:
    torch.manual_seed(seed)
    torch.save(build_model("convnet", 10, 1).state_dict(), path)
    return path


def kd_config(teacher: Path, epochs: int, frozen_bn: str = "train", **overrides):
    """A convnet student and a frozen convnet teacher, 4 steps an epoch."""
    return small_config(
        ["convnet", {"model": "convnet", "checkpoint": str(teacher)}], [[T, T], [C, C]],
        graph={"name": "kd-test", "nodes": ["convnet", {"model": "convnet", "checkpoint": str(teacher)}],
               "gates": [[T, T], [C, C]], "temperature": 2.0, "frozen_bn": frozen_bn},
        train={"epochs": epochs, "batch_size": 32, "num_threads": 1, "max_steps_per_epoch": 4},
        **overrides,
    )


# --- gate progress ----------------------------------------------------------------------------------

def test_iteration_progress_is_k_over_k_end_exactly():
    assert [gate_clock(k, 10, 30) for k in (1, 15, 30)] == [1 / 30, 15 / 30, 1.0]


def test_epoch_counted_linear_is_0_through_epoch_1_and_1_in_the_last_epoch():
    spe, epochs = 7, 5
    total = spe * epochs
    p = [gate_clock(k, spe, total, "epoch") for k in range(1, total + 1)]
    assert p[:spe] == [0.0] * spe                       # all of epoch 1
    assert p[-spe:] == [1.0] * spe                      # all of the last epoch
    assert p[spe:2 * spe] == [0.25] * spe               # e / (E - 1), e 0-based
    assert gate_clock(3, 3, 3, "epoch") == 1.0       # one epoch: it is the last


def test_epoch_counted_gates_in_a_run(tmp_path, one_thread):
    """The mean gate weight the workers record: Linear 0 in epoch 1, 1 in the last epoch;
    NegativeLinear the opposite."""
    cfg = small_config(["convnet", "convnet"], [[T, L], ["NegativeLinear", T]],
                       graph={"name": "ep", "nodes": ["convnet", "convnet"], "gates": [[T, L], ["NegativeLinear", T]],
                              "progress": "epoch"},
                       train={"epochs": 3, "batch_size": 32, "num_threads": 1, "max_steps_per_epoch": 3})
    run_local(cfg, tmp_path, timeout_s=300)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lin = {r["epoch"]: r["gate_1_to_0_Linear"] for r in rows if r["node"] == 0}
    neg = {r["epoch"]: r["gate_0_to_1_NegativeLinear"] for r in rows if r["node"] == 1}
    assert lin == {1: 0.0, 2: 0.5, 3: 1.0}
    assert neg == {1: 1.0, 2: 0.5, 3: 0.0}


# --- the group equals the single-process reference under the published modes -----------------------

def test_group_equals_reference_with_train_mode_teacher_epoch_gates_and_zero_loss_skip(tmp_path, one_thread):
    """Frozen node in train mode, epoch-counted gates, zero-loss skip, lr per epoch, zero
    padding and normalisation: every parameter and buffer of the 3-process group equals the
    single-process reference's; and node 0, whose whole loss is 0 through epoch 1, did not
    move during it (not even by weight decay)."""
    teacher = teacher_file(tmp_path / "teacher.pt")
    nodes = ["convnet", "convnet", {"model": "convnet", "checkpoint": str(teacher)}]
    gates = [[L, L, L], [T, "NegativeLinear", T], [C, C, C]]
    cfg = small_config(
        nodes, gates,
        graph={"name": "reimpl", "nodes": nodes, "gates": gates, "frozen_bn": "train", "progress": "epoch",
               "skip_zero_loss": True},
        dataset={"name": "digits", "val_fraction": 0.15, "crop_pad": 1, "flip": False, "normalize": True,
                 "pad_mode": "zeros"},
        optim={"lr": 0.05, "schedule": "cosine", "schedule_step": "epoch", "milestones": [], "warmup_epochs": 0},
        train={"epochs": 2, "batch_size": 32, "num_threads": 1, "max_steps_per_epoch": 5},
    )
    run_dir = tmp_path / "run"
    run_local(cfg, run_dir, timeout_s=300)
    ref = train_sequential(cfg, load_data(cfg))
    for i, node in enumerate(ref):
        got, _ = load_model_weights(run_dir / f"node{i}.pt")
        want = node.model.state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), f"node {i} {k} differs"

    # epoch 1 alone: node 0's loss is exactly 0 at every step, so its weights stay the initial ones
    group = ReferenceTrainer(cfg, load_data(cfg))
    init = {k: v.clone() for k, v in group.nodes[0].model.state_dict().items()}
    batches = group.batches()
    for _ in range(group.steps_per_epoch):
        group.step(*next(batches))
    after = group.nodes[0].model.state_dict()
    params = {k for k, _ in group.nodes[0].model.named_parameters()}
    assert all(torch.equal(after[k], init[k]) for k in params)
    assert group.nodes[0].scheduler.last_epoch == group.steps_per_epoch  # the schedule still advanced
    # without the skip, weight decay alone moves the weights of the zero-loss steps
    cfg.graph.skip_zero_loss = False
    group = ReferenceTrainer(cfg, load_data(cfg))
    batches = group.batches()
    for _ in range(group.steps_per_epoch):
        group.step(*next(batches))
    assert not all(torch.equal(group.nodes[0].model.state_dict()[k], init[k]) for k in params)


# --- frozen teachers in train mode ------------------------------------------------------------------

def test_train_mode_teacher_drifts_its_statistics_not_its_weights_and_resumes_bitwise(tmp_path, one_thread):
    teacher = teacher_file(tmp_path / "teacher.pt")
    before = torch.load(teacher, weights_only=True)
    run_local(kd_config(teacher, 3, optim=CONST), tmp_path / "straight", timeout_s=300)
    run_local(kd_config(teacher, 2, optim=CONST), tmp_path / "ext", timeout_s=300)
    run_local(kd_config(teacher, 3, optim=CONST), tmp_path / "ext", timeout_s=300)  # resumes epoch 2 -> 3

    straight, _ = load_model_weights(tmp_path / "straight" / "node1.pt")
    params = {k for k, _ in build_model("convnet", 10, 1).named_parameters()}
    stats = [k for k in before if k.endswith("running_mean") or k.endswith("running_var")]
    assert params and stats
    assert all(torch.equal(straight[k], before[k]) for k in params)        # never stepped
    assert all(not torch.equal(straight[k], before[k]) for k in stats)     # batch statistics drifted
    assert all(int(straight[k]) == 12 for k in before if k.endswith("num_batches_tracked"))  # 3 epochs x 4 steps
    # the group checkpoint of epoch 2 holds the drifted statistics, and the resumed run continues them
    [epoch2] = [d for d in (tmp_path / "ext" / "checkpoints").glob("epoch_*") if int(d.name.split("_")[1]) == 2]
    mid, _ = load_model_weights(epoch2 / "node1.pt")
    assert all(not torch.equal(mid[k], before[k]) for k in stats)
    assert all(not torch.equal(mid[k], straight[k]) for k in stats)
    for i in (0, 1):
        a, _ = load_model_weights(tmp_path / "straight" / f"node{i}.pt")
        b, _ = load_model_weights(tmp_path / "ext" / f"node{i}.pt")
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"node {i} {k}: resumed run differs"


def test_eval_mode_teacher_is_the_checkpoint_and_train_mode_changes_what_it_teaches(tmp_path, one_thread):
    teacher = teacher_file(tmp_path / "teacher.pt")
    before = torch.load(teacher, weights_only=True)
    ev, tr = kd_config(teacher, 1, "eval"), kd_config(teacher, 1, "train")
    n_ev = train_sequential(ev, load_data(ev))
    n_tr = train_sequential(tr, load_data(tr))
    after = n_ev[1].model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)   # eval: bitwise the checkpoint
    assert not n_ev[1].model.training and n_tr[1].model.training
    assert not torch.equal(n_ev[0].model.head.weight, n_tr[0].model.head.weight)  # another teacher signal
    assert all(not p.requires_grad for p in n_tr[1].model.parameters()) and n_tr[1].optimizer is None


# --- recipe pieces -----------------------------------------------------------------------------------

def test_per_epoch_cosine_is_cosine_annealing_stepped_once_an_epoch():
    s = LrSchedule("cosine", steps_per_epoch=10, total_steps=50, per_epoch=True)
    for e in range(5):
        want = 0.5 * (1 + math.cos(math.pi * e / 5))
        assert [s(e * 10 + k) for k in range(10)] == [pytest.approx(want)] * 10
    it = LrSchedule("cosine", steps_per_epoch=10, total_steps=50)
    assert it(5) != it(0)  # per iteration by default


def test_zero_padding_fills_black_before_normalisation():
    x = torch.ones(1, 1, 4, 4)
    out = augment(x, torch.tensor([[0, 0]]), None, 2, "zeros")
    assert out[0, 0, :2].eq(0).all() and out[0, 0, :, :2].eq(0).all() and out[0, 0, 2:, 2:].eq(1).all()
    assert augment(x, torch.tensor([[0, 0]]), None, 2, "reflect").eq(1).all()


# --- the docs stand alone --------------------------------------------------------------------------

def _repo_files(*suffixes):
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if f.endswith(suffixes) and (ROOT / f).is_file()]


def test_no_file_of_the_repository_points_outside_it():
    outside = "../" + "shared"  # not written out, so that this file does not match itself
    link = re.compile(r"\]\(([^)\s]+)\)")
    bad = []
    for f in _repo_files(".md", ".py", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".txt"):
        text = f.read_text(errors="replace")
        if outside in text:
            bad.append(f"{f.relative_to(ROOT)}: mentions {outside}")
        if f.suffix != ".md":
            continue
        for target in link.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor
            path = (f.parent / target.split("#")[0]).resolve()
            if ROOT not in path.parents and path != ROOT:
                bad.append(f"{f.relative_to(ROOT)}: links {target}, outside the repository")
            elif not path.exists():
                bad.append(f"{f.relative_to(ROOT)}: links {target}, which does not exist")
    assert not bad, "\n".join(bad)


def test_the_method_is_documented_in_the_repository():
    text = (ROOT / "docs" / "method.md").read_text()
    for needle in ("Through", "Cutoff", "Linear", "Correct", "NegativeLinear", "frozen", "eval", "train mode",
                   "all-gather", "ASHA", "73.54", "71.43", "Minami"):
        assert needle in text, needle
    assert "docs/method.md" in (ROOT / "README.md").read_text()
