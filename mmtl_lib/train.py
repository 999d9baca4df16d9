"""The outer loop: meta-train any :class:`~mmtl_lib.Learner`, fit for notebooks and long runs.

One meta-iteration: draw ``meta_batch_size`` tasks from the sampler, ``learner.meta_backward(tasks)``
fills the meta-gradient, the outer optimizer steps. Around it: periodic validation on held-out
tasks, a JSON-friendly history, checkpoints that resume to the identical continuation (learner,
optimizer, task generator and the history's open window), written periodically and atomically so
that a crash loses at most the last few minutes, a clear stop on a non-finite loss or an
out-of-memory meta-batch that keeps the last good state, and optional TF32/AMP on CUDA scoped to
the training step. Given a :class:`~mmtl_lib.distributed.World` of several processes, each
meta-iteration's tasks are split across them and the meta-gradient all-reduced, to the single
process's result (:mod:`mmtl_lib.distributed`); rank 0 alone validates and writes checkpoints.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from . import checks
from .distributed import World, check_learner
from .errors import ConfigError, DataError
from .evaluation import Metric, evaluate, per_task
from .learners import Learner
from .runtime import precision
from .tasks import Sampler, TaskBatch

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adam", "sgd")


class NonFiniteLossError(ConfigError, FloatingPointError):
    """The meta-loss became NaN or infinite; the message says at which iteration and what to lower."""


class Trainer:
    """Meta-train ``learner`` on tasks from ``sampler``.

    Args:
        learner: the algorithm, holding the model (already on the sampler's device).
        sampler: the training tasks, a :class:`~mmtl_lib.Sampler`.
        meta_batch_size: tasks per meta-iteration.
        outer_lr, optimizer: the meta-optimizer, ``"adam"`` or ``"sgd"`` (Reptile's
            interpolation is SGD at ``outer_lr``).
        schedule: ``"constant"``, ``"linear"`` (to ``final_lr_fraction * outer_lr``, Reptile's
            annealing) or ``"cosine"``, over the ``iterations`` given to :meth:`fit`, or over its
            ``time_budget`` where that ends first.
        val_sampler: optional validation tasks, scored every ``val_every`` iterations on
            ``val_tasks`` tasks with a fixed seed (the same tasks each time).
        metric: ``metric(prediction, y)`` for logging, e.g. :func:`mmtl_lib.accuracy`.
        seed: seeds the generator that draws the training tasks (the only randomness here).
        amp: bfloat16 autocast on CUDA; tf32: allow TF32 matrix products on CUDA, in the training
            step only (:func:`mmtl_lib.runtime.precision`).
        outer_grad_clip: if set, clip the meta-gradient to this global norm before each step.
        world: the processes that share each meta-iteration (default: this one alone), already
            running (:meth:`World.running <mmtl_lib.distributed.World.running>`). Every rank
            draws the whole meta-batch from ``seed`` and computes its share of the tasks; the
            meta-gradient (clipped after the all-reduce) and the logged losses are the whole
            meta-batch's, so the parameters equal a single process's up to rounding. Rank 0 alone
            validates and writes checkpoints. ``meta_batch_size`` must be a multiple of
            ``world.world_size``, and the learner one that splits
            (:func:`~mmtl_lib.distributed.check_learner`).
    """

    def __init__(
        self,
        learner: Learner,
        sampler: Sampler,
        *,
        meta_batch_size: int,
        outer_lr: float,
        optimizer: str = "adam",
        schedule: str = "constant",
        final_lr_fraction: float = 0.0,
        val_sampler: Sampler | None = None,
        val_every: int = 500,
        val_tasks: int = 100,
        metric: Metric | None = None,
        seed: int = 0,
        amp: bool = False,
        tf32: bool = False,
        outer_grad_clip: float | None = None,
        world: World | None = None,
    ):
        if not isinstance(learner, Learner):
            raise ConfigError(f"learner = {type(learner).__name__} is not allowed: it must be a mmtl_lib.Learner")
        for name, s in (("sampler", sampler), ("val_sampler", val_sampler)):
            if s is not None and not isinstance(s, Sampler):
                raise ConfigError(f"{name} = {type(s).__name__} is not allowed: it must have "
                                  "sample(meta_batch_size, generator=...)")
        self.learner, self.sampler, self.val_sampler, self.metric = learner, sampler, val_sampler, metric
        self.meta_batch_size = checks.positive_int("meta_batch_size", meta_batch_size)
        self.outer_lr = checks.positive_float("outer_lr", outer_lr)
        self.schedule = checks.one_of("schedule", schedule, SCHEDULES)
        if isinstance(final_lr_fraction, bool) or not 0 <= final_lr_fraction <= 1:
            raise ConfigError(f"final_lr_fraction = {final_lr_fraction!r} is not allowed: it must lie in [0, 1]")
        self.final_lr_fraction = float(final_lr_fraction)
        self.val_every = checks.positive_int("val_every", val_every)
        self.val_tasks = checks.positive_int("val_tasks", val_tasks)
        self.outer_grad_clip = checks.optional_positive_float("outer_grad_clip", outer_grad_clip)
        params = learner.meta_parameters()
        if not params:
            raise ConfigError(f"{type(learner).__name__} has no meta-parameters to train")
        if world is not None and not isinstance(world, World):
            raise ConfigError(f"world = {type(world).__name__} is not allowed: it must be a mmtl_lib.distributed.World")
        self.world = World() if world is None else world
        self.world.check_meta_batch_size(self.meta_batch_size)
        check_learner(learner, self.world.world_size)
        self.world.require_started()
        checks.one_of("optimizer", optimizer, OPTIMIZERS)
        self.optimizer = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(params, lr=self.outer_lr)
        self.generator = torch.Generator().manual_seed(checks.non_negative_int("seed", seed))
        self.amp, self.tf32 = bool(amp), bool(tf32)
        self.iteration, self.history, self.elapsed = 0, [], 0.0
        self._window: list[dict] = []
        self.iterations: int | None = None
        """The schedule's length, set by :meth:`fit`; ``None``: no annealing."""
        self._time_budget: float | None = None

    def _lr(self) -> float:
        # Progress through whichever budget ends first, so a time-budgeted run anneals too.
        frac = self.iteration / max(self.iterations, 1) if self.iterations else 0.0
        if self._time_budget:
            frac = max(frac, self.elapsed / self._time_budget)
        frac = min(frac, 1.0)
        low = self.final_lr_fraction
        if self.schedule == "linear":
            return self.outer_lr * (1 - (1 - low) * frac)
        if self.schedule == "cosine":
            return self.outer_lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * frac)))
        return self.outer_lr

    def step(self) -> dict:
        """One meta-iteration; returns its logged metrics.

        A :class:`~mmtl_lib.errors.ConfigError` or :class:`~mmtl_lib.errors.DataError` (a
        non-finite loss, a meta-batch too large for memory, a bad task batch) is raised before the
        optimizer steps, with the task generator (and a learner's ``meta_iteration``, MAML++'s
        annealing counter) rewound: the trainer is then exactly as after the last good iteration,
        and a checkpoint of it is that iteration's.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        drawn_from = self.generator.get_state()
        # MAML++'s annealing counts meta-updates: a rejected step must not advance it.
        counted = getattr(self.learner, "meta_iteration", None)
        try:
            tasks, losses, predictions = self._meta_backward()
            metrics = (per_task(self.metric, predictions, tasks.query[1])
                       if self.metric is not None and predictions.numel() else None)
            # With several processes: the whole meta-batch's meta-gradient, losses and metrics.
            losses, metrics = self.world.combine(self.learner.meta_parameters(), losses, metrics)
            loss = losses.mean().item()
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"meta-loss is {loss} at iteration {self.iteration}: lower outer_lr or inner_lr, or set "
                    "inner_grad_clip (the inner loop's) or outer_grad_clip (the meta-gradient's)"
                )
            record = {"iteration": self.iteration + 1, "loss": loss}
            if metrics is not None:
                record["metric"] = metrics.mean().item()
        except (ConfigError, DataError):
            self.generator.set_state(drawn_from)
            if counted is not None:
                self.learner.meta_iteration = counted
            raise
        if self.outer_grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.learner.meta_parameters(), self.outer_grad_clip)
        self.optimizer.step()
        self.iteration += 1
        return record

    def _meta_backward(self) -> tuple[TaskBatch, Tensor, Tensor]:
        """Draw the tasks and fill the meta-gradient of this process's share of them (all of them
        in one process); running out of memory doing so is the meta-batch's size, a setting the
        user can lower (ConfigError), not a bug."""
        try:
            tasks = self.sampler.sample(self.meta_batch_size, generator=self.generator)
            start, stop = self.world.share(tasks.n_tasks)
            mine = tasks if (start, stop) == (0, tasks.n_tasks) else tasks.slice(start, stop)
            self.optimizer.zero_grad(set_to_none=True)
            device_type = tasks.query[0].device.type
            self.world.skip_tasks(self.learner, tasks, 0, start)
            with precision(self.tf32), torch.autocast(device_type, dtype=torch.bfloat16,
                                                      enabled=self.amp and device_type == "cuda"):
                losses, predictions = self.learner.meta_backward(mine)
            self.world.skip_tasks(self.learner, tasks, stop, tasks.n_tasks)
            return mine, losses, predictions
        except RuntimeError as error:
            # torch.OutOfMemoryError (CUDA) is a RuntimeError; the CPU allocator's is a plain one
            # that says so only in its message.
            if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
                raise
            reason = str(error).strip().splitlines()[0]
            raise ConfigError(
                f"meta_batch_size = {self.meta_batch_size} does not fit in memory at iteration {self.iteration} "
                f"({reason}): lower meta_batch_size, or with backend='vmap' set chunk_size"
            ) from error

    def validate(self) -> dict:
        result = evaluate(self.learner, self.val_sampler, n_tasks=self.val_tasks, metric=self.metric, seed=12345)
        return {"val_metric": result.mean(), "val_ci95": result.ci95()}

    def _finished(self) -> bool:
        return self.iteration >= self.iterations or (
            self._time_budget is not None and self.elapsed >= self._time_budget)

    def fit(
        self,
        iterations: int,
        *,
        time_budget: float | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 1000,
        checkpoint_minutes: float = 5.0,
        checkpoint_extra: dict | None = None,
        log_every: int = 50,
        progress: bool = True,
    ) -> list[dict]:
        """Train until ``iterations`` (counted from 0, so a resumed run continues) or until
        ``time_budget`` seconds of training have passed (time spent validating is not
        counted; with several processes, the slowest rank's seconds); returns the history.

        The history keeps one record every ``log_every`` iterations (the mean of the records
        in between) and one per validation.

        With a ``checkpoint`` path, :meth:`save` writes there every ``checkpoint_every``
        iterations, whenever ``checkpoint_minutes`` of wall-clock time have passed since the last
        save, and at the end; ``checkpoint_extra`` (plain data, e.g. the configuration) rides
        along in each. If :meth:`step` stops with a ConfigError or DataError (e.g.
        :class:`NonFiniteLossError`), the last good state is saved there before the error goes
        on, its message saying so. With several processes rank 0 alone validates, shows progress
        and writes.
        """
        self.iterations = checks.positive_int("iterations", iterations)
        self._time_budget = checks.optional_positive_float("time_budget", time_budget)
        checkpoint_every = checks.positive_int("checkpoint_every", checkpoint_every)
        checkpoint_seconds = 60 * checks.positive_float("checkpoint_minutes", checkpoint_minutes)
        log_every = checks.positive_int("log_every", log_every)
        extra = dict(checkpoint_extra or {})
        from tqdm.auto import tqdm

        main = self.world.is_main
        bar = tqdm(total=iterations, initial=self.iteration, disable=not (progress and main), mininterval=5,
                   desc="meta-train")
        saved_at = time.monotonic()
        while not self._finished():
            start = time.perf_counter()
            try:
                self._window.append(self.step())
            except (ConfigError, DataError) as error:
                if checkpoint is not None:
                    self.save(checkpoint, **extra)  # rank 0's; the error is every rank's
                    error.args = (f"{error}; the last good state (iteration {self.iteration}) is saved in "
                                  f"{checkpoint}",)
                raise
            self.elapsed += time.perf_counter() - start  # training time only: validation is extra
            if self._time_budget is not None:  # every rank must stop, and anneal, alike
                self.elapsed = self.world.max(self.elapsed)
            bar.update(1)
            done = self._finished()
            window = self._window
            if len(window) >= log_every or done:
                record = {k: sum(r[k] for r in window) / len(window) for k in window[-1]}
                record.update(iteration=self.iteration, seconds=round(self.elapsed, 2))
                if self.val_sampler is not None and main and (self.iteration % self.val_every < len(window) or done):
                    record.update(self.validate())
                self.history.append(record)
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "metric", "val_metric")})
                self._window = []
            if checkpoint is not None and (self.iteration % checkpoint_every == 0 or done
                                           or time.monotonic() - saved_at >= checkpoint_seconds):
                self.save(checkpoint, **extra)
                saved_at = time.monotonic()
        bar.close()
        return self.history

    def state_dict(self) -> dict:
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "history": self.history,
            # the records since the last history entry: a checkpoint between two entries resumes the same history
            "window": self._window,
        }

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.iteration, self.elapsed = state["iteration"], state["elapsed"]
        self.history, self._window = list(state["history"]), list(state["window"])

    def save(self, path: str | Path, **extra) -> None:
        """Write a checkpoint, and ``history.json`` beside it; ``extra`` (plain data, e.g. the
        config) rides along.

        Each file is written atomically (:func:`write_atomically`): a crash at any moment leaves
        the previous checkpoint or the new one, never a torn file. With several processes only
        rank 0 writes (the ranks hold the same state).
        """
        if not self.world.is_main:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({**self.state_dict(), **extra, "extra_keys": list(extra)}, buffer)
        write_atomically(path, buffer.getvalue())
        write_atomically(path.with_name("history.json"), json_text(self.history).encode())


CHECKPOINT_KEYS = ("learner", "optimizer", "generator", "iteration", "elapsed", "history", "window")
"""What :meth:`Trainer.state_dict` writes, and :func:`load_checkpoint` requires."""


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a missing, unreadable (e.g. truncated) or
    foreign file raises :class:`~mmtl_lib.errors.DataError` naming the path."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise DataError(f"checkpoint {str(path)!r} could not be read ({type(error).__name__}: {error})") from error
    missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise DataError(f"checkpoint {str(path)!r} is not an mmtl_lib checkpoint of this version: it lacks {missing}")
    return state


def write_atomically(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash at any moment leaves the old file or the new
    one: write a temporary file beside it, flush it to disk (``fsync``), rename it over ``path``
    (atomic on POSIX), and flush the folder so that the rename itself survives a power cut."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    if os.name == "posix":  # Windows cannot open a folder to flush it
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def json_text(value) -> str:
    """``value`` as strict JSON, indented: NaN and infinities (e.g. the 95% interval of a single
    task) become ``null``, which every JSON reader accepts, rather than Python's ``NaN``, which
    strict ones refuse."""
    return json.dumps(_finite(value), indent=1, allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
