"""The baselines every meta-learner must beat, as :class:`~mmtl_lib.Learner` s.

* :class:`JointTraining`: one network trained on the pooled data of all tasks, fine-tuned at test
  time (the MAML paper's "pretrained" regression baseline);
* :class:`PretrainClassifier`: supervised pretraining over all training classes, then a fresh
  head fine-tuned on the support set (Chen et al. 2019);
* :class:`Scratch`: no meta-training at all, every task fitted from the same random start.

All three adapt at test time exactly as the meta-learners do, through
:meth:`mmtl_lib.Learner.adaptation`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import checks
from .inner import LossFn, Params
from .learners import Learner
from .tasks import TaskBatch


def pooled(tasks: TaskBatch) -> tuple[Tensor, Tensor]:
    """Support and query of every task pooled: ``[meta_batch_size * n, ...]``."""
    x = torch.cat([tasks.support[0], tasks.query[0]], dim=1)
    y = torch.cat([tasks.support[1], tasks.query[1]], dim=1)
    return x.flatten(0, 1), y.flatten(0, 1)


class JointTraining(Learner):
    """One network trained on the pooled data of all tasks, with no inner loop; at test time it
    is fine-tuned on the support set like the others.

    For regression on a shared input space (sines) this is the MAML paper's pretrained baseline.
    For classification with per-task label permutations the pooled labels carry no meaning:
    give ``targets``, a function from a :class:`TaskBatch` to pooled ``(x, y)`` with global
    labels, or use :class:`PretrainClassifier`.

    Args:
        inner_lr, test_inner_steps, inner_grad_clip: the test-time fine-tuning (:class:`Learner`).
    """

    name = "joint-training"

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, inner_lr: float, test_inner_steps: int, targets=None,
                 inner_grad_clip: float | None = None):
        super().__init__(model, loss_fn, inner_lr=inner_lr, test_inner_steps=test_inner_steps,
                         inner_grad_clip=inner_grad_clip)
        self.targets = targets or pooled

    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        x, y = self.targets(tasks.check())
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        n = tasks.n_tasks
        return loss.detach().expand(n), torch.empty(n, 0)


class Scratch(Learner):
    """The "train from scratch" baseline: every task starts from the same random
    initialisation and is fitted on its support set alone. There is nothing to meta-train."""

    name = "scratch"

    def meta_parameters(self) -> list[Tensor]:
        return []

    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        raise RuntimeError("Scratch has no meta-parameters: evaluate it without training")


class PretrainClassifier(Learner):
    """The pretrain-and-fine-tune baseline for few-shot classification (Chen et al. 2019).

    Training is ordinary supervised learning of ``model.body`` with a classifier over all
    ``n_classes`` training classes (``pretrain_head``), on the pooled images of the meta-batch
    with their global labels (``tasks.info["class_index"]``). At test time the body is kept and a
    fresh ``n_way`` head starting at zero (all classes equally likely) is fine-tuned on the
    support set with SGD, the whole network or only ``adapt_names``.
    """

    name = "pretrain"

    def __init__(self, model: nn.Module, n_classes: int, *, inner_lr: float, test_inner_steps: int, adapt_names=None):
        super().__init__(model, nn.functional.cross_entropy, inner_lr=inner_lr, test_inner_steps=test_inner_steps,
                         adapt_names=adapt_names)
        head = model.head
        self.pretrain_head = nn.Linear(head.in_features, checks.positive_int("n_classes", n_classes))
        self.pretrain_head.to(head.weight.device)

    def meta_parameters(self) -> list[Tensor]:
        return list(self.model.body.parameters()) + list(self.pretrain_head.parameters())

    def params(self) -> Params:
        params = dict(self.model.named_parameters())
        return {k: torch.zeros_like(v) if k.startswith("head.") else v for k, v in params.items()}

    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        x, _ = pooled(tasks.check())
        if "class_index" not in tasks.info:
            raise checks.ConfigError("tasks.info has no 'class_index': PretrainClassifier needs the global "
                                     "class of every label (EpisodeSampler provides it)")
        labels = tasks.info["class_index"].gather(1, torch.cat([tasks.support[1], tasks.query[1]], 1)).flatten()
        loss = self.loss_fn(self.pretrain_head(self.model.body(x)), labels)
        loss.backward()
        return loss.detach().expand(tasks.n_tasks), torch.empty(tasks.n_tasks, 0)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "pretrain_head": self.pretrain_head.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.pretrain_head.load_state_dict(state["pretrain_head"])
