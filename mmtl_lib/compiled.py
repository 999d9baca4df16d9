"""The ``"compile"`` backend of :func:`mmtl_lib.meta_loss`: one task's whole meta-gradient as one
compiled graph.

Why not ``torch.compile`` over the eager objective: its inner gradient is differentiated a second
time by the outer backward, and a compiled region cannot be differentiated twice (AOTAutograd
refuses double backward, pytorch/pytorch#91469), while ``torch.compile`` over
:func:`torch.func.grad` has returned silently wrong gradients (pytorch/pytorch#136662). So the
outer gradient is taken *inside* as well: for one task,

.. math:: (g_i, L_i) = \\left(\\nabla_\\theta L_{query,i}(\\mathrm{adapt}(\\theta)),\\
    L_{query,i}(\\mathrm{adapt}(\\theta))\\right)

is written with :func:`torch.func.grad_and_value` around the same per-task objective the
``"loop"`` backend runs (inner gradients by :func:`torch.func.grad`), traced to one graph of
ATen operators by :func:`torch.fx.experimental.proxy_tensor.make_fx` (functorch runs eagerly while
tracing, so the graph holds exactly the operators the eager path runs, forward, inner backward
and the outer backward through both, and no autograd is left to do), and that graph is handed
to :func:`torch.compile` (Inductor). Nothing is differentiated through a compiled region.

The losses come back through a :class:`torch.autograd.Function` whose backward is
``sum_i dL/dL_i g_i``, so callers keep writing ``(weights * losses).sum().backward()``: the
meta-gradient reaches ``params`` and tensor-valued ``inner_lr`` (Meta-SGD, LSLR), once (the
result cannot be differentiated again). ``task_buffers`` are constants here (MMAML's modulation,
which requires grad, is refused); predictions are returned without a graph.

One graph is compiled per model, settings and task shape, and reused for every task and every
meta-batch of that shape; compiling takes minutes on a CPU (``benchmarks/throughput.py`` prints
how long and when it pays). Where compilation fails (no C++ compiler, a Python that
``torch.compile`` does not support, an operator it cannot lower), a :class:`RuntimeWarning` says
why, once, and the same traced computation runs eagerly: same numbers, about the ``"loop"``
backend's speed.

Measured on a 2-core Xeon CPU (``benchmarks/README.md``): compiling took 62 s and the compiled
meta-iteration was 0.96x as fast as the ``"loop"`` backend's, so there it never pays; in float32
its meta-gradient was 3e-4 (relative norm) from the eager one, against 1e-5 between the eager
backends. Use it where it measures faster, and check it with ``benchmarks/throughput.py``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import checks
from .models import elementary_batch_norm

COMPILER = "inductor"
"""The ``backend`` handed to :func:`torch.compile`; ``None`` runs the traced graph without
compiling it (what the fallback runs, and what quick tests of the plumbing use)."""

# model -> settings key -> _Step. Weak keys: a model that is dropped takes its graphs with it.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, _Step]] = weakref.WeakKeyDictionary()


class _Step:
    """One task's ``(grads, (loss, prediction))``, compiled at the first call (or eager)."""

    def __init__(self, fn: Callable, compiler: str | None):
        self.fn, self.compiler, self.ready = fn, compiler, False

    def __call__(self, *args):
        if self.ready:
            return self.fn(*args)
        from torch.fx.experimental.proxy_tensor import make_fx

        with elementary_batch_norm():  # see there: Inductor's decomposition of the fused kernel
            graph = make_fx(self.fn)(*args)
        self.fn, self.ready = graph, True
        if self.compiler is None:
            return graph(*args)
        try:
            compiled = torch.compile(graph, backend=self.compiler, fullgraph=True, dynamic=False)
            out = compiled(*args)
        except Exception as error:  # any failure to compile: say so, run the same graph eagerly
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            warnings.warn(f"backend='compile': torch.compile failed ({reason}); running the same computation "
                          "eagerly instead (same results, about the speed of backend='loop')",
                          RuntimeWarning, stacklevel=4)
            return graph(*args)
        self.fn = compiled
        return out


