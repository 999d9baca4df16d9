"""Inner optimizers as pure functions: what one step of the inner loop does with a gradient.

An :class:`InnerOptimizer` is a pair of pure functions, after torchopt's functional optimizers:
``init(params) -> state`` and ``update(grads, state, lr) -> (updates, state)``, with
``phi <- phi + updates``. No tensor is modified in place, so an inner loop built on them runs
under :func:`torch.func.vmap` and, unless its gradients are detached, stays differentiable (the
MAML meta-gradient flows through Adam's moments as through SGD's step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from . import checks

Params = dict[str, Tensor]
State = dict
Rates = Mapping[str, float | Tensor]
"""Step size per parameter name: a number, or a tensor broadcastable to the parameter (Meta-SGD)."""


class InnerOptimizer(NamedTuple):
    """``init(params) -> state`` and ``update(grads, state, lr) -> (updates, state)``."""

    name: str
    init: Callable[[Mapping[str, Tensor]], State]
    update: Callable[[Mapping[str, Tensor], State, Rates], tuple[Params, State]]


def sgd() -> InnerOptimizer:
    """Plain gradient descent, ``updates = -lr * grad``: MAML's inner loop."""

    def init(params: Mapping[str, Tensor]) -> State:
        return {}

    def update(grads: Mapping[str, Tensor], state: State, lr: Rates) -> tuple[Params, State]:
        return {n: -lr[n] * g for n, g in grads.items()}, state

    return InnerOptimizer("sgd", init, update)


def adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> InnerOptimizer:
    """Adam (Kingma and Ba 2015) with bias correction, as a pure pair.

    ``m_t = b1 m + (1 - b1) g``, ``v_t = b2 v + (1 - b2) g^2``,
    ``updates = -lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m_t / (1 - b1^t)`` and
    ``v_hat = v_t / (1 - b2^t)``. The Reptile paper's inner loop uses ``betas=(0, 0.999)``.
    The step count ``t`` is a Python int in the state: it is the same for every task of a batch.
    """
    beta1, beta2 = betas
    for name, beta in (("betas[0]", beta1), ("betas[1]", beta2)):
        if not 0 <= beta < 1:
            raise checks.ConfigError(f"{name} = {beta!r} is not allowed: it must lie in [0, 1)")
    eps = checks.positive_float("eps", eps)

    def init(params: Mapping[str, Tensor]) -> State:
        return {"t": 0, "m": {n: torch.zeros_like(p) for n, p in params.items()},
                "v": {n: torch.zeros_like(p) for n, p in params.items()}}

    def update(grads: Mapping[str, Tensor], state: State, lr: Rates) -> tuple[Params, State]:
        t = state["t"] + 1
        m = {n: beta1 * state["m"][n] + (1 - beta1) * g for n, g in grads.items()}
        v = {n: beta2 * state["v"][n] + (1 - beta2) * g * g for n, g in grads.items()}
        updates = {n: -lr[n] * ((m[n] / (1 - beta1**t)) / (_sqrt(v[n] / (1 - beta2**t)) + eps)) for n in grads}
        return updates, {"t": t, "m": m, "v": v}

    return InnerOptimizer("adam", init, update)


def _sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` for ``v >= 0`` whose derivative at 0 is 0, not infinite.

    ``v`` is Adam's second moment, 0 wherever every gradient so far was exactly 0 (a dead ReLU,
    a bias before BatchNorm). Differentiated through (second-order MAML with an Adam inner loop),
    the infinite slope of the square root there times a zero upstream gradient gave NaN, which
    spread to every parameter. The values are unchanged.
    """
    positive = v > 0
    return torch.where(positive, v, torch.ones_like(v)).sqrt() * positive
