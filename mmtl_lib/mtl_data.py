"""Data for multi-task learning: Omniglot alphabets as tasks, and GradNorm's synthetic regression tasks.

* :func:`alphabet_tasks` turns Omniglot (:func:`mmtl_lib.data.load_omniglot`) into one
  classification task per alphabet, the classes of a task being that alphabet's characters, and
  splits every character's 20 drawings by *drawer*: the same drawers train, the others test.
  Unlike a few-shot split, the test characters are the training characters: multi-task learning
  learns these tasks themselves, and what is tested is how well it learned them, on drawings it
  has not seen.
* :func:`gradnorm_regression` draws the synthetic family of Chen et al. (2018, sec. 4): regression
  tasks ``f_t(x) = sigma_t tanh((B + eps_t) x)`` that share ``B``, with scales ``sigma_t`` that
  make the task losses differ by orders of magnitude.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import checks
from .data import DRAWERS
from .errors import ConfigError

ALPHABETS = (
    "Braille", "Cyrillic", "Futurama", "Greek", "Hebrew", "Japanese_(hiragana)", "Latin", "Tifinagh",
)
"""The book's 8 Omniglot alphabets for multi-task learning: 264 characters from ``images_background``,
22 to 55 per alphabet, scripts that look alike (Latin, Greek, Cyrillic) and some that look like
nothing else (Braille's dots, Tifinagh's geometric shapes)."""

TRAIN_DRAWERS = tuple(range(15))
"""Drawers (0-based, in file-name order ``XXXX_01.png`` .. ``XXXX_20.png``) whose drawings train;
the other five (15-19) test. The same for every character."""


class AlphabetTask(NamedTuple):
    """One alphabet as a classification task.

    Attributes:
        train: ``(x, y)``: ``x`` float32 ``[n_characters * len(train_drawers), 1, S, S]`` in
            ``[0, 1]`` (ink 1), ``y`` int64 labels ``0 .. n_characters - 1``.
        test: the same for the other drawers.
        characters: the names ``"Alphabet/characterNN"`` of the classes in label order: label
            ``c`` is ``characters[c]``.
    """

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    characters: tuple[str, ...]


def alphabet_tasks(
    images: Tensor,
    characters: Sequence[str],
    alphabets: Sequence[str] = ALPHABETS,
    *,
    train_drawers: Sequence[int] = TRAIN_DRAWERS,
) -> dict[str, AlphabetTask]:
    """One classification task per alphabet, split by drawer.

    Args:
        images: ``uint8`` ``[n_characters, 20, S, S]``, ``OmniglotImages.images``.
        characters: the names ``"Alphabet/characterNN"`` of its rows, ``OmniglotImages.characters``.
        alphabets: the alphabets to make tasks of, in the order of the returned dict.
        train_drawers: the drawers (0-19) whose drawings form the training sets; the other
            drawers form the test sets. Default: 0-14, leaving 5 test drawings per character.

    Returns:
        alphabet -> :class:`AlphabetTask`. Examples are ordered drawer by drawer, and within a
        drawer by label, so ``x[d * n_characters + c]`` is drawer ``train_drawers[d]``'s drawing
        of character ``c``.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != DRAWERS:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"images has shape {shape}: it must be [n_characters, {DRAWERS}, S, S]")
    characters = list(characters)
    if len(characters) != images.shape[0]:
        raise ConfigError(f"characters has {len(characters)} names for {images.shape[0]} rows of images")
    alphabets = list(alphabets)
    if not alphabets or len(set(alphabets)) != len(alphabets):
        raise ConfigError(f"alphabets = {alphabets} is not allowed: give at least one, each once")
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(characters):
        rows.setdefault(name.split("/")[0], []).append(i)
    unknown = [a for a in alphabets if a not in rows]
    if unknown:
        raise ConfigError(f"alphabets {unknown} are not in the data: the alphabets are {sorted(rows)}")
    train = list(train_drawers)
    if (not train or len(set(train)) != len(train) or len(train) >= DRAWERS
            or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or not 0 <= d < DRAWERS
                   for d in train)):
        raise ConfigError(f"train_drawers = {train_drawers!r} is not allowed: it must be 1 to {DRAWERS - 1} "
                         f"distinct drawers in 0..{DRAWERS - 1}, so that some drawers are left to test")
    test = [d for d in range(DRAWERS) if d not in train]

    def split(index: Tensor, drawers: list[int]) -> tuple[Tensor, Tensor]:
        x = images[index][:, drawers].transpose(0, 1)  # [drawers, characters, S, S]
        labels = torch.arange(len(index)).repeat(len(drawers))
        return x.reshape(-1, 1, *images.shape[2:]).float().div_(255), labels

    tasks = {}
    for alphabet in alphabets:
        index = torch.tensor(rows[alphabet])
        tasks[alphabet] = AlphabetTask(split(index, train), split(index, test),
                                       tuple(characters[i] for i in rows[alphabet]))
    return tasks


