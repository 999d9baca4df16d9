"""Run the papers' Omniglot presets and record the results the book's chapters read.

For each preset: train (all 60k MAML iterations by default, or until ``--time-budget`` seconds),
then evaluate on ``--tasks`` test tasks with a 95% confidence interval. With ``--val-every N``
the run is also validated every N iterations on ``--val-tasks`` tasks of the validation
characters (held out of the training split, never the test set), and the row records the
training seconds at which validation accuracy first reached the paper's figure: the time to
accuracy. The results file holds,
per run, the accuracy and CI, the iterations reached out of the paper's, wall time, hardware,
torch version and the commit, beside the paper's number.

    python benchmarks/reproduce_omniglot.py                              # all MAML presets, GPU
    python benchmarks/reproduce_omniglot.py --presets maml-5w1s --time-budget 600
    python benchmarks/reproduce_omniglot.py --presets maml-5w1s --time-budget 300 --val-every 250
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import common
import torch

import mmtl_lib as ml
from mmtl_lib.config import PRESETS

# Finn et al. 2017, Table 1; Nichol et al. 2018, Omniglot table (Reptile without transduction), in percent.
PAPER = {
    "maml-5w1s": 98.7, "maml-5w5s": 99.9, "maml-20w1s": 95.8, "maml-20w5s": 98.9,
    "fomaml-5w1s": 98.3, "fomaml-20w1s": 89.4,
    "reptile-5w1s": 95.39, "reptile-5w5s": 98.90, "reptile-20w1s": 88.14, "reptile-20w5s": 96.65,
}
ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_PRESETS = [name for name in PRESETS if ml.preset(name).task == "omniglot"]


def commit() -> str:
    """The code's commit: ``MMTL_COMMIT`` where the tree travels without .git, else git's."""
    if os.environ.get("MMTL_COMMIT"):
        return os.environ["MMTL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_to_target(history: list[dict], target: float | None) -> tuple[float | None, int | None]:
    """Training seconds and iteration of the first validation at or above ``target`` (a fraction)."""
    for record in history:
        if target is not None and record.get("val_metric", -1.0) >= target:
            return record["seconds"], record["iteration"]
    return None, None


def run(name: str, device, time_budget, tasks: int, seed: int, tf32: bool, val_every: int | None = None,
        val_tasks: int = 600) -> dict:
    overrides = {"val_every": val_every, "val_tasks": val_tasks} if val_every else {}
    config = ml.preset(name, seed=seed, time_budget=time_budget, tf32=tf32, **overrides)
    samplers = ml.samplers(config, device)
    learner = ml.build_learner(config, device, n_classes=samplers["train"].n_classes)
    trainer = ml.build_trainer(config, learner, samplers, validate=bool(val_every))
    history = trainer.fit(config.iterations, time_budget=time_budget, progress=False)
    target = PAPER.get(name) / 100 if PAPER.get(name) else None
    seconds, iteration = time_to_target(history, target) if val_every else (None, None)
    start = time.perf_counter()
    result = ml.evaluate(learner, samplers["test"], n_tasks=tasks, metric=config.metric(), seed=seed).summary()
    return {
        "preset": name, "setting": config.describe(), "accuracy": result["metric"],
        "ci95": result["ci95"], "pre_adaptation_accuracy": result["pre_metric"], "tasks": tasks,
        "test_inner_steps": result["inner_steps"], "iterations": trainer.iteration,
        "paper_iterations": config.iterations, "train_seconds": round(trainer.elapsed, 1),
        "eval_seconds": round(time.perf_counter() - start, 1), "paper_accuracy": PAPER.get(name),
        "hardware": ml.machine(device), "torch": torch.__version__, "commit": commit(), "seed": seed, "tf32": tf32,
        "validation": None if not val_every else {
            "every": val_every, "tasks": val_tasks, "target": target, "seconds_to_target": seconds,
            "iteration_at_target": iteration,
            "curve": [(r["iteration"], r["seconds"], r["val_metric"]) for r in history if "val_metric" in r]},
    }


def main(argv=None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--presets", default="maml-5w1s,maml-5w5s,maml-20w1s,maml-20w5s",
                   help=f"comma-separated, from: {', '.join(OMNIGLOT_PRESETS)}")
    p.add_argument("--time-budget", type=float, default=None, help="training seconds per preset (default: none)")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--val-every", type=int, default=None,
                   help="validate every N iterations and record the time to the paper's accuracy (default: off)")
    p.add_argument("--val-tasks", type=int, default=600, help="validation tasks per check (default: 600)")
    p.add_argument("--out", default=str(ROOT / "results" / "omniglot.json"))
    args = p.parse_args(argv)
    common.check_arguments(p, args, positive=("tasks", "val_tasks"), methods=OMNIGLOT_PRESETS, option="presets")
    if args.val_every is not None and args.val_every < 1:
        p.error(f"--val-every = {args.val_every} is not allowed: it must be a positive number of iterations")
    ml.set_threads()
    device = ml.default_device() if args.device == "auto" else torch.device(args.device)
    names = args.presets
    runs = []
    for name in names:
        row = run(name, device, args.time_budget, args.tasks, args.seed, args.tf32, args.val_every, args.val_tasks)
        runs.append(row)
        paper = f"paper {row['paper_accuracy']}" if row["paper_accuracy"] else "no paper number"
        print(f"{name}: {100 * row['accuracy']:.2f} +- {100 * row['ci95']:.2f}% ({paper}) after "
              f"{row['iterations']}/{row['paper_iterations']} iterations, {row['train_seconds']} s "
              f"on {row['hardware']}",
              flush=True)
        if row["validation"]:
            reached = row["validation"]["seconds_to_target"]
            print(f"  validation reached the paper's {row['paper_accuracy']}% after "
                  + (f"{reached} s of training (iteration {row['validation']['iteration_at_target']})" if reached
                     is not None else "never, within this run"), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text())["runs"] if out.exists() else []
    kept = [r for r in previous if r["preset"] not in names]
    out.write_text(json.dumps({"runs": kept + runs, "script": "benchmarks/reproduce_omniglot.py"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
