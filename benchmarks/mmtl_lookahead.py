"""Auxiliary tasks with learned weights: which tasks help a primary task that has few examples?

A primary regression task with ``--n-primary`` examples and nine auxiliary tasks with
``--n-aux`` examples each share one network: an MLP trunk with one linear head per task,
``mmtl_lib.MLP(d, hidden, T)`` (output column ``t`` is task ``t``'s head). Inputs are
``x ~ N(0, I_d)``; with ``h(x) = tanh(W x + b)``, ``m`` teacher features:

* primary (task 0): ``y = v_0 . h(x) + noise``;
* related (tasks 1-3): ``y = v_t . h(x) + noise``, the same features and a readout of
  correlation ~``--relatedness`` with the primary's;
* unrelated (tasks 4-6): ``y = v_t . h'(x) + noise``, features ``h'`` of an independent teacher;
* noise (tasks 7-9): ``y ~ N(0, 1)``, independent of ``x``.

Readouts are scaled so every target has variance ~1; the noise has standard deviation
``--noise``. Every method trains for ``--train-steps`` full-batch Adam steps from the same initial
network and is scored by the primary task's MSE on ``--n-test`` fresh inputs (noise-free targets):

* ``single-task``: the primary task alone;
* ``equal``: all ten tasks, equal weights;
* ``MAML + fine-tune``: MAML (``mmtl_lib.MAML``, one output) meta-trained on the nine auxiliary
  tasks as a task distribution, then fine-tuned on the primary task with Adam as single-task;
* ``learned k=1``, ``learned k=3``: Auto-Lambda's weights (:class:`mmtl_lib.LookaheadWeights`)
  from a ``k``-step lookahead. The primary task's examples are split: ``--n-val`` held out for
  the lookahead's loss, the rest trained on. All weights start at ``--init-weight``;
* ``learned k=... + refit``: the same initial network trained again, on all the primary task's
  examples, with each task's weight fixed at its mean over the learned run, so that the held-out
  examples are not lost to training;
* ``oracle``: equal weights on the primary and the related tasks only.

Printed: mean +- std over ``--seeds`` seeds (each its own teachers, data and initial network)
of the primary test MSE, how often each method was the best non-oracle one, and the learned
weights by group. ``--json`` also stores the weights every ``--log-every`` steps, for a figure.

What to expect: noise tasks are switched off within a few dozen steps. Related tasks are not
reliably preferred to unrelated ones, least with ``k = 1``: the lookahead sees a task through
its gradient on the shared trunk, which reaches the trunk through that task's own head, and a
head that does not (yet) resemble the primary's makes even a related task look unhelpful; a
task whose weight hits 0 stops training its head and can stay there. The one-pass runs also
lose the held-out examples; refitting recovers them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mmtl_lookahead.py          # CPU, about a minute
    .venv/bin/python benchmarks/mmtl_lookahead.py --seeds 5 --json results/mmtl_lookahead.json
"""

from __future__ import annotations

import copy
import statistics
import time

import common
import torch
import torch.nn.functional as F
from torch import Tensor

import mmtl_lib as ml

GROUPS = {"primary": [0], "related": [1, 2, 3], "unrelated": [4, 5, 6], "noise": [7, 8, 9]}
N_TASKS = 10
METHODS = ("single-task", "equal", "MAML + fine-tune", "learned k=1", "learned k=3", "oracle")


def make_problem(args, seed: int) -> dict:
    """One seed's data: per task ``x`` ``[n, d]``, ``y`` ``[n]``, ``task`` ``[n]``; the primary
    task's test set ``(x [n_test, d], y [n_test])`` with noise-free targets."""
    g = ml.generator(seed)
    d, m = args.input_dim, args.features
    teachers = [(torch.randn(m, d, generator=g), torch.randn(m, generator=g)) for _ in range(2)]

    def features(x, t):  # h(x) for the primary and related tasks, h'(x) for the unrelated ones
        W, b = teachers[t in GROUPS["unrelated"]]
        return torch.tanh(x @ W.T + b)

    # Readouts of the primary, related and unrelated tasks, scaled to targets of variance ~1.
    probe = torch.randn(20_000, d, generator=g)
    readouts = {}
    for t in range(7):
        v = torch.randn(m, generator=g)
        if t in GROUPS["related"]:  # correlation ~rho with the primary's readout
            v = args.relatedness * readouts[0] / readouts[0].norm() * m**0.5 + (1 - args.relatedness**2) ** 0.5 * v
        readouts[t] = v / (features(probe, t) @ v).std()
    xs, ys, tasks = [], [], []
    for t in range(N_TASKS):
        n = args.n_primary if t == 0 else args.n_aux
        x = torch.randn(n, d, generator=g)
        if t in GROUPS["noise"]:
            y = torch.randn(n, generator=g)
        else:
            y = features(x, t) @ readouts[t] + args.noise * torch.randn(n, generator=g)
        xs.append(x), ys.append(y), tasks.append(torch.full((n,), t))
    x_test = torch.randn(args.n_test, d, generator=g)
    return {"x": xs, "y": ys, "task": tasks, "test": (x_test, features(x_test, 0) @ readouts[0])}


