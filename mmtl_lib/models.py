"""The networks of the MAML paper, each split into a ``body`` and a ``head``.

The split names the parameters ANIL adapts (``head.*``) and the trunk that multi-task models
share. Parameters are used through :func:`torch.func.functional_call`; nothing here holds state
that adaptation could change, except BatchNorm's running statistics where a caller asks for them.
Also here: the FiLM-modulated MLP and the set encoder of MMAML.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks

BATCH_NORM_MODES = ("transductive", "running", "none")
HEAD_INITS = ("torch", "zeros")


_ELEMENTARY = ContextVar("mmtl_lib_elementary_batch_norm", default=False)


@contextmanager
def elementary_batch_norm() -> Iterator[None]:
    """Within this block every :class:`BatchNorm` computes the elementary-op formula, as under
    :func:`torch.func.vmap`. The ``"compile"`` backend traces its graph in here, so that Inductor
    fuses the same formula the vmap backend runs rather than its own decomposition of the fused
    kernel, and :class:`Conv2d` keeps the activations NCHW in here. Its float32 meta-gradient on
    the paper's Conv4 is about 3e-4 (relative norm) from the eager one on a Xeon CPU, against
    1e-5 between the eager backends; in float64 they agree to 1e-8 (``benchmarks/README.md``,
    ``tests/test_learners.py``)."""
    token = _ELEMENTARY.set(True)
    try:
        yield
    finally:
        _ELEMENTARY.reset(token)


def under_vmap() -> bool:
    """Whether the caller runs inside :func:`torch.func.vmap` (at any depth of nested transforms)."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        vmap = torch._C._functorch.TransformType.Vmap
        return any(i.key() == vmap for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):  # a torch without these internals: assume the worst
        return True


class BatchNorm(nn.Module):
    """Batch normalisation with the statistics of the batch at hand.

    Same function and parameter names (``weight``, ``bias``) as
    ``nn.BatchNorm2d(num_features, track_running_stats=False)``, for inputs ``[batch, C, ...]``,
    computed by whichever of two kernels is right where it runs:

    * eagerly outside :func:`torch.func.vmap` (the per-task ``"loop"`` backend, test time), the
      fused kernel, :func:`torch.nn.functional.batch_norm`: one pass over the activations
      instead of six, and its double backward is right. On the paper's Conv4 this made the loop
      backend's meta-iteration about 1.3x faster on a CPU.
    * under :func:`torch.func.vmap` (the ``"vmap"`` backend, Reptile's vmap) and in the graph
      the ``"compile"`` backend traces (:func:`elementary_batch_norm`), the same formula from
      elementary tensor ops. The fused kernel's backward has a batching rule that is wrong
      when differentiated a second time under vmap (pytorch/functorch#534): MAML's meta-gradient
      through the vmap backend came out wrong by ~100% on Conv4's conv biases. Written out,
      autograd and vmap see only means, subtractions and divisions, whose rules are right.

    The two agree to rounding (``tests/test_tasks_models.py``); ``tests/test_inner.py`` checks
    the second-order meta-gradient of each against float64 finite differences and
    ``tests/test_learners.py`` checks that the backends agree.

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
        weight, bias = self.weight, self.bias
        if self.steps is not None:
            weight, bias = weight[self.step], bias[self.step]
        # One value per channel (a single 1x1 example): the fused kernel refuses it, the formula
        # gives the bias (the example minus its own mean is 0), as it always did here.
        if _ELEMENTARY.get() or under_vmap() or x.numel() == x.shape[1]:
            return batch_norm_formula(x, weight, bias, self.eps)
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)


def batch_norm_formula(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """:class:`BatchNorm`'s function from means, subtractions and divisions (right under vmap)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)


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


def channels_last(x: Tensor) -> Tensor:
    """``x`` ``[N, C, H, W]`` with its memory laid out channels-last (NHWC), the same values.

    With one channel NCHW and NHWC hold the same bytes, but the strides still tell the
    convolution which layout to produce: this returns a view with the channels-last strides.
    Otherwise a copy (none if ``x`` already is channels-last).
    """
    if x.shape[1] == 1:
        if x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last):
            return x
        n, _, h, w = x.shape
        return x.reshape(n, h, w, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


class Conv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` that, on a CPU, lays its 4-d input out channels-last (NHWC).

    The same function (and the same parameters) as ``nn.Conv2d``; only the memory layout of the
    activations changes, and with it the order of some sums (float32 results agree to about
    1e-5 relative). Why: on a CPU oneDNN's convolutions, and PyTorch's max-pooling and batch
    normalisation, are several times faster on channels-last activations than on NCHW ones
    (max-pooling a 75 x 64 x 28 x 28 batch: 2 ms against 19 ms), and the layout carries through
    the layers that follow. On the paper's Conv4 a second-order MAML meta-iteration took 1.35x
    less CPU time. Inputs under :func:`torch.func.vmap` and on other devices are left as they
    are; in the compile backend's graph (:func:`elementary_batch_norm`) they are made NCHW.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.device.type == "cpu" and not under_vmap():
            # Not in the compile backend's graph, which runs BatchNorm's formula: its float32 sums
            # over the batch of channels-last activations lost enough precision to move that
            # backend's meta-gradient by 1.6e-3 (norm) on the paper's Conv4, against 1e-6 on NCHW.
            x = x.contiguous() if _ELEMENTARY.get() else channels_last(x)
        return super().forward(x)


def conv_block(in_channels: int, filters: int, batch_norm: str, pool: bool,
               bn_steps: int | None = None) -> nn.Sequential:
    """3x3 conv, BatchNorm, 2x2 max-pool (``nn.Identity`` if not ``pool``), ReLU.

    Pooling before the ReLU computes the same function as after it (both are monotone:
    ``max(relu(a), relu(b)) = relu(max(a, b))``) and the same gradients (a window whose
    maximum is <= 0 passes no gradient either way), with the ReLU on a quarter of the values.
    """
    layers: list[nn.Module] = [Conv2d(in_channels, filters, 3, padding=1)]
    if batch_norm != "none":
        layers.append(batch_norm_layer(filters, batch_norm, dims=2, steps=bn_steps))
    layers.append(nn.MaxPool2d(2) if pool else nn.Identity())
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """The MAML paper's Omniglot network: 4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool], linear head.

    Each block pools before its ReLU, the same function (:func:`conv_block`), and its
    convolutions run on channels-last activations on a CPU (:class:`Conv2d`), which made a
    second-order MAML meta-iteration about 1.4x faster there; ``tests/test_tasks_models.py``
    checks the function against the layers in the paper's order, in float64.

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
