"""Loss weightings on Omniglot alphabets as tasks: test accuracy, gain over single-task models, time.

Every alphabet is a task: classify a drawing as one of that alphabet's characters. The tasks share
the input space and the kind of knowledge needed (strokes, their shapes and positions), not the
labels, which is the setting multi-task learning was made for (Caruana 1997); Meyerson and
Miikkulainen (ICLR 2018, "Beyond Shared Hierarchies: Deep Multitask Learning through Soft Layer
Ordering") used Omniglot's 50 alphabets as 50 tasks in the same way.

Data (:func:`mmtl_lib.mtl_data.alphabet_tasks`): the 8 alphabets of ``mmtl_lib.mtl_data.ALPHABETS``
by default (264 characters; ``--alphabets`` picks others), images of ``--image-size`` pixels
(14 by default, for CPU speed). Each character has 20 drawings, one per drawer; drawers 0-14
(file names ``_01`` to ``_15``) train and drawers 15-19 test, the same for every character, so a
task has 15 training and 5 test drawings per class. The characters of the test set are those of the
training set, unlike a few-shot split: multi-task learning learns these tasks themselves, and the
test asks how well, on drawings not seen in training. No validation set: nothing was tuned per
method; all methods share the hyperparameters below, chosen once for a short CPU run.

Network: the trunk is the body of ``mmtl_lib.Conv4`` (4 x [3x3 conv with ``--filters`` channels,
BatchNorm with running statistics, ReLU, 2x2 max-pool]; at 14 pixels it ends in ``filters``
features), shared by all tasks; each alphabet has its own linear head
(:class:`mmtl_lib.mtl.HardSharing`). A training step takes ``--batch-size`` training images of
*every* alphabet (each alphabet's own shuffled epochs), runs the trunk once on the concatenated
batch, applies each head to its alphabet's features, and hands the ``T`` cross-entropy losses to a
weighting of :mod:`mmtl_lib.mtl`: EW, UW, GradNorm (``--alpha``, on the trunk's last conv layer),
DWA (temperature 2, "epochs" of ``n / batch-size`` steps for the mean training-set size ``n``),
PCGrad or RLW. Adam at ``--lr`` for the network and ``--weight-lr`` for UW's and GradNorm's
weights. Testing is in ``eval()`` mode, with BatchNorm's running statistics.

Single-task learning (STL), the reference: one such network with one head per alphabet, trained
alone from the same initial weights on the same batches of its alphabet for the same ``--train-steps``.
Each task's data are thus seen the same number of times by STL and by the multi-task methods, and
STL's total compute (``T`` networks) is about that of one multi-task run.

Reported, over ``--seeds`` seeds (each its own initial weights, batch order and random weights),
mean +- standard deviation of: every alphabet's test accuracy and their mean; ``Delta_p``, LibMTL's
average relative improvement over STL, ``100/T sum_t (acc_t - acc_t^STL) / acc_t^STL`` (positive:
better than one network per task); and the wall time of the training run (STL: all ``T``
networks). The table, not this docstring, says which method came out ahead.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mtl_omniglot.py --json results/mtl_omniglot.json
    .venv/bin/python benchmarks/mtl_omniglot.py --seeds 5 --train-steps 3000 --methods EW,PCGrad,STL

The default run (3 seeds, 1000 steps) took 6.4 minutes of CPU time on one thread of a Xeon VM,
9 minutes of wall time with other jobs on the machine's two cores; PCGrad is about four times
EW's time per step, STL (eight networks) between two and three times.
"""

from __future__ import annotations

import copy
import datetime
import statistics
import sys
import time

import common
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmtl_lib as ml
from mmtl_lib import mtl, mtl_data

METHODS = ("EW", "UW", "GradNorm", "DWA", "PCGrad", "RLW", "STL")


def make_model(n_classes: dict[str, int], args) -> mtl.HardSharing:
    """Conv4's body as the trunk, one ``Linear(features, n_classes[t])`` head per task."""
    conv = ml.Conv4(1, filters=args.filters, image_size=args.image_size, batch_norm=args.batch_norm)
    features = conv.head.in_features
    return mtl.HardSharing(conv.body, {t: nn.Linear(features, c) for t, c in n_classes.items()})


