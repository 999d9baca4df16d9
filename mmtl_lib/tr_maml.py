"""Task-robust MAML: meta-learning against the worst training task.

TR-MAML (Collins, Mokhtari and Shakkottai, NeurIPS 2020) minimises the worst post-adaptation loss
over a finite set of training tasks rather than their mean, by gradient descent on ``theta`` and
projected gradient ascent on task weights ``p`` on the simplex. It is :class:`~mmtl_lib.MAML` with
one hook changed (:meth:`TRMAML.task_weights`). The second of the book's three meta multi-task
families; its training distribution is :class:`~mmtl_lib.SinusoidTaskSet`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import checks
from .inner import LossFn
from .learners import MAML
from .tasks import TaskBatch


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto the probability simplex: ``argmin_{p >= 0, sum p = 1} ||p - v||``.

    The sort-based algorithm (Held et al. 1974; Duchi et al. 2008; Wang and Carreira-Perpinan
    2013): with ``u`` the entries of ``v`` sorted in decreasing order, ``rho`` the largest ``j``
    with ``u_j + (1 - sum_{i<=j} u_i) / j > 0`` and ``tau = (sum_{i<=rho} u_i - 1) / rho``, the
    projection is ``max(v - tau, 0)``. ``O(n log n)``.

    Args:
        v: ``[..., n]``; each vector along the last dimension is projected.

    Returns:
        ``[..., n]``, every row nonnegative and summing to 1.
    """
    if v.dim() == 0 or v.shape[-1] == 0:
        raise checks.ConfigError(f"v has shape {tuple(v.shape)}: it needs a nonempty last dimension")
    u = v.sort(dim=-1, descending=True).values
    excess = u.cumsum(-1) - 1
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - excess / j) > 0).sum(-1, keepdim=True)  # the test holds for j = 1..rho and no other j
    tau = excess.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - tau).clamp(min=0)


class TRMAML(MAML):
    """TR-MAML (Collins, Mokhtari and Shakkottai 2020): MAML against the worst training task.

    .. math:: \\min_\\theta \\max_{p \\in \\Delta_N} \\textstyle\\sum_{i=1}^N p_i L_i(\\theta),
        \\qquad L_i(\\theta) = L_{query,i}(\\mathrm{adapt}(\\theta, support_i))

    The inner max puts all weight on the worst task, so the objective is the worst-case
    post-adaptation loss; ``p`` keeps it smooth to optimise. Each meta-iteration draws a
    meta-batch ``B`` of task ids ``i_b`` uniformly, and with the unbiased estimates
    ``(N/|B|) sum_b p_{i_b} L_{i_b}`` of the objective and ``(N/|B|) sum_b L_{i_b} e_{i_b}`` of its
    gradient in ``p`` takes a descent step on ``theta`` (the outer optimizer, from the
    ``.grad`` that :meth:`meta_backward` fills) and a projected ascent step on ``p``:
    ``p <- project_simplex(p + p_lr * grad_p)``. With ``p`` uniform this is MAML exactly.

    Args:
        n_tasks: ``N``, the size of the training task set; meta-batches must carry
            ``info["task_id"]`` (as :class:`~mmtl_lib.SinusoidTaskSet` does).
        p_lr: the ascent step on ``p``.

    The other arguments are those of :class:`mmtl_lib.MAML`.
    """

    name = "tr-maml"

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, n_tasks: int, p_lr: float, **maml):
        super().__init__(model, loss_fn, **maml)
        self.p = torch.full((checks.positive_int("n_tasks", n_tasks),), 1.0 / n_tasks)
        self.p_lr = checks.positive_float("p_lr", p_lr)

    def task_weights(self, tasks: TaskBatch) -> Tensor:
        """``(N / |B|) p_{i_b}``: the unbiased estimate of ``sum_i p_i L_i`` from the meta-batch."""
        ids = tasks.info.get("task_id")
        if ids is None:
            raise checks.ConfigError("tasks.info has no 'task_id': TR-MAML needs the id of every task in the "
                                     "meta-batch (SinusoidTaskSet provides it)")
        self.p = self.p.to(ids.device)
        return self.p[ids] * (self.p.numel() / ids.numel())

    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        """MAML's meta-gradient at the weights ``p``, then the projected ascent step on ``p``."""
        losses, predictions = super().meta_backward(tasks)
        if not bool(torch.isfinite(losses).all()):
            # The trainer stops on this loss and saves the last good state: p must still be it.
            return losses, predictions
        ids = tasks.info["task_id"]
        grad_p = torch.zeros_like(self.p).index_add_(0, ids, losses.to(self.p.dtype)) * (self.p.numel() / ids.numel())
        self.p = project_simplex(self.p + self.p_lr * grad_p)
        return losses, predictions

    def state_dict(self) -> dict:
        return {**super().state_dict(), "p": self.p.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.p = state["p"].clone()
