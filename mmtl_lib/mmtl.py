"""Meta multi-task learning: three places where meta-learning and multi-task learning meet.

1. **Task weights learned by looking ahead** (Auto-Lambda, Liu, James, Davison and Johns, TMLR 2022;
   MOML, Ye et al., NeurIPS 2021): the weights ``lambda`` of a multi-task loss
   ``sum_t lambda_t L_t`` are meta-parameters, chosen so that ``k`` training steps on that loss
   lower a held-out loss of the primary task. The hypergradient goes through
   :func:`mmtl_lib.adapt`, whose ``support`` tuple carries the task of every example
   (:func:`pack_targets`). :func:`lookahead_loss`, :class:`LookaheadWeights`.
2. **Task-robust MAML** (TR-MAML, Collins, Mokhtari and Shakkottai, NeurIPS 2020): minimise the
   worst post-adaptation loss over a finite set of training tasks rather than their mean, by
   gradient descent on ``theta`` and projected gradient ascent on task weights ``p`` on the
   simplex. :func:`project_simplex`, :class:`SinusoidTaskSet`, :class:`TRMAML`.
3. **Task-aware modulation** (MMAML, Vuorio et al., NeurIPS 2019): a set encoder reads the support
   set and scales and shifts (FiLM) the hidden units of the network before MAML's inner loop
   adapts its weights, so that one initialisation can serve a multimodal task distribution.
   :class:`FiLMMLP`, :class:`SetEncoder`, :func:`modulated_meta_loss`, :class:`MMAML`,
   :class:`MultimodalFunctions`.

The bridge in the other direction, meta-learning that *is* multi-task learning, is tested in
``tests/test_inner.py::test_reptile_meta_gradient_averages_task_displacements``: Reptile with
one inner step moves ``theta`` along ``inner_lr`` times the gradient of the joint (multi-task)
loss. Its empirical side, that a shared network trained on all tasks and fine-tuned is a strong
few-shot learner (Wang, Zhao and Li, ICML 2021), is the :class:`~mmtl_lib.JointTraining` row of
the TR-MAML and MMAML benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from . import checks
from .algorithms import MAML, Learner, meta_loss
from .inner import LossFn, Params, adapt, forward
from .models import MLP
from .tasks import Sinusoid, TaskBatch

# --- 1. task weights learned by looking ahead -------------------------------------------------


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
        raise ValueError(f"task must be integer ids of shape ({y.shape[0]},), got {task.dtype} {tuple(task.shape)}")
    if task.numel() and not 0 <= int(task.min()) <= int(task.max()) < n_tasks:
        raise ValueError(f"task ids span [{int(task.min())}, {int(task.max())}]: they must lie in [0, {n_tasks})")
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
    steps: int,
    inner_lr: float,
    primary: int = 0,
    grad_clip: float | None = None,
) -> Tensor:
    """The primary task's held-out loss after ``steps`` SGD steps on the weighted multi-task loss.

    .. math:: \\theta_{s+1} = \\theta_s - \\alpha \\nabla \\textstyle\\sum_t \\lambda_t L_t(\\theta_s),
        \\qquad F(\\lambda) = L^{val}_{primary}(\\theta_k(\\lambda))

    Auto-Lambda minimises ``F`` over ``lambda`` (with ``k = 1``); MOML states it as the upper
    level of a bilevel problem. With one step, the chain rule through
    ``theta_1 = theta - alpha sum_t lambda_t grad L_t(theta)``, where ``d theta_1 / d lambda_j =
    -alpha grad L_j(theta)``, gives

    .. math:: \\frac{\\partial F}{\\partial \\lambda_j}
        = -\\alpha\\, \\nabla L^{val}(\\theta_1)^\\top \\nabla L_j(\\theta)

    (tested against autograd in ``tests/test_mmtl.py``). Gradient descent on ``lambda`` thus
    raises the weight of a task in proportion to how well its training gradient agrees with the
    primary task's validation gradient: the gradient-similarity rule of Du et al. (2018), who
    keep an auxiliary loss only while ``cos(grad L_main, grad L_aux) > 0``, with an unnormalised
    dot product and a smooth weight in place of the gate; and, with one weight per training
    *example* instead of per task, the one-step lookahead of learning to reweight examples (Ren
    et al. 2018). For ``k > 1``,
    ``d theta_k / d lambda_j = -alpha sum_s [prod_{r>s} (I - alpha H_r)] grad L_j(theta_s)``
    (``H_r`` the Hessian of the weighted loss at ``theta_r``): a task also counts for how its
    gradient interacts with the curvature of the later steps, which autograd through
    :func:`mmtl_lib.adapt` handles.

    Args:
        model: a network with one output column per task, ``[n, *input_shape] -> [n, T]``.
        params: name -> tensor, the network's parameters ``theta``.
        weights: ``[T]`` task weights ``lambda``.
        train: ``(x, packed)``: the multi-task training batch, ``packed`` from :func:`pack_targets`.
        val: ``(x, packed)``: held-out examples of the primary task.
        steps: ``k``, the lookahead's SGD steps; inner_lr: ``alpha``; grad_clip: as in adapt.

    Returns:
        scalar, differentiable w.r.t. ``weights`` (and ``params``).
    """
    adapted = adapt(model, params, train, weighted_loss(weights), steps=steps, inner_lr=inner_lr,
                    grad_clip=grad_clip)
    return task_losses(forward(model, adapted, val[0]), val[1])[primary]


class LookaheadWeights:
    """Task weights ``lambda >= 0`` trained by Adam on :func:`lookahead_loss` (Auto-Lambda).

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
            the weights; steps, inner_lr, primary, grad_clip: those of :func:`lookahead_loss`.
    """

    def __init__(self, n_tasks: int, *, init=0.1, lr: float = 0.01, steps: int = 1, inner_lr: float = 0.1,
                 primary: int = 0, grad_clip: float | None = None):
        n_tasks = checks.positive_int("n_tasks", n_tasks)
        init = torch.as_tensor(init, dtype=torch.get_default_dtype()).expand(n_tasks).clone()
        if (init < 0).any():
            raise ValueError(f"init = {init.tolist()} is not allowed: task weights must be >= 0")
        if not 0 <= primary < n_tasks:
            raise ValueError(f"primary = {primary} is not allowed: it must be a task id in [0, {n_tasks})")
        self.weights = init.requires_grad_()
        self.optimizer = torch.optim.Adam([self.weights], lr=checks.positive_float("lr", lr))
        self.lookahead = dict(steps=checks.positive_int("steps", steps),
                              inner_lr=checks.positive_float("inner_lr", inner_lr), primary=primary,
                              grad_clip=grad_clip)

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


# --- 2. task-robust MAML ----------------------------------------------------------------------


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
        raise ValueError(f"v has shape {tuple(v.shape)}: it needs a nonempty last dimension")
    u = v.sort(dim=-1, descending=True).values
    excess = u.cumsum(-1) - 1
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - excess / j) > 0).sum(-1, keepdim=True)  # the test holds for j = 1..rho and no other j
    tau = excess.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - tau).clamp(min=0)


class SinusoidTaskSet:
    """A fixed, finite set of ``N`` sinusoid tasks: TR-MAML's training distribution.

    Task ``i`` draws its amplitude uniformly from its own band ``amplitude_bands[i]``, and the
    phase from ``phase``, afresh on every draw, as in TR-MAML's sinusoid code. Tasks are drawn
    uniformly, with replacement.

    Args:
        amplitude_bands: ``[N, 2]`` (low, high) per task.
    """

    def __init__(self, amplitude_bands: Tensor, phase=(0.0, math.pi), x_range=(-5.0, 5.0)):
        bands = torch.as_tensor(amplitude_bands, dtype=torch.float64)
        if bands.dim() != 2 or bands.shape[1] != 2 or bands.shape[0] == 0 or (bands[:, 0] > bands[:, 1]).any():
            raise ValueError("amplitude_bands must be [N, 2] rows (low, high) with low <= high, "
                             f"got shape {tuple(bands.shape)}")
        self.bands, self.phase, self.x_range = bands, phase, x_range

    @classmethod
    def imbalanced(cls, n_easy=95, easy=(0.1, 1.05), n_hard=5, hard=(4.05, 5.0), **kw) -> SinusoidTaskSet:
        """``n_easy`` tasks whose bands tile ``easy`` and ``n_hard`` whose bands tile ``hard``.

        The defaults make the hard, high-amplitude region rare (5 tasks in 100). TR-MAML's code
        tiles [0.1, 1.05] with 95 bands and [4.95, 5.0] with 5, each 0.01 wide; here the 5 hard
        bands cover [4.05, 5.0], so that the top of the test range U[0.1, 5] is covered too.
        """
        edges = [torch.linspace(*r, checks.positive_int("n", n) + 1, dtype=torch.float64)
                 for r, n in ((easy, n_easy), (hard, n_hard))]
        return cls(torch.cat([torch.stack([e[:-1], e[1:]], 1) for e in edges]), **kw)

    @property
    def n_tasks(self) -> int:
        return self.bands.shape[0]

    def sample(self, meta_batch_size: int, k_shot: int, n_query: int, *, generator=None, device="cpu",
               dtype=torch.float32) -> TaskBatch:
        """Like :meth:`mmtl_lib.Sinusoid.sample`; ``info`` adds ``task_id`` ``[meta_batch_size]``."""
        b = checks.positive_int("meta_batch_size", meta_batch_size)
        k, q = checks.positive_int("k_shot", k_shot), checks.positive_int("n_query", n_query)
        ids = torch.randint(self.n_tasks, (b,), generator=generator)
        low, high = self.bands[ids, 0].to(dtype), self.bands[ids, 1].to(dtype)
        amplitude = low + (high - low) * torch.rand(b, generator=generator, dtype=dtype)
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * torch.rand(b, generator=generator, dtype=dtype)
        x = self.x_range[0] + (self.x_range[1] - self.x_range[0]) * torch.rand(b, k + q, 1, generator=generator,
                                                                                 dtype=dtype)
        y = Sinusoid.target(x, amplitude[:, None, None], phase[:, None, None])
        x, y, amplitude, phase, ids = (t.to(device) for t in (x, y, amplitude, phase, ids))
        return TaskBatch((x[:, :k], y[:, :k]), (x[:, k:], y[:, k:]),
                         {"task_id": ids, "amplitude": amplitude, "phase": phase})


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
            ``info["task_id"]`` (as :class:`SinusoidTaskSet` does).
        p_lr: the ascent step on ``p``.
        The other arguments are those of :class:`mmtl_lib.MAML`.
    """

    name = "tr-maml"

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, n_tasks: int, p_lr: float, **maml):
        super().__init__(model, loss_fn, **maml)
        self.p = torch.full((checks.positive_int("n_tasks", n_tasks),), 1.0 / n_tasks)
        self.p_lr = checks.positive_float("p_lr", p_lr)

    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        ids = tasks.info.get("task_id")
        if ids is None:
            raise ValueError("tasks.info has no 'task_id': TR-MAML needs the id of every task in the meta-batch")
        losses, predictions = meta_loss(
            self.model, self.params(), tasks, self.loss_fn, steps=self.steps, inner_lr=self.test_lr,
            first_order=self.first_order, adapt_names=self.adapt_names, backend=self.backend,
            chunk_size=self.chunk_size, grad_clip=self.grad_clip,
        )
        self.p = self.p.to(losses.device)
        scale = self.p.numel() / ids.numel()
        (scale * (self.p[ids] * losses).sum()).backward()
        grad_p = torch.zeros_like(self.p).index_add_(0, ids, losses.detach().to(self.p.dtype)) * scale
        self.p = project_simplex(self.p + self.p_lr * grad_p)
        return losses.detach(), predictions.detach()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "p": self.p.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.p = state["p"].clone()


