"""Task distributions: a meta-batch of tasks, each a support set and a query set.

A :class:`TaskBatch` stacks ``meta_batch_size`` tasks along dimension 0, which is what both the
per-task loop and the :func:`torch.func.vmap` backend of :func:`mmtl_lib.meta_loss` consume.
Every task distribution is a :class:`Sampler`: it knows its task shape (``k_shot``, ``n_query``,
device) and draws meta-batches with ``sample(meta_batch_size, generator=g)``. Here the regression
families (the MAML paper's sines, TR-MAML's finite task set, MMAML's multimodal functions);
Omniglot's :class:`~mmtl_lib.EpisodeSampler` lives in :mod:`mmtl_lib.data`.

``k_shot`` means support examples per class everywhere; a regression task has one class, so its
``k_shot`` is its number of support points (the MAML paper's "K-shot regression"). ``n_query``
likewise counts query examples per class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from . import checks
from .errors import DataError

_NO_INFO: Mapping[str, Tensor] = MappingProxyType({})


class TaskBatch(NamedTuple):
    """``meta_batch_size`` tasks.

    Attributes:
        support: ``(x, y)``, ``x`` of shape ``[meta_batch_size, n_support, *input_shape]``.
        query: ``(x, y)``, ``x`` of shape ``[meta_batch_size, n_query_total, *input_shape]``.
        info: extra per-task tensors of shape ``[meta_batch_size, ...]`` (e.g. the sine's
            amplitude and phase, or the global class ids of an episode); read-only by default.
    """

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    info: Mapping[str, Tensor] = _NO_INFO

    @property
    def n_tasks(self) -> int:
        return self.support[0].shape[0]

    def check(self) -> TaskBatch:
        """Return ``self`` if it is a batch a learner may consume, else raise.

        Called by :func:`~mmtl_lib.meta_loss`, :func:`~mmtl_lib.evaluate` and the learners before
        they use a batch. A NaN or infinity in the data is refused here rather than left to
        spread: adapted to a NaN support set, every parameter turns NaN, and an evaluation would
        report a meaningless score (chance accuracy: argmax of NaN logits) without an error.
        The test is one pass over the floating-point tensors and costs one host-device
        synchronisation per call on a GPU (about 0.1 ms for the cpu preset's 8 tasks of 14-pixel
        images on a CPU, under 1% of a meta-iteration).

        Raises:
            ConfigError: support and query disagree on the number of tasks, or there are none.
            DataError: a floating-point tensor holds NaN or infinity; the message names which
                (support x / support y / query x / query y) and how many tasks hold such values.
        """
        (sx, sy), (qx, qy) = self.support, self.query
        counts = [t.shape[0] if t.dim() else 0 for t in (sx, sy, qx, qy)]
        if len(set(counts)) != 1:
            raise checks.ConfigError(
                "tasks disagree on meta_batch_size: support x/y and query x/y have "
                f"{counts[0]}, {counts[1]}, {counts[2]}, {counts[3]} tasks"
            )
        if counts[0] == 0:
            raise checks.ConfigError("tasks is empty: a TaskBatch needs at least one task")
        named = {"support x": sx, "support y": sy, "query x": qx, "query y": qy}
        floats = {name: t for name, t in named.items() if t.is_floating_point() or t.is_complex()}
        # one synchronisation for the common case; the counts only once something is wrong
        if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats.values()]).all()):
            bad = {name: int((~torch.isfinite(t)).reshape(len(t), -1).any(1).sum()) for name, t in floats.items()}
            raise DataError(
                "tasks hold NaN or infinite values: "
                + ", ".join(f"{name} in {n} of {counts[0]} tasks" for name, n in bad.items() if n)
                + "; a learner adapted to them would turn NaN, so they are refused"
            )
        return self

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


@runtime_checkable
class Sampler(Protocol):
    """A task distribution: ``sample(meta_batch_size, *, generator=None) -> TaskBatch``, tensors
    already on the sampler's device. ``generator`` is the only source of randomness (``None``:
    torch's global generator)."""

    def sample(self, meta_batch_size: int, *, generator: torch.Generator | None = None) -> TaskBatch: ...


def _range(name: str, bounds) -> tuple[float, float]:
    low, high = bounds
    if not low <= high:
        raise checks.ConfigError(f"{name} = {(low, high)!r} is not allowed: low must be <= high")
    return float(low), float(high)


