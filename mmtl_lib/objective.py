"""The meta-objectives: what a meta-batch of tasks asks of the initial parameters ``theta``.

* :func:`meta_loss`, the MAML family's: adapt on each task's support set, score its query set,
  differentiably in ``theta``; one function for every learner that differentiates through the
  inner loop (MAML, first-order MAML, Meta-SGD, ANIL, TR-MAML, MMAML), with a per-task hook for
  the inputs a family adds (MMAML's modulation) and two backends, a per-task ``"loop"`` and a
  batched ``"vmap"``.
* :func:`reptile_meta_gradient`, Reptile's: the mean displacement of the adapted weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from . import checks
from .inner import LossFn, Params, adapt, buffer_copies, forward
from .tasks import TaskBatch

BACKENDS = ("loop", "vmap")

TaskBuffers = Callable[[tuple[Tensor, Tensor]], Params]
"""``task_buffers(support) -> buffers``: the buffers one task's model runs with, from its support set."""


def meta_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    tasks: TaskBatch,
    loss_fn: LossFn,
    *,
    task_buffers: TaskBuffers | None = None,
    backend: str = "loop",
    chunk_size: int | None = None,
    **inner,
) -> tuple[Tensor, Tensor]:
    """Post-adaptation query losses of a meta-batch: the MAML objective, task by task.

    .. math:: L_i(\\theta) = L_{query,i}(\\mathrm{adapt}(\\theta, support_i))

    Args:
        tasks: a :class:`TaskBatch` of ``meta_batch_size`` tasks.
        task_buffers: the per-task hook: ``task_buffers(support) -> buffers``, the buffers task
            ``i``'s model runs with in the inner loop and on its query set (MMAML's modulation,
            computed from the support set; it may depend on meta-parameters, and the
            meta-gradient reaches them). ``None``: every task gets copies of the model's buffers.
        backend: ``"loop"`` adapts one task after another; ``"vmap"`` vectorises over tasks with
            :func:`torch.func.vmap`, ``chunk_size`` tasks at a time (``None``: all at once).
            Both give the same values and gradients. ``"vmap"`` needs a model without running
            BatchNorm statistics (``batch_norm="transductive"`` is fine).
        inner: the keyword arguments of :func:`mmtl_lib.inner_loop` (``inner_steps``,
            ``inner_lr``, ``optimizer``, ``first_order``, ``adapt_names``, ``inner_grad_clip``).

    Returns:
        ``(losses, predictions)``: ``losses`` ``[meta_batch_size]``, differentiable w.r.t.
        ``params``, tensor-valued ``inner_lr`` and whatever ``task_buffers`` depends on;
        ``predictions`` ``[meta_batch_size, n_query, *output_shape]``.
    """
    checks.one_of("backend", backend, BACKENDS)
    checks.optional_positive_int("chunk_size", chunk_size)
    if "buffers" in inner:
        raise checks.ConfigError("meta_loss takes task_buffers (a function of the support set), not buffers")
    tasks.check()
    shared = buffer_copies(model)

    def task_loss(params, sx, sy, qx, qy):
        buffers = shared if task_buffers is None else task_buffers((sx, sy))
        adapted = adapt(model, params, (sx, sy), loss_fn, buffers=buffers, **inner)
        prediction = forward(model, adapted, qx, buffers)
        return loss_fn(prediction, qy), prediction

    (sx, sy), (qx, qy) = tasks.support, tasks.query
    if backend == "loop":
        results = [task_loss(params, *t) for t in zip(sx, sy, qx, qy)]
        return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])
    batched = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0), chunk_size=chunk_size)
    return batched(dict(params), sx, sy, qx, qy)


def reptile_meta_gradient(
    model: nn.Module, params: Mapping[str, Tensor], task_data: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn,
    **inner,
) -> tuple[Params, list[Params]]:
    """Reptile's update direction ``theta - mean_i phi_i`` over a meta-batch of tasks.

    Each ``phi_i`` is :func:`mmtl_lib.adapt` from ``theta`` on task ``i``'s data, never
    differentiated (``first_order``, detached). Feeding the direction to SGD with learning rate
    ``epsilon`` is the paper's update ``theta <- theta + epsilon (mean_i phi_i - theta)``; any
    other optimizer may use it too.

    Args:
        task_data: an iterable of ``(x, y)``, one per task.
        inner: keyword arguments of :func:`mmtl_lib.inner_loop`, e.g. ``inner_steps``,
            ``inner_lr``, ``optimizer=mmtl_lib.adam((0, 0.999))``, ``inner_batch_size``.

    Returns:
        ``(direction, phis)``: name -> tensor, and each task's adapted weights (detached).
    """
    theta = {k: v.detach() for k, v in params.items()}
    phis = [
        {k: v.detach() for k, v in adapt(model, theta, data, loss_fn, first_order=True, **inner).items()}
        for data in task_data
    ]
    if not phis:
        raise checks.ConfigError("task_data is empty: give at least one task")
    direction = {k: v - sum(phi[k] for phi in phis) / len(phis) for k, v in theta.items()}
    return direction, phis
