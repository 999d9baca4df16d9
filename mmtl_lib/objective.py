"""The meta-objectives: what a meta-batch of tasks asks of the initial parameters ``theta``.

* :func:`meta_loss`, the MAML family's: adapt on each task's support set, score its query set,
  differentiably in ``theta``; one function for every learner that differentiates through the
  inner loop (MAML, first-order MAML, Meta-SGD, ANIL, TR-MAML, MMAML), with a per-task hook for
  the inputs a family adds (MMAML's modulation) and three backends, a per-task ``"loop"``, a
  batched ``"vmap"`` and a per-task ``"compile"``d meta-gradient (:mod:`mmtl_lib.compiled`).
* :func:`reptile_meta_gradient`, Reptile's: the mean displacement of the adapted weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import checks, compiled
from .inner import LossFn, Params, adapt, buffer_copies, forward, inner_loop
from .tasks import TaskBatch

BACKENDS = ("loop", "vmap", "compile")
"""The backends of :func:`meta_loss` (and so of :class:`mmtl_lib.MAML` and its family)."""

EAGER_BACKENDS = ("loop", "vmap")
"""The backends of the code that adapts without :func:`meta_loss` (Reptile, :func:`mmtl_lib.evaluate`)."""

TaskBuffers = Callable[[tuple[Tensor, Tensor]], Params]
"""``task_buffers(support) -> buffers``: the buffers one task's model runs with, from its support set."""

TaskParams = Callable[[Params, tuple[Tensor, Tensor], Params], Params]
"""``task_params(params, support, buffers) -> params``: where one task's adaptation starts
(Proto-MAML's head from the support set's prototypes)."""


def msl_weights(inner_steps: int, progress: float) -> list[float]:
    """MAML++'s multi-step loss weights ``v_1, ..., v_k`` (Antoniou et al. 2019, their code's
    ``get_per_step_loss_importance_vector``) at ``progress`` ``r`` through the annealing, in
    ``[0, 1)``.

    .. math:: v_j = \\max(1/k - r/k,\\ 0.03/k) \\ (j < k), \\qquad
        v_k = \\min(1/k + r (k-1)/k,\\ 1 - 0.03 (k-1)/k)

    Uniform at ``r = 0``; from ``r = 1`` on, ``(0, ..., 0, 1)``: the final step's loss alone,
    plain MAML, as the paper's code switches to after its ``multi_step_loss_num_epochs``.
    """
    k = checks.positive_int("inner_steps", inner_steps)
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not progress >= 0:
        raise checks.ConfigError(f"progress = {progress!r} is not allowed: it must be a number >= 0")
    if progress >= 1:
        return [0.0] * (k - 1) + [1.0]
    floor = 0.03 / k
    return [max(1 / k - progress / k, floor)] * (k - 1) + [min(1 / k + progress * (k - 1) / k, 1 - (k - 1) * floor)]


def _with(buffers: Params, step_buffers, step: int) -> Params:
    return buffers if step_buffers is None else {**buffers, **step_buffers(step)}


