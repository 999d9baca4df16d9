"""Command line: ``python -m mmtl_lib {train,evaluate,presets} ...`` for long runs, e.g. on a GPU.

    python -m mmtl_lib presets
    python -m mmtl_lib train --preset maml-5w1s --out runs/maml-5w1s
    python -m mmtl_lib train --preset maml-5w1s --out runs/maml-5w1s --resume   # after a crash
    python -m mmtl_lib train --preset cpu --set filters=16 --set time_budget=120 --out runs/cpu-16
    python -m mmtl_lib evaluate runs/maml-5w1s/checkpoint.pt --tasks 600 --seed 0
    torchrun --nproc-per-node 4 -m mmtl_lib train --preset maml-5w1s --out runs/maml-5w1s  # 4 processes

``train`` checkpoints every ``checkpoint_every`` iterations and every ``checkpoint_minutes``,
atomically, with the configuration and the identity of the data; ``--resume`` continues the
last checkpoint to the result an uninterrupted run gives, and refuses other settings or other
data, saying which. A folder that already holds a run is not replaced without ``--overwrite``.
A non-finite loss stops with the last good state saved. The outputs are strict JSON (``null``
where a value is NaN, e.g. the interval of a single test task).

Launched by ``torchrun`` (``python -m torch.distributed.run``), ``train`` splits each
meta-batch across the processes and all-reduces the meta-gradient, to the parameters one process
reaches from the same seed (:mod:`mmtl_lib.distributed`); rank 0 alone writes the files, and
``config.json`` and ``result.json`` record ``world_size``. With ``--max-restarts``, a job whose
worker dies is restarted by torchrun from the last checkpoint, to the result of an uninterrupted
run.

Mistakes a user can make (a bad option, preset, key or value, missing, unreadable or mismatched
data or checkpoints, a diverging or out-of-memory run: :class:`~mmtl_lib.errors.ConfigError` and
:class:`~mmtl_lib.errors.DataError`) print one line and exit with status 2. Anything else is a bug
and shows its traceback (status 1).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch

from . import config as configs
from .distributed import World
from .errors import ConfigError, DataError
from .evaluation import evaluate as evaluate_learner
from .runtime import default_device, keep_freed_memory, machine, set_threads
from .train import json_text, load_checkpoint, write_atomically


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as vmap or adam
        overrides[key] = value
    return overrides


def _device(name: str, world: World | None = None) -> torch.device:
    if name == "auto":
        device = default_device()
    else:
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise ConfigError(f"--device {name!r}: {error}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    if world is None or not world.distributed:
        return device
    # Each process of a job takes the GPU of its local rank, or shares the CPU.
    processes = f"{world.world_size} processes"
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"--device {name!r} is not allowed with {processes}: each takes a GPU of its own, "
                              "cuda:LOCAL_RANK; use --device cuda (or auto)")
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK = {world.local_rank} is not allowed: this machine has "
                              f"{torch.cuda.device_count()} GPU(s), one per process; lower --nproc-per-node, or use "
                              "--device cpu")
        return torch.device("cuda", world.local_rank)
    if device.type != "cpu":
        raise ConfigError(f"--device {name!r} is not allowed with {processes}: they train on CUDA (NCCL) or "
                          "the CPU (gloo)")
    return device


RUN_FILES = ("checkpoint.pt", "config.json", "history.json", "result.json")
"""What ``train`` writes into ``--out``."""

RESUMABLE = ("checkpoint_every", "checkpoint_minutes")
"""Keys a resumed run may change: they decide when checkpoints are written, not what is computed."""


def train(args) -> dict | None:
    overrides = _parse_overrides(args.set)
    for key in ("iterations", "seed", "time_budget"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    config = configs.preset(args.preset, **overrides)  # every value checked before any data is read
    world = World.from_env()  # one process, or torchrun's
    configs.check_world(config, world)
    device = _device(args.device, world)
    out = Path(args.out or f"runs/{args.preset}")
    checkpoint = out / "checkpoint.pt"
    with world.running(device):
        state = _start(args, config, out, world, device)
        samplers = configs.samplers(config, device)
        learner = configs.build_learner(config, device, n_classes=getattr(samplers["train"], "n_classes", None))
        trainer = configs.build_trainer(config, learner, samplers, world=world)
        identity = configs.data_identity(samplers)
        world.check_same("configuration", config.to_dict())
        world.check_same("data", {name: json_text(v) for name, v in identity.items()}, error=DataError)
        if state is not None:
            configs.check_data(state, samplers, checkpoint)
            _load_weights(trainer, state, checkpoint)
        if world.is_main:
            if state is None:  # a stale checkpoint or result beside the new config.json would pass for this run's
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            run = {"world_size": world.world_size, **({"torchrun_run_id": world.run_id} if world.run_id else {})}
            write_atomically(out / "config.json", json_text({**config.to_dict(), **run}).encode())
        history = trainer.fit(
            config.iterations, time_budget=config.time_budget, checkpoint=checkpoint,
            checkpoint_every=config.checkpoint_every, checkpoint_minutes=config.checkpoint_minutes,
            checkpoint_extra={"config": config.to_dict(), "data": identity},
            progress=not args.quiet,
        )
    if not world.is_main:  # rank 0 alone evaluates and reports
        return None
    result = evaluate_learner(learner, samplers["test"], n_tasks=config.test_tasks, metric=config.metric(),
                              seed=args.seed or 0)
    summary = _summary(config, result.summary(), trainer.iteration, trainer.elapsed, device)
    summary["checkpoint"] = str(checkpoint)
    summary["history_points"] = len(history)
    summary["world_size"] = world.world_size
    write_atomically(out / "result.json", json_text(summary).encode())
    return summary


def _start(args, config, out: Path, world: World, device) -> dict | None:
    """The checkpoint to continue from, or ``None`` to start afresh: decided, and read, by rank 0,
    and handed to every rank, so that all start from the same state.

    ``--resume`` continues ``out``'s checkpoint; a job that torchrun restarted after a failure
    continues the checkpoint of its own first attempt (the ``torchrun_run_id`` in ``config.json``
    is its own), or starts afresh where that attempt wrote none. Otherwise a folder that already
    holds a run is refused unless ``--overwrite``.
    """
    answer = None
    if world.is_main:
        try:
            answer = {"state": _rank0_start(args, config, out, world, device)}
        except (ConfigError, DataError) as error:  # every rank stops with it
            answer = {"error": error}
    answer = world.broadcast(answer)
    if "error" in answer:
        raise answer["error"]
    return answer["state"]


def _rank0_start(args, config, out: Path, world: World, device) -> dict | None:
    checkpoint = out / "checkpoint.pt"
    restarted = world.restart_count > 0 and world.run_id is not None and _run_id(out) == world.run_id
    if args.resume or (restarted and checkpoint.exists()):
        # several processes: on the CPU, for the broadcast; loading puts it on each rank's device
        state = load_checkpoint(checkpoint, map_location="cpu" if world.distributed else device)
        _check_resumable(configs.checkpoint_config(state, checkpoint), config, checkpoint)
        return state
    if not restarted and not args.overwrite and any((out / name).exists() for name in ("checkpoint.pt", "config.json")):
        raise ConfigError(f"--out {str(out)!r} already holds a run: pass --resume to continue it, or --overwrite "
                          "to replace it")
    return None


def _run_id(out: Path) -> str | None:
    """The torchrun run id recorded in ``out/config.json``, if any."""
    try:
        return json.loads((out / "config.json").read_text()).get("torchrun_run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _check_resumable(old, new, checkpoint) -> None:
    changed = [f"{key} {value!r} -> {getattr(new, key)!r}" for key, value in old.to_dict().items()
               if key not in RESUMABLE and value != getattr(new, key)]
    if changed:
        raise ConfigError(f"--resume: {str(checkpoint)!r} was trained with another configuration: "
                          f"{', '.join(changed)} (checkpoint -> now); resume with its settings, or start a new run "
                          "with another --out or --overwrite")


def _load_weights(target, state: dict, path) -> None:
    """``target.load_state_dict(state)``, for a learner or a trainer; weights that do not fit the
    configuration recorded beside them (an edited or mixed-up checkpoint) are a DataError."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError) as error:
        # torch says "Error(s) in loading state_dict" when names or sizes differ; a KeyError is a
        # learner's entry (e.g. Meta-SGD's rates) missing
        if isinstance(error, RuntimeError) and "loading state_dict" not in str(error):
            raise
        raise DataError(f"checkpoint {str(path)!r} holds weights that do not fit its configuration "
                        f"({type(error).__name__}: {error})") from error


