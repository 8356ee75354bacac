"""Every config group composes with hydra's compose API into a valid RunConfig, and bad
values are refused with the field named."""
import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import launch  # noqa: F401  (registers the run-dir resolver)
from actors.config import RunConfig
from actors.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    data = OmegaConf.to_container(cfg, resolve=True)
    return RunConfig.from_dict(data)


def test_groups_are_there():
    assert {"digits", "cifar10", "cifar100", "tiny_imagenet"} <= set(options("dataset"))
    assert {"independent", "kd", "dml", "ktg3", "teacher"} <= set(options("graph"))
    assert {"paper", "cpu"} <= set(options("optim"))
    assert {"wandb", "none"} <= set(options("logger"))


def pairwise_combinations():
    """Every graph preset with every dataset preset, the optim and logger presets alternating so
    that every pair of values of any two groups composes at least once (70 composes, not the
    280 of the full product: the groups set disjoint keys, so a clash shows in a pair)."""
    graphs, datasets, optims, loggers = (options(g) for g in ("graph", "dataset", "optim", "logger"))
    combos = [(g, d, optims[(i + j) % len(optims)], loggers[(i + j // 2) % len(loggers)])
              for i, g in enumerate(graphs) for j, d in enumerate(datasets)]
    groups = (graphs, datasets, optims, loggers)
    for a, b in itertools.combinations(range(4), 2):
        assert {(c[a], c[b]) for c in combos} == set(itertools.product(groups[a], groups[b])), (a, b)
    return combos


@pytest.mark.parametrize("graph, dataset, optim, logger", pairwise_combinations())
def test_every_combination_composes(graph, dataset, optim, logger):
    cfg = composed(f"graph={graph}", f"dataset={dataset}", f"optim={optim}", f"logger={logger}")
    # a preset's dataset name (digits_noisy is digits with label noise)
    assert cfg.graph.name == graph and cfg.dataset.name == OmegaConf.load(CONF / "dataset" / f"{dataset}.yaml").name


def test_defaults_are_the_main_job():
    cfg = composed()
    assert (cfg.graph.name, cfg.dataset.name, cfg.graph.num_nodes) == ("ktg3", "digits", 3)
    assert cfg.logger.backend == "wandb" and cfg.logger.mode == "offline"
    assert cfg.train.epochs == 20  # the CPU recipe


def test_paper_recipe():
    cfg = composed("optim=paper")
    assert (cfg.optim.lr, cfg.optim.milestones, cfg.train.epochs, cfg.train.batch_size) == (0.1, [60, 120, 180], 200, 64)
    assert cfg.optim.nesterov and cfg.optim.weight_decay == 5e-4


def test_command_line_overrides_reach_every_field():
    cfg = composed("train.epochs=7", "seed=3", "graph.temperature=4", "graph.nodes.1.model=wrn28_2",
                   "optim.lr=0.2", "dataset.val_fraction=0.3")
    assert (cfg.train.epochs, cfg.seed, cfg.graph.temperature, cfg.graph.nodes[1].model) == (7, 3, 4.0, "wrn28_2")
    assert (cfg.optim.lr, cfg.dataset.val_fraction) == (0.2, 0.3)


def test_label_noise_defaults_off_and_digits_noisy_sets_it():
    assert composed().dataset.label_noise == 0.0
    cfg = composed("dataset=digits_noisy")
    assert (cfg.dataset.name, cfg.dataset.label_noise) == ("digits", 0.4)
    clean = composed("dataset=digits")
    # otherwise the digits preset: the same split and augmentation
    assert {**vars(cfg.dataset), "label_noise": 0.0} == vars(clean.dataset)
    assert composed("dataset=digits_noisy", "dataset.label_noise=0.2").dataset.label_noise == 0.2
    # a preset that does not list label_noise (the default, 0) takes it with ++
    assert composed("dataset=cifar10", "++dataset.label_noise=0.2").dataset.label_noise == 0.2


@pytest.mark.parametrize("value, shown", [("-0.1", "-0.1"), ("1.0", "1.0"), ("1", "1"), ("a", "'a'"), ("true", "True")])
def test_bad_label_noise_is_refused(value, shown):
    from actors.config import DatasetConfig

    message = rf"dataset.label_noise must be a number in \[0, 1\); got {shown}$"
    with pytest.raises(ConfigError, match=message):
        composed("dataset=digits_noisy", f"dataset.label_noise={value}")
    with pytest.raises(ConfigError, match=message):
        composed(f"++dataset.label_noise={value}")
    with pytest.raises(ConfigError, match=r"dataset.label_noise must be a number in \[0, 1\); got -0.1"):
        DatasetConfig(label_noise=-0.1)


def test_kd_teacher_path_follows_the_dataset():
    cfg = composed("graph=kd", "dataset=cifar100")
    assert cfg.graph.nodes[1].checkpoint.endswith("teachers/cifar100/resnet110/node0.pt")
    assert cfg.graph.is_frozen(1)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", r"train.epochs must be an integer > 0; got 0"),
    ("train.batch_size=-4", r"train.batch_size must be an integer > 0"),
    ("optim.schedule=linear", r"optim.schedule must be one of multistep, cosine, constant; got 'linear'"),
    ("optim.lr=0", r"optim.lr must be a number > 0"),
    ("dataset.name=mnist", r"dataset.name: unknown dataset 'mnist'; known: cifar10, cifar100, digits, tiny_imagenet"),
    ("dataset.val_fraction=1.5", r"dataset.val_fraction must be in \[0, 1\)"),
    ("device=tpu", r"device must be one of auto, cpu, cuda; got 'tpu'"),
    ("backend=mpi", r"backend must be one of auto, gloo, nccl; got 'mpi'"),
    ("logger.mode=maybe", r"logger.mode must be one of offline, online, disabled"),
    ("+train.epoch=3", r"train: unknown key\(s\) epoch; allowed: epochs, batch_size"),
    ("graph.gates.0.1=Sometimes", r"graph.gates\[0\]\[1\] \(edge 1 -> 0\): unknown gate 'Sometimes'"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        composed(override)


def test_run_config_is_picklable():
    import pickle

    cfg = composed("graph=dml")
    assert pickle.loads(pickle.dumps(cfg)).graph.gates == cfg.graph.gates


@pytest.mark.parametrize("preset", options("search"))
def test_search_presets_compose(preset):
    from coordinator.search_space import search_config_from

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["mode=search", f"search={preset}",
                                                       "search.extra={optim:{lr:[0.05,0.1]}}"])
    data = OmegaConf.to_container(cfg, resolve=True)
    space = search_config_from(data["search"])
    assert data["train"]["epochs"] == space.max_epochs  # every trial's schedule spans ASHA's max_t
    assert space.extra == {"optim.lr": [0.05, 0.1]}
    assert space.teachers_dir == "teachers/digits"
    assert len(space.choices()) == (space.num_nodes - 1) + space.num_nodes ** 2 + 1


def test_paper_search_is_the_papers():
    from coordinator.search_space import search_config_from

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["mode=search", "search=paper"])
    s = search_config_from(OmegaConf.to_container(cfg, resolve=True)["search"])
    assert (s.grace_period, s.reduction_factor, s.max_epochs, s.num_samples) == (1, 2, 200, 1500)
    assert s.zoo == ["resnet32", "resnet110", "wrn28_2"] and s.gates == ["Through", "Cutoff", "Linear", "Correct"]


def test_defaults_live_in_the_dataclasses_only():
    """conf/config.yaml restates no default: the top-level options and train.* come from
    RunConfig / TrainConfig (coordinator.hydra_conf), the presets and the command line
    override them."""
    import dataclasses

    import yaml

    from actors.config import TrainConfig

    assert set(yaml.safe_load((CONF / "config.yaml").read_text())) == {"defaults", "hydra"}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        data = OmegaConf.to_container(compose(config_name="config", overrides=["logger=none"]))
    run_defaults = RunConfig(graph=composed().graph)
    assert {k: data[k] for k in ("seed", "device", "backend", "dist_timeout_s")} == {
        k: getattr(run_defaults, k) for k in ("seed", "device", "backend", "dist_timeout_s")}
    assert data["mode"] == "train"
    cpu_recipe = {"epochs": 20, "batch_size": 64}  # conf/optim/cpu.yaml
    assert data["train"] == {**dataclasses.asdict(TrainConfig()), **cpu_recipe}
    assert composed("experiment=cifar100_ktg3_reimpl").train.precision == "bf16"  # a preset over a default
    assert composed("experiment=cifar100_teacher", "train.batch_size=32").train.batch_size == 32  # the command line last


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the dataclasses: regenerate it with
    `python -m coordinator.hydra_conf --write` after changing an option or its docstring."""
    import dataclasses

    from actors.config import SECTIONS, TOP_LEVEL, field_docs
    from actors.graph import GraphSpec, NodeSpec
    from coordinator.hydra_conf import DOCS, reference_markdown

    for klass, names in [(RunConfig, TOP_LEVEL), *((k, None) for k in (*SECTIONS.values(), GraphSpec, NodeSpec))]:
        names = names or [f.name for f in dataclasses.fields(klass)]
        undocumented = [n for n in names if n not in field_docs(klass)]
        assert not undocumented, f"{klass.__name__}: document {undocumented} (a docstring under the field)"
    text = reference_markdown()
    assert "## `search`" in text and "| `train.epochs` | `200` |" in text and "| `seed` | `0` |" in text
    assert DOCS.read_text() == text, "docs/configuration.md is out of date: python -m coordinator.hydra_conf --write"