def last_conv(model: mtl.HardSharing) -> list[Tensor]:
    """The parameters of the trunk's last convolution: GradNorm's shared layer ``W``."""
    return list([m for m in model.trunk.modules() if isinstance(m, nn.Conv2d)][-1].parameters())


def batch_order(n_train: dict[str, int], iterations: int, batch_size: int, seed: int) -> dict[str, Tensor]:
    """task -> ``[iterations, batch_size]`` indices into its training set: shuffled epochs, the
    same for every method of a seed."""
    return {t: common.epoch_batches(n, iterations, batch_size, ml.generator(seed * 1000 + 10_000 + i))
            for i, (t, n) in enumerate(n_train.items())}


def train(model: mtl.HardSharing, weighting: mtl.Weighting, tasks: dict, order: dict[str, Tensor],
          args, shared: list[Tensor] | None = None) -> tuple[float, dict]:
    """Train ``model`` on its heads' tasks; return the seconds taken and the last diagnostics."""
    names = model.task_names
    groups = [{"params": list(model.parameters()), "lr": args.lr}]
    if list(weighting.parameters()):
        groups.append({"params": list(weighting.parameters()), "lr": args.weight_lr})
    optimizer = torch.optim.Adam(groups)
    model.train()
    b = args.batch_size
    start = time.perf_counter()
    for iteration in range(args.train_steps):
        x = torch.cat([tasks[t].train[0][order[t][iteration]] for t in names])
        features = model.trunk(x)
        losses = {t: F.cross_entropy(model.heads[t](features[i * b:(i + 1) * b]),
                                     tasks[t].train[1][order[t][iteration]])
                  for i, t in enumerate(names)}
        optimizer.zero_grad(set_to_none=True)
        diagnostics = weighting.backward(losses, shared if shared is not None else model.shared_parameters())
        optimizer.step()
    return time.perf_counter() - start, diagnostics


@torch.no_grad()
def test_accuracy(model: mtl.HardSharing, tasks: dict) -> dict[str, float]:
    model.eval()
    return {t: ml.accuracy(model(tasks[t].test[0], tasks=[t])[t], tasks[t].test[1]).item()
            for t in model.task_names}


def run_seed(tasks: dict, args, seed: int) -> dict[str, dict]:
    """method -> {"accuracy": task -> test accuracy, "seconds": training time, "weights": last weights}."""
    names = list(tasks)
    order = batch_order({t: len(task.train[1]) for t, task in tasks.items()}, args.train_steps, args.batch_size,
                        seed)
    mean_n = statistics.fmean(len(task.train[1]) for task in tasks.values())
    torch.manual_seed(seed)
    initial = make_model({t: len(task.characters) for t, task in tasks.items()}, args)
    results = {}
    for method in args.methods:
        if method == "STL":
            seconds, accuracy = 0.0, {}
            for t in names:
                single = mtl.HardSharing(copy.deepcopy(initial.trunk), {t: copy.deepcopy(initial.heads[t])})
                s, _ = train(single, mtl.EW(1), tasks, order, args)
                seconds += s
                accuracy.update(test_accuracy(single, tasks))
            results[method] = {"accuracy": accuracy, "seconds": seconds, "weights": None}
            continue
        model = copy.deepcopy(initial)
        weighting = common.make_weighting(method, len(tasks), alpha=args.alpha, layer=last_conv(model),
                                          steps_per_epoch=max(1, round(mean_n / args.batch_size)), seed=seed)
        seconds, diagnostics = train(model, weighting, tasks, order, args)
        weights = diagnostics.get("weights")
        results[method] = {"accuracy": test_accuracy(model, tasks), "seconds": seconds,
                           "weights": None if weights is None else weights.tolist()}
    return results


def delta_p(accuracy: dict[str, float], reference: dict[str, float]) -> float:
    """LibMTL's Delta_p for a higher-is-better metric, in percent."""
    return 100 * statistics.fmean((accuracy[t] - reference[t]) / reference[t] for t in reference)


def summarise(per_seed: list[dict[str, dict]], methods: list[str], names: list[str]) -> dict[str, dict]:
    summary = {}
    for method in methods:
        runs = [r[method] for r in per_seed]
        rows = {
            "mean_accuracy": [statistics.fmean(r["accuracy"].values()) for r in runs],
            "seconds": [r["seconds"] for r in runs],
            **{f"accuracy/{t}": [r["accuracy"][t] for r in runs] for t in names},
        }
        if "STL" in methods:
            rows["delta_p"] = [delta_p(s[method]["accuracy"], s["STL"]["accuracy"]) for s in per_seed]
        summary[method] = {k: common.mean_std(v) for k, v in rows.items()}
    return summary


