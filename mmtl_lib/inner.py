"""The inner loop: gradient steps on a task's support set, written as a pure function.

Parameters are a dict ``name -> tensor`` and every forward pass goes through
:func:`torch.func.functional_call`, so the model object is never modified. The inner gradients come
from :func:`torch.func.grad`, which composes with ordinary autograd on the outside (MAML's
meta-gradient) and with :func:`torch.func.vmap` over tasks (the batched backend in
:mod:`mmtl_lib.algorithms`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import checks

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, buffers=None) -> Tensor:
    """``model(x)`` evaluated with ``params`` (and ``buffers``) in place of the module's own.

    Buffers default to copies of the model's, so a BatchNorm layer that tracks running
    statistics in training mode updates the copies and never the model.
    """
    if buffers is None:
        buffers = {name: b.clone() for name, b in model.named_buffers()}
    return functional_call(model, (dict(params), buffers), (x,))


def _check_support(support) -> tuple[Tensor, Tensor]:
    if not isinstance(support, (tuple, list)) or len(support) != 2:
        raise ValueError(f"support must be a tuple (x, y), got {type(support).__name__}")
    x, y = support
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"support is empty: x has shape {tuple(x.shape)}; give at least one example")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"support x and y disagree: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; "
            "they must have the same number of examples in dimension 0"
        )
    return x, y


def _learning_rates(inner_lr, params: Mapping[str, Tensor], names: list[str]):
    if isinstance(inner_lr, Mapping):
        missing = [n for n in names if n not in inner_lr]
        if missing:
            raise ValueError(f"inner_lr has no learning rate for the adapted parameters {missing}")
        for n in names:
            shape = torch.as_tensor(inner_lr[n]).shape
            try:
                fits = torch.broadcast_shapes(shape, params[n].shape) == params[n].shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"inner_lr[{n!r}] has shape {tuple(shape)}, which does not "
                    f"broadcast to the parameter's shape {tuple(params[n].shape)}"
                )
        return {n: inner_lr[n] for n in names}
    lr = checks.positive_float("inner_lr", inner_lr)
    return {n: lr for n in names}


def _clip(grads: Params, max_norm: float) -> Params:
    # Scale rather than branch on the norm, so the same code runs under vmap.
    norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
    scale = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return {n: g * scale for n, g in grads.items()}


def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    *,
    steps: int,
    inner_lr: float | Mapping[str, Tensor],
    first_order: bool = False,
    adapt_names=None,
    buffers: Mapping[str, Tensor] | None = None,
    grad_clip: float | None = None,
) -> Params:
    """Run ``steps`` SGD steps on the support loss and return the adapted parameters.

    .. math:: \\phi_{j+1} = \\phi_j - \\alpha \\odot \\nabla_\\phi L_{support}(\\phi_j), \\quad \\phi_0 = \\theta

    Args:
        model: the network; only its structure is used, its parameters are never read or written.
        params: name -> tensor, e.g. ``dict(model.named_parameters())``.
        support: ``(x, y)`` with ``x`` of shape ``[n_support, *input_shape]`` and ``y`` of shape
            ``[n_support, *target_shape]``.
        loss_fn: ``loss_fn(prediction, y)`` -> scalar tensor, e.g. ``F.mse_loss``.
        steps: number of inner gradient steps, >= 1.
        inner_lr: a step size > 0, or a dict name -> tensor broadcastable to that parameter
            (per-parameter rates, learned as in Meta-SGD; such rates may take any sign).
        first_order: treat the inner gradients as constants (first-order MAML). The result is
            still differentiable w.r.t. ``params``, with identity Jacobian.
        adapt_names: the parameters to adapt (ANIL: the head's); the others pass through
            unchanged. Defaults to the keys of ``inner_lr`` if it is a dict, else all of ``params``.
        buffers: name -> tensor for the model's buffers; defaults to copies of the model's own.
        grad_clip: if given, rescale each step's inner gradient to at most this global norm.

    Returns:
        name -> tensor with the same keys as ``params``: differentiable w.r.t. ``params`` (and
        tensor-valued ``inner_lr``) through every step unless ``first_order``.
    """
    steps = checks.positive_int("steps", steps)
    if not params:
        raise ValueError("params is empty: pass e.g. dict(model.named_parameters())")
    if isinstance(inner_lr, Mapping):
        checks.known_names("inner_lr", inner_lr, params)
    if adapt_names is None:
        adapt_names = list(inner_lr) if isinstance(inner_lr, Mapping) else list(params)
    names = checks.known_names("adapt_names", adapt_names, params)
    lrs = _learning_rates(inner_lr, params, names)
    if grad_clip is not None:
        grad_clip = checks.positive_float("grad_clip", grad_clip)
    x, y = _check_support(support)
    if buffers is None:
        buffers = {name: b.clone() for name, b in model.named_buffers()}

    fast = dict(params)
    for _ in range(steps):
        # First order: differentiate a detached copy, so no graph for second derivatives is built.
        base = {n: t.detach() for n, t in fast.items()} if first_order else fast

        def support_loss(adapted: Params, buffers: Params, base=base) -> Tensor:
            return loss_fn(forward(model, {**base, **adapted}, x, buffers), y)

        # Buffers are an argument, not a capture: BatchNorm may update its running statistics.
        grads = torch.func.grad(support_loss)({n: base[n] for n in names}, buffers)
        if grad_clip is not None:
            grads = _clip(grads, grad_clip)
        for n in names:
            fast[n] = fast[n] - lrs[n] * grads[n]
    return fast