def _meta(t: Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device, t.requires_grad


class _MetaLoss(torch.autograd.Function):
    """Losses ``[B]`` (and predictions, without a graph) whose backward is ``sum_i dL/dL_i g_i``."""

    @staticmethod
    def forward(ctx, step, per_task, *leaves):
        detached = [t.detach() for t in leaves]
        losses, predictions, grads = [], [], [[] for _ in leaves]
        for task in per_task:
            g, (loss, prediction) = step(detached, *task)
            losses.append(loss)
            predictions.append(prediction)
            for acc, x in zip(grads, g):
                acc.append(x)
        ctx.save_for_backward(*(torch.stack(gs) for gs in grads))
        predictions = torch.stack(predictions)
        ctx.mark_non_differentiable(predictions)
        return torch.stack(losses), predictions

    @staticmethod
    def backward(ctx, grad_losses, _):
        return (None, None, *(torch.tensordot(grad_losses.to(g.dtype), g, dims=1) for g in ctx.saved_tensors))


def meta_loss(objective: Callable, model: nn.Module, params: dict[str, Tensor], tasks, task_buffers, static: tuple,
              *, inner_lr, step_weights) -> tuple[Tensor, Tensor]:
    """The ``"compile"`` backend of :func:`mmtl_lib.meta_loss` (which checks the arguments).

    ``task_buffers(support) -> buffers``, each task's (graph inputs, never baked in);
    ``objective(params, inner_lr, step_weights, support, query, buffers) -> (loss, prediction)``
    is one task's query loss, the one the ``"loop"`` backend runs, with ``step_weights`` a
    tensor (or ``None``); ``static`` holds the settings it closes over, the key (with the
    shapes) under which its graph is kept.
    """
    rate_leaves, rate_spec = tree_flatten(inner_lr)
    names = list(params)
    leaves = [*params.values(), *(r for r in rate_leaves if isinstance(r, Tensor))]
    (sx, sy), (qx, qy) = tasks.support, tasks.query
    buffers = [dict(task_buffers((x, y))) for x, y in zip(sx, sy)]
    moving = sorted({k for b in buffers for k, v in b.items() if v.requires_grad})
    if moving:
        raise checks.ConfigError(
            f"backend='compile' treats the task buffers as constants, but {moving} require grad (MMAML's "
            "modulation): use backend='loop' or 'vmap'")
    weights = None if step_weights is None else torch.tensor(step_weights, dtype=qx.dtype, device=qx.device)
    key = (static, str(tree_unflatten([None if isinstance(r, Tensor) else r for r in rate_leaves], rate_spec)),
           tuple(names), tuple(_meta(t) for t in leaves), tuple((k, _meta(v)) for k, v in sorted(buffers[0].items())),
           _meta(sx[0]), _meta(sy[0]), _meta(qx[0]), _meta(qy[0]), COMPILER,
           None if step_weights is None else tuple(w == 0 for w in step_weights))
    graphs = _CACHE.setdefault(model, {})
    if key not in graphs:
        def step(leaves, weights, buffers, sx, sy, qx, qy):
            def loss(differentiable):
                rates = iter(differentiable[len(names):])
                lr = tree_unflatten([next(rates) if isinstance(r, Tensor) else r for r in rate_leaves], rate_spec)
                return objective(dict(zip(names, differentiable)), lr, weights, (sx, sy), (qx, qy), buffers)

            return torch.func.grad_and_value(loss, has_aux=True)(leaves)

        graphs[key] = _Step(step, COMPILER)
    per_task = [(weights, buffers[i], sx[i], sy[i], qx[i], qy[i]) for i in range(tasks.n_tasks)]
    try:
        return _MetaLoss.apply(graphs[key], per_task, *leaves)
    except BaseException:
        if not graphs[key].ready:  # the trace failed: keep no closure over the model
            del graphs[key]
        raise
