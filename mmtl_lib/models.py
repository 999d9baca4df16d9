"""The networks of the MAML paper, each split into a ``body`` and a ``head``.

The split names the parameters ANIL adapts (``head.*``) and the trunk that multi-task models
share. Parameters are used through :func:`torch.func.functional_call`; nothing here holds state
that adaptation could change, except BatchNorm's running statistics where a caller asks for them.
Also here: the FiLM-modulated MLP and the set encoder of MMAML.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from . import checks

BATCH_NORM_MODES = ("transductive", "running", "none")
HEAD_INITS = ("torch", "zeros")


class BatchNorm(nn.Module):
    """Batch normalisation with the statistics of the batch at hand, from elementary tensor ops.

    Same function and parameter names (``weight``, ``bias``) as
    ``nn.BatchNorm2d(num_features, track_running_stats=False)``, for inputs ``[batch, C, ...]``.
    Why not that module: its fused kernel's backward has a batching rule that is wrong when
    differentiated a second time under :func:`torch.func.vmap` (pytorch/functorch#534). MAML's
    meta-gradient through the vmap backend came out wrong by ~100% on Conv4's conv biases
    while the per-task loop matched finite differences. Written out, autograd and vmap see only
    means, subtractions and divisions, whose rules are right; ``tests/test_learners.py``
    checks loop == vmap and ``tests/test_inner.py`` checks against finite differences.

    With ``steps`` (MAML++'s per-step BatchNorm weights and biases, Antoniou et al. 2019),
    ``weight`` and ``bias`` are ``[steps, num_features]``, one row per inner step, and the
    buffer ``step`` (a 0-dim integer, default 0) picks the row a forward pass uses. The inner
    loop sets it through :func:`step_buffers`; the model object is never modified.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, steps: int | None = None):
        super().__init__()
        self.eps = eps
        shape = (checks.positive_int("num_features", num_features),)
        self.steps = checks.optional_positive_int("steps", steps)
        if self.steps is not None:
            shape = (self.steps, num_features)
            self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        weight, bias = self.weight, self.bias
        if self.steps is not None:
            weight, bias = weight[self.step], bias[self.step]
        return (x - mean) * torch.rsqrt(var + self.eps) * weight.view(shape) + bias.view(shape)


def batch_norm_layer(num_features: int, mode: str, dims: int, steps: int | None = None) -> nn.Module:
    """The normalisation layer for ``mode`` in :data:`BATCH_NORM_MODES` (not ``"none"``);
    ``steps``: per-step weights and biases (transductive mode only)."""
    if mode == "transductive":
        return BatchNorm(num_features, steps=steps)
    if steps is not None:
        raise checks.ConfigError(f"bn_steps = {steps!r} needs batch_norm='transductive', not {mode!r}")
    return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features)


