"""mmtl_lib: the library of the Meta Multi-Task Learning book.

Functional meta-learning in PyTorch: parameters live in dicts and go through
:func:`torch.func.functional_call`; inner loops are differentiable end to end.
"""

from . import mmtl, mtl
from .algorithms import (
    MAML,
    JointTraining,
    Learner,
    Reptile,
    Scratch,
    accuracy,
    anil,
    evaluate,
    first_order_maml,
    gaussian_ci95,
    meta_loss,
    meta_sgd,
    reptile_adapt,
    reptile_meta_gradient,
)
from .data import (
    EpisodeSampler,
    OmniglotImages,
    OmniglotNotFoundError,
    load_omniglot,
    omniglot_split,
    omniglot_tasks,
)
from .inner import adapt, forward
from .models import MLP, Conv4, head_names
from .runtime import default_device, generator, keep_freed_memory, machine, processor, set_threads
from .tasks import Sinusoid, TaskBatch

__version__ = "0.1.0"

__all__ = [
    "MAML", "MLP", "Conv4", "JointTraining", "Learner", "Reptile", "Scratch", "Sinusoid",
    "TaskBatch", "accuracy", "adapt", "anil", "default_device", "evaluate", "first_order_maml",
    "forward", "gaussian_ci95", "generator", "head_names", "keep_freed_memory", "machine", "meta_loss",
    "meta_sgd", "processor", "reptile_adapt", "reptile_meta_gradient", "set_threads",
    "EpisodeSampler", "OmniglotImages", "OmniglotNotFoundError", "load_omniglot", "omniglot_split",
    "omniglot_tasks", "mmtl", "mtl",
]
