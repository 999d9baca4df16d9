"""MMAML against MAML on a multimodal task distribution: sines, lines and quadratics.

The regression set-up of MMAML (Vuorio et al., NeurIPS 2019), with the ranges of its code
(:class:`mmtl_lib.mmtl.MultimodalFunctions`): each task is a sine ``A sin(x - phase)``
(``A`` in [0.1, 5], phase in [0, pi]), a line (slope and intercept in [-3, 3]) or a quadratic
``a (x - c)^2 + b`` (``|a|`` in [0.02, 0.15], ``c`` and ``b`` in [-3, 3]), with equal
probability; ``x ~ U[-5, 5]``, targets with Gaussian noise of std ``--noise`` (0.3: an MSE floor
of 0.09). ``--k-shot`` support points, ``--n-query`` query points in training, 50 at test.

Methods, each ``--iterations`` Adam meta-iterations on the same task stream:

* ``MMAML`` (:class:`mmtl_lib.mmtl.MMAML`): a :class:`~mmtl_lib.mmtl.FiLMMLP` whose hidden
  layers are scaled and shifted per task by a :class:`~mmtl_lib.mmtl.SetEncoder` of the support
  set (an MLP on ``(x, y)`` pairs, mean-pooled; MMAML's encoder is recurrent), then
  ``--steps`` inner SGD steps on the network's weights, the modulation held fixed;
* ``MAML``: the same network without modulation, the same inner loop;
* ``MTL pretrain``: the network trained on the pooled points of all tasks
  (:class:`mmtl_lib.JointTraining`), the multi-task baseline (Wang, Zhao and Li, ICML 2021).

The outer learning rate follows a cosine schedule (``--schedule``): the task losses range over
two orders of magnitude, the meta-gradient is noisy, and at a constant rate the ranking of
MMAML and MAML at the last iterate changed from run to run. Every inner loop and every
test-time fine-tuning (``--steps`` SGD steps at ``--inner-lr``) clips the gradient to norm
``--grad-clip``, as MMAML's code does: the targets reach ~13 and unclipped steps diverged.
Printed: mean +- std over ``--seeds`` seeds of the post-adaptation MSE on ``--test-tasks``
tasks, overall and per family, and the training time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mmaml.py                 # CPU, a few minutes
    .venv/bin/python benchmarks/mmaml.py --seeds 5 --iterations 10000 --json results/mmaml.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import mmtl_lib
from mmtl_lib import mmtl
from mmtl_lib.runtime import check_arguments, run_seeds, save_report
from mmtl_lib.train import Trainer

METHODS = ("MMAML", "MAML", "MTL pretrain")


def make_learner(method: str, args):
    hidden = (args.hidden,) * args.layers
    if method == "MMAML":
        model = mmtl.FiLMMLP(1, hidden, 1)
        encoder = mmtl.SetEncoder(1, 1, model.modulation_shapes(), hidden=args.encoder_hidden)
        return mmtl.MMAML(model, encoder, F.mse_loss, inner_lr=args.inner_lr, steps=args.steps,
                          grad_clip=args.grad_clip)
    model = mmtl_lib.MLP(1, hidden, 1)
    if method == "MAML":
        return mmtl_lib.MAML(model, F.mse_loss, inner_lr=args.inner_lr, steps=args.steps,
                             grad_clip=args.grad_clip, backend="vmap")
    return mmtl_lib.JointTraining(model, F.mse_loss, test_lr=args.inner_lr, test_steps=args.steps,
                                  grad_clip=args.grad_clip)


def run_seed(args, seed: int, test_tasks: mmtl_lib.TaskBatch) -> dict:
    family = mmtl.MultimodalFunctions(noise_std=args.noise)
    mode = test_tasks.info["mode"]
    out = {}
    for method in args.methods:
        torch.manual_seed(seed)
        learner = make_learner(method, args)

        def sample(n, generator):
            return family.sample(n, args.k_shot, args.n_query, generator=generator)

        start = time.perf_counter()
        Trainer(learner, sample, meta_batch_size=args.meta_batch_size, outer_lr=args.outer_lr,
                schedule=args.schedule, seed=seed).fit(args.iterations, progress=False)
        seconds = time.perf_counter() - start
        mse = mmtl_lib.evaluate(learner, test_tasks, steps=[args.steps])[args.steps]
        out[method] = {"mse": mse.mean().item(), "seconds": seconds,
                       **{f"mse_{m}": mse[mode == i].mean().item() for i, m in enumerate(family.MODES)}}
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: list[dict]) -> dict:
    return {method: {k: mean_std([s[method][k] for s in per_seed]) for k in per_seed[0][method]}
            for method in per_seed[0]}


def print_table(summary: dict, args) -> None:
    def cell(pair, fmt=".3f"):
        return f"{format(pair[0], fmt)} +- {format(pair[1], fmt)}"

    modes = mmtl.MultimodalFunctions.MODES
    header = f"{'method':<14} {'MSE':>16}" + "".join(f" {m:>16}" for m in modes) + f" {'train s':>14}"
    print(header)
    print("-" * len(header))
    for method, s in summary.items():
        print(f"{method:<14} {cell(s['mse']):>16}" + "".join(f" {cell(s[f'mse_{m}']):>16}" for m in modes)
              + f" {cell(s['seconds'], '.1f'):>14}")
    print(f"post-adaptation MSE ({args.k_shot}-shot, {args.steps} steps; noise floor {args.noise ** 2:.2f}); "
          f"mean +- std over {args.seeds} seed(s), {args.test_tasks} test tasks.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=2000, help="meta-iterations per method")
    p.add_argument("--meta-batch-size", type=int, default=25)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--n-query", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.3, help="std of the Gaussian noise on the targets")
    p.add_argument("--hidden", type=int, default=40, help="width of the regression network's hidden layers")
    p.add_argument("--layers", type=int, default=2, help="hidden layers of the regression network")
    p.add_argument("--encoder-hidden", type=int, default=64, help="width of MMAML's set encoder")
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=5, help="inner steps, in training and at test time")
    p.add_argument("--grad-clip", type=float, default=10.0, help="inner-gradient norm clip")
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                   help="outer learning-rate schedule (cosine: the end point is less noisy)")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $MMTL_THREADS, else 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    positive = ("seeds", "iterations", "meta_batch_size", "k_shot", "n_query", "hidden", "layers",
                 "encoder_hidden", "steps", "test_tasks")
    check_arguments(p, args, positive, METHODS)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = mmtl_lib.set_threads(args.threads)
    print(f"sines, lines and quadratics, noise std {args.noise}; {args.k_shot}-shot, {args.steps} inner steps; "
          f"MLP(1, {(args.hidden,) * args.layers}, 1); {args.iterations} meta-iterations of {args.meta_batch_size} "
          f"tasks; {args.seeds} seed(s); torch {torch.__version__}, {threads} thread(s)")
    test_tasks = mmtl.MultimodalFunctions(noise_std=args.noise).sample(
        args.test_tasks, args.k_shot, 50, generator=mmtl_lib.generator(12345))
    per_seed, total = run_seeds(lambda seed: run_seed(args, seed, test_tasks), args.seeds)
    summary = summarise(per_seed)
    print()
    print_table(summary, args)
    print(f"total wall time {total:.0f} s")
    report = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "torch": torch.__version__,
              "python": sys.version.split()[0], "threads": threads, "total_seconds": total,
              "summary": summary, "per_seed": per_seed}
    save_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