class MLP(nn.Module):
    """Fully connected ReLU network ``in_features -> hidden... -> out_features``.

    ``MLP(1, (40, 40), 1)`` is the MAML paper's sinusoid regressor. With ``batch_norm`` the hidden
    layers are followed by BatchNorm, as in the paper's fully connected Omniglot network
    (``MLP(784, (256, 128, 64, 64), n_way, batch_norm="transductive")``); inputs of any shape
    ``[batch, ...]`` are flattened. ``bn_steps``: per-step BatchNorm, as in :class:`Conv4`.
    """

    def __init__(self, in_features=1, hidden=(40, 40), out_features=1, *, batch_norm="none", bn_steps=None):
        super().__init__()
        checks.one_of("batch_norm", batch_norm, BATCH_NORM_MODES)
        layers: list[nn.Module] = [nn.Flatten()]
        width = checks.positive_int("in_features", in_features)
        for h in hidden:
            layers.append(nn.Linear(width, checks.positive_int("hidden", h)))
            if batch_norm != "none":
                layers.append(batch_norm_layer(h, batch_norm, dims=1, steps=bn_steps))
            layers.append(nn.ReLU())
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, checks.positive_int("out_features", out_features))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[batch, *input_shape]`` -> ``[batch, out_features]``."""
        return self.head(self.body(x))


def conv_block(in_channels: int, filters: int, batch_norm: str, pool: bool,
               bn_steps: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, filters, 3, padding=1)]
    if batch_norm != "none":
        layers.append(batch_norm_layer(filters, batch_norm, dims=2, steps=bn_steps))
    layers.append(nn.ReLU())
    layers.append(nn.MaxPool2d(2) if pool else nn.Identity())
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """The MAML paper's Omniglot network: 4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool], linear head.

    On 28x28 inputs the feature map shrinks 28 -> 14 -> 7 -> 3 -> 1, so the head sees
    ``filters`` features.

    ``batch_norm``:
        ``"transductive"`` (default, :class:`BatchNorm`) normalises with the statistics of the
        batch at hand, in training and at test time alike, and keeps no running buffers. That is
        what the MAML reference code does; it makes adaptation pure (no state to mutate) and lets
        :func:`torch.func.vmap` batch tasks. Its cost: a query set is normalised with its own
        statistics, so predictions for one query image depend on the others (transductive).
        ``"running"`` tracks running statistics (use the model in ``eval()`` mode to test with
        them); ``"none"`` drops BatchNorm.

    ``head_init``:
        ``"torch"`` (default) keeps PyTorch's initialisation of the linear head. ``"zeros"``
        starts the head at zero, after the zeroing trick of Kao et al. (ICLR 2022, "MAML is a
        noisy contrastive learner in classification"), who re-zero it before every outer step:
        labels are permuted in every task, so whatever the initial head says about class ``c``
        is noise that the inner step must first undo.
        From zero, one inner SGD step of size ``alpha`` on a balanced support set sets row ``c``
        of the head to ``alpha / n_way * (mu_c - mu)``, where ``mu_c`` is the mean feature of
        class ``c``'s support images and ``mu`` that of all of them, and leaves the bias at zero:
        a prototype classifier (``tests/test_tasks_models.py`` checks this).

    ``bn_steps``: MAML++'s per-step BatchNorm, one row of BatchNorm weights and biases per inner
    step (:class:`BatchNorm` with ``steps``; transductive mode only).
    """

    def __init__(
        self,
        n_way: int,
        *,
        in_channels: int = 1,
        filters: int = 64,
        image_size: int = 28,
        batch_norm: str = "transductive",
        head_init: str = "torch",
        bn_steps: int | None = None,
    ):
        super().__init__()
        checks.one_of("batch_norm", batch_norm, BATCH_NORM_MODES)
        checks.one_of("head_init", head_init, HEAD_INITS)
        filters = checks.positive_int("filters", filters)
        size = checks.positive_int("image_size", image_size)
        blocks = []
        channels = checks.positive_int("in_channels", in_channels)
        for _ in range(4):
            pool = size >= 2  # stop pooling once the map is 1x1, as 'SAME' pooling would
            blocks.append(conv_block(channels, filters, batch_norm, pool, bn_steps))
            channels, size = filters, size // 2 if pool else size
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(filters * size * size, checks.positive_int("n_way", n_way))
        if head_init == "zeros":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[batch, in_channels, image_size, image_size]`` -> logits ``[batch, n_way]``."""
        return self.head(self.body(x))


def step_buffers(model: nn.Module):
    """MAML++'s per-step BatchNorm hook for :func:`mmtl_lib.inner_loop`: ``j -> buffers`` that make
    every :class:`BatchNorm` with ``steps`` use row ``min(j, steps - 1)`` of its weights and
    biases; ``None`` if the model has no such layer (then nothing changes).

    Inner step ``j`` (``j = 0, ..., k - 1``) runs its support forward with ``step_buffers(j)``
    and the query is scored at ``phi_j`` with ``step_buffers(j - 1)`` (``phi_0``: row 0), as in
    Antoniou et al.'s code. Steps beyond the rows (a longer test-time loop) reuse the last row.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BatchNorm) and m.steps is not None}
    if not layers:
        return None

    def buffers(j: int) -> dict[str, Tensor]:
        return {f"{name}.step": torch.tensor(min(max(j, 0), m.steps - 1), device=m.weight.device)
                for name, m in layers.items()}

    return buffers


def prototype_head(features: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
    """Proto-MAML's head (Triantafillou et al. 2020): a linear layer equal to a prototypical network.

    With the prototypes ``c_n`` (mean feature of class ``n``'s support examples), ``W_n = 2 c_n``
    and ``b_n = -||c_n||^2``, so that ``W h + b = -||h - c_n||^2 + ||h||^2``: the squared-Euclidean
    ProtoNet logits up to a term the same for every class (which the softmax ignores).

    Args:
        features: ``[n_support, d]`` support features (the body's output).
        labels: ``[n_support]`` integer labels in ``0, ..., n_way - 1``, every class present.
        n_way: the number of classes.

    Returns:
        ``(weight [n_way, d], bias [n_way])``, differentiable w.r.t. ``features``. Written with a
        comparison matrix rather than indexing, so that it runs under :func:`torch.func.vmap`.
    """
    n_way = checks.positive_int("n_way", n_way)
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise checks.ConfigError(f"features must be [n_support, d] and labels [n_support], got "
                                 f"{tuple(features.shape)} and {tuple(labels.shape)}")
    onehot = (labels[:, None] == torch.arange(n_way, device=labels.device)).to(features.dtype)  # [n, N]
    prototypes = (onehot.T @ features) / onehot.sum(0)[:, None]  # [N, d]
    return 2 * prototypes, -(prototypes * prototypes).sum(-1)


def head_names(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model.head``: the ones ANIL adapts."""
    if not isinstance(getattr(model, "head", None), nn.Module):
        raise checks.ConfigError(f"{type(model).__name__} has no submodule 'head' to adapt")
    return [f"head.{n}" for n, _ in model.head.named_parameters()]


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018), ``h -> gamma * h + delta``.

    The scale ``gamma`` and the shift ``delta`` ``[features]`` are the buffers ``gamma`` and
    ``beta`` (the paper's names), set to the identity: a task's modulation replaces them through
    :func:`torch.func.functional_call`, never by assignment.
    """

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("gamma", torch.ones(features), persistent=False)
        self.register_buffer("beta", torch.zeros(features), persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        return h * self.gamma + self.beta


class FiLMMLP(MLP):
    """:class:`MLP` with every hidden pre-activation modulated, as in MMAML's regressor:
    ``h_l = ReLU(gamma_l * (W_l h_{l-1} + b_l) + delta_l)``, with the FiLM scale ``gamma_l`` and
    shift ``delta_l`` (the paper's ``beta_l``).

    Its parameters have the MLP's names. The modulation lives in buffers ``film.{l}.gamma``
    (``gamma_l``) and ``film.{l}.beta`` (``delta_l``) ``[hidden[l]]``, at the identity by
    default, so ``FiLMMLP(...)(x)`` is the plain MLP; pass a task's modulation as ``buffers``
    to :func:`mmtl_lib.adapt` and :func:`mmtl_lib.forward`: adapt then keeps it fixed (it
    adapts parameters only) while autograd still reaches whatever computed it
    (:class:`mmtl_lib.MMAML`).
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

    The book's ``E_omega``: ``e = rho(mean_i phi([x_i, y_i]))`` (Deep Sets, Zaheer et al. 2017; the
    book's ``MLP_2`` and ``MLP_1``), then a linear map to every scale ``gamma`` and shift ``delta``
    (the buffers ``gamma`` and ``beta`` of :class:`FiLMMLP`). MMAML's regression encoder is a
    recurrent network over the support examples; the mean-pooled MLP is the permutation-invariant
    choice and was enough here. The last layer starts at zero and ``gamma = 1 + output``, so that at
    initialisation every task gets the identity modulation and MMAML starts exactly as MAML, which
    makes the comparison with MAML clean. (A random start trained about as well in our sinusoid
    runs; the inner-gradient clipping of :class:`MMAML` is what training needed.)

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
