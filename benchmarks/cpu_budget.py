"""Which 5-way 1-shot set-up learns most in a fixed CPU budget? (how the `cpu` preset was chosen)

Each candidate is the `cpu` preset with some keys changed; each trains for ``--budget`` seconds
of wall time on one thread and is then scored on ``--tasks`` test tasks (95% CI). It prints
the iterations reached, tasks/s and accuracy, and the throughput ratio to the paper's set-up
(Conv4-64 on 28x28, meta-batch 32) run in the same process.

    python benchmarks/cpu_budget.py --budget 300            # about 30 minutes for all candidates
    python benchmarks/cpu_budget.py --budget 60 --only paper,cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mmtl_lib import experiment
from mmtl_lib.runtime import set_threads
from mmtl_lib.train import Trainer, evaluate_learner

CANDIDATES = {
    "paper": dict(image_size=28, filters=64, meta_batch_size=32),
    "conv64-28-mb8": dict(image_size=28, filters=64, meta_batch_size=8),
    "conv32-28-mb8": dict(image_size=28, filters=32, meta_batch_size=8),
    "conv16-28-mb8": dict(image_size=28, filters=16, meta_batch_size=8),
    "cpu": dict(),
    "cpu-lr1e-3": dict(outer_lr=1e-3, schedule="constant"),
    "conv32-14-mb4": dict(meta_batch_size=4),
    "conv64-14-mb8": dict(filters=64),
    "fomaml-cpu": dict(algorithm="fomaml"),
    "fomaml-conv64-28-mb8": dict(algorithm="fomaml", image_size=28, filters=64),
}


def run(name: str, overrides: dict, budget: float, tasks: int, seed: int) -> dict:
    config = experiment.preset("cpu", time_budget=budget, seed=seed, **overrides)
    device = torch.device("cpu")
    samplers = experiment.samplers(config, device)
    learner = experiment.build_learner(config, device)
    trainer = Trainer(learner, samplers["train"].sample, meta_batch_size=config["meta_batch_size"],
                      outer_lr=config["outer_lr"], metric=experiment.metric_for(config), seed=seed)
    trainer.fit(config["iterations"], time_budget=budget, progress=False)
    start = time.perf_counter()
    result = evaluate_learner(learner, samplers["test"].sample, tasks=tasks, metric=experiment.metric_for(config))
    return {
        "name": name, **overrides, "iterations": trainer.iteration, "train_seconds": round(trainer.elapsed, 1),
        "tasks_per_second": trainer.iteration * config["meta_batch_size"] / trainer.elapsed,
        "accuracy": result["metric"], "ci95": result["ci95"], "eval_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per candidate")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated candidate names: " + ",".join(CANDIDATES))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    set_threads()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), budget {args.budget:.0f} s per candidate")
    rows = []
    for name in names:
        row = run(name, CANDIDATES[name], args.budget, args.tasks, args.seed)
        rows.append(row)
        print(f"{name:>16}: {row['iterations']:6d} it, {row['tasks_per_second']:6.1f} tasks/s, "
              f"5-way 1-shot {100 * row['accuracy']:.1f} +- {100 * row['ci95']:.1f}%", flush=True)
    paper = next((r for r in rows if r["name"] == "paper"), None)
    if paper:
        for r in rows:
            ratio = r["tasks_per_second"] / paper["tasks_per_second"]
            print(f"{r['name']:>16}: {ratio:.1f}x the paper set-up's tasks/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
