"""MMAML against MAML on a multimodal task distribution: sines, lines and quadratics.

The regression set-up of MMAML (Vuorio et al., NeurIPS 2019), with the ranges of its code
(:class:`mmtl_lib.MultimodalFunctions`): each task is a sine ``A sin(x - phase)``
(``A`` in [0.1, 5], phase in [0, pi]), a line (slope and intercept in [-3, 3]) or a quadratic
``a (x - c)^2 + b`` (``|a|`` in [0.02, 0.15], ``c`` and ``b`` in [-3, 3]), with equal
probability; ``x ~ U[-5, 5]``, targets with Gaussian noise of std ``--noise`` (0.3: an MSE floor
of 0.09). ``--k-shot`` support points, ``--n-query`` query points in training, 50 at test.

Methods, each ``--iterations`` Adam meta-iterations on the same task stream:

* ``MMAML`` (:class:`mmtl_lib.MMAML`): a :class:`~mmtl_lib.FiLMMLP` whose hidden
  layers are scaled and shifted per task by a :class:`~mmtl_lib.SetEncoder` of the support
  set (an MLP on ``(x, y)`` pairs, mean-pooled; MMAML's encoder is recurrent), then
  ``--inner-steps`` inner SGD steps on the network's weights, the modulation held fixed;
* ``MAML``: the same network without modulation, the same inner loop;
* ``MTL pretrain``: the network trained on the pooled points of all tasks
  (:class:`mmtl_lib.JointTraining`), the multi-task baseline (Wang, Zhao and Li, ICML 2021).

The outer learning rate follows a cosine schedule (``--schedule``): the task losses range over
two orders of magnitude, the meta-gradient is noisy, and at a constant rate the ranking of
MMAML and MAML at the last iterate changed from run to run. Every inner loop and every
test-time fine-tuning (``--inner-steps`` SGD steps at ``--inner-lr``) clips the gradient to norm
``--inner-grad-clip``, as MMAML's code does: the targets reach ~13 and unclipped steps diverged.
Printed: mean +- std over ``--seeds`` seeds of the post-adaptation MSE on ``--test-tasks``
tasks, overall and per family, and the training time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mmaml.py                 # CPU, a few minutes
    .venv/bin/python benchmarks/mmaml.py --seeds 5 --iterations 10000 --json results/mmaml.json
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F

import mmtl_lib as ml

METHODS = ("MMAML", "MAML", "MTL pretrain")


def make_learner(method: str, args) -> ml.Learner:
    hidden = (args.hidden,) * args.layers
    if method == "MMAML":
        model = ml.FiLMMLP(1, hidden, 1)
        encoder = ml.SetEncoder(1, 1, model.modulation_shapes(), hidden=args.encoder_hidden)
        return ml.MMAML(model, encoder, F.mse_loss, inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                        inner_grad_clip=args.inner_grad_clip)
    model = ml.MLP(1, hidden, 1)
    if method == "MAML":
        return ml.MAML(model, F.mse_loss, inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                       inner_grad_clip=args.inner_grad_clip, backend="vmap")
    return ml.JointTraining(model, F.mse_loss, inner_lr=args.inner_lr, test_inner_steps=args.inner_steps,
                            inner_grad_clip=args.inner_grad_clip)


def run_seed(args, seed: int, test_tasks: ml.TaskBatch) -> dict:
    sampler = ml.MultimodalFunctions(args.k_shot, args.n_query, noise_std=args.noise)
    mode = test_tasks.info["mode"]
    out = {}
    for method in args.methods:
        torch.manual_seed(seed)
        learner = make_learner(method, args)
        seconds = common.meta_train(learner, sampler, args, seed, schedule=args.schedule)
        mse = ml.evaluate(learner, test_tasks, inner_steps=args.inner_steps)[args.inner_steps]
        out[method] = {"mse": mse.mean().item(), "seconds": seconds,
                       **{f"mse_{m}": mse[mode == i].mean().item() for i, m in enumerate(sampler.MODES)}}
    return out


def summarise(per_seed: list[dict]) -> dict:
    return {method: {k: common.mean_std([s[method][k] for s in per_seed]) for k in per_seed[0][method]}
            for method in per_seed[0]}


def print_table(summary: dict, args) -> None:
    modes = ml.MultimodalFunctions.MODES
    common.print_header(f"{'method':<14} {'MSE':>16}" + "".join(f" {m:>16}" for m in modes) + f" {'train s':>14}")
    for method, s in summary.items():
        print(f"{method:<14} {common.cell(s['mse']):>16}" + "".join(f" {common.cell(s[f'mse_{m}']):>16}" for m in modes)
              + f" {common.cell(s['seconds'], '.1f'):>14}")
    print(f"post-adaptation MSE ({args.k_shot}-shot, {args.inner_steps} inner steps; noise floor "
          f"{args.noise ** 2:.2f}); mean +- std over {args.seeds} seed(s), {args.test_tasks} test tasks.")


def parse_args(argv=None):
    p = common.parser(__doc__, METHODS)
    common.add_meta_training_options(p, iterations=2000, k_shot=5, test_tasks=600)
    p.add_argument("--noise", type=float, default=0.3, help="std of the Gaussian noise on the targets")
    p.add_argument("--hidden", type=int, default=40, help="width of the regression network's hidden layers")
    p.add_argument("--layers", type=int, default=2, help="hidden layers of the regression network")
    p.add_argument("--encoder-hidden", type=int, default=64, help="width of MMAML's set encoder")
    p.add_argument("--inner-steps", type=int, default=5, help="inner steps, in training and at test time")
    p.add_argument("--inner-grad-clip", type=float, default=10.0, help="norm clip of each inner step's gradient")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                   help="outer learning-rate schedule (cosine: the end point is less noisy)")
    args = p.parse_args(argv)
    positive = ("seeds", "iterations", "meta_batch_size", "k_shot", "n_query", "hidden", "layers",
                "encoder_hidden", "inner_steps", "test_tasks")
    common.check_arguments(p, args, positive, METHODS)
    return args


def main(argv=None) -> dict:
    """Run the benchmark with command-line arguments ``argv``; print the table, return the report."""
    args = parse_args(argv)
    threads = common.start(args, f"sines, lines and quadratics, noise std {args.noise}; {args.k_shot}-shot, "
                                 f"{args.inner_steps} inner steps; MLP(1, {(args.hidden,) * args.layers}, 1); "
                                 f"{args.iterations} meta-iterations of {args.meta_batch_size} tasks")
    test_tasks = ml.MultimodalFunctions(args.k_shot, 50, noise_std=args.noise).sample(
        args.test_tasks, generator=ml.generator(12345))
    per_seed, total = common.run_seeds(lambda seed: run_seed(args, seed, test_tasks), args.seeds)
    return common.finish(args, threads, total, summarise(per_seed), lambda s: print_table(s, args), per_seed=per_seed)


if __name__ == "__main__":
    main()