def meta_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    tasks: TaskBatch,
    loss_fn: LossFn,
    *,
    task_buffers: TaskBuffers | None = None,
    task_params: TaskParams | None = None,
    step_weights: Sequence[float] | None = None,
    backend: str = "loop",
    chunk_size: int | None = None,
    **inner,
) -> tuple[Tensor, Tensor]:
    """Post-adaptation query losses of a meta-batch: the MAML objective, task by task.

    .. math:: L_i(\\theta) = L_{query,i}(\\mathrm{adapt}(\\theta, support_i))

    or, with ``step_weights`` (MAML++'s multi-step loss),
    ``L_i = sum_{j=1..k} v_j L_{query,i}(phi_j)``.

    Args:
        tasks: a :class:`TaskBatch` of ``meta_batch_size`` tasks.
        task_buffers: the per-task hook: ``task_buffers(support) -> buffers``, the buffers task
            ``i``'s model runs with in the inner loop and on its query set (MMAML's modulation,
            computed from the support set; it may depend on meta-parameters, and the
            meta-gradient reaches them). ``None``: every task gets copies of the model's buffers.
        task_params: the hook for where task ``i``'s adaptation starts,
            ``task_params(params, support, buffers) -> params`` (Proto-MAML's prototype head);
            the meta-gradient flows through it. ``None``: from ``params``.
        step_weights: ``v_1, ..., v_k``, one float per inner step (:func:`msl_weights`): the
            query loss after every step, weighted. Steps with weight 0 are not scored at all, so
            ``(0, ..., 0, 1)`` computes exactly what ``None`` (the last step only) does.
        backend: ``"loop"`` adapts one task after another; ``"vmap"`` vectorises over tasks with
            :func:`torch.func.vmap`, ``chunk_size`` tasks at a time (``None``: all at once);
            ``"compile"`` computes each task's meta-gradient with one graph compiled by
            :func:`torch.compile` (:mod:`mmtl_lib.compiled`: compiled once per task shape, which
            takes minutes on a CPU; where compilation fails, a warning and the same computation
            run eagerly). All give the same values and gradients. ``"vmap"`` needs a model without
            running BatchNorm statistics (``batch_norm="transductive"`` is fine). ``"compile"``'s
            losses can be differentiated once (not twice), its predictions not at all, and its
            ``task_buffers`` must not require grad (not MMAML); it refuses ``inner_batch_size``.
        inner: the keyword arguments of :func:`mmtl_lib.inner_loop` (``inner_steps``,
            ``inner_lr``, ``optimizer``, ``first_order``, ``adapt_names``, ``inner_grad_clip``,
            ``step_buffers``, ``recompute``; the query at ``phi_j`` is scored with
            ``step_buffers(j - 1)``).

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
    steps = inner.get("inner_steps")
    step_buffers = inner.get("step_buffers")
    if step_weights is not None:
        step_weights = [float(w) for w in step_weights]
        if not steps or len(step_weights) != steps:
            raise checks.ConfigError(f"step_weights has {len(step_weights)} entries, but inner_steps = {steps}: "
                                     "give one weight per inner step")

    skip = None if step_weights is None else [w == 0 for w in step_weights]

    def query_loss(params, inner_lr, weights, support, query, buffers):
        """One task's (weighted) query loss after adaptation, and its last prediction."""
        (sx, sy), (qx, qy) = support, query
        start = params if task_params is None else task_params(params, (sx, sy), buffers)
        settings = {**inner, "inner_lr": inner_lr}
        if weights is None:
            adapted = adapt(model, start, (sx, sy), loss_fn, buffers=buffers, **settings)
            prediction = forward(model, adapted, qx, _with(buffers, step_buffers, (steps or 0) - 1))
            return loss_fn(prediction, qy), prediction
        loss = 0.0
        for j, phi in enumerate(inner_loop(model, start, (sx, sy), loss_fn, buffers=buffers, **settings)):
            if j == 0 or (skip[j - 1] and j < steps):
                continue
            prediction = forward(model, phi, qx, _with(buffers, step_buffers, j - 1))
            loss = loss + weights[j - 1] * loss_fn(prediction, qy)
        return loss, prediction

    def task_loss(params, sx, sy, qx, qy):
        buffers = shared if task_buffers is None else task_buffers((sx, sy))
        return query_loss(params, inner.get("inner_lr"), step_weights, (sx, sy), (qx, qy), buffers)

    (sx, sy), (qx, qy) = tasks.support, tasks.query
    if backend == "compile":
        if inner.get("inner_batch_size") is not None:
            raise checks.ConfigError("inner_batch_size is not allowed with backend='compile', which adapts on the "
                                     "whole support set: use backend='loop'")
        if inner.get("recompute"):
            raise checks.ConfigError("recompute = True is not allowed with backend='compile', whose traced graph "
                                     "stores nothing between the passes: use backend='loop' or 'vmap'")
        per_step = None if step_buffers is None else tuple(
            tuple((k, v.tolist()) for k, v in sorted(step_buffers(j).items())) for j in range(-1, steps or 0))
        # What the traced graph bakes in, and so tells graphs apart (the model is the cache's key;
        # Proto-MAML's hook by its function, which depends only on the model).
        static = (loss_fn, getattr(task_params, "__func__", task_params), per_step, tuple(
            (k, tuple(v) if k == "adapt_names" and v is not None else v) for k, v in sorted(inner.items())
            if k not in ("inner_lr", "step_buffers")))
        return compiled.meta_loss(query_loss, model, dict(params), tasks,
                                  (lambda support: shared) if task_buffers is None else task_buffers, static,
                                  inner_lr=inner.get("inner_lr"), step_weights=step_weights)
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
