"""What the benchmarks share: command-line options and their checks, seeds, mean +- std tables,
the report every script writes with ``--json``, and the multi-task scripts' batches and weightings.

The scripts run as ``python benchmarks/<script>.py``, which puts this folder first on ``sys.path``,
so they import this module as ``common``; the tests put the folder there themselves. The library
never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import mmtl_lib
from mmtl_lib import mtl


def parser(doc: str, methods: Sequence[str] | None = None,
           seeds_help: str = "independent runs") -> argparse.ArgumentParser:
    """A script's parser, described by the first paragraph of its docstring ``doc``. With
    ``methods``, a comparison over seeds: ``--seeds`` (default 3), ``--methods`` (default: all of
    ``methods``), ``--threads`` and ``--json``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    if methods is not None:
        p.add_argument("--seeds", type=int, default=3, help=f"{seeds_help} (default: 3)")
        p.add_argument("--methods", default=",".join(methods), help=f"comma-separated subset of {', '.join(methods)}")
        add_output_options(p)
    return p


def add_output_options(p: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--json``."""
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: $MMTL_THREADS, else 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")


def check_arguments(parser, args, positive=(), methods=None, option: str = "methods") -> None:
    """A benchmark's command-line checks: every name in ``positive`` must be >= 1, and the
    comma-separated list in ``args.<option>`` is split and checked against ``methods`` (in place).
    A failure exits through ``parser.error`` with the option, its value and what is allowed."""
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)} is not allowed: it must be >= 1")
    if methods is not None:
        given = getattr(args, option)
        chosen = [m.strip() for m in given.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in methods]
        if unknown or not chosen:
            parser.error(f"--{option.replace('_', '-')} = {given!r}: unknown {unknown}; allowed: {', '.join(methods)}")
        setattr(args, option, chosen)


def start(args: argparse.Namespace, setting: str) -> int:
    """Set torch's thread count from ``--threads`` and print the run's ``setting``, its seed count
    and the machine; return the thread count."""
    threads = mmtl_lib.set_threads(args.threads)
    print(f"{setting}; {args.seeds} seed(s); {mmtl_lib.machine()}")
    return threads


def run_seeds(run_seed: Callable[[int], object], seeds: int) -> tuple[list, float]:
    """``[run_seed(0), ..., run_seed(seeds - 1)]`` and the seconds they took, reporting progress."""
    start, results = time.perf_counter(), []
    for seed in range(seeds):
        results.append(run_seed(seed))
        print(f"seed {seed} done, {time.perf_counter() - start:.0f} s", flush=True)
    return results, time.perf_counter() - start


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(pair: tuple[float, float], fmt: str = ".3f", sign: str = "") -> str:
    """A ``(mean, std)`` pair as ``"mean +- std"``; ``sign="+"`` prints the mean's sign always."""
    return f"{format(pair[0], sign + fmt)} +- {format(pair[1], fmt)}"


def print_header(header: str) -> None:
    """A table's header line, underlined."""
    print(header)
    print("-" * len(header))


def save_report(path: str | None, report: dict) -> None:
    """Write a benchmark's report as JSON to ``path`` (creating its folder), with the machine it
    ran on first; nothing if ``path`` is ``None``."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": mmtl_lib.machine(), **report}, f, indent=1)
    print(f"wrote {path}")


def finish(args: argparse.Namespace, threads: int, total: float, summary: dict, print_table: Callable[[dict], None],
           *, exclude=("json",), **results) -> dict:
    """The end of a comparison over seeds: print the ``summary`` with ``print_table`` and the total
    wall time, then write (``--json``) and return the report: the arguments less ``exclude``, torch,
    Python, threads, total seconds, the summary and ``results``."""
    print()
    print_table(summary)
    print(f"total wall time {total:.0f} s")
    report = {"args": {k: v for k, v in vars(args).items() if k not in exclude}, "torch": torch.__version__,
              "python": sys.version.split()[0], "threads": threads, "total_seconds": total, "summary": summary,
              **results}
    save_report(args.json, report)
    return report


# --- the meta-learning comparisons on regression tasks (mmaml, tr_maml) ------------------------


def add_meta_training_options(p: argparse.ArgumentParser, *, iterations: int, k_shot: int, test_tasks: int) -> None:
    """The meta-training and test options of the regression comparisons (:func:`meta_train`)."""
    p.add_argument("--iterations", type=int, default=iterations, help="meta-iterations per method")
    p.add_argument("--meta-batch-size", type=int, default=25)
    p.add_argument("--k-shot", type=int, default=k_shot, help="support points per task")
    p.add_argument("--n-query", type=int, default=10, help="query points per training task")
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--outer-lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--test-tasks", type=int, default=test_tasks)


def meta_train(learner: mmtl_lib.Learner, sampler: mmtl_lib.Sampler, args, seed: int, **trainer) -> float:
    """Meta-train ``learner`` for ``--iterations`` of ``--meta-batch-size`` tasks from ``sampler``,
    with Adam at ``--outer-lr`` (and ``trainer``'s other settings), the tasks drawn from ``seed``;
    return the seconds it took."""
    start = time.perf_counter()
    mmtl_lib.Trainer(learner, sampler, meta_batch_size=args.meta_batch_size, outer_lr=args.outer_lr, seed=seed,
                     **trainer).fit(args.iterations, progress=False)
    return time.perf_counter() - start


# --- the multi-task learning comparisons (mtl_synthetic, mtl_omniglot) ----------------------


def epoch_batches(n: int, iterations: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """``[iterations, batch_size]`` indices into ``n`` examples: shuffled epochs, each dropping
    its last ``n % batch_size`` examples."""
    per_epoch = n // batch_size
    epochs = -(-iterations // per_epoch)
    order = torch.cat([torch.randperm(n, generator=generator)[: per_epoch * batch_size] for _ in range(epochs)])
    return order.view(-1, batch_size)[:iterations]


def make_weighting(name: str, n_tasks: int, *, alpha: float, layer: list[Tensor], steps_per_epoch: int,
                   seed: int) -> mtl.Weighting:
    """The loss weighting ``name`` of :data:`mmtl_lib.mtl.WEIGHTINGS` as the MTL benchmarks run it:
    GradNorm with asymmetry ``alpha`` on the shared ``layer``, DWA at temperature 2 over epochs of
    ``steps_per_epoch`` steps, PCGrad's and RLW's draws seeded by ``seed + 20_000``."""
    if name == "GradNorm":
        return mtl.GradNorm(n_tasks, alpha=alpha, layer=layer)
    if name == "DWA":
        return mtl.DWA(n_tasks, temperature=2.0, steps_per_epoch=steps_per_epoch)
    if name in ("PCGrad", "RLW"):
        return mtl.WEIGHTINGS[name](n_tasks, generator=mmtl_lib.generator(seed + 20_000))
    return mtl.WEIGHTINGS[name](n_tasks)