def _summary(config, result, iterations, seconds, device) -> dict:
    name = "accuracy" if config.task == "omniglot" else "mse"
    return {
        "setting": config.describe(),
        name: result["metric"], "ci95": result["ci95"],
        f"pre_adaptation_{name}": result["pre_metric"],
        "n_way": config.n_way, "k_shot": config.k_shot, "tasks": result["tasks"],
        "inner_steps": result["inner_steps"], "iterations": iterations, "train_seconds": round(seconds, 1),
        "hardware": machine(device), "torch": torch.__version__,
    }


def evaluate(args) -> dict:
    world = World.from_env()
    if world.distributed:
        raise ConfigError(f"evaluate runs in one process, not {world.world_size}: launch it with python -m mmtl_lib, "
                          "not torchrun")
    device = _device(args.device)
    state = load_checkpoint(args.checkpoint, map_location=device)
    config = configs.checkpoint_config(state, args.checkpoint)
    samplers = configs.samplers(config, device)
    configs.check_data(state, samplers, args.checkpoint)
    learner = configs.build_learner(config, device, n_classes=getattr(samplers["train"], "n_classes", None))
    _load_weights(learner, state["learner"], args.checkpoint)
    start = time.perf_counter()
    result = evaluate_learner(learner, samplers["test"], n_tasks=args.tasks, inner_steps=args.inner_steps,
                              metric=config.metric(), seed=args.seed)
    summary = _summary(config, result.summary(), state["iteration"], state["elapsed"], device)
    summary["eval_seconds"] = round(time.perf_counter() - start, 1)
    summary["seed"] = args.seed
    return summary


