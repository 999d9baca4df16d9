"""Command line: ``python -m mmtl_lib {train,evaluate,presets} ...`` for long runs, e.g. on a GPU.

    python -m mmtl_lib presets
    python -m mmtl_lib train --preset maml-5w1s --out runs/maml-5w1s
    python -m mmtl_lib train --preset cpu --set filters=16 --set time_budget=120
    python -m mmtl_lib evaluate runs/maml-5w1s/checkpoint.pt --tasks 600 --seed 0

Mistakes a user can make (a bad option, preset, key or value, missing or unreadable data or
checkpoints: :class:`~mmtl_lib.errors.ConfigError` and :class:`~mmtl_lib.errors.DataError`) print
one line and exit with status 2. Anything else is a bug and shows its traceback (status 1).
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
from .errors import ConfigError, DataError
from .evaluation import evaluate as evaluate_learner
from .runtime import default_device, keep_freed_memory, machine, set_threads
from .train import load_checkpoint


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def train(args) -> dict:
    overrides = _parse_overrides(args.set)
    for key in ("iterations", "seed", "time_budget"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    config = configs.preset(args.preset, **overrides)  # every value checked before any data is read
    device = _device(args.device)
    samplers = configs.samplers(config, device)
    learner = configs.build_learner(config, device, n_classes=getattr(samplers["train"], "n_classes", None))
    trainer = configs.build_trainer(config, learner, samplers)
    out = Path(args.out or f"runs/{args.preset}")
    checkpoint = out / "checkpoint.pt"
    if args.resume:
        state = load_checkpoint(checkpoint, map_location=device)
        if state.get("config") != config.to_dict():
            raise ConfigError(f"--resume: {checkpoint} was trained with another configuration")
        trainer.load_state_dict(state)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    history = trainer.fit(config.iterations, time_budget=config.time_budget, progress=not args.quiet)
    trainer.save(checkpoint, config=config.to_dict())
    result = evaluate_learner(learner, samplers["test"], n_tasks=config.test_tasks, metric=config.metric(),
                              seed=args.seed or 0)
    summary = _summary(config, result.summary(), trainer.iteration, trainer.elapsed, device)
    summary["checkpoint"] = str(checkpoint)
    summary["history_points"] = len(history)
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    return summary


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
    device = _device(args.device)
    state = load_checkpoint(args.checkpoint, map_location=device)
    if not isinstance(state.get("config"), dict):
        raise DataError(f"checkpoint {args.checkpoint!r} holds no configuration: it was not written by train")
    config = configs.Config.from_dict(state["config"])
    samplers = configs.samplers(config, device)
    learner = configs.build_learner(config, device, n_classes=getattr(samplers["train"], "n_classes", None))
    learner.load_state_dict(state["learner"])
    start = time.perf_counter()
    result = evaluate_learner(learner, samplers["test"], n_tasks=args.tasks, inner_steps=args.inner_steps,
                              metric=config.metric(), seed=args.seed)
    summary = _summary(config, result.summary(), state["iteration"], state["elapsed"], device)
    summary["eval_seconds"] = round(time.perf_counter() - start, 1)
    summary["seed"] = args.seed
    return summary


def presets(_args) -> dict:
    return {name: configs.preset(name).describe() for name in configs.PRESETS}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmtl_lib", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: MMTL_THREADS or 1)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="meta-train a preset, then evaluate it on the test tasks")
    t.add_argument("--preset", required=True, help="one of: " + ", ".join(configs.PRESETS))
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a configuration key")
    t.add_argument("--iterations", type=int)
    t.add_argument("--time-budget", dest="time_budget", type=float, help="stop training after this many seconds")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", default="auto", help="auto (CUDA, MPS, else CPU), cpu, cuda, cuda:1, ...")
    t.add_argument("--out", help="output folder (default runs/PRESET)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
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
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
