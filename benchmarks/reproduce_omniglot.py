"""Run the papers' Omniglot presets and record the results the book's chapters read.

For each preset: train (all 60k MAML iterations by default, or until ``--time-budget`` seconds),
then evaluate on ``--tasks`` test tasks with a 95% confidence interval. The results file holds,
per run, the accuracy and CI, the iterations reached out of the paper's, wall time, hardware,
torch version and the commit, beside the paper's number.

    python benchmarks/reproduce_omniglot.py                              # all MAML presets, GPU
    python benchmarks/reproduce_omniglot.py --presets maml-5w1s --time-budget 600
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


def run(name: str, device, time_budget, tasks: int, seed: int, tf32: bool) -> dict:
    config = ml.preset(name, seed=seed, time_budget=time_budget, tf32=tf32)
    samplers = ml.samplers(config, device)
    learner = ml.build_learner(config, device, n_classes=samplers["train"].n_classes)
    trainer = ml.build_trainer(config, learner, samplers, validate=False)
    trainer.fit(config.iterations, time_budget=time_budget, progress=False)
    start = time.perf_counter()
    result = ml.evaluate(learner, samplers["test"], n_tasks=tasks, metric=config.metric(), seed=seed).summary()
    return {
        "preset": name, "setting": config.describe(), "accuracy": result["metric"],
        "ci95": result["ci95"], "pre_adaptation_accuracy": result["pre_metric"], "tasks": tasks,
        "test_inner_steps": result["inner_steps"], "iterations": trainer.iteration,
        "paper_iterations": config.iterations, "train_seconds": round(trainer.elapsed, 1),
        "eval_seconds": round(time.perf_counter() - start, 1), "paper_accuracy": PAPER.get(name),
        "hardware": ml.machine(device), "torch": torch.__version__, "commit": commit(), "seed": seed, "tf32": tf32,
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
    p.add_argument("--out", default=str(ROOT / "results" / "omniglot.json"))
    args = p.parse_args(argv)
    common.check_arguments(p, args, positive=("tasks",), methods=OMNIGLOT_PRESETS, option="presets")
    ml.set_threads()
    device = ml.default_device() if args.device == "auto" else torch.device(args.device)
    names = args.presets
    runs = []
    for name in names:
        row = run(name, device, args.time_budget, args.tasks, args.seed, args.tf32)
        runs.append(row)
        paper = f"paper {row['paper_accuracy']}" if row["paper_accuracy"] else "no paper number"
        print(f"{name}: {100 * row['accuracy']:.2f} +- {100 * row['ci95']:.2f}% ({paper}) after "
              f"{row['iterations']}/{row['paper_iterations']} iterations, {row['train_seconds']} s "
              f"on {row['hardware']}",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text())["runs"] if out.exists() else []
    kept = [r for r in previous if r["preset"] not in names]
    out.write_text(json.dumps({"runs": kept + runs, "script": "benchmarks/reproduce_omniglot.py"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
