"""Which 5-way 1-shot set-up learns most in a fixed CPU budget? (how the `cpu` preset was chosen)

Each candidate is the `cpu` preset with some keys changed: the preset itself, the preset with one
of its choices undone (an ablation), and the paper's set-up. Each trains for ``--budget`` seconds
of wall time on one thread, exactly as the preset's trainer would (Adam, the cosine schedule over
the budget, no validation), and is then scored on ``--tasks`` test tasks with a 95% CI. It prints
the iterations reached, tasks/s and accuracy, and the throughput ratio to the paper's set-up run
in the same process; ``--json`` writes it all, with the machine, for the Omniglot chapter.

    python benchmarks/cpu_budget.py --json results/cpu_budget.json   # 6 candidates, about 35 minutes
    python benchmarks/cpu_budget.py --budget 60 --only cpu,paper
"""

from __future__ import annotations

import time

import common
import torch

import mmtl_lib as ml

PAPER = dict(image_size=28, filters=64, meta_batch_size=32, train_n_query=None, rotation="random",
             head_init="torch", outer_lr=1e-3, schedule="constant")
"""The MAML paper's 5-way 1-shot choices that the `cpu` preset changes."""

CANDIDATES = {
    "cpu": {},
    "15 query/class": dict(train_n_query=None),
    "random rotations": dict(rotation="random"),
    "PyTorch head init": dict(head_init="torch"),
    "meta lr 1e-3": dict(outer_lr=1e-3, schedule="constant"),
    "paper": PAPER,
    "meta-batch 32": dict(meta_batch_size=32),
    "Conv4-64, 28x28": dict(filters=64, image_size=28),
    "first-order": dict(algorithm="fomaml"),
}
DEFAULT = "cpu,15 query/class,random rotations,PyTorch head init,meta lr 1e-3,paper"


UNCAPPED = 100_000
"""An iteration count no candidate reaches within the budget: here the budget, not the count, ends
training (the preset itself trains a fixed 6,800 iterations)."""


def run(name: str, overrides: dict, budget: float, tasks: int, seed: int) -> dict:
    config = ml.preset("cpu", iterations=UNCAPPED, time_budget=budget, seed=seed, **overrides)
    device = torch.device("cpu")
    samplers = ml.samplers(config, device)
    learner = ml.build_learner(config, device)
    trainer = ml.build_trainer(config, learner, samplers, validate=False)
    trainer.fit(config.iterations, time_budget=budget, progress=False)
    start = time.perf_counter()
    result = ml.evaluate(learner, samplers["test"], n_tasks=tasks, metric=config.metric(), seed=seed).summary()
    return {
        "name": name, "overrides": overrides, "iterations": trainer.iteration,
        "train_seconds": round(trainer.elapsed, 1),
        "tasks_per_second": trainer.iteration * config.meta_batch_size / trainer.elapsed,
        "accuracy": result["metric"], "ci95": result["ci95"], "pre_adaptation_accuracy": result["pre_metric"],
        "test_tasks": tasks, "test_inner_steps": result["inner_steps"],
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> list[dict]:
    p = common.parser(__doc__)
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per candidate (default: 300)")
    p.add_argument("--tasks", type=int, default=600, help="test tasks per candidate (default: 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=DEFAULT, help=f"comma-separated candidates, from: {', '.join(CANDIDATES)} "
                                                   f"(default: {DEFAULT})")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if not args.budget > 0:
        p.error(f"--budget = {args.budget} is not allowed: it must be > 0 seconds")
    common.check_arguments(p, args, positive=("tasks",), methods=list(CANDIDATES), option="only")
    ml.set_threads()
    freed = ml.keep_freed_memory()
    budget_note = f"budget {args.budget:.0f} s per candidate, keep_freed_memory {'on' if freed else 'n/a'}"
    print(f"{ml.preset('cpu').describe()}; {budget_note}")
    start, rows = time.perf_counter(), []
    for name in args.only:
        row = run(name, CANDIDATES[name], args.budget, args.tasks, args.seed)
        rows.append(row)
        print(f"{name:>18}: {row['iterations']:6d} it, {row['tasks_per_second']:6.1f} tasks/s, "
              f"5-way 1-shot {100 * row['accuracy']:.1f} +- {100 * row['ci95']:.1f}%", flush=True)
    paper = next((r for r in rows if r["name"] == "paper"), None)
    if paper:
        for r in rows:
            print(f"{r['name']:>18}: {r['tasks_per_second'] / paper['tasks_per_second']:.1f}x "
                  "the paper set-up's tasks/s")
    common.save_report(args.json, {"budget_seconds": args.budget, "seed": args.seed,
                                   "cpu_preset": ml.preset("cpu").to_dict(),
                                   "wall_minutes": round((time.perf_counter() - start) / 60, 1), "runs": rows})
    return rows


if __name__ == "__main__":
    main()