def print_table(summary: dict[str, dict], names: list[str], args) -> None:
    has_delta = "delta_p" in next(iter(summary.values()))
    common.print_header(f"{'method':<9} {'mean test acc %':>16}" + (f" {'Delta_p vs STL %':>16}" if has_delta else "")
                        + f" {'train time s':>14}")
    for method, s in summary.items():
        acc = (100 * s["mean_accuracy"][0], 100 * s["mean_accuracy"][1])
        delta = f" {common.cell(s['delta_p'], '.2f', '+'):>16}" if has_delta else ""
        print(f"{method:<9} {common.cell(acc, '.1f'):>16}{delta} {common.cell(s['seconds'], '.1f'):>14}")
    print()
    short = [t.split("_(")[0][:9] for t in names]
    print("test accuracy % per alphabet (mean over seeds)")
    print(f"{'method':<9} " + " ".join(f"{s:>9}" for s in short))
    for method, s in summary.items():
        print(f"{method:<9} " + " ".join(f"{100 * s[f'accuracy/{t}'][0]:>9.1f}" for t in names))
    print(f"mean +- std over {args.seeds} seed(s); {args.train_steps} steps of {args.batch_size} images per task.")


def parse_args(argv=None):
    p = common.parser(__doc__, METHODS, seeds_help="independent runs: initial weights, batch order")
    p.add_argument("--train-steps", type=int, default=1000, help="Adam steps per method (STL: per task)")
    p.add_argument("--alphabets", default=",".join(mtl_data.ALPHABETS), help="comma-separated alphabets, the tasks")
    p.add_argument("--image-size", type=int, default=14, help="side of the images in pixels")
    p.add_argument("--filters", type=int, default=32, help="Conv4 channels per layer")
    p.add_argument("--batch-norm", default="running", choices=("running", "none"),
                   help="BatchNorm with running statistics in the trunk, or none")
    p.add_argument("--batch-size", type=int, default=8, help="training images per task per step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate for the networks")
    p.add_argument("--weight-lr", type=float, default=0.025,
                   help="Adam's learning rate for UW's and GradNorm's weights")
    p.add_argument("--alpha", type=float, default=1.5, help="GradNorm's asymmetry (LibMTL's default)")
    p.add_argument("--data", default=None, help="Omniglot folder (default: $MMTL_DATA, else the user cache)")
    args = p.parse_args(argv)
    positive = ("seeds", "train_steps", "image_size", "filters", "batch_size")
    common.check_arguments(p, args, positive, METHODS)
    args.alphabets = [a.strip() for a in args.alphabets.split(",") if a.strip()]
    return args


def main(argv=None) -> dict:
    """Run the benchmark with command-line arguments ``argv``; print the table, return the report."""
    args = parse_args(argv)
    threads = ml.set_threads(args.threads)
    data = ml.load_omniglot(args.data, image_size=args.image_size)
    tasks = mtl_data.alphabet_tasks(data.images, data.characters, args.alphabets)
    smallest = min(len(task.train[1]) for task in tasks.values())
    if args.batch_size > smallest:
        sys.exit(f"--batch-size = {args.batch_size} is not allowed: the smallest training set has {smallest} images")
    names = list(tasks)
    print(f"{len(tasks)} alphabets ({sum(len(t.characters) for t in tasks.values())} characters), "
          f"{args.image_size}px, drawers 0-14 train / 15-19 test; Conv4 trunk with {args.filters} filters; "
          f"{args.train_steps} Adam steps (lr {args.lr:g}) of {args.batch_size} images per task; {args.seeds} "
          f"seed(s); {ml.machine()}")
    per_seed, total = common.run_seeds(lambda seed: run_seed(tasks, args, seed), args.seeds)
    return common.finish(args, threads, total, summarise(per_seed, args.methods, names),
                         lambda s: print_table(s, names, args), exclude=("json", "data"),
                         alphabets={t: len(task.characters) for t, task in tasks.items()}, cpu=ml.processor("cpu"),
                         date=datetime.date.today().isoformat(), per_seed=per_seed)


if __name__ == "__main__":
    main()
