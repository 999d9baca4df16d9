"""mmtl_lib: the library of the Meta Multi-Task Learning book.

Functional meta-learning in PyTorch: parameters live in dicts and go through
:func:`torch.func.functional_call`; inner loops are differentiable end to end.

Everything a reader uses is imported from here, ``import mmtl_lib as ml``; the list below is the
whole public surface (``ARCHITECTURE.md`` says which module owns what):

* the inner loop: :func:`adapt`, :func:`inner_loop`, :func:`forward`, :class:`Adapted`, inner
  optimizers :func:`sgd`, :func:`adam`, :class:`InnerOptimizer`;
* meta-objectives: :func:`meta_loss` (MAML++'s :func:`msl_weights`), :func:`reptile_meta_gradient`;
* learners: :class:`Learner`, :class:`MAML` (:func:`first_order_maml`, :func:`meta_sgd`,
  :func:`anil`), :class:`Reptile`; baselines :class:`JointTraining`, :class:`PretrainClassifier`,
  :class:`Scratch`; metric-based learners :class:`MetricLearner`, :class:`ProtoNet`,
  :class:`MatchingNet` (:func:`conv4_embedding`, :func:`prototypes`, :func:`matching_attention`);
* meta multi-task learning: :class:`LookaheadWeights` (:func:`lookahead_loss`,
  :func:`pack_targets`, :func:`task_losses`, :func:`weighted_loss`), :class:`TRMAML`
  (:func:`project_simplex`), :class:`MMAML`;
* multi-task learning: :class:`HardSharing`, :class:`CrossStitch`, :func:`cross_stitch_mlp`,
  the weightings :class:`EW`, :class:`UW`, :class:`GradNorm`, :class:`DWA`, :class:`PCGrad`,
  :class:`RLW`; data :func:`alphabet_tasks`, :func:`gradnorm_regression`;
* tasks: :class:`TaskBatch`, :class:`Sampler`, :class:`Sinusoid`, :class:`SinusoidTaskSet`,
  :class:`MultimodalFunctions`, Omniglot (:func:`omniglot_tasks`, :class:`EpisodeSampler`,
  :func:`load_omniglot`, :func:`omniglot_split`);
* models: :class:`MLP`, :class:`Conv4`, :class:`FiLMMLP`, :class:`SetEncoder`, :func:`head_names`,
  Proto-MAML's :func:`prototype_head`, per-step BatchNorm's :func:`step_buffers`;
* evaluation: :func:`evaluate`, :class:`Evaluation`, :func:`accuracy`, :func:`gaussian_ci95`,
  :func:`binned_means`;
* training and experiments: :class:`Trainer`, :func:`load_checkpoint`, :class:`Config`,
  :func:`preset`, :func:`build_learner`, :func:`build_trainer`, :func:`samplers`; several processes
  with ``torchrun``: :class:`World` (:mod:`mmtl_lib.distributed`);
* errors: :class:`ConfigError`, :class:`DataError`, :class:`NonFiniteLossError`,
  :class:`OmniglotNotFoundError`;
* the machine: :func:`set_threads`, :func:`default_device`, :func:`generator`,
  :func:`keep_freed_memory`, :func:`processor`, :func:`machine`.

The plotting helpers of the chapters are in :mod:`mmtl_lib.plot`, the book's conceptual
diagrams in :mod:`mmtl_lib.diagrams`.
"""

from .baselines import JointTraining, PretrainClassifier, Scratch
from .config import Config, build_learner, build_trainer, preset, samplers
from .data import EpisodeSampler, OmniglotNotFoundError, load_omniglot, omniglot_split, omniglot_tasks
from .distributed import World
from .errors import ConfigError, DataError
from .evaluation import Evaluation, accuracy, binned_means, evaluate, gaussian_ci95
from .inner import Adapted, adapt, forward, inner_loop
from .learners import MAML, Learner, Reptile, anil, first_order_maml, meta_sgd
from .lookahead import LookaheadWeights, lookahead_loss, pack_targets, task_losses, weighted_loss
from .metric import MatchingNet, MetricLearner, ProtoNet, conv4_embedding, matching_attention, prototypes
from .mmaml import MMAML
from .models import MLP, Conv4, FiLMMLP, SetEncoder, head_names, prototype_head, step_buffers
from .mtl import DWA, EW, RLW, UW, CrossStitch, GradNorm, HardSharing, PCGrad, cross_stitch_mlp
from .mtl_data import alphabet_tasks, gradnorm_regression
from .objective import meta_loss, msl_weights, reptile_meta_gradient
from .optim import InnerOptimizer, adam, sgd
from .runtime import default_device, generator, keep_freed_memory, machine, processor, set_threads
from .tasks import MultimodalFunctions, Sampler, Sinusoid, SinusoidTaskSet, TaskBatch
from .tr_maml import TRMAML, project_simplex
from .train import NonFiniteLossError, Trainer, load_checkpoint

__version__ = "0.2.0"

__all__ = [
    "adapt", "inner_loop", "forward", "Adapted", "sgd", "adam", "InnerOptimizer",
    "meta_loss", "msl_weights", "reptile_meta_gradient",
    "Learner", "MAML", "first_order_maml", "meta_sgd", "anil", "Reptile",
    "JointTraining", "PretrainClassifier", "Scratch",
    "MetricLearner", "ProtoNet", "MatchingNet", "conv4_embedding", "prototypes", "matching_attention",
    "LookaheadWeights", "lookahead_loss", "pack_targets", "task_losses", "weighted_loss",
    "TRMAML", "project_simplex", "MMAML",
    "HardSharing", "CrossStitch", "cross_stitch_mlp", "EW", "UW", "GradNorm", "DWA", "PCGrad", "RLW",
    "alphabet_tasks", "gradnorm_regression",
    "TaskBatch", "Sampler", "Sinusoid", "SinusoidTaskSet", "MultimodalFunctions",
    "omniglot_tasks", "EpisodeSampler", "load_omniglot", "omniglot_split",
    "MLP", "Conv4", "FiLMMLP", "SetEncoder", "head_names", "prototype_head", "step_buffers",
    "evaluate", "Evaluation", "accuracy", "gaussian_ci95", "binned_means",
    "Trainer", "load_checkpoint", "Config", "preset", "build_learner", "build_trainer", "samplers", "World",
    "ConfigError", "DataError", "NonFiniteLossError", "OmniglotNotFoundError",
    "set_threads", "default_device", "generator", "keep_freed_memory", "processor", "machine",
]
