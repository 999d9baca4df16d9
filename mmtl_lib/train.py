"""Meta-training loop for any :class:`~mmtl_lib.algorithms.Learner`, fit for notebooks and long runs.

One meta-iteration: draw ``meta_batch_size`` tasks, ``learner.meta_backward(tasks)`` fills the
meta-gradient, the outer optimizer steps. Around it: periodic validation on held-out tasks, a
JSON-friendly history, checkpoints that resume to the identical continuation (model, optimizer
and every random state), a clear stop on a non-finite loss, and optional TF32/AMP on CUDA.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from . import checks
from .algorithms import Learner, evaluate, gaussian_ci95
from .tasks import TaskBatch

Sampler = Callable[..., TaskBatch]
"""``sample(meta_batch_size, generator=g) -> TaskBatch``, tensors already on the device."""

SCHEDULES = ("constant", "linear", "cosine")


def evaluate_learner(
    learner: Learner,
    sample: Sampler,
    *,
    tasks: int = 600,
    steps: int | None = None,
    metric=None,
    seed: int = 0,
    batch_size: int = 25,
) -> dict:
    """Mean query metric over ``tasks`` freshly drawn tasks, after and before adaptation.

    Each task is adapted on its own support set with ``steps`` inner steps (default: the
    learner's ``test_steps``) and scored on its query set, so the score measures what the
    algorithm promises: performance after adapting to a new task.

    Returns:
        ``{"metric": mean, "ci95": half-width of the 95% interval, "pre_metric": mean before
        adaptation, "pre_ci95", "tasks", "steps"}``; ``metric`` is accuracy for classifiers.
    """
    tasks = checks.positive_int("tasks", tasks)
    steps = learner.test_steps if steps is None else steps
    generator = torch.Generator().manual_seed(seed)
    post, pre, done = [], [], 0
    while done < tasks:
        n = min(batch_size, tasks - done)
        result = evaluate(learner, sample(n, generator=generator), steps=[0, steps], metric=metric)
        pre.append(result[0].cpu())
        post.append(result[steps].cpu())
        done += n
    mean, ci = gaussian_ci95(torch.cat(post))
    pre_mean, pre_ci = gaussian_ci95(torch.cat(pre))
    return {"metric": mean, "ci95": ci, "pre_metric": pre_mean, "pre_ci95": pre_ci, "tasks": tasks, "steps": steps}


class NonFiniteLossError(FloatingPointError):
    """The meta-loss became NaN or infinite; the message says at which iteration."""


class Trainer:
    """Meta-train ``learner`` on tasks from ``sample``.

    Args:
        learner: the algorithm, holding the model (already on ``device``).
        sample: the training task sampler, ``sample(meta_batch_size, generator=g)``.
        val_sample: optional validation sampler, scored every ``val_every`` iterations on
            ``val_tasks`` tasks with a fixed seed (the same tasks each time).
        metric: ``metric(prediction, y)`` for logging, e.g. :func:`mmtl_lib.accuracy`.
        outer_lr, optimizer: the meta-optimizer, ``"adam"`` or ``"sgd"`` (Reptile's
            interpolation is SGD at ``outer_lr``).
        schedule: ``"constant"``, ``"linear"`` (to ``final_lr_fraction * outer_lr``, Reptile's
            annealing) or ``"cosine"``, over ``iterations`` given to :meth:`fit`, or over its
            ``time_budget`` where that ends first.
        seed: seeds the task generator and torch's global generators.
        amp: bfloat16 autocast on CUDA; tf32: allow TF32 matmuls on CUDA.
    """

    def __init__(
        self,
        learner: Learner,
        sample: Sampler,
        *,
        meta_batch_size: int,
        outer_lr: float,
        optimizer: str = "adam",
        schedule: str = "constant",
        final_lr_fraction: float = 0.0,
        val_sample: Sampler | None = None,
        val_every: int = 500,
        val_tasks: int = 100,
        metric=None,
        seed: int = 0,
        amp: bool = False,
        tf32: bool = False,
        grad_clip: float | None = None,
    ):
        self.learner, self.sample, self.val_sample, self.metric = learner, sample, val_sample, metric
        self.meta_batch_size = checks.positive_int("meta_batch_size", meta_batch_size)
        self.outer_lr = checks.positive_float("outer_lr", outer_lr)
        self.schedule = checks.one_of("schedule", schedule, SCHEDULES)
        self.final_lr_fraction = final_lr_fraction
        self.val_every = checks.positive_int("val_every", val_every)
        self.val_tasks = checks.positive_int("val_tasks", val_tasks)
        self.grad_clip = grad_clip
        params = learner.meta_parameters()
        if not params:
            raise ValueError(f"{type(learner).__name__} has no meta-parameters to train")
        checks.one_of("optimizer", optimizer, ("adam", "sgd"))
        self.optimizer = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(params, lr=self.outer_lr)
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.iteration, self.history, self.elapsed = 0, [], 0.0
        self._time_budget: float | None = None
        self.amp = amp
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _lr(self, iterations: int) -> float:
        # Progress through whichever budget ends first, so a time-budgeted run anneals too.
        frac = self.iteration / max(iterations, 1)
        if self._time_budget:
            frac = max(frac, self.elapsed / self._time_budget)
        frac = min(frac, 1.0)
        low = self.final_lr_fraction
        if self.schedule == "linear":
            return self.outer_lr * (1 - (1 - low) * frac)
        if self.schedule == "cosine":
            return self.outer_lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * frac)))
        return self.outer_lr

    def step(self, iterations: int) -> dict:
        """One meta-iteration; returns its logged metrics."""
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(iterations)
        tasks = self.sample(self.meta_batch_size, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        device_type = tasks.query[0].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.amp and device_type == "cuda"):
            losses, predictions = self.learner.meta_backward(tasks)
        loss = losses.mean().item()
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"meta-loss is {loss} at iteration {self.iteration}: lower outer_lr or the inner "
                "learning rate, or set grad_clip"
            )
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.learner.meta_parameters(), self.grad_clip)
        self.optimizer.step()
        self.iteration += 1
        record = {"iteration": self.iteration, "loss": loss}
        if self.metric is not None and predictions.numel():
            record["metric"] = per_task(self.metric, predictions, tasks.query[1]).mean().item()
        return record

    def validate(self) -> dict:
        result = evaluate_learner(self.learner, self.val_sample, tasks=self.val_tasks, metric=self.metric, seed=12345)
        return {"val_metric": result["metric"], "val_ci95": result["ci95"]}

    def fit(
        self,
        iterations: int,
        *,
        time_budget: float | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 1000,
        log_every: int = 50,
        progress: bool = True,
    ) -> list[dict]:
        """Train until ``iterations`` (counted from 0, so a resumed run continues) or until
        ``time_budget`` seconds of training have passed (time spent validating is not
        counted); returns the history.

        The history keeps one record every ``log_every`` iterations (the mean of the records
        in between) and one per validation.
        """
        iterations = checks.positive_int("iterations", iterations)
        if time_budget is not None:
            checks.positive_float("time_budget", time_budget)
        self._time_budget = time_budget
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=self.iteration, disable=not progress, mininterval=5, desc="meta-train")
        window: list[dict] = []
        while self.iteration < iterations:
            start = time.perf_counter()
            window.append(self.step(iterations))
            self.elapsed += time.perf_counter() - start  # training time only: validation is extra
            bar.update(1)
            done = self.iteration >= iterations or (time_budget is not None and self.elapsed >= time_budget)
            if len(window) >= log_every or done:
                record = {k: sum(r[k] for r in window) / len(window) for k in window[-1]}
                record.update(iteration=self.iteration, seconds=round(self.elapsed, 2))
                if self.val_sample is not None and (self.iteration % self.val_every < len(window) or done):
                    record.update(self.validate())
                self.history.append(record)
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "metric", "val_metric")})
                window = []
            if checkpoint is not None and (self.iteration % checkpoint_every == 0 or done):
                self.save(checkpoint)
            if done:
                break
        bar.close()
        return self.history

    def state_dict(self) -> dict:
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.iteration, self.elapsed, self.history = state["iteration"], state["elapsed"], state["history"]

    def save(self, path: str | Path, **extra) -> None:
        """Write a checkpoint atomically; ``extra`` (plain data, e.g. the config) rides along."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({**self.state_dict(), **extra, "extra_keys": list(extra)}, tmp)
        tmp.replace(path)
        history = path.with_name("history.json")
        history.write_text(json.dumps(self.history, indent=1))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a missing or unreadable file raises
    ``ValueError`` naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {str(path)!r} could not be read ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or "learner" not in state:
        raise ValueError(f"checkpoint {str(path)!r} is not an mmtl_lib checkpoint (no 'learner' entry)")
    return state


def per_task(metric, predictions: Tensor, targets: Tensor) -> Tensor:
    """``metric`` applied task by task: ``[meta_batch_size]``."""
    return torch.stack([metric(p, y) for p, y in zip(predictions, targets)])
