"""The inner loop: gradient steps on a task's support set, written as a pure function.

Parameters are a dict ``name -> tensor`` and every forward pass goes through
:func:`torch.func.functional_call`, so the model object is never modified. The inner gradients come
from :func:`torch.func.grad`, which composes with ordinary autograd on the outside (MAML's
meta-gradient) and with :func:`torch.func.vmap` over tasks (:func:`mmtl_lib.meta_loss`). What a
step does with the gradient is an :class:`~mmtl_lib.optim.InnerOptimizer` (SGD by default).

Every adaptation in the library goes through :func:`inner_loop`: MAML's training and test time,
Reptile's Adam loop, the baselines' fine-tuning, the lookahead of learned task weights.
"""

from __future__ import annotations

import functools
import types
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import checks
from .optim import InnerOptimizer, sgd

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class Adapted(NamedTuple):
    """A model adapted to one task: its parameters and the buffers it runs with.

    Buffers are the model's own (copies) for most learners, or a task's modulation (MMAML's FiLM
    scales and shifts); :meth:`mmtl_lib.Learner.predict` runs the model with both.
    """

    params: Params
    buffers: Params


def forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, buffers=None) -> Tensor:
    """``model(x)`` evaluated with ``params`` (and ``buffers``) in place of the module's own.

    Buffers default to copies of the model's, so a BatchNorm layer that tracks running
    statistics in training mode updates the copies and never the model.
    """
    if buffers is None:
        buffers = buffer_copies(model)
    return functional_call(model, (dict(params), dict(buffers)), (x,))


def buffer_copies(model: nn.Module) -> Params:
    """Copies of the model's buffers, for one adaptation to update without touching the model."""
    return {name: b.clone() for name, b in model.named_buffers()}


def _check_support(support) -> tuple[Tensor, Tensor]:
    if not isinstance(support, (tuple, list)) or len(support) != 2:
        raise checks.ConfigError(f"support must be a tuple (x, y), got {type(support).__name__}")
    x, y = support
    if x.dim() == 0 or x.shape[0] == 0:
        raise checks.ConfigError(f"support is empty: x has shape {tuple(x.shape)}; give at least one example")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise checks.ConfigError(
            f"support x and y disagree: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; "
            "they must have the same number of examples in dimension 0"
        )
    return x, y


