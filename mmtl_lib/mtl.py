"""Multi-task learning: networks that share parameters between tasks, and ways to weigh task losses.

Architectures:

* :class:`HardSharing`, one shared trunk and one head per task (Caruana 1997);
* :class:`CrossStitch`, one column per task, mixed after every block by learned
  :class:`CrossStitchUnit` s (Misra et al. 2016); :func:`cross_stitch_mlp` builds MLP columns.

Both return a dict ``task -> prediction``. With ``T`` tasks and losses ``L_1 .. L_T``, a
:class:`Weighting` turns the losses into gradients. All weightings share one call,

.. code-block:: python

    diagnostics = weighting.backward(losses, shared_params)   # fills .grad
    optimizer.step()                                          # optimizer also holds weighting.parameters()

which accumulates into ``.grad`` of every parameter the losses depend on, so the caller zeroes the
gradients before and steps the optimizer after, exactly as with ``loss.backward()``:

* :class:`EW`: equal weights, ``sum_t L_t``;
* :class:`UW`: uncertainty weighting (Kendall, Gal and Cipolla 2018), learned log-variances;
* :class:`GradNorm` (Chen et al. 2018): learned weights that equalise the tasks' gradient norms
  on a shared layer, scaled by how slowly each task trains;
* :class:`DWA`: dynamic weight average (Liu, Johns and Davison 2019), weights from loss ratios;
* :class:`PCGrad` (Yu et al. 2020): per-task gradients on the shared parameters, with conflicting
  components projected away;
* :class:`RLW`: random loss weighting (Lin et al. 2022), fresh random weights every step.

Weightings are :class:`torch.nn.Module` s: learned weights are ``parameters()`` (give them to an
optimizer), loss histories are buffers, so ``state_dict()`` checkpoints both, and
``weighting.to(device)`` moves them to the model's device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import checks
from .errors import ConfigError

Losses = Mapping[str, Tensor] | Tensor


# --- architectures ---------------------------------------------------------------------------


class HardSharing(nn.Module):
    """Hard parameter sharing: ``prediction_t = head_t(trunk(x))`` for every task ``t``.

    Args:
        trunk: the shared network, ``[batch, *input_shape] -> [batch, *feature_shape]``.
        heads: task name -> head, ``[batch, *feature_shape] -> [batch, *output_shape_t]``.
    """

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        if not heads:
            raise ConfigError("heads is empty: give one head per task, e.g. {'depth': nn.Linear(64, 1)}")
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)

    @property
    def task_names(self) -> list[str]:
        return list(self.heads)

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``x`` ``[batch, *input_shape]`` -> task -> prediction ``[batch, *output_shape_t]``.

        ``tasks`` restricts the heads evaluated (default: all); the trunk runs once.
        """
        tasks = self.task_names if tasks is None else _known_tasks(tasks, self.heads)
        features = self.trunk(x)
        return {t: self.heads[t](features) for t in tasks}

    def shared_parameters(self) -> list[Tensor]:
        """The trunk's parameters: the ones every task's loss depends on."""
        return list(self.trunk.parameters())

    def task_parameters(self, task: str) -> list[Tensor]:
        """The parameters of ``task``'s head."""
        return list(self.heads[_known_tasks([task], self.heads)[0]].parameters())

    def last_shared_parameters(self) -> list[Tensor]:
        """Parameters of the trunk's last submodule that owns any: GradNorm's layer ``W``.

        "Last" is registration order, which is the order of the layers in an ``nn.Sequential``.
        """
        owners = [m for m in self.trunk.modules() if next(m.parameters(recurse=False), None) is not None]
        if not owners:
            raise ConfigError("the trunk has no parameters, so there is no last shared layer")
        return list(owners[-1].parameters(recurse=False))


def _known_tasks(tasks: Sequence[str], known) -> list[str]:
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(f"tasks {unknown} are not allowed: the tasks are {list(known)}")
    return list(tasks)


