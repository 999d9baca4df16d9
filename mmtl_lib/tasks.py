"""Task distributions: a meta-batch of tasks, each a support set and a query set.

A :class:`TaskBatch` stacks ``meta_batch_size`` tasks along dimension 0, which is what both the
per-task loop and the :func:`torch.func.vmap` backend of :mod:`mmtl_lib.algorithms` consume.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import checks


class TaskBatch(NamedTuple):
    """``meta_batch_size`` tasks.

    Attributes:
        support: ``(x, y)``, ``x`` of shape ``[meta_batch_size, n_support, *input_shape]``.
        query: ``(x, y)``, ``x`` of shape ``[meta_batch_size, n_query, *input_shape]``.
        info: extra per-task tensors of shape ``[meta_batch_size, ...]`` (e.g. the sine's
            amplitude and phase, or the global class ids of an episode).
    """

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    info: dict = {}

    @property
    def n_tasks(self) -> int:
        return self.support[0].shape[0]

    def task(self, i: int) -> TaskBatch:
        """Task ``i`` alone, with the task dimension dropped."""
        return TaskBatch(
            (self.support[0][i], self.support[1][i]),
            (self.query[0][i], self.query[1][i]),
            {k: v[i] for k, v in self.info.items()},
        )

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start`` to ``stop - 1``, keeping the task dimension."""
        return TaskBatch(
            tuple(t[start:stop] for t in self.support),
            tuple(t[start:stop] for t in self.query),
            {k: v[start:stop] for k, v in self.info.items()},
        )

    def to(self, device) -> TaskBatch:
        return TaskBatch(
            tuple(t.to(device) for t in self.support),
            tuple(t.to(device) for t in self.query),
            {k: v.to(device) for k, v in self.info.items()},
        )


class Sinusoid:
    """The MAML paper's regression tasks: ``y = A sin(x - phase)``, MSE loss.

    Amplitude ~ U[0.1, 5], phase ~ U[0, pi], inputs ~ U[-5, 5] (Finn et al. 2017, sec. 5.1).
    The ranges are arguments so that other chapters can build shifted or imbalanced families.
    """

    def __init__(self, amplitude=(0.1, 5.0), phase=(0.0, math.pi), x_range=(-5.0, 5.0)):
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"{name} = {(low, high)!r} is not allowed: low must be <= high")
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    @staticmethod
    def target(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """``A sin(x - phase)``; ``amplitude`` and ``phase`` broadcast against ``x``."""
        return amplitude * torch.sin(x - phase)

    def _uniform(self, shape, bounds, generator, device, dtype) -> Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=dtype).to(device)

    def sample(
        self,
        meta_batch_size: int,
        k_shot: int,
        n_query: int,
        *,
        generator: torch.Generator | None = None,
        device="cpu",
        dtype=torch.float32,
    ) -> TaskBatch:
        """Draw ``meta_batch_size`` sines with ``k_shot`` support and ``n_query`` query points.

        Returns:
            a :class:`TaskBatch` with ``x`` and ``y`` of shape ``[meta_batch_size, k_shot, 1]``
            (support) and ``[meta_batch_size, n_query, 1]`` (query); ``info`` holds
            ``amplitude`` and ``phase``, each ``[meta_batch_size]``.
        """
        b = checks.positive_int("meta_batch_size", meta_batch_size)
        k = checks.positive_int("k_shot", k_shot)
        q = checks.positive_int("n_query", n_query)
        amplitude = self._uniform((b,), self.amplitude, generator, device, dtype)
        phase = self._uniform((b,), self.phase, generator, device, dtype)
        x = self._uniform((b, k + q, 1), self.x_range, generator, device, dtype)
        y = self.target(x, amplitude[:, None, None], phase[:, None, None])
        return TaskBatch(
            (x[:, :k], y[:, :k]), (x[:, k:], y[:, k:]), {"amplitude": amplitude, "phase": phase}
        )
