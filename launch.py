"""Train a knowledge transfer graph: one process per graph node.

    torchrun --standalone --nproc_per_node=3 launch.py                      # 3-node graph (ktg3) on digits
    torchrun --standalone --nproc_per_node=2 launch.py graph=dml train.epochs=10 seed=1
    torchrun --standalone --nproc_per_node=3 launch.py graph=ktg3 dataset=cifar100 optim=paper
    python launch.py graph=teacher graph.nodes.0.model=resnet110 hydra.run.dir=teachers/digits/resnet110
    python launch.py mode=search search=small                              # ASHA graph search (Ray Tune)
    python launch.py mode=attention graph=mhgd                             # MHGD stage 1 (then train graph=mhgd)
    torchrun --standalone --nproc_per_node=3 launch.py graph=runs/search/<exp>/best_graph.yaml

Every rank runs ``train(cfg)``; node t is rank t. NCCL with one GPU per rank when CUDA is
there, gloo on CPU. Outputs go to hydra's run dir (``runs/...``, or ``hydra.run.dir=...``).
"""
from __future__ import annotations

import os

LAUNCHER = os.getppid()  # torchrun's agent: read before the seconds of imports (actors.lifeline)

import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, NoReturn, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from actors.config import RunConfig
from actors.errors import ConfigError
from actors.exchange import env_from_torchrun
from actors.graph_file import read_graph_file
from coordinator.hydra_conf import MODES, check_overrides, register_defaults
from coordinator.run import run_node


def _launcher_start_time() -> Optional[float]:
    """Start time of torchrun's agent (our parent process): the same for every local rank,
    so all ranks agree on one timestamped run directory."""
    try:
        ppid = os.getppid()
        with open(f"/proc/{ppid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat, counted after "pid (comm)"
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):  # no /proc (not Linux), or another layout
        return None


def run_id() -> str:
    """``KTG_RUN_ID`` if set; under torchrun on several machines the rendezvous id (the same
    on every machine: ``--rdzv-id``; without one, give ``hydra.run.dir``); under torchrun on
    one machine the agent's start time; else now."""
    if os.environ.get("KTG_RUN_ID"):
        return os.environ["KTG_RUN_ID"]
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if rdzv != "none" and world.isdigit() and local.isdigit() and int(world) > int(local):
        return rdzv
    t = time.time()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        start = _launcher_start_time()
        if start is None:
            return os.environ["TORCHELASTIC_RUN_ID"][:12]
        t = start
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(t))


if not OmegaConf.has_resolver("ktg_run_id"):
    OmegaConf.register_new_resolver("ktg_run_id", run_id, use_cache=True)
register_defaults()  # conf/config.yaml starts from the dataclasses' defaults (coordinator.hydra_conf)


def use_graph_files(argv: list[str]) -> list[str]:
    """``graph=<path to .yaml>`` (e.g. a search's best_graph.yaml) is registered as a graph
    option of its own, so hydra composes it like a preset and overrides still apply. The file
    is read with OmegaConf's YAML rules, as hydra reads one; ``ConfigError`` when it is
    missing, not YAML, or not a mapping (``actors.graph_file.read_graph_file``)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf._utils import get_yaml_loader

    out = []
    for arg in argv:
        if arg.startswith("graph=") and arg.endswith((".yaml", ".yml")):
            path = arg.split("=", 1)[1]
            node = OmegaConf.create(read_graph_file(path, loader=get_yaml_loader()))
            name = "file_" + "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
            ConfigStore.instance().store(group="graph", name=name, node=node)
            arg = f"graph={name}"
        out.append(arg)
    return out


def exit_on_config_error(e: ConfigError) -> NoReturn:
    """A user's input mistake: one line (from rank 0 only), exit code 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def search(cfg: DictConfig, out_dir: Optional[str] = None) -> dict[str, Any]:
    """Run the Ray Tune ASHA graph search described by ``cfg.search``."""
    from coordinator.search import run_search
    from coordinator.search_space import search_config_from

    if cfg.get("search") is None:
        raise ConfigError("mode=search needs a search space: search=<preset> (see conf/search/: small, paper)")
    container = OmegaConf.to_container(cfg, resolve=True)
    space = search_config_from(container["search"])
    space.dataset_name = container["dataset"]["name"]
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    return run_search(space, container, out_dir, seed=container.get("seed", 0))


def attention(cfg: DictConfig) -> dict[int, dict[str, Any]]:
    """Stage 1 of MHGD: train the attention modules the graph's mhgd edges need."""
    from coordinator.attention import run_attention

    return run_attention(RunConfig.from_dict(OmegaConf.to_container(cfg, resolve=True)))


def train(cfg: DictConfig, run_dir: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Validate the config and run this process's graph node. Returns the summary on rank 0."""
    container = OmegaConf.to_container(cfg, resolve=True)
    spec = RunConfig.from_dict(container)
    rank, world_size, local_rank = env_from_torchrun()
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        run_dir = hc.runtime.output_dir
        container.pop("hydra", None)
        container["overrides"] = list(hc.overrides.task)  # the command line, kept in run_config.json
    # under torchrun, a worker whose agent is killed ends itself (it lives in its own session)
    watch = LAUNCHER if "TORCHELASTIC_RUN_ID" in os.environ else None
    return run_node(spec, run_dir, rank, world_size, local_rank, config_dict=container, watch_parent=watch)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        mode = cfg.get("mode", MODES[0])
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        {"search": search, "attention": attention}.get(mode, train)(cfg)
    except ConfigError as e:
        exit_on_config_error(e)


def add_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with ``extra`` overrides placed right after the user's last override, so they
    join the same run of positional arguments (hydra's argparse refuses overrides on both
    sides of a flag such as ``--cfg job``)."""
    last = max((i for i, a in enumerate(argv) if i and "=" in a and not a.startswith("-")), default=len(argv) - 1)
    return argv[: last + 1] + extra + argv[last + 1 :]


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) != 0:
        # One hydra output (config, log) per run, written by rank 0; other ranks stay quiet.
        sys.argv = add_overrides(sys.argv, ["hydra.output_subdir=null", "hydra/job_logging=disabled",
                                            "hydra/hydra_logging=disabled"])
    elif "mode=search" not in sys.argv[1:] and not any(a.startswith("hydra.output_subdir=") for a in sys.argv[1:]):
        # A training run records its config in run_config.json once it owns the run directory;
        # hydra's .hydra/ would be rewritten by any command pointed at the directory, even one
        # that is then refused because another run holds it.
        sys.argv = add_overrides(sys.argv, ["hydra.output_subdir=null"])
    try:
        check_overrides(sys.argv[1:])  # preset and option names, before hydra's own errors
        sys.argv = use_graph_files(sys.argv)
    except ConfigError as e:
        exit_on_config_error(e)
    main()