def _check_params(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Refuse params that are not the model's: a missing name would silently run with the model's
    own tensor (``functional_call`` falls back to it), an extra one would be ignored.

    Under :func:`torch.func.vmap` a tensor's ``shape`` is the per-task shape, so the comparison
    holds there too. It costs a walk over the model's parameters, microseconds per task.
    """
    expected = dict(model.named_parameters())
    if params.keys() != expected.keys():
        missing = [n for n in expected if n not in params]
        extra = [n for n in params if n not in expected]
        raise checks.ConfigError(
            f"params does not match the model's parameters: missing {missing}, not in the model {extra}; "
            "pass one tensor for each name of model.named_parameters(), e.g. dict(model.named_parameters())"
        )
    wrong = {
        n: (tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__, tuple(expected[n].shape))
        for n, t in params.items() if not isinstance(t, Tensor) or t.shape != expected[n].shape
    }
    if wrong:
        raise checks.ConfigError(
            "params has tensors of the wrong shape: "
            + ", ".join(f"params[{n!r}] is {got}, the model's is {want}" for n, (got, want) in wrong.items())
        )


def _learning_rates(inner_lr, params: Mapping[str, Tensor], names: list[str]) -> dict:
    if isinstance(inner_lr, Mapping):
        missing = [n for n in names if n not in inner_lr]
        if missing:
            raise checks.ConfigError(f"inner_lr has no learning rate for the adapted parameters {missing}")
        for n in names:
            shape = torch.as_tensor(inner_lr[n]).shape
            try:
                fits = torch.broadcast_shapes(shape, params[n].shape) == params[n].shape
            except RuntimeError:
                fits = False
            if not fits:
                raise checks.ConfigError(
                    f"inner_lr[{n!r}] has shape {tuple(shape)}, which does not "
                    f"broadcast to the parameter's shape {tuple(params[n].shape)}"
                )
        return {n: inner_lr[n] for n in names}
    lr = checks.positive_float("inner_lr", inner_lr)
    return {n: lr for n in names}


def _step_rates(inner_lr, params: Mapping[str, Tensor], names: list[str], inner_steps: int) -> list[dict]:
    """One dict of rates per step: ``inner_lr`` repeated, or a list with one entry per step (LSLR)."""
    if isinstance(inner_lr, Sequence) and not isinstance(inner_lr, str):
        if len(inner_lr) != inner_steps:
            raise checks.ConfigError(
                f"inner_lr is a list of {len(inner_lr)} per-step rates, but inner_steps = {inner_steps}: "
                "give one rate (a number or a dict name -> tensor) for each step"
            )
        return [_learning_rates(rate, params, names) for rate in inner_lr]
    return [_learning_rates(inner_lr, params, names)] * inner_steps


def _clip(grads: Params, max_norm: float) -> Params:
    # Scale rather than branch on the norm, so the same code runs under vmap.
    norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
    scale = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return {n: g * scale for n, g in grads.items()}


def inner_loop(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: float | Mapping[str, Tensor] | Sequence,
    optimizer: InnerOptimizer | None = None,
    first_order: bool = False,
    adapt_names=None,
    buffers: Mapping[str, Tensor] | None = None,
    inner_grad_clip: float | None = None,
    inner_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    step_buffers: Callable[[int], Mapping[str, Tensor]] | None = None,
    recompute: bool = False,
) -> Iterator[Params]:
    """The parameters before and after each inner step: ``phi_0 = params, phi_1, ..., phi_k``.

    .. math:: \\phi_{j+1} = \\phi_j + \\mathrm{update}(\\nabla_\\phi L_{support}(\\phi_j)),
        \\quad \\phi_0 = \\theta

    with SGD's update ``-alpha * grad`` unless ``optimizer`` says otherwise. The arguments are
    checked when this is called, not when the iterator is first advanced.

    Args:
        model: the network; only its structure is used, its parameters are never read or written.
        params: name -> tensor, e.g. ``dict(model.named_parameters())``: exactly the names of
            ``model.named_parameters()``, each with the shape of the model's parameter (else
            :class:`~mmtl_lib.errors.ConfigError`, naming the names or shapes that differ).
        support: ``(x, y)`` with ``x`` of shape ``[n_support, *input_shape]`` and ``y`` of shape
            ``[n_support, *target_shape]``.
        loss_fn: ``loss_fn(prediction, y)`` -> scalar tensor, e.g. ``F.mse_loss``.
        inner_steps: ``k``, the number of inner steps, >= 0.
        inner_lr: ``alpha``: a step size > 0, or a dict name -> tensor broadcastable to that
            parameter (per-parameter rates, learned as in Meta-SGD; such rates may take any sign),
            or a list of ``inner_steps`` such rates, step ``j`` using entry ``j`` (per-step
            rates, learned per layer and step in MAML++'s LSLR).
        optimizer: what a step does with the gradient: :func:`mmtl_lib.sgd` (default) or
            :func:`mmtl_lib.adam`; its state starts fresh at ``phi_0``.
        first_order: treat the inner gradients as constants (first-order MAML, Reptile). The
            result is still differentiable w.r.t. ``params``, with identity Jacobian.
        adapt_names: the parameters to adapt (ANIL: the head's); the others pass through
            unchanged. Defaults to the keys of ``inner_lr`` if it is a dict, else all of ``params``.
        buffers: name -> tensor for the model's buffers; defaults to copies of the model's own.
        inner_grad_clip: if given, rescale each step's gradient to at most this global norm.
        inner_batch_size: examples per step, taken in turn from a random permutation of the
            support set (``generator`` draws it; Reptile's mini-batches); ``None``: all of it.
        step_buffers: ``j -> buffers`` that override entries of ``buffers`` in step ``j``'s
            forward pass (MAML++'s per-step BatchNorm, :func:`mmtl_lib.models.step_buffers`).
        recompute: gradient checkpointing of the inner steps, for second order: keep only each
            step's inputs (``phi_j``, the optimizer's state) for the meta-gradient and recompute
            the step (support forward pass and inner gradient) when the outer backward pass
            reaches it. The same values and meta-gradient (to round-off: sums may add up in
            another order); the memory the graph holds grows by one copy of the parameters per
            step instead of by one step's graph (``benchmarks/memory.py``), for about one more
            step's computation each. Not with ``first_order`` (nothing to recompute) or a model
            with running BatchNorm statistics (the recomputation would update them twice).

    Yields:
        name -> tensor with the same keys as ``params``, ``inner_steps + 1`` times: each
        differentiable w.r.t. ``params`` (and tensor-valued ``inner_lr``) through every step
        unless ``first_order``.
    """
    inner_steps = checks.non_negative_int("inner_steps", inner_steps)
    if not params:
        raise checks.ConfigError("params is empty: pass e.g. dict(model.named_parameters())")
    _check_params(model, params)
    for rate in (inner_lr if isinstance(inner_lr, Sequence) and not isinstance(inner_lr, str) else [inner_lr]):
        if isinstance(rate, Mapping):
            checks.known_names("inner_lr", rate, params)
    if adapt_names is None:
        first = inner_lr[0] if isinstance(inner_lr, Sequence) and not isinstance(inner_lr, str) and inner_lr \
            else inner_lr
        adapt_names = list(first) if isinstance(first, Mapping) else list(params)
    names = checks.known_names("adapt_names", adapt_names, params)
    lrs = _step_rates(inner_lr, params, names, inner_steps)
    if step_buffers is not None and not callable(step_buffers):
        raise checks.ConfigError(f"step_buffers = {step_buffers!r:.80} is not allowed: it must be a function "
                                 "j -> buffers, e.g. mmtl_lib.models.step_buffers(model)")
    optimizer = sgd() if optimizer is None else optimizer
    if not isinstance(optimizer, InnerOptimizer):
        raise checks.ConfigError(
            f"optimizer = {optimizer!r} is not allowed: it must be an InnerOptimizer such as "
            "mmtl_lib.sgd() or mmtl_lib.adam()"
        )
    inner_grad_clip = checks.optional_positive_float("inner_grad_clip", inner_grad_clip)
    x, y = _check_support(support)
    n = x.shape[0]
    inner_batch_size = checks.optional_positive_int("inner_batch_size", inner_batch_size)
    order = None if inner_batch_size is None else torch.randperm(n, generator=generator).to(x.device)
    if not isinstance(recompute, bool):
        raise checks.ConfigError(f"recompute = {recompute!r:.80} is not allowed: it must be True or False")
    if recompute and first_order:
        raise checks.ConfigError("recompute = True is not allowed with first_order = True: a first-order step "
                                 "keeps no graph of its inner gradient, so there is nothing to recompute")
    if recompute and any(getattr(m, "track_running_stats", False) for m in model.modules()):
        raise checks.ConfigError("recompute = True is not allowed for a model with running BatchNorm statistics, "
                                 "which recomputing a step would update a second time: use batch_norm='transductive'")
    if buffers is None:
        buffers = buffer_copies(model)
    step = functools.partial(_update, model, loss_fn, optimizer, names, first_order, inner_grad_clip)
    return _steps(step, dict(params), x, y, inner_steps, lrs, optimizer, names, dict(buffers), order,
                  inner_batch_size, step_buffers, recompute)


def _update(model, loss_fn, optimizer, names, first_order, clip, inputs: dict) -> tuple[Params, dict]:
    """One inner step's ``(updates, state)`` from ``inputs``: the parameters ``fast``, the optimizer's
    ``state``, the rates ``lr``, the ``buffers`` and the support batch ``x``, ``y``."""
    fast, xb, yb = inputs["fast"], inputs["x"], inputs["y"]
    # First order: differentiate a detached copy, so no graph for second derivatives is built.
    base = {n: t.detach() for n, t in fast.items()} if first_order else fast

    def support_loss(adapted: Params, buffers: Params) -> Tensor:
        return loss_fn(forward(model, {**base, **adapted}, xb, buffers), yb)

    # Buffers are an argument, not a capture: BatchNorm may update its running statistics.
    grads = torch.func.grad(support_loss)({n: base[n] for n in names}, inputs["buffers"])
    if clip is not None:
        grads = _clip(grads, clip)
    return optimizer.update(grads, inputs["state"], inputs["lr"])


def _steps(step, fast, x, y, inner_steps, lrs, optimizer, names, buffers, order, batch, step_buffers,
           recompute) -> Iterator[Params]:
    yield fast
    state = optimizer.init({n: fast[n] for n in names})
    for j in range(inner_steps):
        if order is None:
            xb, yb = x, y
        else:
            idx = order[(j * batch + torch.arange(batch, device=order.device)) % len(order)]
            xb, yb = x[idx], y[idx]
        step_bufs = buffers if step_buffers is None else {**buffers, **step_buffers(j)}
        inputs = {"fast": fast, "state": state, "lr": lrs[j], "buffers": step_bufs, "x": xb, "y": yb}
        updates, state = _recomputed(step, inputs) if recompute else step(inputs)
        fast = {**fast, **{n: fast[n] + updates[n] for n in names}}
        yield fast


# --- recomputed steps (gradient checkpointing) --------------------------------------------------
# Why not torch.utils.checkpoint: its non-reentrant form works through saved-tensor hooks, which
# torch.func.grad refuses ("don't yet support saved tensor hooks"), and its reentrant form
# neither passes gradients to tensors the step captures nor works with torch.autograd.grad. So a
# step is one autograd.Function whose inputs are every tensor it reads: it saves them, and its
# backward recomputes the step under torch.func.vjp, which composes with vmap (the vmap backend).

_TENSOR = object()


def _tensors(tree) -> list[Tensor]:
    """The tensors of nested dicts, lists and tuples, in order."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def _skeleton(tree):
    """``tree`` with its tensors replaced by a marker (the rest, e.g. Adam's step count, kept)."""
    if isinstance(tree, Tensor):
        return _TENSOR
    if isinstance(tree, Mapping):
        return {k: _skeleton(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_skeleton(v) for v in tree)
    return tree


def _fill(skeleton, tensors: Iterator[Tensor]):
    """The inverse of :func:`_skeleton`: the markers replaced by ``tensors``, in order."""
    if skeleton is _TENSOR:
        return next(tensors)
    if isinstance(skeleton, Mapping):
        return {k: _fill(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_fill(v, tensors) for v in skeleton)
    return skeleton


class _Recompute(torch.autograd.Function):
    """``step(inputs)``, saving only the input tensors; backward runs ``step`` again."""

    generate_vmap_rule = True

    @staticmethod
    def forward(step, skeleton, out, *tensors):
        outputs = step(_fill(skeleton, iter(tensors)))
        out.skeleton = _skeleton(outputs)
        return tuple(_tensors(outputs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.step, ctx.skeleton = inputs[0], inputs[1]
        ctx.save_for_backward(*inputs[3:])

    @staticmethod
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        result = [None] * len(tensors)
        if wanted:
            def step(*primals):
                given = list(tensors)
                for i, p in zip(wanted, primals):
                    given[i] = p
                return tuple(_tensors(ctx.step(_fill(ctx.skeleton, iter(given)))))

            _, vjp = torch.func.vjp(step, *(tensors[i] for i in wanted))
            for i, g in zip(wanted, vjp(grads)):
                result[i] = g
        return (None, None, None, *result)


def _recomputed(step, inputs: dict):
    """``step(inputs)``, differentiable, holding for the backward pass only ``inputs``' tensors."""
    out = types.SimpleNamespace()  # the outputs' structure; not a list, which vmap would copy
    outputs = _Recompute.apply(step, _skeleton(inputs), out, *_tensors(inputs))
    return _fill(out.skeleton, iter(outputs))


def adapt(model: nn.Module, params: Mapping[str, Tensor], support: tuple[Tensor, Tensor], loss_fn: LossFn,
          **inner) -> Params:
    """``phi_k``: the parameters after ``inner_steps`` steps on the support loss.

    The arguments are those of :func:`inner_loop` (``inner_steps`` and ``inner_lr`` are required),
    of which this is the last element.

    Returns:
        name -> tensor with the same keys as ``params``: differentiable w.r.t. ``params`` (and
        tensor-valued ``inner_lr``) through every step unless ``first_order``.
    """
    return deque(inner_loop(model, params, support, loss_fn, **inner), maxlen=1)[0]
