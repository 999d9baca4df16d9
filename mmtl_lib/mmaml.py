"""Task-aware modulation: MMAML, one initialisation for a multimodal task distribution.

MMAML (Vuorio et al., NeurIPS 2019): a set encoder reads the support set and scales and shifts
(FiLM) the hidden units of the network before MAML's inner loop adapts its weights. It is
:class:`~mmtl_lib.MAML` with one hook changed: :meth:`MMAML.task_buffers` computes a task's
modulation from its support set, and :func:`mmtl_lib.meta_loss` passes it to the inner loop and
the query forward pass as the model's buffers, so the meta-gradient reaches the encoder through
every inner step. The network and the encoder are :class:`~mmtl_lib.FiLMMLP` and
:class:`~mmtl_lib.SetEncoder`; the tasks :class:`~mmtl_lib.MultimodalFunctions`. The third of
the book's three meta multi-task families.
"""

from __future__ import annotations

from torch import Tensor

from . import checks
from .inner import LossFn, Params
from .learners import MAML
from .models import FiLMMLP, SetEncoder


class MMAML(MAML):
    """Multimodal MAML: modulate with the set encoder, then adapt with MAML.

    The encoder is meta-trained with the network, through the inner loop. A task's adapted model
    (:meth:`adapt`) is the network's adapted parameters with the task's modulation as buffers, so
    :func:`mmtl_lib.evaluate` works unchanged.

    Args:
        model: a :class:`~mmtl_lib.FiLMMLP`.
        encoder: a :class:`~mmtl_lib.SetEncoder` for it.
        inner_grad_clip: clip each inner step's gradient to this norm; on the mixture of sines,
            lines and quadratics (targets up to ~13) the inner loop diverged without it.

    The other arguments are those of :class:`mmtl_lib.MAML`.
    """

    name = "mmaml"

    def __init__(self, model: FiLMMLP, encoder: SetEncoder, loss_fn: LossFn, *, inner_lr: float, inner_steps: int,
                 test_inner_steps: int | None = None, inner_grad_clip: float | None = None, backend: str = "vmap"):
        if backend == "compile":
            raise checks.ConfigError("backend='compile' is not allowed for MMAML: it treats task buffers as "
                                     "constants, and the modulation is learned; use backend='loop' or 'vmap'")
        super().__init__(model, loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                         test_inner_steps=test_inner_steps, inner_grad_clip=inner_grad_clip, backend=backend)
        self.encoder = encoder

    def task_buffers(self, support: tuple[Tensor, Tensor]) -> Params:
        """The task's modulation, ``film.{l}.gamma`` and ``film.{l}.beta`` ``[width]``, from its
        support set ``x`` ``[k_shot, in_features]``, ``y`` ``[k_shot, out_features]``."""
        x, y = support
        return {name: m[0] for name, m in self.encoder(x[None], y[None]).items()}

    def meta_parameters(self) -> list[Tensor]:
        return super().meta_parameters() + list(self.encoder.parameters())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "encoder": self.encoder.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.encoder.load_state_dict(state["encoder"])