def presets(_args) -> dict:
    return {name: configs.preset(name).describe() for name in configs.PRESETS}


LAUNCH = """\
several processes (torchrun; each meta-batch is split across them, the result is one process's):
  torchrun --nproc-per-node 2 -m mmtl_lib train --preset cpu --out runs/cpu-2
  torchrun --nproc-per-node 8 --max-restarts 3 -m mmtl_lib train --preset maml-5w1s --out runs/m
several machines (run on each; --out on a shared file system, a unique --rdzv-id per job):
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
      --rdzv-id JOB --max-restarts 3 -m mmtl_lib train --preset maml-5w1s --out /shared/runs/m
meta_batch_size must be a multiple of the number of processes; rank 0 writes every file; with
--max-restarts a job whose worker dies resumes from the last checkpoint, to the same result."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmtl_lib", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: MMTL_THREADS or 1)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="meta-train a preset, then evaluate it on the test tasks",
                       description="Meta-train a preset, then evaluate it on the test tasks.", epilog=LAUNCH,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--preset", required=True, help="one of: " + ", ".join(configs.PRESETS))
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a configuration key")
    t.add_argument("--iterations", type=int)
    t.add_argument("--time-budget", dest="time_budget", type=float, help="stop training after this many seconds")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", default="auto", help="auto (CUDA, MPS, else CPU), cpu, cuda, cuda:1, ...")
    t.add_argument("--out", help="output folder (default runs/PRESET)")
    run = t.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue from OUT/checkpoint.pt, with the same settings and data")
    run.add_argument("--overwrite", action="store_true", help="replace the run that OUT already holds")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=train)
    e = sub.add_parser("evaluate", help="mean test accuracy (or MSE) with a 95%% confidence interval")
    e.add_argument("checkpoint")
    e.add_argument("--tasks", type=int, default=600)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--inner-steps", dest="inner_steps", type=int, default=None,
                   help="test-time inner steps (default: the preset's)")
    e.add_argument("--device", default="auto")
    e.set_defaults(run=evaluate)
    s = sub.add_parser("presets", help="list the presets")
    s.set_defaults(run=presets)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        set_threads(args.threads)
        keep_freed_memory()  # up to 1.22x tasks/s on a CPU; see its docstring
        result = args.run(args)
    except (ConfigError, DataError) as error:  # the user's to fix; anything else is a bug: traceback
        print("error:", " ".join(str(error).split()), file=sys.stderr)  # torch may answer in several lines
        return 2
    if result is not None:  # None: a rank other than 0, which reports nothing
        print(json_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
