"""Learners: an algorithm with its model and hyperparameters, behind one contract.

A :class:`Learner` is what the :class:`~mmtl_lib.Trainer` trains and :func:`~mmtl_lib.evaluate`
scores. Training: :meth:`~Learner.meta_backward` fills ``.grad`` of
:meth:`~Learner.meta_parameters` from a meta-batch. Test time: :meth:`~Learner.adaptation` adapts
to one task's support set through :func:`mmtl_lib.inner_loop` (every learner fine-tunes the same
way, with its own step size, inner optimizer, adapted names and clipping) and
:meth:`~Learner.predict` scores the result. Here the optimisation-based meta-learners: the MAML
family (:class:`MAML` with its switches for first-order MAML, Meta-SGD and ANIL) and
:class:`Reptile`. The baselines are in :mod:`mmtl_lib.baselines`, the meta multi-task families
(:class:`~mmtl_lib.TRMAML`, :class:`~mmtl_lib.MMAML`) build on :class:`MAML` in their own modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import checks
from .inner import Adapted, LossFn, Params, adapt, buffer_copies, forward, inner_loop
from .models import head_names, prototype_head, step_buffers
from .objective import BACKENDS, EAGER_BACKENDS, _with, meta_loss, msl_weights, reptile_meta_gradient
from .optim import InnerOptimizer, sgd
from .tasks import TaskBatch


class Learner(ABC):
    """The contract between an algorithm and the code that trains and evaluates it.

    The constructor sets and checks these fields once.

    Attributes:
        model: the network; its parameters are ``theta`` (subclasses may add meta-parameters).
        loss_fn: ``loss_fn(prediction, y)`` -> scalar.
        inner_lr: the step size of adaptation to a task (at test time for every learner, and in
            training for those with an inner loop).
        test_inner_steps: inner steps at test time, >= 1.
        inner_optimizer: what an adaptation step does with the gradient, :func:`mmtl_lib.sgd`
            (default) or :func:`mmtl_lib.adam`.
        adapt_names: the parameters adaptation changes (``None``: all).
        inner_grad_clip: if set, each inner step's gradient is rescaled to at most this norm, at
            test time exactly as in training.

    Subclasses give a unique :attr:`name` and implement :meth:`meta_backward`. A learner that
    adapts without an inner loop (:class:`mmtl_lib.MetricLearner`: one forward pass over the
    support set) has ``test_inner_steps = 0`` and ``None`` for the inner-loop fields, and its
    :meth:`adaptation` yields one state.
    """

    name: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        inner_lr: float,
        test_inner_steps: int,
        inner_optimizer: InnerOptimizer | None = None,
        adapt_names=None,
        inner_grad_clip: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise checks.ConfigError(f"model = {model!r:.80} is not allowed: it must be a torch.nn.Module")
        self.model, self.loss_fn = model, loss_fn
        self.inner_lr = checks.positive_float("inner_lr", inner_lr)
        self.test_inner_steps = checks.positive_int("test_inner_steps", test_inner_steps)
        self.inner_optimizer = sgd() if inner_optimizer is None else inner_optimizer
        if not isinstance(self.inner_optimizer, InnerOptimizer):
            raise checks.ConfigError(
                f"inner_optimizer = {inner_optimizer!r:.80} is not allowed: it must be an InnerOptimizer "
                "such as mmtl_lib.sgd() or mmtl_lib.adam()"
            )
        self.adapt_names = None if adapt_names is None else checks.known_names(
            "adapt_names", adapt_names, dict(model.named_parameters()))
        self.inner_grad_clip = checks.optional_positive_float("inner_grad_clip", inner_grad_clip)

    # --- training ---------------------------------------------------------------------------

    @abstractmethod
    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        """Accumulate the meta-gradient of ``tasks`` into ``.grad`` of :meth:`meta_parameters`;
        return the detached per-task query losses ``[meta_batch_size]`` and the query
        predictions ``[meta_batch_size, n_query_total, ...]`` (empty where there are none)."""

    def meta_parameters(self) -> list[Tensor]:
        """What the outer optimizer updates: the model's parameters, plus any the learner adds."""
        return list(self.model.parameters())

    def params(self) -> Params:
        """``theta``: where adaptation to every task starts, differentiable (name -> tensor)."""
        return dict(self.model.named_parameters())

    def inner_rates(self, inner_steps: int | None = None) -> float | Mapping[str, Tensor] | list:
        """The inner step size as :func:`mmtl_lib.inner_loop` takes it for ``inner_steps`` steps
        (Meta-SGD: learned tensors; MAML++'s LSLR: a list, one entry per step)."""
        return self.inner_lr

    def task_params(self, params: Params, support: tuple[Tensor, Tensor], buffers: Params) -> Params:
        """Where adaptation to the task with ``support`` starts; by default ``params`` (``theta``)."""
        return params

    def task_buffers(self, support: tuple[Tensor, Tensor]) -> Params:
        """The buffers a task's model runs with; by default copies of the model's own."""
        return buffer_copies(self.model)

    # --- test time --------------------------------------------------------------------------

    def adaptation(self, support: tuple[Tensor, Tensor], inner_steps: int | None = None) -> Iterator[Adapted]:
        """The model adapted to one task before and after each test-time inner step.

        Args:
            support: ``(x, y)`` of one task, ``x`` ``[n_support, *input_shape]``.
            inner_steps: how many steps (default :attr:`test_inner_steps`); 0 yields the start.

        Yields:
            ``inner_steps + 1`` detached :class:`~mmtl_lib.Adapted` states; no graph is kept.
        """
        inner_steps = self.test_inner_steps if inner_steps is None else inner_steps
        per_step = step_buffers(self.model)
        with torch.no_grad():
            buffers = {k: v.detach() for k, v in self.task_buffers(support).items()}
            params = {k: v.detach() for k, v in self.params().items()}
            params = {k: v.detach() for k, v in self.task_params(params, support, buffers).items()}
        rates = self.inner_rates(inner_steps)
        rates = [_detached(r) for r in rates] if isinstance(rates, list) else _detached(rates)
        steps = inner_loop(
            self.model, params, support, self.loss_fn, inner_steps=inner_steps, inner_lr=rates,
            optimizer=self.inner_optimizer, first_order=True, adapt_names=self.adapt_names, buffers=buffers,
            inner_grad_clip=self.inner_grad_clip, step_buffers=per_step,
        )
        return (Adapted({k: v.detach() for k, v in phi.items()}, _with(buffers, per_step, j - 1))
                for j, phi in enumerate(steps))

    def adapt(self, support: tuple[Tensor, Tensor], inner_steps: int | None = None) -> Adapted:
        """The model adapted to one task: the last state of :meth:`adaptation`."""
        return deque(self.adaptation(support, inner_steps), maxlen=1)[0]

    def predict(self, adapted: Adapted, x: Tensor) -> Tensor:
        """The adapted model's predictions for ``x`` ``[n, *input_shape]``, without a graph."""
        with torch.no_grad():
            return forward(self.model, adapted.params, x, adapted.buffers)

    @property
    def vmappable(self) -> bool:
        """Whether adaptation can run under :func:`torch.func.vmap`: no layer of the model keeps
        running statistics, which adaptation would update in place."""
        return not any(getattr(m, "track_running_stats", False) for m in self.model.modules())

    # --- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])