def batch(problem: dict, tasks: list[int], primary: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, d], packed [n, 1 + T])`` of the listed tasks; ``primary`` selects task 0's examples."""
    x = torch.cat([problem["x"][t][primary if t == 0 else slice(None)] for t in tasks])
    y = torch.cat([problem["y"][t][primary if t == 0 else slice(None)] for t in tasks])
    task = torch.cat([problem["task"][t][primary if t == 0 else slice(None)] for t in tasks])
    return x, ml.pack_targets(y, task, N_TASKS)


def test_mse(model, problem, column: int = 0) -> float:
    x, y = problem["test"]
    with torch.no_grad():
        return F.mse_loss(model(x)[:, column], y).item()


def train_weighted(model, data, weights, args, lookahead=None, val=None) -> tuple[list, Tensor | None]:
    """Full-batch Adam on ``sum_t weights_t L_t`` over ``data``, ``--train-steps`` steps. With a
    :class:`LookaheadWeights` the weights take their lookahead step first, every step, and the
    result is (weights every ``--log-every`` steps, their mean over all steps)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    params = dict(model.named_parameters())
    history, total = [], 0
    for iteration in range(args.train_steps):
        if lookahead is not None:
            lookahead.update(model, params, data, val)
            total = total + lookahead.weights.detach()
            if iteration % args.log_every == 0:
                history.append(lookahead.weights.detach().tolist())
        loss_fn = lookahead.loss_fn() if lookahead is not None else ml.weighted_loss(weights)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(data[0]), data[1]).backward()
        optimizer.step()
    return history, (total / args.train_steps if lookahead is not None else None)


def maml_then_fine_tune(problem, args, seed: int) -> float:
    """MAML on the auxiliary tasks (support and query drawn from each task's data), then Adam
    on the primary task from the meta-learned initialisation."""
    torch.manual_seed(seed)
    model = ml.MLP(args.input_dim, (args.hidden,) * 2, 1)
    learner = ml.MAML(model, F.mse_loss, inner_lr=args.maml_inner_lr, inner_steps=args.maml_inner_steps,
                      backend="vmap")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = ml.generator(seed + 1)
    aux = torch.arange(1, N_TASKS)
    k = args.maml_shots
    for _ in range(args.train_steps):
        ids = aux[torch.randint(len(aux), (args.maml_batch,), generator=g)]
        rows = [torch.randperm(args.n_aux, generator=g)[: 2 * k] for _ in ids]
        x = torch.stack([problem["x"][t][r] for t, r in zip(ids.tolist(), rows)])
        y = torch.stack([problem["y"][t][r] for t, r in zip(ids.tolist(), rows)])[..., None]
        tasks = ml.TaskBatch((x[:, :k], y[:, :k]), (x[:, k:], y[:, k:]))
        optimizer.zero_grad(set_to_none=True)
        learner.meta_backward(tasks)
        optimizer.step()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    x, y = problem["x"][0], problem["y"][0][:, None]
    for _ in range(args.train_steps):
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    x_test, y_test = problem["test"]
    with torch.no_grad():
        return F.mse_loss(model(x_test)[:, 0], y_test).item()


def run_seed(args, seed: int) -> dict:
    problem = make_problem(args, seed)
    torch.manual_seed(seed)
    initial = ml.MLP(args.input_dim, (args.hidden,) * 2, N_TASKS)
    everything = list(range(N_TASKS))
    n_train = args.n_primary - args.n_val
    out = {"mse": {}, "final_weights": {}, "mean_weights": {}, "weight_history": {}, "seconds": {}}

    def fixed_weights(tasks, weights=None):
        model = copy.deepcopy(initial)
        if weights is None:
            weights = torch.zeros(N_TASKS)
            weights[tasks] = 1.0
        train_weighted(model, batch(problem, tasks), weights, args)
        return test_mse(model, problem)

    for method in args.methods:
        start = time.perf_counter()
        if method == "MAML + fine-tune":
            out["mse"][method] = maml_then_fine_tune(problem, args, seed)
        elif method.startswith("learned"):
            lookahead = ml.LookaheadWeights(N_TASKS, init=args.init_weight, lr=args.weight_lr,
                                            inner_steps=int(method.split("=")[1]), inner_lr=args.lookahead_lr)
            model = copy.deepcopy(initial)
            history, mean = train_weighted(model, batch(problem, everything, slice(0, n_train)), None, args,
                                           lookahead, val=batch(problem, [0], slice(n_train, None)))
            out["mse"][method] = test_mse(model, problem)
            out["final_weights"][method] = lookahead.weights.detach().tolist()
            out["mean_weights"][method] = mean.tolist()
            out["weight_history"][method] = history
            out["seconds"][method] = time.perf_counter() - start
            start = time.perf_counter()
            method = f"{method} + refit"  # the same network trained on all primary data at the mean weights
            out["mse"][method] = fixed_weights(everything, mean)
        else:
            tasks = {"single-task": [0], "equal": everything, "oracle": [0, *GROUPS["related"]]}[method]
            out["mse"][method] = fixed_weights(tasks)
        out["seconds"][method] = time.perf_counter() - start
    return out


def summarise(per_seed: list[dict]) -> dict:
    rows = list(per_seed[0]["mse"])
    rivals = [r for r in rows if r != "oracle"]
    summary = {}
    for row in rows:
        entry = {"mse": common.mean_std([s["mse"][row] for s in per_seed]),
                 "seconds": common.mean_std([s["seconds"][row] for s in per_seed]),
                 "best": None if row == "oracle" else
                 sum(s["mse"][row] <= min(s["mse"][r] for r in rivals) for s in per_seed)}
        for kind in ("final_weights", "mean_weights"):
            if row in per_seed[0][kind]:
                for group, ids in GROUPS.items():
                    entry[f"{kind}_{group}"] = common.mean_std([statistics.fmean(s[kind][row][i] for i in ids)
                                                         for s in per_seed])
        summary[row] = entry
    return summary


def print_table(summary: dict, seeds: int) -> None:
    common.print_header(f"{'method':<24} {'primary test MSE':>18} {'best of non-oracle':>19} {'time s':>12}")
    for row, entry in summary.items():
        best = "-" if entry["best"] is None else f"{entry['best']}/{seeds} seeds"
        print(f"{row:<24} {common.cell(entry['mse']):>18} {best:>19} {common.cell(entry['seconds'], '.1f'):>12}")
    learned = [r for r in summary if "final_weights_noise" in summary[r]]
    for kind in ("final", "mean"):
        if learned:
            print()
            print(f"{kind + ' weights':<24}" + "".join(f" {g:>15}" for g in GROUPS))
            for row in learned:
                print(f"{row:<24}" + "".join(f" {common.cell(summary[row][f'{kind}_weights_{g}'], '.2f'):>15}"
                                             for g in GROUPS))
    print(f"mean +- std over {seeds} seed(s); weights: mean over the tasks of a group, at the end of training "
          "(final) and averaged over its steps (mean, used by '+ refit').")


def parse_args(argv=None):
    p = common.parser(__doc__, METHODS)
    p.add_argument("--train-steps", type=int, default=600, help="Adam steps (and MAML meta-iterations)")
    p.add_argument("--input-dim", type=int, default=4)
    p.add_argument("--features", type=int, default=8, help="m, the teachers' hidden units")
    p.add_argument("--hidden", type=int, default=32, help="width of the two shared layers")
    p.add_argument("--n-primary", type=int, default=40, help="the primary task's training examples")
    p.add_argument("--n-val", type=int, default=20, help="of which held out for the lookahead (learned weights)")
    p.add_argument("--n-aux", type=int, default=200, help="examples per auxiliary task")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--relatedness", type=float, default=0.8,
                   help="rho: a related task's readout is rho * the primary's + sqrt(1 - rho^2) * its own")
    p.add_argument("--noise", type=float, default=0.1, help="label noise std (primary, related, unrelated tasks)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate for the network")
    p.add_argument("--init-weight", type=float, default=0.1, help="initial learned weight of every task")
    p.add_argument("--weight-lr", type=float, default=0.01, help="Adam's learning rate for the weights")
    p.add_argument("--lookahead-lr", type=float, default=0.1, help="alpha, the lookahead's SGD step")
    p.add_argument("--maml-inner-lr", type=float, default=0.05)
    p.add_argument("--maml-inner-steps", type=int, default=1)
    p.add_argument("--maml-shots", type=int, default=10, help="support (and query) examples per MAML task")
    p.add_argument("--maml-batch", type=int, default=9, help="tasks per MAML meta-batch")
    p.add_argument("--log-every", type=int, default=10, help="record the learned weights every this many steps")
    args = p.parse_args(argv)
    positive = ("seeds", "train_steps", "input_dim", "features", "hidden", "n_aux", "n_test", "maml_inner_steps",
                "maml_shots", "maml_batch", "log_every")
    common.check_arguments(p, args, positive, METHODS)
    if not 1 <= args.n_val < args.n_primary:
        p.error(f"--n-val = {args.n_val} is not allowed: it must be in [1, --n-primary = {args.n_primary})")
    if 2 * args.maml_shots > args.n_aux:
        p.error(f"--maml-shots = {args.maml_shots} needs 2 * shots <= --n-aux = {args.n_aux}")
    return args


def main(argv=None) -> dict:
    """Run the benchmark with command-line arguments ``argv``; print the table, return the report."""
    args = parse_args(argv)
    threads = common.start(args, f"primary: {args.n_primary} examples ({args.n_val} held out for the lookahead); "
                                 f"9 auxiliary tasks of {args.n_aux}; MLP({args.input_dim}, ({args.hidden}, "
                                 f"{args.hidden}), {N_TASKS}); {args.train_steps} Adam steps")
    per_seed, total = common.run_seeds(lambda seed: run_seed(args, seed), args.seeds)
    return common.finish(args, threads, total, summarise(per_seed), lambda s: print_table(s, args.seeds),
                         groups=GROUPS, per_seed=per_seed)


if __name__ == "__main__":
    main()
