"""Task weights learned by looking ahead: meta-learning the weights of a multi-task loss.

Auto-Lambda (Liu, James, Davison and Johns, TMLR 2022) and MOML (Ye et al., NeurIPS 2021): the
weights ``w_t`` of a multi-task loss ``sum_t w_t L_t`` (Auto-Lambda's ``lambda_t``) are
meta-parameters, chosen so that ``k`` training steps on that loss lower a held-out loss of the
primary task. The hypergradient goes through :func:`mmtl_lib.adapt`, whose ``support`` tuple
carries the task of every example (:func:`pack_targets`). The first of the book's three meta
multi-task families.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from . import checks
from .inner import LossFn, adapt, forward


def pack_targets(y: Tensor, task: Tensor, n_tasks: int) -> Tensor:
    """Targets and task ids in one tensor, so that a multi-task batch fits adapt's ``(x, y)``.

    Args:
        y: ``[n]`` or ``[n, 1]`` regression targets.
        task: ``[n]`` integer task ids in ``[0, n_tasks)``.

    Returns:
        ``[n, 1 + n_tasks]``: column 0 the target, then the one-hot task id.
    """
    n_tasks = checks.positive_int("n_tasks", n_tasks)
    y = y.reshape(-1, 1)
    if task.shape != (y.shape[0],) or task.dtype.is_floating_point:
        raise checks.ConfigError(
            f"task must be integer ids of shape ({y.shape[0]},), got {task.dtype} {tuple(task.shape)}")
    if task.numel() and not 0 <= int(task.min()) <= int(task.max()) < n_tasks:
        raise checks.ConfigError(
            f"task ids span [{int(task.min())}, {int(task.max())}]: they must lie in [0, {n_tasks})")
    return torch.cat([y, nn.functional.one_hot(task, n_tasks).to(y.dtype)], dim=1)


def task_losses(prediction: Tensor, packed: Tensor) -> Tensor:
    """Each task's mean squared error, for a network with one output column (head) per task.

    Args:
        prediction: ``[n, T]``; column ``t`` is task ``t``'s head, e.g. ``MLP(d, hidden, T)``.
        packed: ``[n, 1 + T]`` from :func:`pack_targets`.

    Returns:
        ``[T]``: ``L_t``, the MSE of head ``t`` on the examples of task ``t`` (0 for a task with
        none in the batch). Each example is scored by its own task's head only.
    """
    y, onehot = packed[:, :1], packed[:, 1:]
    return ((prediction - y) ** 2 * onehot).sum(0) / onehot.sum(0).clamp(min=1)


def weighted_loss(weights: Tensor) -> LossFn:
    """``loss_fn(prediction, packed) = sum_t weights_t L_t``, differentiable w.r.t. ``weights`` ``[T]``."""
    return lambda prediction, packed: (weights * task_losses(prediction, packed)).sum()


def lookahead_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    weights: Tensor,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    *,
    inner_steps: int,
    inner_lr: float,
    primary: int = 0,
    inner_grad_clip: float | None = None,
) -> Tensor:
    """The primary task's held-out loss after ``inner_steps`` SGD steps on the weighted multi-task loss.

    .. math:: \\theta_{s+1} = \\theta_s - \\alpha \\nabla \\textstyle\\sum_t w_t L_t(\\theta_s),
        \\qquad F(w) = L^{val}_{primary}(\\theta_k(w))

    Auto-Lambda minimises ``F`` over ``w`` (with ``k = 1``); MOML states it as the upper
    level of a bilevel problem. With one step, the chain rule through
    ``theta_1 = theta - alpha sum_t w_t grad L_t(theta)``, where ``d theta_1 / d w_j =
    -alpha grad L_j(theta)``, gives

    .. math:: \\frac{\\partial F}{\\partial w_j}
        = -\\alpha\\, \\nabla L^{val}(\\theta_1)^\\top \\nabla L_j(\\theta)

    (tested against autograd in ``tests/test_lookahead.py``). Gradient descent on ``w`` thus
    raises the weight of a task in proportion to how well its training gradient agrees with the
    primary task's validation gradient: the gradient-similarity rule of Du et al. (2018), who
    keep an auxiliary loss only while ``cos(grad L_main, grad L_aux) > 0``, with an unnormalised
    dot product and a smooth weight in place of the gate; and, with one weight per training
    *example* instead of per task, the one-step lookahead of learning to reweight examples (Ren
    et al. 2018). For ``k > 1``,
    ``d theta_k / d w_j = -alpha sum_s [prod_{r>s} (I - alpha H_r)] grad L_j(theta_s)``
    (``H_r`` the Hessian of the weighted loss at ``theta_r``): a task also counts for how its
    gradient interacts with the curvature of the later steps, which autograd through
    :func:`mmtl_lib.adapt` handles.

    Args:
        model: a network with one output column per task, ``[n, *input_shape] -> [n, T]``.
        params: name -> tensor, the network's parameters ``theta``.
        weights: ``[T]`` task weights ``w``.
        train: ``(x, packed)``: the multi-task training batch, ``packed`` from :func:`pack_targets`.
        val: ``(x, packed)``: held-out examples of the primary task.
        inner_steps: ``k``, the lookahead's SGD steps; inner_lr: ``alpha``; inner_grad_clip: as in
            :func:`mmtl_lib.inner_loop`.

    Returns:
        scalar, differentiable w.r.t. ``weights`` (and ``params``).
    """
    adapted = adapt(model, params, train, weighted_loss(weights), inner_steps=inner_steps, inner_lr=inner_lr,
                    inner_grad_clip=inner_grad_clip)
    return task_losses(forward(model, adapted, val[0]), val[1])[primary]


class LookaheadWeights:
    """Task weights ``w >= 0`` trained by Adam on :func:`lookahead_loss` (Auto-Lambda).

    Alternate, every training step: ``update`` the weights on the hypergradient at the current
    network, then train the network on ``loss_fn()``, the weighted loss with the weights held
    fixed. Two things mattered in our runs: start the weights small (``init``; Auto-Lambda's
    default is 0.1), so that an auxiliary task can do little harm to the shared trunk before its
    weight has been measured, and compute ``val`` on primary-task examples held out of ``train``
    (Auto-Lambda's code reuses the training set in a different order), or the lookahead rewards
    whatever fits the primary training set fastest. Unlike Auto-Lambda the weights are clamped
    at 0. With one head per task, a task's hypergradient passes through its own head: a related
    task whose head does not resemble the primary's looks unhelpful, and a task whose weight
    reaches 0 no longer trains its head (``benchmarks/mmtl_lookahead.py`` measures the effect).

    Args:
        n_tasks: ``T``; init: initial weights, a number or ``[T]``; lr: Adam's learning rate for
            the weights; inner_steps, inner_lr, primary, inner_grad_clip: those of :func:`lookahead_loss`.
    """

    def __init__(self, n_tasks: int, *, init=0.1, lr: float = 0.01, inner_steps: int = 1, inner_lr: float = 0.1,
                 primary: int = 0, inner_grad_clip: float | None = None):
        n_tasks = checks.positive_int("n_tasks", n_tasks)
        init = torch.as_tensor(init, dtype=torch.get_default_dtype()).expand(n_tasks).clone()
        if (init < 0).any():
            raise checks.ConfigError(f"init = {init.tolist()} is not allowed: task weights must be >= 0")
        if not 0 <= primary < n_tasks:
            raise checks.ConfigError(f"primary = {primary} is not allowed: it must be a task id in [0, {n_tasks})")
        self.weights = init.requires_grad_()
        self.optimizer = torch.optim.Adam([self.weights], lr=checks.positive_float("lr", lr))
        self.lookahead = dict(inner_steps=checks.positive_int("inner_steps", inner_steps),
                              inner_lr=checks.positive_float("inner_lr", inner_lr), primary=primary,
                              inner_grad_clip=checks.optional_positive_float("inner_grad_clip", inner_grad_clip))

    def update(self, model: nn.Module, params: Mapping[str, Tensor], train, val) -> Tensor:
        """One Adam step on the weights, then clamp to ``>= 0``; returns the hypergradient ``[T]``."""
        params = {k: v.detach() for k, v in params.items()}  # the network's own step is separate
        loss = lookahead_loss(model, params, self.weights, train, val, **self.lookahead)
        (grad,) = torch.autograd.grad(loss, self.weights)
        self.weights.grad = grad
        self.optimizer.step()
        with torch.no_grad():
            self.weights.clamp_(min=0)
        return grad

    def loss_fn(self) -> LossFn:
        """The weighted loss at the current weights, as constants: the network's training loss."""
        return weighted_loss(self.weights.detach())
