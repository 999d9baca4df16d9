"""Named experiment configurations (the papers' settings) and the glue that builds them.

A configuration is a flat dict of plain values, so it can be stored inside a checkpoint (loaded
with ``weights_only=True``), printed, and overridden from the command line. :func:`build` turns
one into a learner and its task samplers.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from . import algorithms, checks
from .models import HEAD_INITS, MLP, Conv4
from .tasks import Sinusoid

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "reptile", "pretrain")
TASKS = ("omniglot", "sinusoid")

DEFAULTS = dict(
    task="omniglot", algorithm="maml", split="maml", rotation="random", image_size=28, filters=64, head_init="torch",
    n_way=5, k_shot=1, n_query=15, train_k_shot=None, train_n_query=None, inner_lr=0.4, steps=1, test_steps=3,
    meta_batch_size=32, iterations=60_000, outer_lr=1e-3, optimizer="adam", schedule="constant",
    final_lr_fraction=0.0, backend="vmap", chunk_size=None, inner_optimizer="sgd", inner_batch_size=None,
    val_every=1000, val_tasks=200, test_tasks=600, time_budget=None, seed=0, amp=False, tf32=False,
    grad_clip=None,
)


def _maml(n_way, k_shot, **kw):
    five = n_way == 5
    return dict(n_way=n_way, k_shot=k_shot, inner_lr=0.4 if five else 0.1, steps=1 if five else 5,
                test_steps=3 if five else 5, meta_batch_size=32 if five else 16, **kw)


def _reptile(n_way, k_shot):
    # Nichol et al. 2018, Omniglot (their run_omniglot.py): Adam inner loop with beta1 = 0,
    # 10 training shots per class, meta step 1 annealed linearly to 0, 50 test-time steps.
    five = n_way == 5
    return dict(algorithm="reptile", n_way=n_way, k_shot=k_shot, train_k_shot=10, n_query=1,
                inner_optimizer="adam", inner_lr=1e-3, steps=5 if five else 10,
                inner_batch_size=10 if five else 20, test_steps=50, meta_batch_size=5,
                iterations=100_000 if five else 200_000, outer_lr=1.0, optimizer="sgd",
                schedule="linear", backend="loop", rotation="classes", split="vinyals")


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
    # 5 minutes of training on a 2-core laptop CPU, one thread (benchmarks/cpu_budget.py): small
    # images and a narrow network make each task ~16x cheaper, 2 query images per class in training
    # (the test keeps 15) ~3x cheaper again; upright characters only, a zero head (Kao et al. 2022)
    # and a 5x larger meta learning rate, annealed over the time budget, learn faster in a short run.
    "cpu": dict(n_way=5, k_shot=1, n_query=15, train_n_query=2, image_size=14, filters=32, head_init="zeros",
                rotation="none", meta_batch_size=8, inner_lr=0.4, steps=1, test_steps=3, iterations=100_000,
                time_budget=300.0, outer_lr=5e-3, schedule="cosine", final_lr_fraction=0.05, val_every=500,
                val_tasks=100),
    # Finn et al. 2017, sec. 5.1: K = 10, one step of size 0.01, meta-batch 25, 70k iterations.
    "sinusoid": dict(task="sinusoid", k_shot=10, n_query=10, inner_lr=0.01, steps=1, test_steps=10,
                     meta_batch_size=25, iterations=70_000, val_every=5000, val_tasks=500),
}


def preset(name: str, **overrides) -> dict:
    """The configuration ``name`` with ``overrides`` applied; unknown names and keys raise."""
    checks.one_of("preset", name, PRESETS)
    config = {**copy.deepcopy(DEFAULTS), **PRESETS[name], "preset": name}
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown configuration keys {unknown}; the keys are {sorted(config)}")
    config.update(overrides)
    return validate(config)


def validate(config: dict) -> dict:
    checks.one_of("task", config["task"], TASKS)
    checks.one_of("algorithm", config["algorithm"], ALGORITHMS)
    checks.one_of("head_init", config["head_init"], HEAD_INITS)
    for key in ("n_way", "k_shot", "n_query", "steps", "test_steps", "meta_batch_size", "iterations",
                "image_size", "filters", "test_tasks", "val_tasks", "val_every"):
        checks.positive_int(key, config[key])
    for key in ("inner_lr", "outer_lr"):
        checks.positive_float(key, config[key])
    for key in ("train_k_shot", "train_n_query"):
        if config[key] is not None:
            checks.positive_int(key, config[key])
    if config["time_budget"] is not None:
        checks.positive_float("time_budget", config["time_budget"])
    return config


class SinusoidSampler:
    """Sinusoid tasks with fixed ``k_shot`` and ``n_query``, in the sampler interface."""

    def __init__(self, k_shot: int, n_query: int, device="cpu"):
        self.k_shot, self.n_query, self.device = k_shot, n_query, device

    def sample(self, meta_batch_size: int, *, generator=None):
        return Sinusoid().sample(meta_batch_size, self.k_shot, self.n_query, generator=generator, device=self.device)


def samplers(config: dict, device) -> dict:
    """``{"train", "val", "test"}`` -> a sampler with ``.sample(meta_batch_size, generator=g)``.

    Omniglot validation holds characters out of the training split (the MAML code's 100 of
    1200); validation and test tasks are never rotated at random. ``train_k_shot`` and
    ``train_n_query``, when set, size the training tasks only: validation and test keep the
    protocol's ``k_shot`` and ``n_query``.
    """
    train_k_shot = config["train_k_shot"] or config["k_shot"]
    train_n_query = config["train_n_query"] or config["n_query"]
    if config["task"] == "sinusoid":
        held_out = SinusoidSampler(config["k_shot"], config["n_query"], device)
        return {"train": SinusoidSampler(train_k_shot, train_n_query, device), "val": held_out, "test": held_out}
    from .data import omniglot_tasks

    def make(subset, k_shot, rotation, n_query=config["n_query"]):
        return omniglot_tasks(
            config["split"], subset, n_way=config["n_way"], k_shot=k_shot, n_query=n_query,
            image_size=config["image_size"], rotation=rotation, validation=True, device=device,
        )

    held_out = "none" if config["rotation"] == "random" else config["rotation"]
    return {
        "train": make("train", train_k_shot, config["rotation"], train_n_query),
        "val": make("val", config["k_shot"], held_out),
        "test": make("test", config["k_shot"], held_out),
    }


def build_learner(config: dict, device, n_classes: int | None = None) -> algorithms.Learner:
    """The model and algorithm of ``config``, on ``device``; seeded by ``config["seed"]``.

    ``n_classes``: the training split's class count, which the pretraining baseline classifies.
    """
    torch.manual_seed(config["seed"])
    if config["task"] == "sinusoid":
        model, loss_fn = MLP(1, (40, 40), 1), F.mse_loss
    else:
        model = Conv4(config["n_way"], filters=config["filters"], image_size=config["image_size"],
                      head_init=config["head_init"])
        loss_fn = F.cross_entropy
    model.to(device)
    name = config["algorithm"]
    if name == "reptile":
        return algorithms.Reptile(
            model, loss_fn, inner_lr=config["inner_lr"], steps=config["steps"], test_steps=config["test_steps"],
            inner_optimizer=config["inner_optimizer"], inner_batch_size=config["inner_batch_size"],
            generator=torch.Generator().manual_seed(config["seed"]),
        )
    if name == "pretrain":
        if config["task"] == "sinusoid":
            return algorithms.JointTraining(model, loss_fn, test_lr=config["inner_lr"],
                                            test_steps=config["test_steps"])
        if n_classes is None:
            raise ValueError("the pretrain baseline needs n_classes, the training split's class count")
        return algorithms.PretrainClassifier(model, n_classes, test_lr=config["inner_lr"],
                                             test_steps=config["test_steps"])
    return algorithms.MAML(
        model, loss_fn, inner_lr=config["inner_lr"], steps=config["steps"], test_steps=config["test_steps"],
        first_order=name == "fomaml", learn_inner_lr=name == "metasgd",
        adapt_names=algorithms.head_names(model) if name == "anil" else None,
        backend=config["backend"], chunk_size=config["chunk_size"], grad_clip=config["grad_clip"],
    )


def build_trainer(config: dict, learner: algorithms.Learner, samplers: dict, *, validate: bool = True):
    """The :class:`~mmtl_lib.train.Trainer` that runs ``config``'s outer loop (optimizer, learning-rate
    schedule, validation, AMP/TF32) on ``learner`` with tasks from ``samplers["train"]``.

    ``validate=False`` skips periodic validation, for runs that are scored only at the end.
    """
    from .train import Trainer

    return Trainer(
        learner, samplers["train"].sample, meta_batch_size=config["meta_batch_size"], outer_lr=config["outer_lr"],
        optimizer=config["optimizer"], schedule=config["schedule"], final_lr_fraction=config["final_lr_fraction"],
        val_sample=samplers["val"].sample if validate else None, val_every=config["val_every"],
        val_tasks=config["val_tasks"], metric=metric_for(config), seed=config["seed"], amp=config["amp"],
        tf32=config["tf32"],
    )


def metric_for(config: dict):
    """Accuracy for classification, MSE for regression: what the papers report."""
    return F.mse_loss if config["task"] == "sinusoid" else algorithms.accuracy


def describe(config: dict) -> str:
    """One line: the setting in the papers' words."""
    if config["task"] == "sinusoid":
        return f"{config['algorithm']} sinusoid K={config['k_shot']}"
    return f"{config['algorithm']} Omniglot {config['n_way']}-way {config['k_shot']}-shot"


def iterations_per_second(history: list[dict]) -> float:
    if not history:
        return math.nan
    return history[-1]["iteration"] / max(history[-1]["seconds"], 1e-9)
