"""Meta-training on several processes and machines with :mod:`torch.distributed`.

``torchrun`` (``python -m torch.distributed.run``) starts the same program in every process, a
*rank*, and tells it where it stands through environment variables; :meth:`World.from_env` reads
them and a :class:`World` does what the ranks do together. The :class:`~mmtl_lib.Trainer` given
a world splits each meta-iteration across the ranks:

* every rank draws the whole meta-batch of ``B`` tasks from the same seeded generator and keeps
  its share, tasks ``[rank * B / W, (rank + 1) * B / W)`` of the ``W`` ranks. No rank draws
  differently from a single process, so a run is reproducible, and resumable with any ``W``;
* each rank fills the meta-gradient of its own tasks (their mean), scales it by its share of the
  meta-batch, ``(B / W) / B``, and one all-reduce (a sum) gives every rank the mean over the
  whole meta-batch: the single process's meta-gradient, up to the order of floating-point sums.
  The same all-reduce carries every task's loss and metric, so each rank logs, checks (a
  non-finite loss stops every rank at the same iteration) and clips the whole meta-batch's;
* the outer optimizer then takes the same step on every rank, and the parameters stay equal.

That is exact for a learner whose meta-gradient is a mean of per-task terms computed from each
task alone (:func:`check_learner`): the MAML family (first-order MAML, Meta-SGD, ANIL, MAML++,
whose annealing counters advance alike on every rank, Proto-MAML, MMAML), Reptile (its
mini-batch generator drawn past the other ranks' tasks), the metric learners (ProtoNet,
Matching networks), and joint training of a model without BatchNorm. Refused by name: TR-MAML,
whose task weights ``p`` follow the losses of the whole meta-batch; any model with BatchNorm
running statistics, which each rank would update from its own tasks; and the pooled baselines
(joint training, supervised pretraining) on a model with BatchNorm, whose statistics would be
those of a rank's images instead of the meta-batch's.

Checkpoints, logs and results are rank 0's to write (:attr:`World.is_main`); on a restart rank 0
reads the checkpoint and :meth:`World.broadcast` hands it to the others, so several machines
need not share a file system for it (but rank 0 may be on another machine after a restart:
``--out`` belongs on a shared one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.rendezvous import rendezvous

from .baselines import JointTraining, PretrainClassifier
from .errors import ConfigError
from .learners import MAML, Learner, Reptile
from .metric import MetricLearner
from .models import BatchNorm
from .tasks import TaskBatch

TIMEOUT = timedelta(minutes=30)
"""How long a rank waits for the others in a collective, e.g. while rank 0 alone validates."""


@dataclass(frozen=True)
class World:
    """Where this process stands in a job of ``world_size`` processes; ``World()`` is one process.

    Attributes:
        rank: this process's index, ``0 .. world_size - 1``; rank 0 writes every file.
        world_size: the number of processes, over all machines.
        local_rank: this process's index on its machine: the GPU it takes.
        restart_count: how often ``torchrun`` restarted the job after a failure (0: first attempt).
        run_id: the job's rendezvous id (``torchrun --rdzv-id``, a fresh one per single-machine
            launch): the same in every attempt of one launch, so a restarted job knows its files.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0
    run_id: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """The world ``torchrun`` describes in ``env`` (default ``os.environ``): ``WORLD_SIZE``,
        ``RANK``, ``LOCAL_RANK``, ``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_RUN_ID``;
        without ``WORLD_SIZE``, one process. A value that is not allowed is a
        :class:`~mmtl_lib.errors.ConfigError` naming the variable."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        world_size = _env_int(env, "WORLD_SIZE", low=1)
        rank = _env_int(env, "RANK", low=0, high=world_size - 1)
        local_rank = _env_int(env, "LOCAL_RANK", low=0, default=rank)
        restarts = _env_int(env, "TORCHELASTIC_RESTART_COUNT", low=0, default=0)
        if world_size > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
            if missing:
                raise ConfigError(f"WORLD_SIZE = {world_size} but {' and '.join(missing)} not set: launch the "
                                  "processes with torchrun (python -m torch.distributed.run), which sets them")
        return cls(rank, world_size, local_rank, restarts, env.get("TORCHELASTIC_RUN_ID"))

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes checkpoints, logs and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    # --- the process group ----------------------------------------------------------------

    @contextmanager
    def running(self, device: torch.device) -> Iterator[World]:
        """Join the process group for the block (nothing for one process): gloo on a CPU, NCCL on
        CUDA ``device`` (which should be ``cuda:{local_rank}``)."""
        if not self.distributed:
            yield self
            return
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # torchrun's agent keeps one store for all attempts of a job, where the keys of a failed
        # attempt (each rank's address) outlive it: a restarted rank may read its peer's old
        # address and fail to connect (pytorch/pytorch#135712, #167288). Each attempt gets keys
        # of its own.
        store, _, _ = next(rendezvous("env://", self.rank, self.world_size, timeout=TIMEOUT))
        store = dist.PrefixStore(f"mmtl_lib/attempt_{self.restart_count}/", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=self.rank,
                                world_size=self.world_size, timeout=TIMEOUT)
        try:
            yield self
        finally:
            dist.destroy_process_group()

    def require_started(self) -> None:
        """Raise :class:`~mmtl_lib.errors.ConfigError` unless this process is in a process group of
        ``world_size`` ranks (:meth:`running`)."""
        if not self.distributed:
            return
        if not dist.is_initialized() or dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ConfigError(f"world_size = {self.world_size} needs this process in a process group of that size "
                              "with its rank: train inside `with world.running(device):`")

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # --- splitting a meta-batch -------------------------------------------------------------

    def share(self, n_tasks: int) -> tuple[int, int]:
        """``(start, stop)``: the tasks of a meta-batch of ``n_tasks`` that this rank computes."""
        per_rank = n_tasks // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def check_meta_batch_size(self, meta_batch_size: int) -> None:
        """Refuse a meta-batch that does not split evenly over the ranks."""
        w = self.world_size
        if meta_batch_size % w:
            low, high = meta_batch_size // w * w, (meta_batch_size // w + 1) * w
            allowed = f"{low} or {high}" if low else f"{high}"
            raise ConfigError(f"meta_batch_size = {meta_batch_size} is not allowed with {w} processes (WORLD_SIZE = "
                              f"{w}): it must be a multiple of the number of processes, e.g. {allowed}")

    def combine(self, params: Sequence[Tensor], losses: Tensor, metrics: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Turn this rank's share into the whole meta-batch's, on every rank, in one all-reduce.

        Args:
            params: the meta-parameters, ``.grad`` holding the mean meta-gradient of this rank's
                tasks (``None`` where a parameter gets none, as on every other rank).
            losses, metrics: this rank's per-task query losses and metrics ``[B / W]``.

        Returns:
            every task's losses and metrics ``[B]``, in the order of the meta-batch; each
            ``.grad`` now holds the mean meta-gradient over all ``B`` tasks.
        """
        if not self.distributed:
            return losses, metrics
        n = losses.numel()
        total, start = n * self.world_size, n * self.rank
        grads = [p.grad for p in params]
        rows = [losses] if metrics is None else [losses, metrics]
        dtype = losses.dtype
        for t in [*rows, *(g for g in grads if g is not None)]:
            dtype = torch.promote_types(dtype, t.dtype)
        device = losses.device
        has_grad = torch.tensor([g is not None for g in grads], dtype=dtype, device=device)
        per_task = torch.zeros(len(rows), total, dtype=dtype, device=device)
        for i, row in enumerate(rows):
            per_task[i, start:start + n] = row.detach().reshape(-1)
        scale = n / total  # this rank's share of the meta-batch
        flat = torch.cat([has_grad, per_task.flatten(),
                          *((g.detach().flatten().to(dtype) * scale) if g is not None
                            else torch.zeros(p.numel(), dtype=dtype, device=device) for p, g in zip(params, grads))])
        dist.all_reduce(flat)
        counts = flat[:len(grads)].round().long().tolist()
        offset = len(grads)
        gathered = flat[offset:offset + len(rows) * total].view(len(rows), total)
        offset += len(rows) * total
        for p, g, count in zip(params, grads, counts):
            chunk = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if count not in (0, self.world_size):
                raise RuntimeError(f"{count} of {self.world_size} ranks have a meta-gradient for a parameter of shape "
                                   f"{tuple(p.shape)}: the ranks do not run the same learner")
            if count:
                g.copy_(chunk)
        out = [gathered[i].to(row.dtype) for i, row in enumerate(rows)]
        return out[0], (out[1] if metrics is not None else None)

    # --- agreeing on values -----------------------------------------------------------------

    def max(self, value: float) -> float:
        """The largest of every rank's ``value`` (e.g. the seconds of training, so that a time
        budget ends every rank at the same iteration)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object, e.g. a checkpoint), on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def check_same(self, what: str, value: Mapping, error=ConfigError) -> None:
        """Refuse, on every rank alike, a job whose ranks disagree on ``value`` (plain data, e.g.
        their configuration or the identity of their data), naming the rank and the keys."""
        values = self.gather(value)
        for rank, other in enumerate(values[1:], start=1):
            keys = [k for k in {**values[0], **other} if values[0].get(k) != other.get(k)]
            if keys:
                raise error(f"rank {rank} has another {what} than rank 0: "
                            + ", ".join(f"{k} {values[0].get(k)!r} (rank 0) vs {other.get(k)!r} (rank {rank})"
                                        for k in keys)
                            + "; launch every process with the same settings and data")

    def skip_tasks(self, learner: Learner, tasks: TaskBatch, start: int, stop: int) -> None:
        """Advance ``learner``'s own random state over tasks ``start .. stop - 1`` of ``tasks`` as its
        :meth:`~mmtl_lib.Learner.meta_backward` would, without computing them: the other ranks'
        tasks, so that this rank's tasks get the draws they get in one process.

        Only Reptile with mini-batches draws (one permutation of each task's support set, in
        :func:`mmtl_lib.inner_loop`); ``tests/test_distributed.py`` checks that its generator
        ends as in one process."""
        if isinstance(learner, Reptile) and learner.inner_batch_size is not None and learner.backend == "loop":
            n_support = tasks.support[0].shape[1]
            for _ in range(start, stop):
                torch.randperm(n_support, generator=learner.generator)


def _env_int(env: Mapping[str, str], name: str, *, low: int, high: int | None = None,
             default: int | None = None) -> int:
    text = env.get(name)
    if text is None and default is not None:
        return default
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise ConfigError(f"{name} = {text!r} is not allowed: it must be {allowed} (torchrun sets it)")
    return value


SPLITTABLE = (MAML.meta_backward, Reptile.meta_backward, MetricLearner.meta_backward,
              JointTraining.meta_backward, PretrainClassifier.meta_backward)
"""The meta-gradients known to be a mean of per-task terms, each computed from its task alone."""


def check_learner(learner: Learner, world_size: int) -> None:
    """Refuse, naming it and saying why, a learner whose meta-gradient does not split over
    ``world_size`` > 1 processes into the single process's (see the module's docstring)."""
    if world_size == 1:
        return
    name = getattr(learner, "name", type(learner).__name__)
    kind, why = type(learner), None
    if name == "tr-maml":
        why = ("its task weights p follow the losses of the whole meta-batch, which no rank sees, and every rank "
               "would move its own p")
    elif kind.meta_backward not in SPLITTABLE or (isinstance(learner, MAML)
                                                  and kind.task_weights is not MAML.task_weights):
        why = (f"{kind.__name__} changes how the meta-gradient is formed from the tasks (meta_backward or "
               "task_weights), so a rank's share of it is not known to add up to the whole")
    elif any(getattr(m, "track_running_stats", False) for m in learner.model.modules()):
        why = "its model keeps BatchNorm running statistics, which each rank would update from its own tasks only"
    elif isinstance(learner, (JointTraining, PretrainClassifier)) and any(
            isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNorm)) for m in learner.model.modules()):
        why = ("it trains on the pooled images of the meta-batch through BatchNorm, whose statistics would be those "
               "of a rank's share")
    if why:
        raise ConfigError(f"learner {name!r} is not allowed with {world_size} processes: {why}; train it in one "
                          "process")

