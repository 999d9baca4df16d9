"""Evaluation: adapt to each test task's support set, score its query set, with a 95% interval.

One function, :func:`evaluate`, for a fixed :class:`~mmtl_lib.TaskBatch` or for fresh tasks
drawn from a :class:`~mmtl_lib.Sampler`; it returns an :class:`Evaluation` with the per-task scores
after each requested number of inner steps, so that a score always measures what meta-learning
promises: performance after adapting to a new task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import checks
from .learners import Learner
from .objective import EAGER_BACKENDS
from .tasks import Sampler, TaskBatch

Metric = Callable[[Tensor, Tensor], Tensor]


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of ``argmax(logits, -1) == labels``; ``logits`` ``[..., n_way]``."""
    return (logits.argmax(-1) == labels).float().mean()


def gaussian_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval of ``values`` ``[n]``.

    With one value the sample standard deviation, and so the interval, is undefined: the
    half-width is NaN (not 0, which would claim a certainty one task cannot give). A report
    written as JSON shows it as ``null``.

    Raises:
        ConfigError: ``values`` is empty.
    """
    values = values.double()
    n = values.numel()
    if n == 0:
        raise checks.ConfigError("values is empty: a confidence interval needs at least one value")
    std = values.std(unbiased=True).item() if n > 1 else float("nan")
    return values.mean().item(), 1.96 * std / math.sqrt(n)


def per_task(metric: Metric, predictions: Tensor, targets: Tensor) -> Tensor:
    """``metric`` applied task by task to ``[meta_batch_size, n, ...]`` tensors: ``[meta_batch_size]``."""
    return torch.stack([metric(p, y) for p, y in zip(predictions, targets)])


@dataclass(frozen=True)
class Evaluation:
    """Per-task scores after each number of inner steps.

    Attributes:
        scores: inner steps -> per-task metric ``[n_tasks]``; 0 is the score before adaptation.
    """

    scores: dict[int, Tensor]

    @property
    def inner_steps(self) -> list[int]:
        return sorted(self.scores)

    @property
    def n_tasks(self) -> int:
        return next(iter(self.scores.values())).numel()

    def __getitem__(self, inner_steps: int) -> Tensor:
        return self.scores[inner_steps]

    def mean(self, inner_steps: int | None = None) -> float:
        """Mean over tasks after ``inner_steps`` (default: the largest count evaluated)."""
        return gaussian_ci95(self.scores[self._steps(inner_steps)])[0]

    def ci95(self, inner_steps: int | None = None) -> float:
        """Half-width of the 95% interval of :meth:`mean`; NaN for one task (see :func:`gaussian_ci95`)."""
        return gaussian_ci95(self.scores[self._steps(inner_steps)])[1]

    def _steps(self, inner_steps):
        return max(self.scores) if inner_steps is None else inner_steps

    def summary(self) -> dict:
        """Plain numbers for a report: ``metric`` and ``ci95`` after the largest step count,
        ``pre_metric`` and ``pre_ci95`` before adaptation, ``tasks`` and ``inner_steps``. The
        intervals are NaN for one task."""
        return {"metric": self.mean(), "ci95": self.ci95(), "pre_metric": self.mean(0), "pre_ci95": self.ci95(0),
                "tasks": self.n_tasks, "inner_steps": max(self.scores)}


def _step_counts(learner: Learner, inner_steps) -> list[int]:
    if inner_steps is None:
        inner_steps = learner.test_inner_steps
    counts = [inner_steps] if not isinstance(inner_steps, Sequence) else list(inner_steps)
    if not counts:
        raise checks.ConfigError("inner_steps = [] is not allowed: give at least one step count")
    return sorted({0, *(checks.non_negative_int("inner_steps", c) for c in counts)})


def evaluate(
    learner: Learner,
    tasks: TaskBatch | Sampler,
    *,
    inner_steps: int | Sequence[int] | None = None,
    metric: Metric | None = None,
    n_tasks: int | None = None,
    seed: int = 0,
    batch_size: int = 25,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Evaluation:
    """Adapt to each task's support set and score its query set after each of ``inner_steps``.

    Args:
        learner: what to evaluate; it adapts with :meth:`~mmtl_lib.Learner.adaptation`.
        tasks: a :class:`TaskBatch`, or a :class:`Sampler` from which ``n_tasks`` (default 600)
            fresh tasks are drawn, ``batch_size`` at a time, with a generator seeded by ``seed``.
        inner_steps: the step count(s) to report, e.g. ``[1, 5, 10]``; default the learner's
            ``test_inner_steps``. 0 (before adaptation) is always reported too. The adaptation
            runs once, step by step, so several counts cost no more than the largest.
        metric: ``metric(prediction, y)`` -> scalar; defaults to ``learner.loss_fn``.
        backend: ``"loop"`` (task by task), ``"vmap"`` (all tasks at once, ``chunk_size`` at a
            time) or ``"auto"``: vmap where :attr:`~mmtl_lib.Learner.vmappable`, else the loop.
            Both give the same numbers.

    Returns:
        an :class:`Evaluation`: step count -> per-task metric ``[n_tasks]``, with means and
        95% intervals (NaN for a single task).

    Raises:
        ConfigError: an empty task batch, support and query of different task counts,
            ``inner_steps=[]``, or another bad argument.
        DataError: tasks holding NaN or infinite values (:meth:`~mmtl_lib.TaskBatch.check`).
    """
    counts = _step_counts(learner, inner_steps)
    checks.one_of("backend", backend, ("auto", *EAGER_BACKENDS))
    checks.optional_positive_int("chunk_size", chunk_size)
    metric = metric or learner.loss_fn
    if backend == "auto":
        backend = "vmap" if learner.vmappable else "loop"

    def scores(sx, sy, qx, qy) -> Tensor:
        states = learner.adaptation((sx, sy), counts[-1])
        return torch.stack([metric(learner.predict(state, qx), qy)
                            for step, state in enumerate(states) if step in counts])

    def table(batch: TaskBatch) -> Tensor:
        args = (*batch.check().support, *batch.query)
        if backend == "vmap":
            return torch.func.vmap(scores, chunk_size=chunk_size)(*args)
        return torch.stack([scores(*task) for task in zip(*args)])

    if isinstance(tasks, TaskBatch):
        if n_tasks is not None:
            raise checks.ConfigError("n_tasks is for a sampler: a TaskBatch is evaluated whole")
        result = table(tasks)
    elif isinstance(tasks, Sampler):
        n_tasks = checks.positive_int("n_tasks", 600 if n_tasks is None else n_tasks)
        batch_size = checks.positive_int("batch_size", batch_size)
        generator = torch.Generator().manual_seed(seed)
        parts = [table(tasks.sample(min(batch_size, n_tasks - done), generator=generator)).cpu()
                 for done in range(0, n_tasks, batch_size)]
        result = torch.cat(parts)
    else:
        raise checks.ConfigError(
            f"tasks = {type(tasks).__name__} is not allowed: give a TaskBatch or a sampler with "
            "sample(meta_batch_size, generator=...)"
        )
    # Contiguous, so that a mean sums in the same order as over a freshly concatenated tensor.
    return Evaluation({c: result[:, i].contiguous() for i, c in enumerate(counts)})


def binned_means(values: Tensor, keys: Tensor, edges: Tensor) -> Tensor:
    """Mean of ``values`` ``[n]`` in each bin of ``keys`` ``[n]``: ``[len(edges) - 1]``, NaN where empty.

    Bin ``b`` is ``[edges[b], edges[b + 1])``, the last one closed, e.g. MSE per amplitude bin.
    """
    index = (torch.bucketize(keys, edges, right=True) - 1).clamp(0, edges.numel() - 2)
    inside = (keys >= edges[0]) & (keys <= edges[-1])
    n_bins = edges.numel() - 1
    total = torch.zeros(n_bins, dtype=values.dtype).index_add_(0, index[inside], values[inside])
    count = torch.zeros(n_bins, dtype=values.dtype).index_add_(0, index[inside], torch.ones_like(values[inside]))
    return total / count  # 0 / 0 = NaN marks an empty bin
