"""Metric-based meta-learners: Prototypical networks and Matching networks.

A metric learner meta-learns an embedding ``f_theta`` and classifies a query by comparing its
embedding with those of the support set. Adapting to a task is one forward pass over the support
set (no gradient steps): Prototypical networks (Snell, Swersky and Zemel 2017) average each
class's support embeddings into a prototype ``c_n`` and score ``-d(f(x), c_n)``; Matching networks
(Vinyals et al. 2016) attend over the support examples. Both are :class:`~mmtl_lib.Learner` s, so
:class:`~mmtl_lib.Trainer` trains them and :func:`~mmtl_lib.evaluate` scores them like MAML.

The learner contract, for a learner without an inner loop: ``test_inner_steps`` is 0 and the
inner-loop fields (``inner_lr``, ``inner_optimizer``, ``adapt_names``, ``inner_grad_clip``) are
``None``; :meth:`MetricLearner.adaptation` yields one state (the support set's summary), which
:func:`~mmtl_lib.evaluate` reports as step 0.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .inner import Adapted, forward
from .learners import Learner
from .models import Conv4
from .tasks import TaskBatch

DISTANCES = ("euclidean", "cosine")


def conv4_embedding(*, in_channels: int = 1, filters: int = 64, image_size: int = 28,
                    batch_norm: str = "transductive") -> nn.Module:
    """The embedding of Snell et al. and Vinyals et al.: :class:`~mmtl_lib.Conv4` without its head.

    ``[batch, in_channels, image_size, image_size]`` -> ``[batch, filters * s * s]`` with ``s``
    the side of the last feature map (1 for 28 or 14 pixels).
    """
    return Conv4(1, in_channels=in_channels, filters=filters, image_size=image_size, batch_norm=batch_norm).body


def _check_labels(labels: Tensor, n_examples: int) -> int:
    """The number of classes ``n_way`` of support ``labels`` ``[n_support]``, which must be
    integers ``0..n_way-1`` with at least one example of each."""
    if labels.dim() != 1 or labels.shape[0] != n_examples or labels.is_floating_point():
        raise checks.ConfigError(
            f"labels must be an integer tensor [n_support] = [{n_examples}] of class indices, got "
            f"{labels.dtype} of shape {tuple(labels.shape)}"
        )
    if n_examples == 0:
        raise checks.ConfigError("labels is empty: the support set needs at least one example")
    n_way = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=n_way)
    if int(labels.min()) < 0 or bool((counts == 0).any()):
        raise checks.ConfigError(
            f"labels must hold every class 0..n_way-1 at least once, got the counts {counts.tolist()} "
            f"(min label {int(labels.min())}): a class without support examples has no prototype"
        )
    return n_way


def prototypes(embeddings: Tensor, labels: Tensor) -> Tensor:
    """The prototype of each class: the mean of its support embeddings (Snell et al., eq. 1).

    Args:
        embeddings: ``f(x)`` of the support set, ``[n_support, D]``.
        labels: ``[n_support]`` integers ``0..n_way-1``, every class present.

    Returns:
        ``c`` ``[n_way, D]``, ``c[n] = mean of embeddings[labels == n]``.
    """
    if embeddings.dim() != 2:
        raise checks.ConfigError(f"embeddings must be [n_support, D], got shape {tuple(embeddings.shape)}")
    n_way = _check_labels(labels, embeddings.shape[0])
    one_hot = F.one_hot(labels, n_way).to(embeddings.dtype)  # [n_support, n_way]
    return one_hot.T @ embeddings / one_hot.sum(0)[:, None]


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j||^2`` for ``a`` ``[n, D]`` and ``b`` ``[m, D]``: ``[n, m]``.

    Written as a difference, not as ``|a|^2 - 2 a.b + |b|^2``, which cancels badly when the
    points are close; the sizes here are small.
    """
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """``cos(a_i, b_j)`` for ``a`` ``[n, D]`` and ``b`` ``[m, D]``: ``[n, m]`` in ``[-1, 1]``."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def prototype_logits(queries: Tensor, protos: Tensor, distance: str = "euclidean") -> Tensor:
    """ProtoNet's logits ``-d(f(x), c_n)`` (Snell et al., eq. 2): their softmax is ``p(y = n | x)``.

    Args:
        queries: ``f(x)`` of the query set, ``[n_query_total, D]``.
        protos: ``[n_way, D]`` from :func:`prototypes`.
        distance: ``"euclidean"`` (squared Euclidean, the paper's choice) or ``"cosine"``
            (``d = 1 - cos``).

    Returns:
        ``[n_query_total, n_way]``.
    """
    checks.one_of("distance", distance, DISTANCES)
    if distance == "euclidean":
        return -squared_euclidean(queries, protos)
    return cosine_similarity(queries, protos) - 1


def matching_attention(queries: Tensor, support: Tensor) -> Tensor:
    """Matching networks' attention ``a(x, x_j)``: a softmax over the support examples of the
    cosine similarities of the embeddings (Vinyals et al., eq. 2).

    Args:
        queries: ``[n_query_total, D]``; support: ``[n_support, D]``.

    Returns:
        ``[n_query_total, n_support]``, each row summing to one.
    """
    return torch.softmax(cosine_similarity(queries, support), dim=-1)


class MetricLearner(Learner):
    """A learner that adapts in closed form: one forward pass summarises the support set.

    Of :class:`~mmtl_lib.Learner`'s fields only ``model`` (the embedding ``f_theta``) and
    ``loss_fn`` (cross-entropy on the logits of :meth:`predict`) apply. There is no inner loop:
    ``test_inner_steps`` is 0 and ``inner_lr``, ``inner_optimizer``, ``adapt_names`` and
    ``inner_grad_clip`` are ``None``. Training minimises the query loss of each episode, as the
    papers do; the support set and the query set are embedded in two forward passes, at training
    and at test time alike (with the default transductive BatchNorm each is normalised with its
    own statistics, as a MAML query set is).

    Subclasses give a :attr:`name`, :meth:`summarise` (the support set's state) and
    :meth:`logits`. The number of ways is read from the support labels, so a learner trained on
    20-way tasks is tested on 5-way tasks as it is (Snell et al. train with more ways than they
    test).
    """

    test_inner_steps = 0
    inner_lr = inner_optimizer = adapt_names = inner_grad_clip = None

    def __init__(self, embedding: nn.Module):
        # Learner.__init__ checks the inner-loop fields, of which a metric learner has none.
        if not isinstance(embedding, nn.Module):
            raise checks.ConfigError(f"embedding = {embedding!r:.80} is not allowed: it must be a torch.nn.Module")
        self.model, self.loss_fn = embedding, F.cross_entropy

    @abstractmethod
    def summarise(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """What the learner keeps of a support set: name -> tensor, from ``[n_support, D]``."""

    @abstractmethod
    def logits(self, queries: Tensor, state: dict[str, Tensor]) -> Tensor:
        """``[n_query_total, n_way]`` logits of query embeddings ``[n_query_total, D]``."""

    def embed(self, x: Tensor) -> Tensor:
        """``f_theta(x)``: ``[n, *input_shape]`` -> ``[n, D]``."""
        return self.model(x).flatten(1)

    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        """The episode loss (query cross-entropy) averaged over the tasks; backward runs task by
        task, so that one task's graph is alive at a time."""
        tasks.check()
        losses, predictions = [], []
        for (sx, sy), (qx, qy) in zip(zip(*tasks.support), zip(*tasks.query)):
            logits = self.logits(self.embed(qx), self.summarise(self.embed(sx), sy))
            loss = self.loss_fn(logits, qy)
            (loss / tasks.n_tasks).backward()
            losses.append(loss.detach())
            predictions.append(logits.detach())
        return torch.stack(losses), torch.stack(predictions)

    def adaptation(self, support: tuple[Tensor, Tensor], inner_steps: int | None = None) -> Iterator[Adapted]:
        """The one adapted state: the embedding's parameters (``params``) and the support set's
        summary (``buffers``, e.g. ``{"prototypes": [n_way, D]}``), detached.

        Raises:
            ConfigError: ``inner_steps`` > 0: a metric learner takes no gradient steps.
        """
        inner_steps = 0 if inner_steps is None else checks.non_negative_int("inner_steps", inner_steps)
        if inner_steps:
            raise checks.ConfigError(
                f"inner_steps = {inner_steps} is not allowed for {type(self).__name__}: a metric learner adapts "
                "by one forward pass over the support set, with no inner steps; use 0 (the default)"
            )
        x, y = support
        params = {k: v.detach() for k, v in self.params().items()}
        with torch.no_grad():
            state = self.summarise(forward(self.model, params, x).flatten(1), y)
        return iter([Adapted(params, state)])

    def predict(self, adapted: Adapted, x: Tensor) -> Tensor:
        """Logits ``[n, n_way]`` for ``x`` ``[n, *input_shape]`` of the task ``adapted`` summarises."""
        with torch.no_grad():
            return self.logits(forward(self.model, adapted.params, x).flatten(1), adapted.buffers)

    @property
    def vmappable(self) -> bool:
        """False: the number of ways is read from the labels, which :func:`torch.func.vmap` cannot."""
        return False


class ProtoNet(MetricLearner):
    """Prototypical networks (Snell, Swersky and Zemel 2017).

    A task's state is its prototypes ``c_n`` (:func:`prototypes`); a query's logits are
    ``-d(f(x), c_n)`` (:func:`prototype_logits`). With the squared Euclidean distance this is a
    linear classifier on the embedding, ``W_n = 2 c_n``, ``b_n = -||c_n||^2`` (their sec. 2.4).

    Args:
        embedding: ``f_theta``, e.g. :func:`conv4_embedding`.
        distance: ``"euclidean"`` (squared, default) or ``"cosine"``.
    """

    name = "protonet"

    def __init__(self, embedding: nn.Module, *, distance: str = "euclidean"):
        super().__init__(embedding)
        self.distance = checks.one_of("distance", distance, DISTANCES)

    def summarise(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return {"prototypes": prototypes(embeddings, labels)}

    def logits(self, queries: Tensor, state: dict[str, Tensor]) -> Tensor:
        return prototype_logits(queries, state["prototypes"], self.distance)


class MatchingNet(MetricLearner):
    """Matching networks (Vinyals et al. 2016), the simple version without full-context
    embeddings: support and query go through the same embedding ``f_theta`` (no LSTM over the
    support set, no attention LSTM for the query), and

        p(y = n | x) = sum_j a(x, x_j) [y_j = n],   a = softmax_j cos(f(x), f(x_j))

    (:func:`matching_attention`). The logits are ``log p``, so that cross-entropy on them is
    the negative log-likelihood.
    """

    name = "matching"

    def summarise(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        n_way = _check_labels(labels, embeddings.shape[0])
        return {"support": embeddings, "one_hot": F.one_hot(labels, n_way).to(embeddings.dtype)}

    def logits(self, queries: Tensor, state: dict[str, Tensor]) -> Tensor:
        probabilities = matching_attention(queries, state["support"]) @ state["one_hot"]
        return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()