def _detached(rate):
    return {k: v.detach() for k, v in rate.items()} if isinstance(rate, Mapping) else rate


def _slices(n: int, per_task: bool) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(n)] if per_task else [(0, n)]


class MAML(Learner):
    """MAML (Finn et al. 2017) and its variants, by their switches.

    * ``first_order=True``: first-order MAML (inner gradients as constants).
    * ``learn_inner_lr=True``: Meta-SGD (Li et al. 2017), one learned rate per parameter entry,
      initialised at ``inner_lr``.
    * ``adapt_names=head_names(model)``: ANIL (Raghu et al. 2020), adapt the head only.
    * ``proto_head=True``: Proto-MAML (Triantafillou et al. 2020), each task's head starts at
      the prototype classifier of its support set (:func:`mmtl_lib.models.prototype_head`).
    * MAML++'s stabilisers (Antoniou et al. 2019), each on its own:
      ``msl_iterations=E``: the multi-step loss, annealed over the first ``E`` meta-iterations
      (:func:`mmtl_lib.objective.msl_weights`), the last step's loss alone afterwards;
      ``learn_step_lrs=True``: LSLR, a learned step size per parameter tensor and inner step,
      initialised at ``inner_lr`` (test-time steps beyond ``inner_steps`` reuse the last);
      ``first_order_iterations=E``: derivative-order annealing, first order for the first
      ``E`` meta-iterations, second order after; per-step BatchNorm is the model's
      (``Conv4(..., bn_steps=inner_steps)``) and is used whenever the model has it.
    * ``recompute_inner=True``: gradient checkpointing of the inner steps in second-order
      training (``recompute`` of :func:`mmtl_lib.inner_loop`): the same meta-gradient, for less
      memory with many inner steps and about one more step's computation each. Not with
      ``first_order`` or ``backend="compile"``; with ``first_order_iterations`` it applies once
      training turns second order.

    Args:
        inner_steps: inner steps in training; ``test_inner_steps`` defaults to the same.
        backend, chunk_size: those of :func:`mmtl_lib.meta_loss`.

    The other arguments are the :class:`Learner` fields.

    The annealed options count meta-updates in :attr:`meta_iteration` (checkpointed with the
    learner): calls of :meth:`meta_backward` whose loss is finite, less any step that the
    :class:`~mmtl_lib.Trainer` rejects, so a step skipped for a non-finite loss does not advance
    the schedules.

    Families that change the objective override two hooks: :meth:`task_buffers` (per-task
    inputs computed from the support set, e.g. MMAML's modulation) and :meth:`task_weights`
    (each task's weight in the outer loss, e.g. TR-MAML's ``p``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        inner_lr: float,
        inner_steps: int,
        test_inner_steps: int | None = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        adapt_names=None,
        inner_optimizer: InnerOptimizer | None = None,
        inner_grad_clip: float | None = None,
        backend: str = "loop",
        chunk_size: int | None = None,
        learn_step_lrs: bool = False,
        msl_iterations: int | None = None,
        first_order_iterations: int = 0,
        proto_head: bool = False,
        recompute_inner: bool = False,
    ):
        self.inner_steps = checks.positive_int("inner_steps", inner_steps)
        super().__init__(
            model, loss_fn, inner_lr=inner_lr, test_inner_steps=inner_steps if test_inner_steps is None
            else test_inner_steps, inner_optimizer=inner_optimizer, adapt_names=adapt_names,
            inner_grad_clip=inner_grad_clip,
        )
        self.first_order = bool(first_order)
        if not isinstance(recompute_inner, bool):
            raise checks.ConfigError(f"recompute_inner = {recompute_inner!r:.80} is not allowed: it must be True or "
                                     "False")
        if recompute_inner and self.first_order:
            raise checks.ConfigError("recompute_inner = True is not allowed with first_order = True: first-order MAML "
                                     "keeps no graph of its inner gradients, so there is nothing to recompute")
        if recompute_inner and not self.vmappable:
            raise checks.ConfigError("recompute_inner = True is not allowed for a model with running BatchNorm "
                                     "statistics, which recomputing a step would update a second time: use "
                                     "batch_norm='transductive'")
        self.recompute_inner = recompute_inner
        self.backend = checks.one_of("backend", backend, BACKENDS)
        if recompute_inner and self.backend not in ("loop", "vmap"):
            raise checks.ConfigError(f"recompute_inner = True is not allowed with backend = {backend!r}, which "
                                     "computes each task's meta-gradient in one traced graph that stores nothing "
                                     "between the passes: use backend='loop' or 'vmap'")
        self.chunk_size = checks.optional_positive_int("chunk_size", chunk_size)
        self.inner_lrs = self.step_lrs = None
        if learn_inner_lr and learn_step_lrs:
            raise checks.ConfigError("learn_inner_lr (Meta-SGD) and learn_step_lrs (MAML++'s LSLR) are not "
                                     "allowed together: choose one kind of learned step size")
        params = self.params()
        names = self.adapt_names or list(params)
        if learn_inner_lr:
            self.inner_lrs = {n: torch.full_like(params[n], self.inner_lr, requires_grad=True) for n in names}
        if learn_step_lrs:
            self.step_lrs = {n: torch.full((self.inner_steps,), self.inner_lr, dtype=params[n].dtype,
                                           device=params[n].device, requires_grad=True) for n in names}
        self.msl_iterations = checks.optional_positive_int("msl_iterations", msl_iterations)
        self.first_order_iterations = checks.non_negative_int("first_order_iterations", first_order_iterations)
        self.proto_head = bool(proto_head)
        if self.proto_head and not (isinstance(getattr(model, "head", None), nn.Linear)
                                    and isinstance(getattr(model, "body", None), nn.Module)):
            raise checks.ConfigError(f"proto_head needs a model with a 'body' and a linear 'head', "
                                     f"not {type(model).__name__}")
        self.meta_iteration = 0

    @property
    def stabilised(self) -> bool:
        """Whether any of MAML++'s stabilisers is on (LSLR, MSL, annealed order, per-step BatchNorm)."""
        return (self.step_lrs is not None or self.msl_iterations is not None or self.first_order_iterations > 0
                or step_buffers(self.model) is not None)

    @property
    def name(self) -> str:
        if self.proto_head:
            return "protomaml"
        if self.stabilised:
            return "maml++"
        if self.inner_lrs is not None:
            return "metasgd"
        if self.adapt_names is not None:
            return "anil"
        return "fomaml" if self.first_order else "maml"

    def inner_rates(self, inner_steps: int | None = None):
        if self.step_lrs is not None:
            steps = self.inner_steps if inner_steps is None else inner_steps
            return [{n: t[min(j, self.inner_steps - 1)] for n, t in self.step_lrs.items()} for j in range(steps)]
        return self.inner_lr if self.inner_lrs is None else self.inner_lrs

    def meta_parameters(self) -> list[Tensor]:
        return (super().meta_parameters() + list((self.inner_lrs or {}).values())
                + list((self.step_lrs or {}).values()))

    def task_params(self, params: Params, support: tuple[Tensor, Tensor], buffers: Params) -> Params:
        """Proto-MAML: the head replaced by the support set's prototype classifier; else ``params``."""
        if not self.proto_head:
            return params
        buffers = _with(buffers, step_buffers(self.model), 0)
        body = {k[5:]: v for k, v in params.items() if k.startswith("body.")}
        features = forward(self.model.body, body, support[0], {k[5:]: v for k, v in buffers.items()
                                                               if k.startswith("body.")})
        weight, bias = prototype_head(features, support[1], self.model.head.out_features)
        return {**params, "head.weight": weight, "head.bias": bias}

    def step_weights(self) -> list[float] | None:
        """This meta-iteration's multi-step loss weights, ``None`` for the last step's loss alone."""
        if self.msl_iterations is None or self.meta_iteration >= self.msl_iterations:
            return None
        return msl_weights(self.inner_steps, self.meta_iteration / self.msl_iterations)

    def task_weights(self, tasks: TaskBatch) -> Tensor:
        """Each task's weight in the outer loss ``sum_i w_i L_i``: ``1 / meta_batch_size``."""
        n = tasks.n_tasks
        return torch.full((n,), 1.0 / n, device=tasks.query[0].device)

    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        # The loop backend runs backward task by task, so only one task's graph is alive at a
        # time: less memory, and ~6% faster on a CPU than one backward over the meta-batch. (The
        # compile backend keeps no graph: each task's meta-gradient is computed in its forward.)
        weights = self.task_weights(tasks.check())
        losses, predictions = [], []
        first_order = self.first_order or self.meta_iteration < self.first_order_iterations
        for start, stop in _slices(tasks.n_tasks, self.backend == "loop"):
            part = tasks.slice(start, stop)
            loss, prediction = meta_loss(
                self.model, self.params(), part, self.loss_fn, task_buffers=self.task_buffers,
                task_params=self.task_params if self.proto_head else None, step_weights=self.step_weights(),
                backend=self.backend, chunk_size=self.chunk_size, inner_steps=self.inner_steps,
                inner_lr=self.inner_rates(), optimizer=self.inner_optimizer, first_order=first_order,
                adapt_names=self.adapt_names, inner_grad_clip=self.inner_grad_clip,
                step_buffers=step_buffers(self.model), recompute=self.recompute_inner and not first_order,
            )
            (weights[start:stop] * loss).sum().backward()
            losses.append(loss.detach())
            predictions.append(prediction.detach())
        losses = torch.cat(losses)
        if bool(torch.isfinite(losses).all()):
            # A meta-batch with a non-finite loss is not applied (the Trainer stops on it), so the
            # annealing schedules do not count it.
            self.meta_iteration += 1
        return losses, torch.cat(predictions)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.inner_lrs is not None:
            state["inner_lrs"] = {k: v.detach().clone() for k, v in self.inner_lrs.items()}
        if self.step_lrs is not None:
            state["step_lrs"] = {k: v.detach().clone() for k, v in self.step_lrs.items()}
        if self.msl_iterations is not None or self.first_order_iterations:
            state["meta_iteration"] = self.meta_iteration
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for mine, key in ((self.inner_lrs, "inner_lrs"), (self.step_lrs, "step_lrs")):
                for k, v in (state[key].items() if mine is not None else ()):
                    mine[k].copy_(v)
        self.meta_iteration = int(state.get("meta_iteration", 0))