class CrossStitchUnit(nn.Module):
    """Learned linear mixing of ``T`` task activations of equal shape (Misra et al. 2016, Eq. 1).

    .. math:: \\tilde x_t = \\sum_s \\alpha_{ts} x_s

    ``alpha`` is one ``[T, T]`` matrix per unit, initialised to ``self_weight`` on the diagonal and
    ``(1 - self_weight) / (T - 1)`` elsewhere, so each row sums to 1. The default is the paper's
    initialisation for two tasks, ``(alpha_S, alpha_D) = (0.9, 0.1)``; ``self_weight = 1`` makes
    the columns independent.
    """

    def __init__(self, n_tasks: int, self_weight: float = 0.9):
        super().__init__()
        n = checks.positive_int("n_tasks", n_tasks)
        if n < 2:
            raise ConfigError(f"n_tasks = {n} is not allowed: cross-stitching needs at least 2 task columns")
        if isinstance(self_weight, bool) or not isinstance(self_weight, numbers.Real) or not 0 <= self_weight <= 1:
            raise ConfigError(f"self_weight = {self_weight!r} is not allowed: it must be a number in [0, 1]")
        other = (1 - self_weight) / (n - 1)
        alpha = torch.full((n, n), other) + (self_weight - other) * torch.eye(n)
        self.alpha = nn.Parameter(alpha)

    def forward(self, xs: Tensor) -> Tensor:
        """``xs`` ``[T, batch, ...]`` -> ``[T, batch, ...]``, row ``t`` the mix for task ``t``."""
        return torch.tensordot(self.alpha, xs, dims=([1], [0]))


class CrossStitch(nn.Module):
    """Cross-stitch network: ``T`` task columns of ``K`` blocks, a :class:`CrossStitchUnit` after
    each of the first ``K - 1`` blocks (Misra et al. 2016).

    Column ``t`` computes ``h_t^k = block_t^k(mix^{k-1}(h^{k-1})_t)`` from ``h_t^0 = x``; the last
    block of each column is its task's head and is not mixed. Every parameter thus influences
    every task's loss unless the units stay at the identity.

    Args:
        columns: task name -> sequence of ``K`` blocks (the same ``K`` for every task). The blocks
            at depth ``k < K`` must produce activations of the same shape in every column.
        self_weight: initial diagonal of every unit's ``alpha``.

    Misra et al. trained the units with a much larger learning rate than the columns; give
    :meth:`stitch_parameters` their own optimizer parameter group to do the same.
    """

    def __init__(self, columns: Mapping[str, Sequence[nn.Module]], *, self_weight: float = 0.9):
        super().__init__()
        depths = {t: len(blocks) for t, blocks in columns.items()}
        if len(depths) < 2:
            raise ConfigError(f"columns has {len(depths)} task(s): cross-stitching needs at least 2 task columns")
        if len(set(depths.values())) != 1 or 0 in depths.values():
            raise ConfigError(f"columns have {depths} blocks: every column must have the same number >= 1")
        self.columns = nn.ModuleDict({t: nn.ModuleList(blocks) for t, blocks in columns.items()})
        depth = next(iter(depths.values()))
        self.units = nn.ModuleList(CrossStitchUnit(len(columns), self_weight) for _ in range(depth - 1))

    @property
    def task_names(self) -> list[str]:
        return list(self.columns)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x`` ``[batch, *input_shape]`` -> task -> prediction ``[batch, *output_shape_t]``."""
        hs = [x] * len(self.columns)
        for k, column_blocks in enumerate(zip(*self.columns.values())):
            hs = [block(h) for block, h in zip(column_blocks, hs)]
            if k < len(self.units):
                shapes = {t: tuple(h.shape) for t, h in zip(self.columns, hs)}
                if len(set(shapes.values())) != 1:
                    raise ConfigError(f"block {k} gives activations of shapes {shapes}: a cross-stitch "
                                     "unit can only mix activations of one shape")
                hs = list(self.units[k](torch.stack(hs)).unbind(0))
        return dict(zip(self.columns, hs))

    def stitch_parameters(self) -> list[Tensor]:
        """The units' ``alpha`` matrices, ``K - 1`` of shape ``[T, T]``."""
        return list(self.units.parameters())

    def column_parameters(self, task: str) -> list[Tensor]:
        """The parameters of ``task``'s column (its head included)."""
        return list(self.columns[_known_tasks([task], self.columns)[0]].parameters())