def binned_means(values: Tensor, keys: Tensor, edges: Tensor) -> Tensor:
    """Mean of ``values`` ``[n]`` in each bin of ``keys`` ``[n]``: ``[len(edges) - 1]``, NaN where empty.

    Bin ``b`` is ``[edges[b], edges[b + 1])``, the last one closed, e.g. MSE per amplitude bin.
    """
    index = (torch.bucketize(keys, edges, right=True) - 1).clamp(0, edges.numel() - 2)
    inside = (keys >= edges[0]) & (keys <= edges[-1])
    n_bins = edges.numel() - 1
    total = torch.zeros(n_bins, dtype=values.dtype).index_add_(0, index[inside], values[inside])
    count = torch.zeros(n_bins, dtype=values.dtype).index_add_(0, index[inside], torch.ones_like(values[inside]))
    return total / count  # 0 / 0 = NaN marks an empty bin


# --- 3. task-aware modulation (MMAML) ---------------------------------------------------------


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018), ``h -> gamma * h + beta``.

    ``gamma`` and ``beta`` ``[features]`` are buffers set to the identity: a task's modulation
    replaces them through :func:`torch.func.functional_call`, never by assignment.
    """

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("gamma", torch.ones(features), persistent=False)
        self.register_buffer("beta", torch.zeros(features), persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        return h * self.gamma + self.beta


class FiLMMLP(MLP):
    """:class:`mmtl_lib.MLP` with every hidden pre-activation modulated, as in MMAML's regressor:
    ``h_l = ReLU(gamma_l * (W_l h_{l-1} + b_l) + beta_l)``.

    Its parameters have the MLP's names. The modulation lives in buffers ``film.{l}.gamma``
    and ``film.{l}.beta`` ``[hidden[l]]``, at the identity by default, so ``FiLMMLP(...)(x)`` is the
    plain MLP; pass a task's modulation as ``buffers`` to :func:`mmtl_lib.adapt` and
    :func:`mmtl_lib.forward`: adapt then keeps it fixed (it adapts parameters only) while
    autograd still reaches whatever computed it.
    """

    def __init__(self, in_features=1, hidden=(40, 40), out_features=1):
        super().__init__(in_features, hidden, out_features)
        self.film = nn.ModuleList(FiLM(h) for h in hidden)

    def modulation_shapes(self) -> dict[str, int]:
        """Buffer name -> width, e.g. ``{"film.0.gamma": 40, "film.0.beta": 40, ...}``."""
        return {name: b.numel() for name, b in self.named_buffers() if name.startswith("film.")}

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[batch, *input_shape]`` -> ``[batch, out_features]``."""
        films = iter(self.film)
        for layer in self.body:
            x = layer(x)
            if isinstance(layer, nn.Linear):
                x = next(films)(x)
        return self.head(x)