def first_order_maml(model, loss_fn, **kw) -> MAML:
    """First-order MAML: :class:`MAML` with ``first_order=True``."""
    return MAML(model, loss_fn, first_order=True, **kw)


def meta_sgd(model, loss_fn, **kw) -> MAML:
    """Meta-SGD: :class:`MAML` with ``learn_inner_lr=True``."""
    return MAML(model, loss_fn, learn_inner_lr=True, **kw)


def anil(model, loss_fn, **kw) -> MAML:
    """ANIL: :class:`MAML` adapting ``head_names(model)`` only."""
    return MAML(model, loss_fn, adapt_names=head_names(model), **kw)


class Reptile(Learner):
    """Reptile (Nichol, Achiam and Schulman 2018): adapt each task with ``inner_steps`` of SGD or
    Adam on its support set, then move towards the mean of the adapted weights.

    ``meta_backward`` writes ``theta - mean_i phi_i`` into ``.grad`` (:func:`reptile_meta_gradient`);
    an outer SGD with learning rate ``epsilon`` then performs the paper's interpolation. Test time
    adapts as training does, with the inner optimizer, on the whole support set.

    Args:
        inner_steps: inner steps in training; ``test_inner_steps`` defaults to the same.
        inner_optimizer: :func:`mmtl_lib.sgd` (default) or :func:`mmtl_lib.adam`; the paper uses
            ``adam(betas=(0, 0.999))``.
        inner_batch_size: examples per training inner step (``None``: the whole support set).
        generator: draws those mini-batches; checkpointed with the learner.
        backend: ``"loop"`` (default) adapts one task after another through
            :func:`reptile_meta_gradient`; ``"vmap"`` adapts the whole meta-batch at once with
            :func:`torch.func.vmap` (the same numbers, several times faster for small models);
            it needs ``inner_batch_size=None`` and a model without running BatchNorm statistics.
    """

    name = "reptile"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        inner_lr: float,
        inner_steps: int,
        test_inner_steps: int | None = None,
        inner_optimizer: InnerOptimizer | None = None,
        inner_batch_size: int | None = None,
        generator: torch.Generator | None = None,
        backend: str = "loop",
    ):
        self.inner_steps = checks.positive_int("inner_steps", inner_steps)
        super().__init__(model, loss_fn, inner_lr=inner_lr, inner_optimizer=inner_optimizer,
                         test_inner_steps=inner_steps if test_inner_steps is None else test_inner_steps)
        self.inner_batch_size = checks.optional_positive_int("inner_batch_size", inner_batch_size)
        self.generator = generator
        self.backend = checks.one_of("backend", backend, EAGER_BACKENDS)
        if self.backend == "vmap" and self.inner_batch_size is not None:
            raise checks.ConfigError(
                f"inner_batch_size = {inner_batch_size} is not allowed with backend='vmap', which adapts on "
                "the whole support set: use inner_batch_size=None or backend='loop'"
            )
        if self.backend == "vmap" and not self.vmappable:
            raise checks.ConfigError(
                "backend='vmap' is not allowed for a model with running BatchNorm statistics: use "
                "backend='loop' or batch_norm='transductive'"
            )

    def _vmap_direction(self, support: tuple[Tensor, Tensor]) -> tuple[Params, list[Params]]:
        """:func:`reptile_meta_gradient` for the whole meta-batch in one :func:`torch.func.vmap`."""
        theta = {k: v.detach() for k, v in self.params().items()}
        buffers = buffer_copies(self.model)

        def one_task(x, y):
            return adapt(self.model, theta, (x, y), self.loss_fn, inner_steps=self.inner_steps,
                         inner_lr=self.inner_lr, optimizer=self.inner_optimizer, first_order=True,
                         buffers=buffers)

        stacked = {k: v.detach() for k, v in torch.func.vmap(one_task)(*support).items()}
        direction = {k: theta[k] - stacked[k].mean(0) for k in theta}
        return direction, [{k: v[i] for k, v in stacked.items()} for i in range(support[0].shape[0])]

    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        params = self.params()
        if self.backend == "vmap":
            direction, phis = self._vmap_direction(tasks.check().support)
        else:
            direction, phis = reptile_meta_gradient(
                self.model, params, zip(*tasks.check().support), self.loss_fn, inner_steps=self.inner_steps,
                inner_lr=self.inner_lr, optimizer=self.inner_optimizer, inner_batch_size=self.inner_batch_size,
                generator=self.generator,
            )
        for k, p in params.items():
            p.grad = direction[k] if p.grad is None else p.grad + direction[k]
        # Query losses at the adapted weights are reported, not trained on.
        predictions = torch.stack([self.predict(Adapted(phi, buffer_copies(self.model)), x)
                                   for phi, x in zip(phis, tasks.query[0])])
        with torch.no_grad():
            losses = torch.stack([self.loss_fn(p, y) for p, y in zip(predictions, tasks.query[1])])
        return losses, predictions

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
