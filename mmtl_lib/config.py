"""Experiment configurations: a typed, validated :class:`Config`, the papers' presets, and the
builders that turn a configuration into samplers, a learner and a trainer.

A :class:`Config` is a frozen dataclass of plain values, so it can be stored inside a checkpoint
(as :meth:`Config.to_dict`, loaded with ``weights_only=True``), printed, and overridden from the
command line. Every field is checked when the object is made, and :func:`preset` also refuses an
override that the chosen algorithm or task would ignore, so a mistyped or meaningless setting is
refused by name before any data is read.

A checkpoint of the command line records its configuration and the identity of its data
(:func:`data_identity`); :func:`checkpoint_config` and :func:`check_data` read them back and
refuse, by name, a checkpoint of another version or data that are not what it was trained on.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from . import checks
from .baselines import JointTraining, PretrainClassifier
from .data import DRAWERS, ROTATIONS, SPLITS, EpisodeSampler, omniglot_tasks
from .distributed import World
from .errors import ConfigError, DataError
from .evaluation import accuracy
from .learners import MAML, Learner, Reptile
from .models import HEAD_INITS, MLP, Conv4, head_names
from .objective import BACKENDS
from .optim import adam, sgd
from .tasks import Sampler, Sinusoid
from .train import OPTIMIZERS, SCHEDULES, Trainer

MAML_FAMILY = ("maml", "fomaml", "metasgd", "anil", "maml++", "protomaml")
ALGORITHMS = (*MAML_FAMILY, "reptile", "pretrain")
TASKS = ("omniglot", "sinusoid")
INNER_OPTIMIZERS = ("sgd", "adam")

OMNIGLOT_KEYS = ("split", "rotation", "image_size", "filters", "head_init", "n_way")
USED_BY = {
    "inner_steps": (*MAML_FAMILY, "reptile"),
    "inner_optimizer": (*MAML_FAMILY, "reptile"),
    "inner_batch_size": ("reptile",),
    "inner_grad_clip": MAML_FAMILY,
    "backend": MAML_FAMILY,
    "chunk_size": MAML_FAMILY,
    "recompute_inner": tuple(a for a in MAML_FAMILY if a != "fomaml"),
}
"""Keys that only some algorithms read: an override of one of them for another is refused."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Config:
    """One experiment, every field checked on creation (:class:`~mmtl_lib.errors.ConfigError`).

    The defaults are the MAML paper's 5-way 1-shot Omniglot set-up (Finn et al. 2017, sec. 5.2).
    ``k_shot`` and ``n_query`` are the test protocol's; ``train_k_shot`` and ``train_n_query``,
    when set, size the training tasks only. The command line checkpoints every
    ``checkpoint_every`` iterations and whenever ``checkpoint_minutes`` have passed since the
    last checkpoint, so that a crash loses little.
    """

    task: str = "omniglot"
    algorithm: str = "maml"
    split: str = "maml"
    rotation: str = "random"
    image_size: int = 28
    filters: int = 64
    head_init: str = "torch"
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15
    train_k_shot: int | None = None
    train_n_query: int | None = None
    inner_lr: float = 0.4
    inner_steps: int = 1
    test_inner_steps: int = 3
    inner_optimizer: str = "sgd"
    inner_batch_size: int | None = None
    inner_grad_clip: float | None = None
    meta_batch_size: int = 32
    iterations: int = 60_000
    outer_lr: float = 1e-3
    outer_optimizer: str = "adam"
    schedule: str = "constant"
    final_lr_fraction: float = 0.0
    outer_grad_clip: float | None = None
    backend: str = "vmap"
    chunk_size: int | None = None
    recompute_inner: bool = False
    val_every: int = 1000
    val_tasks: int = 200
    test_tasks: int = 600
    time_budget: float | None = None
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 5.0
    seed: int = 0
    amp: bool = False
    tf32: bool = False
    preset: str | None = None

    def __post_init__(self):
        checks.one_of("task", self.task, TASKS)
        checks.one_of("algorithm", self.algorithm, ALGORITHMS)
        checks.one_of("split", self.split, SPLITS)
        checks.one_of("rotation", self.rotation, ROTATIONS)
        checks.one_of("head_init", self.head_init, HEAD_INITS)
        checks.one_of("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        checks.one_of("outer_optimizer", self.outer_optimizer, OPTIMIZERS)
        checks.one_of("schedule", self.schedule, SCHEDULES)
        checks.one_of("backend", self.backend, BACKENDS)
        for key in ("image_size", "filters", "n_way", "k_shot", "n_query", "inner_steps", "test_inner_steps",
                    "meta_batch_size", "iterations", "val_every", "val_tasks", "test_tasks", "checkpoint_every"):
            checks.positive_int(key, getattr(self, key))
        for key in ("train_k_shot", "train_n_query", "inner_batch_size", "chunk_size"):
            checks.optional_positive_int(key, getattr(self, key))
        for key in ("inner_lr", "outer_lr", "checkpoint_minutes"):
            checks.positive_float(key, getattr(self, key))
        for key in ("inner_grad_clip", "outer_grad_clip", "time_budget"):
            checks.optional_positive_float(key, getattr(self, key))
        if isinstance(self.final_lr_fraction, bool) or not isinstance(self.final_lr_fraction, numbers.Real) \
                or not 0 <= self.final_lr_fraction <= 1:
            raise ConfigError(f"final_lr_fraction = {self.final_lr_fraction!r} is not allowed: it must lie in [0, 1]")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed = {self.seed!r} is not allowed: it must be an integer >= 0")
        for key in ("amp", "tf32", "recompute_inner"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} = {getattr(self, key)!r} is not allowed: it must be True or False")
        if self.algorithm == "protomaml" and self.task != "omniglot":
            raise ConfigError(f"algorithm = 'protomaml' is not allowed for task = {self.task!r}: its prototype "
                              "head is a classifier's (task = 'omniglot')")
        if self.preset is not None and self.preset not in PRESETS:
            checks.one_of("preset", self.preset, PRESETS)
        if self.task == "omniglot":
            for k, q in ((self.k_shot, self.n_query), (self.train_shots, self.train_queries)):
                if k + q > DRAWERS:
                    raise ConfigError(f"k_shot + n_query = {k + q} exceeds the {DRAWERS} drawers per Omniglot "
                                      f"character (k_shot = {k}, n_query = {q})")

    @property
    def train_shots(self) -> int:
        """Support examples per class in training tasks."""
        return self.train_k_shot or self.k_shot

    @property
    def train_queries(self) -> int:
        """Query examples per class in training tasks."""
        return self.train_n_query or self.n_query

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """A configuration from plain values (e.g. a checkpoint's); unknown keys are refused."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; the keys are {', '.join(known)}")
        return cls(**values)

    def replace(self, **overrides) -> Config:
        """A copy with ``overrides`` applied and checked; unknown keys are refused."""
        return Config.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def unused(self, keys) -> list[str]:
        """Those of ``keys`` that this configuration's algorithm or task does not read."""
        out = []
        for key in keys:
            if key in USED_BY and self.algorithm not in USED_BY[key]:
                out.append(f"{key} (used by {', '.join(USED_BY[key])}, not {self.algorithm})")
            elif key in OMNIGLOT_KEYS and self.task != "omniglot":
                out.append(f"{key} (used by the omniglot task, not {self.task})")
            elif key == "chunk_size" and self.backend != "vmap":
                out.append("chunk_size (used by backend='vmap', not 'loop')")
            elif key == "recompute_inner" and self.backend not in ("loop", "vmap"):
                out.append(f"recompute_inner (used by backend='loop' and 'vmap', not {self.backend!r})")
        return out

    def describe(self) -> str:
        """One line: the setting in the papers' words."""
        if self.task == "sinusoid":
            return f"{self.algorithm} sinusoid K={self.k_shot}"
        return f"{self.algorithm} Omniglot {self.n_way}-way {self.k_shot}-shot"

    def metric(self):
        """Accuracy for classification, MSE for regression: what the papers report."""
        return F.mse_loss if self.task == "sinusoid" else accuracy


def _maml(n_way, k_shot, **kw):
    five = n_way == 5
    return dict(n_way=n_way, k_shot=k_shot, inner_lr=0.4 if five else 0.1, inner_steps=1 if five else 5,
                test_inner_steps=3 if five else 5, meta_batch_size=32 if five else 16, **kw)


def _reptile(n_way, k_shot):
    # Nichol et al. 2018, Omniglot (their run_omniglot.py): Adam inner loop with beta1 = 0,
    # 10 training shots per class, meta step 1 annealed linearly to 0, 50 test-time steps.
    five = n_way == 5
    return dict(algorithm="reptile", n_way=n_way, k_shot=k_shot, train_k_shot=10, n_query=1,
                inner_optimizer="adam", inner_lr=1e-3, inner_steps=5 if five else 10,
                inner_batch_size=10 if five else 20, test_inner_steps=50, meta_batch_size=5,
                iterations=100_000 if five else 200_000, outer_lr=1.0, outer_optimizer="sgd",
                schedule="linear", rotation="classes", split="vinyals")


PRESETS: dict[str, dict] = {
    # Finn et al. 2017, sec. 5.2: Conv4-64 on 28x28, meta lr 1e-3, 60k iterations.
    "maml-5w1s": _maml(5, 1),
    "maml-5w5s": _maml(5, 5),
    "maml-20w1s": _maml(20, 1),
    "maml-20w5s": _maml(20, 5),
    "fomaml-5w1s": _maml(5, 1, algorithm="fomaml"),
    "fomaml-20w1s": _maml(20, 1, algorithm="fomaml"),
    "reptile-5w1s": _reptile(5, 1),
    "reptile-5w5s": _reptile(5, 5),
    "reptile-20w1s": _reptile(20, 1),
    "reptile-20w5s": _reptile(20, 5),
    # Chosen for 5 minutes of training on a 2-core laptop CPU, one thread (benchmarks/cpu_budget.py):
    # small images and a narrow network make each task ~16x cheaper, 2 query images per class in
    # training (the test keeps 15) ~3x cheaper again; upright characters only, a zero head (Kao et al.
    # 2022) and a 5x larger meta learning rate, annealed over the iterations, learn faster in a short
    # run. A fixed number of iterations, not seconds, so that every machine computes the same run:
    # 6,800, what the book's CPU made in those 5 minutes (a time budget is the command line's
    # --time-budget).
    "cpu": dict(n_way=5, k_shot=1, n_query=15, train_n_query=2, image_size=14, filters=32, head_init="zeros",
                rotation="none", meta_batch_size=8, inner_lr=0.4, inner_steps=1, test_inner_steps=3,
                iterations=6_800, outer_lr=5e-3, schedule="cosine", final_lr_fraction=0.05,
                val_every=500, val_tasks=100),
    # The MAML paper's 5-way 1-shot set-up with MAML++'s stabilisers (Antoniou et al. 2019: multi-step
    # loss, per-step learning rates and BatchNorm, derivative-order annealing, cosine annealing of
    # the meta learning rate) and, as there, 5 inner steps in training and at test time.
    "maml++-5w1s": _maml(5, 1, algorithm="maml++") | dict(inner_lr=0.1, inner_steps=5, test_inner_steps=5,
                                                          schedule="cosine", final_lr_fraction=0.01),
    # Proto-MAML (Triantafillou et al. 2020) in the MAML paper's 5-way 1-shot set-up.
    "protomaml-5w1s": _maml(5, 1, algorithm="protomaml"),
    # Finn et al. 2017, sec. 5.1: K = 10, one step of size 0.01, meta-batch 25, 70k iterations.
    "sinusoid": dict(task="sinusoid", k_shot=10, n_query=10, inner_lr=0.01, inner_steps=1, test_inner_steps=10,
                     meta_batch_size=25, iterations=70_000, val_every=5000, val_tasks=500),
}


def preset(name: str, **overrides) -> Config:
    """The configuration ``name`` with ``overrides`` applied.

    Refuses, by name, an unknown preset or key, a bad value, and an override that the resulting
    algorithm or task does not read (e.g. ``inner_batch_size`` for MAML).
    """
    checks.one_of("preset", name, PRESETS)
    config = Config(**PRESETS[name], preset=name).replace(**overrides)
    unused = config.unused(overrides)
    if unused:
        raise ConfigError(f"these settings would be ignored: {'; '.join(unused)}")
    return config


def samplers(config: Config, device) -> dict[str, Sampler]:
    """``{"train", "val", "test"}`` -> the :class:`~mmtl_lib.Sampler` of each.

    Omniglot validation holds characters out of the training split (the MAML code's 100 of
    1200); validation and test tasks are never rotated at random. Training tasks have
    ``train_shots`` and ``train_queries`` examples per class; validation and test keep the
    protocol's ``k_shot`` and ``n_query``.
    """
    if config.task == "sinusoid":
        held_out = Sinusoid(config.k_shot, config.n_query, device=device)
        return {"train": Sinusoid(config.train_shots, config.train_queries, device=device),
                "val": held_out, "test": held_out}

    def make(subset, k_shot, n_query, rotation):
        return omniglot_tasks(
            config.split, subset, n_way=config.n_way, k_shot=k_shot, n_query=n_query,
            image_size=config.image_size, rotation=rotation, validation=True, device=device,
        )

    held_out = "none" if config.rotation == "random" else config.rotation
    return {
        "train": make("train", config.train_shots, config.train_queries, config.rotation),
        "val": make("val", config.k_shot, config.n_query, held_out),
        "test": make("test", config.k_shot, config.n_query, held_out),
    }


def build_learner(config: Config, device, n_classes: int | None = None) -> Learner:
    """The model and algorithm of ``config`` on ``device``, initialised from ``config.seed``.

    The seed is applied inside :func:`torch.random.fork_rng`, so the caller's random state is
    left as it was. ``n_classes``: the training split's class count, which the Omniglot
    pretraining baseline classifies.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.task == "sinusoid":
            model, loss_fn = MLP(1, (40, 40), 1).to(device), F.mse_loss
        else:
            # MAML++ (Antoniou et al. 2019) has BatchNorm weights and biases per inner step.
            model = Conv4(config.n_way, filters=config.filters, image_size=config.image_size,
                          head_init=config.head_init,
                          bn_steps=config.inner_steps if config.algorithm == "maml++" else None).to(device)
            loss_fn = F.cross_entropy
        if config.algorithm == "pretrain" and config.task == "omniglot":
            if n_classes is None:
                raise ConfigError("the pretrain baseline needs n_classes, the training split's class count")
            # Its pretraining head is initialised from the same seeded stream, after the model.
            return PretrainClassifier(model, n_classes, inner_lr=config.inner_lr,
                                      test_inner_steps=config.test_inner_steps)
    if config.algorithm == "pretrain":
        return JointTraining(model, loss_fn, inner_lr=config.inner_lr, test_inner_steps=config.test_inner_steps)
    if config.algorithm == "reptile":
        # The Reptile paper's inner Adam has beta1 = 0.
        optimizer = adam(betas=(0.0, 0.999)) if config.inner_optimizer == "adam" else sgd()
        return Reptile(
            model, loss_fn, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
            test_inner_steps=config.test_inner_steps, inner_optimizer=optimizer,
            inner_batch_size=config.inner_batch_size, generator=torch.Generator().manual_seed(config.seed),
        )
    return MAML(
        model, loss_fn, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
        test_inner_steps=config.test_inner_steps, first_order=config.algorithm == "fomaml",
        learn_inner_lr=config.algorithm == "metasgd",
        adapt_names=head_names(model) if config.algorithm == "anil" else None,
        inner_optimizer=adam() if config.inner_optimizer == "adam" else sgd(),
        inner_grad_clip=config.inner_grad_clip, backend=config.backend, chunk_size=config.chunk_size,
        recompute_inner=config.recompute_inner,
        proto_head=config.algorithm == "protomaml", **(_maml_plus_plus(config) if config.algorithm == "maml++" else {}),
    )


def _maml_plus_plus(config: Config) -> dict:
    # MAML++'s code anneals the multi-step loss over 15 of 150 epochs and turns to second order
    # after epoch 80: here the same fractions of `iterations`.
    return dict(learn_step_lrs=True, msl_iterations=max(1, config.iterations // 10),
                first_order_iterations=config.iterations * 8 // 15)


def check_world(config: Config, world: World) -> None:
    """Refuse, before any data is read, a configuration that ``world``'s processes cannot share:
    a meta-batch that does not split evenly over them, or an algorithm whose meta-gradient does
    not split (:func:`mmtl_lib.distributed.check_learner`, which the trainer applies to the
    learner itself)."""
    if not world.distributed:
        return
    world.check_meta_batch_size(config.meta_batch_size)
    if config.algorithm == "pretrain" and config.task == "omniglot":
        raise ConfigError(f"algorithm = 'pretrain' is not allowed with {world.world_size} processes on task = "
                          "'omniglot': it trains on the pooled images of the meta-batch through BatchNorm, whose "
                          "statistics would be those of a rank's share; train it in one process")


def build_trainer(config: Config, learner: Learner, samplers: dict, *, validate: bool = True,
                  world: World | None = None) -> Trainer:
    """The :class:`~mmtl_lib.Trainer` that runs ``config``'s outer loop (optimizer, learning-rate
    schedule, validation, AMP/TF32) on ``learner`` with tasks from ``samplers["train"]``.

    ``validate=False`` skips periodic validation, for runs that are scored only at the end.
    ``world``: the processes that share each meta-iteration (:mod:`mmtl_lib.distributed`).
    """
    return Trainer(
        learner, samplers["train"], meta_batch_size=config.meta_batch_size, outer_lr=config.outer_lr,
        optimizer=config.outer_optimizer, schedule=config.schedule, final_lr_fraction=config.final_lr_fraction,
        val_sampler=samplers["val"] if validate else None, val_every=config.val_every, val_tasks=config.val_tasks,
        metric=config.metric(), seed=config.seed, amp=config.amp, tf32=config.tf32,
        outer_grad_clip=config.outer_grad_clip, world=world,
    )


def iterations_per_second(history: list[dict]) -> float:
    """Meta-iterations per second of training over a :meth:`Trainer.fit` history."""
    if not history:
        return math.nan
    return history[-1]["iteration"] / max(history[-1]["seconds"], 1e-9)


def data_identity(samplers: dict[str, Sampler]) -> dict[str, dict]:
    """What each of ``samplers`` (``{"train", "val", "test"}`` -> sampler) draws from, in plain
    values for a checkpoint to record: Omniglot's :meth:`~mmtl_lib.EpisodeSampler.identity` (its
    classes' hash among them), or a sinusoid family's shape and ranges."""
    return {name: _identity(sampler) for name, sampler in samplers.items()}


def _identity(sampler: Sampler) -> dict:
    if isinstance(sampler, EpisodeSampler):
        return sampler.identity()
    return {"dataset": "sinusoid", "k_shot": sampler.k_shot, "n_query": sampler.n_query,
            "amplitude": list(sampler.amplitude), "phase": list(sampler.phase), "x_range": list(sampler.x_range)}


def checkpoint_config(state: dict, path) -> Config:
    """The :class:`Config` a checkpoint (:func:`~mmtl_lib.load_checkpoint`) was trained with.

    Raises :class:`~mmtl_lib.errors.DataError` naming ``path`` if it holds none (saved by
    :meth:`~mmtl_lib.Trainer.save` without ``config=``), if its keys are not this version's
    (written by an older or newer ``mmtl_lib``: a missing key must not silently take today's
    default), or if a value is not allowed.
    """
    values = state.get("config")
    if not isinstance(values, dict):
        raise DataError(f"checkpoint {str(path)!r} holds no configuration: it was not written by "
                        "`python -m mmtl_lib train` (Trainer.save without config=...)")
    known = [f.name for f in fields(Config)]
    missing, unknown = [k for k in known if k not in values], sorted(set(values) - set(known))
    if missing or unknown:
        differs = []
        if missing:
            differs.append(f"lacks the keys {missing}")
        if unknown:
            differs.append(f"has the unknown keys {unknown}")
        raise DataError(f"checkpoint {str(path)!r} was written by another version of mmtl_lib: its configuration "
                        f"{' and '.join(differs)}; train it again with this one")
    try:
        return Config.from_dict(values)
    except ConfigError as error:
        raise DataError(f"checkpoint {str(path)!r} holds a configuration that is not allowed: {error}") from error


def check_data(state: dict, samplers: dict[str, Sampler], path) -> None:
    """Refuse, with a :class:`~mmtl_lib.errors.DataError` saying what differs, ``samplers`` that do
    not draw from the data the checkpoint ``state`` recorded (:func:`data_identity`): e.g. a
    data folder with an alphabet missing, whose reshuffled split would test on trained classes."""
    recorded = state.get("data")
    if not isinstance(recorded, dict):
        raise DataError(f"checkpoint {str(path)!r} records no data identity: it was not written by "
                        "`python -m mmtl_lib train` (Trainer.save without data=...)")
    now = data_identity(samplers)
    differences = []
    for subset in [*now, *(s for s in recorded if s not in now)]:
        old, new = recorded.get(subset, {}), now.get(subset, {})
        keys = [k for k in [*old, *(k for k in new if k not in old)] if old.get(k) != new.get(k)]
        if keys:
            differences.append(f"the {subset} data differ from those it was trained with: " + ", ".join(
                f"{k} {old.get(k)!r} (checkpoint) vs {new.get(k)!r} (now)" for k in keys))
    if differences:
        raise DataError(f"checkpoint {str(path)!r}: " + "; ".join(differences))