class _Regression:
    """What the regression families share: the task shape, the input range, the split of the
    ``k_shot + n_query`` drawn points into support and query."""

    def __init__(self, k_shot: int, n_query: int, x_range, device, dtype):
        self.k_shot = checks.positive_int("k_shot", k_shot)
        self.n_query = checks.positive_int("n_query", n_query)
        self.x_range = _range("x_range", x_range)
        self.device, self.dtype = torch.device(device), dtype

    def _uniform(self, shape, bounds, generator) -> Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=self.dtype)

    def _inputs(self, b: int, generator) -> Tensor:
        return self._uniform((b, self.k_shot + self.n_query, 1), self.x_range, generator)

    def _batch(self, x: Tensor, y: Tensor, info: dict) -> TaskBatch:
        k = self.k_shot
        x, y = x.to(self.device), y.to(self.device)
        return TaskBatch((x[:, :k], y[:, :k]), (x[:, k:], y[:, k:]),
                         {name: t.to(self.device) for name, t in info.items()})


class Sinusoid(_Regression):
    """The MAML paper's regression tasks: ``y = A sin(x - phase)``, MSE loss.

    Amplitude ~ U[0.1, 5], phase ~ U[0, pi], inputs ~ U[-5, 5] (Finn et al. 2017, sec. 5.1).
    The ranges are arguments so that other chapters can build shifted or imbalanced families.

    Args:
        k_shot: support points per task; n_query: query points per task.
        device, dtype: of the tensors drawn.
    """

    def __init__(self, k_shot: int, n_query: int, *, amplitude=(0.1, 5.0), phase=(0.0, math.pi),
                 x_range=(-5.0, 5.0), device="cpu", dtype=torch.float32):
        super().__init__(k_shot, n_query, x_range, device, dtype)
        self.amplitude, self.phase = _range("amplitude", amplitude), _range("phase", phase)

    @staticmethod
    def target(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """``A sin(x - phase)``; ``amplitude`` and ``phase`` broadcast against ``x``."""
        return amplitude * torch.sin(x - phase)

    def sample(self, meta_batch_size: int, *, generator: torch.Generator | None = None) -> TaskBatch:
        """Draw ``meta_batch_size`` sines.

        Returns:
            a :class:`TaskBatch` with ``x`` and ``y`` of shape ``[meta_batch_size, k_shot, 1]``
            (support) and ``[meta_batch_size, n_query, 1]`` (query); ``info`` holds
            ``amplitude`` and ``phase``, each ``[meta_batch_size]``.
        """
        b = checks.positive_int("meta_batch_size", meta_batch_size)
        amplitude = self._uniform((b,), self.amplitude, generator)
        phase = self._uniform((b,), self.phase, generator)
        x = self._inputs(b, generator)
        y = self.target(x, amplitude[:, None, None], phase[:, None, None])
        return self._batch(x, y, {"amplitude": amplitude, "phase": phase})


class SinusoidTaskSet(_Regression):
    """A fixed, finite set of ``N`` sinusoid tasks: TR-MAML's training distribution.

    Task ``i`` draws its amplitude uniformly from its own band ``amplitude_bands[i]``, and the
    phase from ``phase``, afresh on every draw, as in TR-MAML's sinusoid code. Tasks are drawn
    uniformly, with replacement.

    Args:
        amplitude_bands: ``[N, 2]`` (low, high) per task.

    The other arguments are those of :class:`Sinusoid`.
    """

    def __init__(self, amplitude_bands: Tensor, k_shot: int, n_query: int, *, phase=(0.0, math.pi),
                 x_range=(-5.0, 5.0), device="cpu", dtype=torch.float32):
        super().__init__(k_shot, n_query, x_range, device, dtype)
        bands = torch.as_tensor(amplitude_bands, dtype=torch.float64)
        if bands.dim() != 2 or bands.shape[1] != 2 or bands.shape[0] == 0 or (bands[:, 0] > bands[:, 1]).any():
            raise checks.ConfigError("amplitude_bands must be [N, 2] rows (low, high) with low <= high, "
                                     f"got shape {tuple(bands.shape)}")
        self.bands, self.phase = bands, _range("phase", phase)

    @classmethod
    def imbalanced(cls, k_shot: int, n_query: int, *, n_easy=95, easy=(0.1, 1.05), n_hard=5, hard=(4.05, 5.0),
                   **kw) -> SinusoidTaskSet:
        """``n_easy`` tasks whose bands tile ``easy`` and ``n_hard`` whose bands tile ``hard``.

        The defaults make the hard, high-amplitude region rare (5 tasks in 100). TR-MAML's code
        tiles [0.1, 1.05] with 95 bands and [4.95, 5.0] with 5, each 0.01 wide; here the 5 hard
        bands cover [4.05, 5.0], so that the top of the test range U[0.1, 5] is covered too.
        """
        edges = [torch.linspace(*r, checks.positive_int(name, n) + 1, dtype=torch.float64)
                 for name, r, n in (("n_easy", easy, n_easy), ("n_hard", hard, n_hard))]
        return cls(torch.cat([torch.stack([e[:-1], e[1:]], 1) for e in edges]), k_shot, n_query, **kw)

    @property
    def n_tasks(self) -> int:
        return self.bands.shape[0]

    def sample(self, meta_batch_size: int, *, generator: torch.Generator | None = None) -> TaskBatch:
        """Like :meth:`Sinusoid.sample`; ``info`` adds ``task_id`` ``[meta_batch_size]``."""
        b = checks.positive_int("meta_batch_size", meta_batch_size)
        ids = torch.randint(self.n_tasks, (b,), generator=generator)
        band = (self.bands[ids, 0].to(self.dtype), self.bands[ids, 1].to(self.dtype))
        amplitude = self._uniform(b, band, generator)
        phase = self._uniform(b, self.phase, generator)
        x = self._inputs(b, generator)
        y = Sinusoid.target(x, amplitude[:, None, None], phase[:, None, None])
        return self._batch(x, y, {"task_id": ids, "amplitude": amplitude, "phase": phase})


class MultimodalFunctions(_Regression):
    """MMAML's multimodal regression tasks: sines, lines and quadratics on ``x ~ U[-5, 5]``.

    Ranges of the MMAML regression code (Vuorio et al. 2019): sine ``A sin(x - phase)``, ``A`` in
    [0.1, 5], phase in [0, pi]; line ``slope * x + intercept``, both in [-3, 3]; quadratic
    ``a (x - center)^2 + bias`` with ``|a|`` in [0.02, 0.15] and a random sign, center and bias
    in [-3, 3]. Each task's family is drawn uniformly; targets carry Gaussian noise of standard
    deviation ``noise_std`` (MMAML's option), support and query alike, so an MSE cannot go
    below ``noise_std^2``.
    """

    MODES = ("sine", "linear", "quadratic")

    def __init__(self, k_shot: int, n_query: int, *, modes=MODES, noise_std: float = 0.3, x_range=(-5.0, 5.0),
                 device="cpu", dtype=torch.float32):
        super().__init__(k_shot, n_query, x_range, device, dtype)
        self.modes = [checks.one_of("modes", m, self.MODES) for m in modes]
        if not self.modes:
            raise checks.ConfigError("modes is empty: name at least one of " + ", ".join(self.MODES))
        if not noise_std >= 0:
            raise checks.ConfigError(f"noise_std = {noise_std} is not allowed: it must be >= 0")
        self.noise_std = noise_std

    @staticmethod
    def target(x: Tensor, mode: Tensor, u: Tensor) -> Tensor:
        """``x`` ``[B, n, 1]``; ``mode`` ``[B]`` indices into :attr:`MODES`; ``u`` ``[B, 3]`` uniform
        [0, 1) draws, mapped to each family's ranges. Returns ``[B, n, 1]``."""
        u = u[:, None, :]
        sine = (0.1 + 4.9 * u[..., :1]) * torch.sin(x - math.pi * u[..., 1:2])
        line = (6 * u[..., :1] - 3) * x + (6 * u[..., 1:2] - 3)
        # |a| in [0.02, 0.15] with a random sign: stretch u_0 over [-0.13, 0.13], push away from 0.
        s = 0.26 * u[..., :1] - 0.13
        a = torch.where(s < 0, s - 0.02, s + 0.02)
        quad = a * (x - (6 * u[..., 1:2] - 3)) ** 2 + (6 * u[..., 2:3] - 3)
        return torch.where(mode[:, None, None] == 0, sine, torch.where(mode[:, None, None] == 1, line, quad))

    def sample(self, meta_batch_size: int, *, generator: torch.Generator | None = None) -> TaskBatch:
        """Like :meth:`Sinusoid.sample`; ``info["mode"]`` ``[meta_batch_size]`` indexes :attr:`MODES`."""
        b = checks.positive_int("meta_batch_size", meta_batch_size)
        allowed = torch.tensor([self.MODES.index(m) for m in self.modes])
        mode = allowed[torch.randint(len(allowed), (b,), generator=generator)]
        u = torch.rand(b, 3, generator=generator, dtype=self.dtype)
        x = self._inputs(b, generator)
        noise = torch.randn(b, self.k_shot + self.n_query, 1, generator=generator, dtype=self.dtype)
        return self._batch(x, self.target(x, mode, u) + self.noise_std * noise, {"mode": mode})