def cross_stitch_mlp(
    tasks: Sequence[str],
    in_features: int,
    hidden: Sequence[int] = (100, 100),
    out_features: int | Mapping[str, int] = 1,
    *,
    self_weight: float = 0.9,
) -> CrossStitch:
    """A :class:`CrossStitch` of ReLU MLP columns ``in_features -> hidden... -> out_features``,
    one unit after every hidden layer.

    ``out_features`` may differ per task (a dict task -> width); the hidden widths may not, as
    the units mix activations of equal shape.
    """
    tasks = list(tasks)
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks = {tasks} is not allowed: task names must be distinct")
    outs = dict(out_features) if isinstance(out_features, Mapping) else dict.fromkeys(tasks, out_features)
    _known_tasks(tasks, outs)
    columns = {}
    for t in tasks:
        blocks, width = [], checks.positive_int("in_features", in_features)
        for h in hidden:
            blocks.append(nn.Sequential(nn.Linear(width, checks.positive_int("hidden", h)), nn.ReLU()))
            width = h
        blocks.append(nn.Linear(width, checks.positive_int("out_features", outs[t])))
        columns[t] = blocks
    return CrossStitch(columns, self_weight=self_weight)


# --- loss weightings -------------------------------------------------------------------------


class Weighting(nn.Module):
    """The interface of every loss weighting.

    ``backward(losses, shared_params)`` accumulates gradients into ``.grad`` of every leaf the
    losses depend on (and of the weighting's own learned parameters) and returns detached
    diagnostics. Subclasses implement :meth:`_backward`.
    """

    def __init__(self, n_tasks: int):
        super().__init__()
        self.n_tasks = checks.positive_int("n_tasks", n_tasks)

    def backward(self, losses: Losses, shared_params: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """Fill ``.grad`` from the task losses.

        A NaN or infinite loss is refused before anything is computed: it would otherwise be
        absorbed into learned state that outlives the step (UW's log-variances, GradNorm's weights
        and initial losses, DWA's loss history) and poison every later step.

        Args:
            losses: ``[T]`` tensor of scalar losses, or a dict task -> scalar loss whose order is
                the task order (``T = n_tasks`` entries either way).
            shared_params: the parameters all tasks share, e.g. ``model.shared_parameters()``.
                Only the methods that look at per-task gradients need them (:class:`PCGrad`,
                and :class:`GradNorm` unless it was given its ``layer``).

        Returns:
            name -> detached tensor; ``"weights"`` ``[T]`` is the loss weights used in this step,
            where the method has any.

        Raises:
            ConfigError: ``losses`` has the wrong number of entries or shapes, or a task's loss is
                NaN or infinite (the message names the tasks); no gradient or state was changed.
        """
        vector = self._as_vector(losses)
        finite = torch.isfinite(vector.detach())
        if not bool(finite.all()):
            names = list(losses) if isinstance(losses, Mapping) else [f"task {t}" for t in range(self.n_tasks)]
            bad = {names[t]: vector[t].item() for t in (~finite).nonzero().flatten().tolist()}
            raise ConfigError(
                f"losses {bad} are not finite: {type(self).__name__} refuses them before updating its "
                "weights or history; find where the loss diverged (learning rate, data)"
            )
        return self._backward(vector, None if shared_params is None else list(shared_params))

    def _backward(self, losses: Tensor, shared: list[Tensor] | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def _as_vector(self, losses: Losses) -> Tensor:
        if isinstance(losses, Mapping):
            names = list(losses)
            if len(names) != self.n_tasks:
                raise ConfigError(f"losses has {len(names)} entries {names}: this {type(self).__name__} "
                                 f"was built for n_tasks = {self.n_tasks}")
            bad = {t: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                   for t, v in losses.items() if not isinstance(v, Tensor) or v.dim() != 0}
            if bad:
                raise ConfigError(f"losses {bad} are not scalar tensors: each task's loss must have shape ()")
            return torch.stack(list(losses.values()))
        if not isinstance(losses, Tensor) or losses.shape != (self.n_tasks,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ConfigError(f"losses has shape {shape}: it must be a dict of scalar losses or a tensor of "
                             f"shape ({self.n_tasks},) for n_tasks = {self.n_tasks}")
        return losses

    def _required(self, shared: list[Tensor] | None) -> list[Tensor]:
        if not shared:
            raise ConfigError(f"shared_params = {shared!r} is not allowed for {type(self).__name__}: give the "
                             "shared parameters, e.g. model.shared_parameters()")
        return shared

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}"


def _ratio(losses: Tensor, reference: Tensor) -> Tensor:
    """``losses / reference``, and 1 where ``reference`` is 0: a loss ratio against a loss of
    exactly 0 is undefined or infinite, and 1 (no change) keeps the weights that use it finite."""
    return torch.where(reference == 0, torch.ones_like(losses), losses / torch.where(reference == 0, 1, reference))


def _weighted_backward(losses: Tensor, weights: Tensor) -> dict[str, Tensor]:
    (weights * losses).sum().backward()
    return {"weights": weights.detach().clone()}


class EW(Weighting):
    """Equal weighting: the gradient of ``sum_t L_t``, weights all 1 (as in LibMTL).

    The baseline every other method must beat; Kurin et al. (2022) and Xin et al. (2022) found
    that, given the same care in regularisation and tuning, the specialised methods rarely do.
    """

    def _backward(self, losses, shared):
        return _weighted_backward(losses, torch.ones_like(losses))


class UW(Weighting):
    """Uncertainty weighting (Kendall, Gal and Cipolla 2018) with learned ``s_t = log sigma_t^2``.

    .. math:: L = \\sum_t e^{-s_t} L_t + s_t

    This is twice the paper's Gaussian-likelihood objective for regression,
    ``sum_t L_t / (2 sigma_t^2) + log sigma_t`` (which LibMTL implements, with ``s_t`` initialised
    to -0.5): the same minimiser in ``s`` and the same relative task weights, and a gradient twice
    as large, which an Adam optimizer does not notice. For a fixed ``L_t`` the optimum is
    ``s_t* = log L_t``, where the objective equals ``sum_t (1 + log L_t)``: at equilibrium UW
    minimises the sum of log-losses, which no rescaling of a task's loss changes.

    ``s`` starts at 0 (weights 1, equal to :class:`EW`); ``log_vars`` ``[T]`` is a parameter to give
    the optimizer.
    """

    def __init__(self, n_tasks: int):
        super().__init__(n_tasks)
        self.log_vars = nn.Parameter(torch.zeros(self.n_tasks))

    def _backward(self, losses, shared):
        s = self.log_vars
        (torch.exp(-s) * losses + s).sum().backward()
        return {"weights": torch.exp(-s).detach(), "log_vars": s.detach().clone()}


class GradNorm(Weighting):
    """GradNorm (Chen et al. 2018): learned weights ``w_t`` that balance the tasks' gradient norms.

    Every step, on the shared layer ``W`` (the paper: the last shared layer),

    .. math::

        G_t = \\|\\nabla_W\\, w_t L_t\\|_2, \\quad
        r_t = \\frac{L_t / L_t(0)}{\\operatorname{mean}_s L_s / L_s(0)}, \\quad
        L_{grad} = \\sum_t \\bigl| G_t - \\operatorname{mean}_s(G_s)\\, r_t^{\\alpha} \\bigr|,

    with the target ``mean(G) r_t^alpha`` held constant. ``w`` receives ``d L_grad / d w`` only,
    the network receives the gradient of ``sum_t w_t L_t`` with ``w`` held constant. A task that
    trains slower (larger loss ratio ``r_t``) gets a larger target norm and so a larger weight;
    ``alpha`` sets how strongly (0: equal gradient norms).

    The paper renormalises ``w`` to sum to ``T`` after every update. Here the renormalisation runs at
    the start of each :meth:`backward` (so every step uses weights summing to ``T``) or when
    :meth:`renormalise` is called. ``L_t(0)`` is the loss seen by the first call. A ratio against
    a loss of exactly 0 (``L_t(0) = 0``, or a mean ratio of 0) counts as 1, as in :class:`DWA`,
    so that a solved task does not make the weights NaN.

    Args:
        alpha: the asymmetry, >= 0. The paper used 1.5 on NYUv2 (LibMTL's default) and 0.12 on
            its synthetic regression tasks.
        layer: the parameters ``W``, e.g. ``model.last_shared_parameters()``; ``None`` uses the
            ``shared_params`` of each call (all shared parameters: exact, and slower).
    """

    def __init__(self, n_tasks: int, alpha: float = 1.5, layer: Sequence[Tensor] | None = None):
        super().__init__(n_tasks)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha >= 0:
            raise ConfigError(f"alpha = {alpha!r} is not allowed: it must be a number >= 0")
        self.alpha = float(alpha)
        self.layer = None if layer is None else list(layer)
        self.loss_weights = nn.Parameter(torch.ones(self.n_tasks))
        self.register_buffer("initial_losses", torch.full((self.n_tasks,), math.nan))

    @torch.no_grad()
    def renormalise(self) -> None:
        """Rescale the weights to sum to ``T``."""
        self.loss_weights.mul_(self.n_tasks / self.loss_weights.sum())

    def _backward(self, losses, shared):
        layer = self.layer if self.layer is not None else self._required(shared)
        self.renormalise()
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(losses.detach())
        # A task that does not reach W has gradient zero there, not an error.
        norms = torch.stack([
            torch.sqrt(sum((g * g).sum() for g in torch.autograd.grad(loss, layer, retain_graph=True,
                                                                      materialize_grads=True)))
            for loss in losses
        ])
        w = self.loss_weights
        G = w * norms
        ratios = _ratio(losses.detach(), self.initial_losses)
        relative = _ratio(ratios, ratios.mean().expand_as(ratios))
        target = (G.mean() * relative**self.alpha).detach()
        L_grad = (G - target).abs().sum()
        (grad,) = torch.autograd.grad(L_grad, w)
        w.grad = grad if w.grad is None else w.grad + grad
        out = _weighted_backward(losses, w.detach())
        return {**out, "grad_norms": G.detach(), "L_grad": L_grad.detach()}

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, alpha={self.alpha}"


class DWA(Weighting):
    """Dynamic weight average (Liu, Johns and Davison 2019, Eq. 7-8), with temperature ``T_w``.

    .. math:: w_t(e) = T\\,\\operatorname{softmax}_t\\bigl(r_t(e-1) / T_w\\bigr), \\quad
              r_t(e-1) = \\bar L_t(e-1) / \\bar L_t(e-2)

    where ``bar L_t(e)`` is task ``t``'s mean loss over epoch ``e``. The weights sum to ``T``; a task
    whose loss fell less (larger ratio) gets more weight. The first two epochs use weights 1.
    A task whose mean loss was exactly 0 in epoch ``e-2`` gets ratio 1 (as if its loss had not
    changed): the quotient is undefined or infinite there, and softmax would turn every weight NaN.

    Args:
        temperature: ``T_w`` > 0; the paper's 2. Large values give equal weights.
        steps_per_epoch: backward calls per epoch, over which losses are averaged. The paper
            used whole epochs (set it to the number of batches per epoch); 1 makes the ratio a
            step-to-step one, cheap and noisier.
    """

    def __init__(self, n_tasks: int, temperature: float = 2.0, steps_per_epoch: int = 1):
        super().__init__(n_tasks)
        self.temperature = checks.positive_float("temperature", temperature)
        self.steps_per_epoch = checks.positive_int("steps_per_epoch", steps_per_epoch)
        self.register_buffer("epoch_means", torch.zeros(2, self.n_tasks))  # epochs e-2, e-1
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_sum", torch.zeros(self.n_tasks))
        self.register_buffer("running_steps", torch.zeros((), dtype=torch.long))

    def current_weights(self) -> Tensor:
        """The weights ``[T]`` the next :meth:`backward` uses."""
        if self.epochs_seen < 2:
            return torch.ones(self.n_tasks, device=self.epoch_means.device)
        ratios = _ratio(self.epoch_means[1], self.epoch_means[0])
        return self.n_tasks * torch.softmax(ratios / self.temperature, dim=0)

    def _backward(self, losses, shared):
        out = _weighted_backward(losses, self.current_weights().to(losses))
        with torch.no_grad():
            self.running_sum += losses.detach().to(self.running_sum)
            self.running_steps += 1
            if self.running_steps == self.steps_per_epoch:
                self.epoch_means.copy_(torch.stack([self.epoch_means[1], self.running_sum / self.steps_per_epoch]))
                self.epochs_seen += 1
                self.running_sum.zero_()
                self.running_steps.zero_()
        return out

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, temperature={self.temperature}, steps_per_epoch={self.steps_per_epoch}"


class RLW(Weighting):
    """Random loss weighting (Lin et al. 2022): ``w = softmax(z)``, ``z ~ N(0, I_T)``, fresh each step.

    The weights are positive and sum to 1, as in LibMTL and the paper, not to ``T`` as :class:`EW`'s
    do: with plain SGD this is a learning rate ``T`` times smaller, with Adam it hardly matters.
    A ``generator`` makes the draws repeatable.
    """

    def __init__(self, n_tasks: int, generator: torch.Generator | None = None):
        super().__init__(n_tasks)
        self.generator = generator

    def _backward(self, losses, shared):
        z = torch.randn(self.n_tasks, generator=self.generator)
        return _weighted_backward(losses, torch.softmax(z, dim=0).to(losses))


def pcgrad_project(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's gradient surgery (Yu et al. 2020, Algorithm 1) on ``grads`` ``[T, D]``.

    For each task ``i``, for the other tasks ``j`` in random order: if ``g_i^PC . g_j < 0``, remove
    from ``g_i^PC`` its component along ``g_j``,

    .. math:: g_i^{PC} \\leftarrow g_i^{PC} - \\frac{g_i^{PC} \\cdot g_j}{\\|g_j\\|^2}\\, g_j .

    Projections are against the *original* gradients ``g_j``. Right after a projection
    ``g_i^PC . g_j = 0``; a later projection can make it negative again when ``T >= 3``.

    Returns:
        the projected gradients ``[T, D]``; PCGrad's update direction is their sum.
    """
    projected = grads.clone()
    for i in range(grads.shape[0]):
        for j in torch.randperm(grads.shape[0], generator=generator).tolist():
            if j == i:
                continue
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] -= dot / (grads[j] @ grads[j]) * grads[j]
    return projected


class PCGrad(Weighting):
    """PCGrad (Yu et al. 2020): sum of the per-task gradients on the shared parameters after
    :func:`pcgrad_project`; every other parameter gets the plain ``sum_t grad L_t``.

    Costs ``T`` backward passes per step, one per task. Returns ``"conflicts"``, the number of task
    pairs whose shared gradients had a negative inner product before surgery.
    """

    def __init__(self, n_tasks: int, generator: torch.Generator | None = None):
        super().__init__(n_tasks)
        self.generator = generator

    def _backward(self, losses, shared):
        shared = self._required(shared)
        grads = _task_gradients(losses, shared)
        projected = pcgrad_project(grads, self.generator)
        _add_flat_grad(shared, projected.sum(0))
        gram = grads @ grads.T
        return {"conflicts": (torch.triu(gram, diagonal=1) < 0).sum()}


def _task_gradients(losses: Tensor, shared: list[Tensor]) -> Tensor:
    """``[T, D]``: row ``t`` is ``grad L_t`` on ``shared``, flattened. One backward per task, so the
    other leaves accumulate ``sum_t grad L_t``; ``shared``'s ``.grad`` is left as it was."""
    saved = [p.grad for p in shared]
    rows = []
    for t, loss in enumerate(losses):
        for p in shared:
            p.grad = None
        loss.backward(retain_graph=t < len(losses) - 1)
        rows.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in shared]))
    for p, g in zip(shared, saved):
        p.grad = g
    return torch.stack(rows)


def _add_flat_grad(params: list[Tensor], flat: Tensor) -> None:
    for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
        g = g.view_as(p)
        p.grad = g.clone() if p.grad is None else p.grad + g


WEIGHTINGS: dict[str, type[Weighting]] = {
    "EW": EW, "UW": UW, "GradNorm": GradNorm, "DWA": DWA, "PCGrad": PCGrad, "RLW": RLW,
}
