"""Is Reptile less sensitive to its hyperparameters than MAML? A grid on the sinusoid tasks.

For each algorithm (MAML, first-order MAML, Reptile) and each cell of the grid inner step size
``alpha`` (``--alphas``) x inner steps ``k`` (``--ks``) x outer step size ``beta`` (``--betas``),
one meta-training run from the same initial ``MLP(1, (40, 40), 1)`` (``torch.manual_seed(seed)``)
on the same stream of tasks, ``--iterations`` Adam meta-iterations of ``--meta-batch-size``
sinusoid tasks (Finn et al. 2017: ``y = A sin(x - b)``), each with 10 support and 10 query points.

Equal compute per task and iteration: the same 20 labelled points and ``k + 1`` forward-backward
passes. MAML and first-order MAML take ``k`` inner SGD steps on the 10 support points and one
gradient of the query loss (MAML also backpropagates through the inner steps); Reptile
(``backend="vmap"``) takes ``k + 1`` SGD steps on all 20 points and moves towards the mean of the
adapted weights, its direction fed to the same Adam.

Test: ``--test-tasks`` new sines (one fixed set for every run), each adapted on 10 support points
with SGD of step ``alpha``, the number of steps the configuration was trained with (``k`` for MAML
and first-order MAML, ``k + 1`` for Reptile) and also 10, and scored on 100 query points (MSE). A
run whose loss turns non-finite is recorded as diverged (MSE ``inf``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reptile_sweep.py --json results/reptile_sweep.json
    .venv/bin/python benchmarks/reptile_sweep.py --iterations 200 --alphas 0.01 --ks 1 --betas 0.001  # a smoke test

The chapter ``chapters/reptile.md`` reads the JSON and reruns one cell per algorithm live.
"""

from __future__ import annotations

import itertools
import math
import time

import common
import torch
import torch.nn.functional as F

import mmtl_lib as ml

ALGORITHMS = ("maml", "fomaml", "reptile")
TEST_SEED = 2018


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def pooled(tasks: ml.TaskBatch) -> ml.TaskBatch:
    """The same tasks with support and query points joined as the support set (Reptile's data)."""
    (sx, sy), (qx, qy) = tasks.support, tasks.query
    return ml.TaskBatch((torch.cat([sx, qx], 1), torch.cat([sy, qy], 1)), tasks.query, tasks.info)


def make_learner(algorithm: str, alpha: float, k: int) -> ml.Learner:
    """The learner of one cell; the caller seeds the model's initialisation."""
    model = ml.MLP(1, (40, 40), 1)
    if algorithm == "reptile":
        return ml.Reptile(model, F.mse_loss, inner_lr=alpha, inner_steps=k + 1, backend="vmap")
    return ml.MAML(model, F.mse_loss, inner_lr=alpha, inner_steps=k, first_order=algorithm == "fomaml",
                   backend="vmap")


def train(algorithm: str, alpha: float, k: int, beta: float, *, iterations: int, meta_batch_size: int = 10,
          seed: int = 0) -> ml.Learner:
    """Meta-train one cell; returns the learner (its parameters NaN if training diverged)."""
    torch.manual_seed(seed)
    learner = make_learner(algorithm, alpha, k)
    optimizer = torch.optim.Adam(learner.meta_parameters(), lr=beta)
    sampler, rng = ml.Sinusoid(10, 10), ml.generator(seed + 1)
    for _ in range(iterations):
        tasks = sampler.sample(meta_batch_size, generator=rng)
        optimizer.zero_grad()
        losses, _ = learner.meta_backward(pooled(tasks) if algorithm == "reptile" else tasks)
        if not torch.isfinite(losses).all():
            break
        optimizer.step()
    return learner


def test_tasks(n: int) -> ml.TaskBatch:
    return ml.Sinusoid(10, 100).sample(n, generator=ml.generator(TEST_SEED))


def score(learner: ml.Learner, tasks: ml.TaskBatch) -> dict:
    """Mean test MSE after the trained number of steps and after 10 (``inf`` if not finite)."""
    steps = learner.test_inner_steps
    result = ml.evaluate(learner, tasks, inner_steps=sorted({steps, 10}))

    def mean(s):
        value = result.mean(s)
        return value if math.isfinite(value) else math.inf

    return {"test_steps": steps, "mse": mean(steps), "mse_10_steps": mean(10), "mse_0_steps": mean(0)}


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset of maml,fomaml,reptile")
    p.add_argument("--alphas", default="0.003,0.01,0.03,0.1", help="inner step sizes")
    p.add_argument("--ks", default="1,3,5", help="inner steps of MAML (Reptile takes k + 1)")
    p.add_argument("--betas", default="0.0003,0.001,0.003", help="outer (Adam) step sizes")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--meta-batch-size", type=int, default=10)
    p.add_argument("--test-tasks", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    common.add_output_options(p)
    args = p.parse_args(argv)
    common.check_arguments(p, args, positive=("iterations", "meta_batch_size", "test_tasks"), methods=ALGORITHMS,
                           option="algorithms")
    alphas, ks, betas = floats(args.alphas), ints(args.ks), floats(args.betas)
    if not alphas or not ks or not betas or min(alphas + betas) <= 0 or min(ks) < 1:
        p.error("--alphas and --betas must be positive numbers and --ks integers >= 1")
    threads = ml.set_threads(args.threads)
    print(f"Reptile sweep: {len(alphas)} x {len(ks)} x {len(betas)} cells x {args.algorithms}; {ml.machine()}")
    tasks = test_tasks(args.test_tasks)
    cells, start = [], time.perf_counter()
    for algorithm, alpha, k, beta in itertools.product(args.algorithms, alphas, ks, betas):
        t0 = time.perf_counter()
        learner = train(algorithm, alpha, k, beta, iterations=args.iterations,
                        meta_batch_size=args.meta_batch_size, seed=args.seed)
        cell = {"algorithm": algorithm, "alpha": alpha, "k": k, "beta": beta, **score(learner, tasks),
                "seconds": time.perf_counter() - t0}
        cells.append(cell)
        print(f"{algorithm:8s} alpha={alpha:<6g} k={k} beta={beta:<6g} test MSE {cell['mse']:.3f} "
              f"({cell['test_steps']} steps), {cell['mse_10_steps']:.3f} (10 steps)  {cell['seconds']:.0f} s",
              flush=True)
    total = time.perf_counter() - start
    print(f"total wall time {total:.0f} s")
    report = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "torch": torch.__version__,
              "threads": threads, "total_seconds": total, "cells": cells}
    common.save_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