class SetEncoder(nn.Module):
    """A task's FiLM modulation from its support set, invariant to the order of the examples.

    ``e = rho(mean_i phi([x_i, y_i]))`` (Deep Sets, Zaheer et al. 2017), then a linear map to
    every ``gamma`` and ``beta``. MMAML's regression encoder is a recurrent network over the
    support examples; the mean-pooled MLP is the permutation-invariant choice and was enough
    here. The last layer starts at zero and ``gamma = 1 + output``, so that at initialisation
    every task gets the identity modulation and MMAML starts exactly as MAML, which makes the
    comparison with MAML clean. (A random start trained about as well in our sinusoid runs; the
    inner-gradient clipping of :class:`MMAML` is what training needed.)

    Args:
        in_features, out_features: of the regression network (one example is ``[x, y]``).
        shapes: ``FiLMMLP.modulation_shapes()``.
        hidden: width of ``phi`` and ``rho``.
    """

    def __init__(self, in_features: int, out_features: int, shapes: Mapping[str, int], hidden: int = 64):
        super().__init__()
        hidden = checks.positive_int("hidden", hidden)
        self.shapes = dict(shapes)
        self.phi = nn.Sequential(nn.Linear(in_features + out_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU())
        self.rho = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, sum(self.shapes.values()))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``x`` ``[B, k_shot, in_features]``, ``y`` ``[B, k_shot, out_features]`` -> name -> ``[B, width]``."""
        e = self.out(self.rho(self.phi(torch.cat([x, y], -1)).mean(1)))
        parts = dict(zip(self.shapes, e.split(list(self.shapes.values()), dim=-1)))
        return {n: 1 + v if n.endswith("gamma") else v for n, v in parts.items()}


def modulated_meta_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    modulation: Mapping[str, Tensor],
    tasks: TaskBatch,
    loss_fn: LossFn,
    *,
    steps: int,
    inner_lr: float,
    grad_clip: float | None = None,
    backend: str = "vmap",
) -> tuple[Tensor, Tensor]:
    """MMAML's objective: adapt each task's modulated network on its support set, score its query.

    Args:
        model: a :class:`FiLMMLP`; params: its parameters ``theta``.
        modulation: buffer name -> ``[meta_batch_size, width]``, one modulation per task
            (from :class:`SetEncoder`), fixed during the inner loop.
        backend: ``"loop"`` or ``"vmap"``, as in :func:`mmtl_lib.meta_loss` (same results).
        The other arguments are those of :func:`mmtl_lib.adapt`.

    Returns:
        ``(losses [meta_batch_size], predictions [meta_batch_size, n_query, out])``,
        differentiable w.r.t. ``params`` and ``modulation`` through every inner step.
    """
    checks.one_of("backend", backend, ("loop", "vmap"))
    (sx, sy), (qx, qy) = tasks.support, tasks.query

    def task_loss(mod, sx, sy, qx, qy):
        adapted = adapt(model, params, (sx, sy), loss_fn, steps=steps, inner_lr=inner_lr, buffers=mod,
                        grad_clip=grad_clip)
        prediction = forward(model, adapted, qx, mod)
        return loss_fn(prediction, qy), prediction

    if backend == "loop":
        results = [task_loss({n: m[i] for n, m in modulation.items()}, *t)
                   for i, t in enumerate(zip(sx, sy, qx, qy))]
        return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])
    return torch.func.vmap(task_loss)(dict(modulation), sx, sy, qx, qy)


class MMAML(Learner):
    """Multimodal MAML (Vuorio et al. 2019): modulate with the set encoder, then adapt with MAML.

    The encoder is meta-trained with the network, through the inner loop. A task's adapted
    "parameters" (what :meth:`adapt` returns and :meth:`predict` takes) are the network's
    parameters plus its modulation buffers, so :func:`mmtl_lib.evaluate` works unchanged.

    Args:
        model: a :class:`FiLMMLP`; encoder: a :class:`SetEncoder` for it.
        grad_clip: clip each inner step's gradient to this norm; on the mixture of sines, lines
            and quadratics (targets up to ~13) the inner loop diverged without it.
        The other arguments are those of :class:`mmtl_lib.MAML`.
    """

    name = "mmaml"

    def __init__(self, model: FiLMMLP, encoder: SetEncoder, loss_fn: LossFn, *, inner_lr: float, steps: int,
                 test_steps: int | None = None, grad_clip: float | None = None, backend: str = "vmap"):
        self.model, self.encoder, self.loss_fn = model, encoder, loss_fn
        self.inner_lr = self.test_lr = checks.positive_float("inner_lr", inner_lr)
        self.steps = checks.positive_int("steps", steps)
        self.test_steps = self.steps if test_steps is None else checks.positive_int("test_steps", test_steps)
        self.grad_clip = None if grad_clip is None else checks.positive_float("grad_clip", grad_clip)
        self.backend = checks.one_of("backend", backend, ("loop", "vmap"))
        self.names = list(model.modulation_shapes())

    def meta_parameters(self) -> list[Tensor]:
        return super().meta_parameters() + list(self.encoder.parameters())

    def meta_backward(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        modulation = self.encoder(*tasks.support)
        losses, predictions = modulated_meta_loss(
            self.model, self.params(), modulation, tasks, self.loss_fn, steps=self.steps,
            inner_lr=self.inner_lr, grad_clip=self.grad_clip, backend=self.backend)
        losses.mean().backward()
        return losses.detach(), predictions.detach()

    def _split(self, params: Params) -> tuple[Params, Params]:
        return ({k: v for k, v in params.items() if k not in self.names},
                {k: params[k] for k in self.names})

    def adapt(self, support: tuple[Tensor, Tensor], steps: int | None = None) -> Params:
        with torch.no_grad():
            modulation = {k: v[0] for k, v in self.encoder(support[0][None], support[1][None]).items()}
        params = {**{k: v.detach() for k, v in self.params().items()}, **modulation}
        steps = self.test_steps if steps is None else steps
        return params if steps == 0 else self.fine_tune(params, support, steps)

    def fine_tune(self, params: Params, support: tuple[Tensor, Tensor], steps: int) -> Params:
        net, modulation = self._split(params)
        adapted = adapt(self.model, net, support, self.loss_fn, steps=steps, inner_lr=self.inner_lr,
                        first_order=True, buffers=modulation, grad_clip=self.grad_clip)
        return {**{k: v.detach() for k, v in adapted.items()}, **modulation}

    def predict(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        net, modulation = self._split(dict(params))
        with torch.no_grad():
            return forward(self.model, net, x, modulation)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "encoder": self.encoder.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.encoder.load_state_dict(state["encoder"])


class MultimodalFunctions:
    """MMAML's multimodal regression tasks: sines, lines and quadratics on ``x ~ U[-5, 5]``.

    Ranges of the MMAML regression code (Vuorio et al. 2019): sine ``A sin(x - phase)``, ``A`` in
    [0.1, 5], phase in [0, pi]; line ``slope * x + intercept``, both in [-3, 3]; quadratic
    ``a (x - center)^2 + bias`` with ``|a|`` in [0.02, 0.15] and a random sign, center and bias
    in [-3, 3]. Each task's family is drawn uniformly; targets carry Gaussian noise of standard
    deviation ``noise_std`` (MMAML's option), support and query alike, so an MSE cannot go
    below ``noise_std^2``.
    """

    MODES = ("sine", "linear", "quadratic")

    def __init__(self, modes=MODES, noise_std: float = 0.3, x_range=(-5.0, 5.0)):
        self.modes = [checks.one_of("modes", m, self.MODES) for m in modes]
        if not self.modes:
            raise ValueError("modes is empty: name at least one of " + ", ".join(self.MODES))
        if noise_std < 0:
            raise ValueError(f"noise_std = {noise_std} is not allowed: it must be >= 0")
        self.noise_std, self.x_range = noise_std, x_range

    @staticmethod
    def target(x: Tensor, mode: Tensor, u: Tensor) -> Tensor:
        """``x`` ``[B, n, 1]``; ``mode`` ``[B]`` indices into :attr:`MODES`; ``u`` ``[B, 3]`` uniform
        [0, 1) draws, mapped to each family's ranges. Returns ``[B, n, 1]``."""
        u = u[:, None, :]
        sine = (0.1 + 4.9 * u[..., :1]) * torch.sin(x - math.pi * u[..., 1:2])
        line = (6 * u[..., :1] - 3) * x + (6 * u[..., 1:2] - 3)
        # |a| in [0.02, 0.15] with a random sign: stretch u_0 over [-0.13, 0.13], push away from 0.
        s = 0.26 * u[..., :1] - 0.13
        a = torch.where(s < 0, s - 0.02, s + 0.02)
        quad = a * (x - (6 * u[..., 1:2] - 3)) ** 2 + (6 * u[..., 2:3] - 3)
        return torch.where(mode[:, None, None] == 0, sine, torch.where(mode[:, None, None] == 1, line, quad))

    def sample(self, meta_batch_size: int, k_shot: int, n_query: int, *, generator=None, device="cpu",
               dtype=torch.float32) -> TaskBatch:
        """Like :meth:`mmtl_lib.Sinusoid.sample`; ``info["mode"]`` ``[meta_batch_size]`` indexes :attr:`MODES`."""
        b = checks.positive_int("meta_batch_size", meta_batch_size)
        k, q = checks.positive_int("k_shot", k_shot), checks.positive_int("n_query", n_query)
        allowed = torch.tensor([self.MODES.index(m) for m in self.modes])
        mode = allowed[torch.randint(len(allowed), (b,), generator=generator)]
        u = torch.rand(b, 3, generator=generator, dtype=dtype)
        low, high = self.x_range
        x = low + (high - low) * torch.rand(b, k + q, 1, generator=generator, dtype=dtype)
        y = self.target(x, mode, u) + self.noise_std * torch.randn(b, k + q, 1, generator=generator, dtype=dtype)
        x, y, mode = x.to(device), y.to(device), mode.to(device)
        return TaskBatch((x[:, :k], y[:, :k]), (x[:, k:], y[:, k:]), {"mode": mode})