class RegressionTasks(NamedTuple):
    """GradNorm's synthetic tasks, sampled.

    Attributes:
        sigma: the task scales ``[T]``.
        train: ``(x, y)``, ``x`` ``[n_train, 250]``, ``y`` ``[n_train, T, 100]``: every input has a
            target for every task.
        test: the same with ``n_test`` fresh inputs.
    """

    sigma: Tensor
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def gradnorm_regression(
    n_tasks: int = 10,
    *,
    n_train: int = 1000,
    n_test: int = 5000,
    max_sigma: float = 100.0,
    b_std: float = 1.0,
    eps_std: float = 0.35,
    in_features: int = 250,
    out_features: int = 100,
    generator: torch.Generator | None = None,
) -> RegressionTasks:
    """GradNorm's synthetic regression tasks (Chen et al. 2018, sec. 4), as ``benchmarks/mtl_synthetic.py``.

    .. math:: f_t(x) = \\sigma_t \\tanh\\bigl((B + \\epsilon_t)\\, x\\bigr)

    ``B`` ``[out, in]`` is shared by all tasks, ``eps_t`` is task ``t``'s own, with entries
    i.i.d. ``N(0, b_std^2)`` and ``N(0, eps_std^2)``: ``eps_std / b_std`` sets how related the
    tasks are (the paper's 3.5 / 10). The scales ``sigma_t`` are log-spaced over
    ``[1, max_sigma]``. Inputs are uniform on ``[-1, 1]^in`` rescaled to unit norm; the returned
    ``x`` is multiplied by ``sqrt(in_features)`` so that the network sees features of variance ~1.
    ``benchmarks/mtl_synthetic.py`` draws its problems with it.
    """
    n_tasks = checks.positive_int("n_tasks", n_tasks)
    for name, value in (("n_train", n_train), ("n_test", n_test), ("in_features", in_features),
                        ("out_features", out_features)):
        checks.positive_int(name, value)
    if isinstance(max_sigma, bool) or not isinstance(max_sigma, numbers.Real) or not max_sigma >= 1:
        raise ConfigError(f"max_sigma = {max_sigma!r} is not allowed: it must be a number >= 1")
    checks.positive_float("b_std", b_std)
    checks.positive_float("eps_std", eps_std)
    g = generator
    sigma = torch.logspace(0, torch.log10(torch.tensor(float(max_sigma))).item(), n_tasks)
    B = b_std * torch.randn(out_features, in_features, generator=g)
    eps = eps_std * torch.randn(n_tasks, out_features, in_features, generator=g)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = 2 * torch.rand(n, in_features, generator=g) - 1
        x = x / x.norm(dim=1, keepdim=True)
        y = sigma[None, :, None] * torch.tanh(torch.einsum("toi,ni->nto", B + eps, x))
        return x * in_features**0.5, y

    return RegressionTasks(sigma, sample(n_train), sample(n_test))
