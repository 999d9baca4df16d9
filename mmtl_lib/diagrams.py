"""Conceptual diagrams of the book, drawn by code (matplotlib only, imported on demand).

* :func:`meta_learning_episodes`: meta-training and meta-test tasks, each split into a support
  and a query set, drawn with the tasks' own images;
* :func:`maml_graph`: the computation graph of a k-step MAML meta-gradient, with the
  second-order path that first-order MAML drops;
* :func:`parameter_sharing`: hard versus soft parameter sharing in multi-task learning.

Each function draws on the ``Axes`` it is given and returns it. Nothing here is imported by
``mmtl_lib`` itself: ``from mmtl_lib import diagrams``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import checks
from .errors import ConfigError
from .tasks import TaskBatch

SUPPORT_COLOR = "C0"
QUERY_COLOR = "C1"


def _box(ax, x, y, w, h, text="", *, color="0.3", fill="white", fontsize=10, **text_kw):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                edgecolor=color, facecolor=fill, linewidth=1.5))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, **text_kw)


def _arrow(ax, start, end, *, color="0.2", style="-|>", linestyle="-", rad=0.0, lw=1.5):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=14, color=color,
                                 linestyle=linestyle, linewidth=lw,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))


def _task_images(tasks: TaskBatch, i: int, which: str, n_per_class: int) -> list[list[torch.Tensor]]:
    x, y = getattr(tasks, which)
    x, y = x[i], y[i]
    rows = []
    for label in range(int(y.max()) + 1):
        rows.append([img[0] for img in x[y == label][:n_per_class]])
    return rows


def meta_learning_episodes(ax, train_tasks: TaskBatch, test_tasks: TaskBatch, *, n_train: int = 2,
                           n_test: int = 1, max_query: int = 2):
    """Draw ``n_train`` meta-training and ``n_test`` meta-test tasks side by side, each as a
    panel with its support set (one row per label, ``K`` images) and query set (``max_query``
    images per label, or fewer), framed in the support and query colours.

    Args:
        ax: a matplotlib ``Axes`` (its aspect is set to equal and its axes hidden).
        train_tasks, test_tasks: image :class:`~mmtl_lib.tasks.TaskBatch` es with ``x`` of
            shape ``[B, N * K, 1, H, W]`` and labels ``0..N-1``, e.g. from
            ``EpisodeSampler.sample``.
        n_train, n_test: how many tasks of each batch to draw (at most its ``n_tasks``).
        max_query: query images drawn per label.
    """
    for name, tasks, n in (("train_tasks", train_tasks, n_train), ("test_tasks", test_tasks, n_test)):
        if not isinstance(tasks, TaskBatch) or tasks.support[0].dim() != 5:
            raise ConfigError(f"{name} must be a TaskBatch of images [B, N*K, 1, H, W]")
        checks.int_in_range(f"n_{name.split('_')[0]}", n, low=1, high=tasks.n_tasks)
    checks.int_in_range("max_query", max_query, low=1)
    size = train_tasks.support[0].shape[-1]
    cell = 1.0
    gap = 0.6
    x0 = 0.0
    panels = [(train_tasks, i, "meta-training task") for i in range(n_train)]
    panels += [(test_tasks, i, "meta-test task") for i in range(n_test)]
    top = 0.0
    for p, (tasks, i, title) in enumerate(panels):
        support = _task_images(tasks, i, "support", n_per_class=10**6)
        query = _task_images(tasks, i, "query", n_per_class=max_query)
        n_way, k_shot, n_q = len(support), len(support[0]), len(query[0])
        height = n_way * cell
        for side, rows, left, color in (("support", support, x0, SUPPORT_COLOR),
                                        ("query", query, x0 + k_shot * cell + gap / 2, QUERY_COLOR)):
            width = len(rows[0]) * cell
            for r, row in enumerate(rows):
                for c, img in enumerate(row):
                    ax.imshow((1 - img.float().cpu()).numpy(), cmap="gray", vmin=0, vmax=1,
                              extent=(left + c * cell + 0.05, left + (c + 1) * cell - 0.05,
                                      -(r + 1) * cell + 0.05, -r * cell - 0.05))
            _box(ax, left - 0.05, -height - 0.05, width + 0.1, height + 0.1, color=color, fill="none")
            ax.text(left + width / 2, 0.25, side, ha="center", va="bottom", fontsize=9, color=color)
        width = (k_shot + n_q) * cell + gap / 2
        ax.text(x0 + width / 2, 0.9, f"{title} {i + 1}", ha="center", va="bottom", fontsize=10,
                weight="bold" if "test" in title else "normal")
        if p == n_train - 1:
            split_x = x0 + width + 1.1 * gap
            x0 += width + 2.2 * gap
        else:
            x0 += width + gap
        top = max(top, height)
    ax.axvline(split_x, color="0.6", linestyle=":", linewidth=1)
    ax.set_xlim(-0.3, x0 - gap + 0.3)
    ax.set_ylim(-top - 0.4, 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"{n_way}-way {k_shot}-shot episodes ({size}x{size} images)", fontsize=10)
    return ax


def maml_graph(ax, inner_steps: int = 2):
    """Draw the computation graph of MAML's outer loss for one task after ``inner_steps`` steps.

    Nodes: ``theta = phi_0 -> phi_1 -> ... -> phi_k -> L^q(phi_k)``; each step
    ``phi_{j+1} = phi_j - alpha grad L^s(phi_j)`` reads the support set. Solid black arrows are
    the forward pass; the blue backward path through the identity is all that first-order MAML
    keeps; the red path through ``grad L^s(phi_j)`` carries the Hessian terms
    ``-alpha H(phi_j)`` of the second-order meta-gradient.
    """
    checks.int_in_range("inner_steps", inner_steps, low=1, high=4)
    ax.set_xlim(-0.5, 3.0 * inner_steps + 3.6)
    ax.set_ylim(-1.8, 3.3)
    ax.axis("off")
    w, h = 1.3, 0.8
    xs = [3.0 * j for j in range(inner_steps + 1)]
    for j, x in enumerate(xs):
        label = r"$\theta = \phi^{(0)}$" if j == 0 else rf"$\phi^{{({j})}}$"
        _box(ax, x, 0, w, h, label, fontsize=12)
    for j in range(inner_steps):
        gx = xs[j] + 1.5
        _box(ax, gx, 1.4, 1.4, 0.7, rf"$\nabla\mathcal{{L}}^{{s}}(\phi^{{({j})}})$", fontsize=10,
             color=SUPPORT_COLOR)
        _arrow(ax, (xs[j] + w, h / 2), (xs[j + 1], h / 2))
        _arrow(ax, (xs[j] + w * 0.8, h), (gx + 0.3, 1.4), color="0.2")
        _arrow(ax, (gx + 1.1, 1.4), (xs[j + 1] + 0.3, h), color="0.2")
        ax.text(xs[j] + w + 0.85, h / 2 + 0.12, r"$-\alpha$", fontsize=9, ha="center")
        _arrow(ax, (xs[j + 1] + 0.2, -0.05), (xs[j] + w - 0.2, -0.05), color="C0", rad=-0.35,
               style="-|>", linestyle="--")
        ax.text((xs[j] + xs[j + 1] + w) / 2, -1.1, r"$I$", color="C0", ha="center", fontsize=11)
        _arrow(ax, (xs[j + 1] + 0.25, h + 0.05), (xs[j] + w - 0.25, h + 0.05), color="C3",
               linestyle="--", rad=0.95)
        ax.text((xs[j] + xs[j + 1] + w) / 2, 2.45, rf"$-\alpha H(\phi^{{({j})}})$", color="C3",
                ha="center", fontsize=10)
    lx = xs[-1] + 2.2
    _box(ax, lx, 0, 1.3, h, r"$\mathcal{L}^{q}(\phi^{(k)})$", color=QUERY_COLOR, fontsize=11)
    _arrow(ax, (xs[-1] + w, h / 2), (lx, h / 2))
    _arrow(ax, (lx + 0.2, -0.05), (xs[-1] + w - 0.2, -0.05), color="C0", rad=-0.35, linestyle="--")
    ax.text(0.0, -1.5, "forward pass (black); backward: first-order MAML keeps only the blue path, "
            "second-order MAML also the red Hessian terms", fontsize=9, color="0.25")
    return ax


def parameter_sharing(axes: Sequence, n_tasks: int = 3):
    """Draw hard parameter sharing (one shared trunk, a head per task) on ``axes[0]`` and soft
    sharing (one column per task, mixed by cross-stitch units) on ``axes[1]``."""
    checks.int_in_range("n_tasks", n_tasks, low=2, high=5)
    if len(axes) != 2:
        raise ConfigError(f"axes holds {len(axes)} Axes; parameter_sharing draws on exactly 2")
    hard, soft = axes
    layers = 3
    for ax in axes:
        ax.set_xlim(-0.3, 1.4 * n_tasks + 0.1)
        ax.set_ylim(-0.8, layers + 2.6)
        ax.axis("off")
    width = 1.4 * n_tasks - 0.4
    for layer in range(layers):
        _box(hard, 0, layer + 0.1, width, 0.7, f"shared layer {layer + 1}", fill="0.92")
        if layer:
            _arrow(hard, (width / 2, layer - 0.2), (width / 2, layer + 0.1))
    _box(hard, 0, -0.7, width, 0.5, r"input $x$", color="0.5")
    _arrow(hard, (width / 2, -0.2), (width / 2, 0.1))
    for t in range(n_tasks):
        x = 1.4 * t
        _box(hard, x, layers + 0.3, 1.0, 0.7, rf"head $\psi_{t + 1}$", color=f"C{t}")
        _arrow(hard, (width / 2, layers - 0.2), (x + 0.5, layers + 0.3))
        hard.text(x + 0.5, layers + 1.3, rf"$\hat y_{t + 1}$", ha="center", color=f"C{t}")
    hard.set_title("hard sharing: one trunk, one head per task", fontsize=10)
    for t in range(n_tasks):
        x = 1.4 * t
        for layer in range(layers + 1):
            _box(soft, x, layer + 0.1, 1.0, 0.7, f"task {t + 1}" if layer == layers else "",
                 color=f"C{t}", fill="white")
            if layer:
                _arrow(soft, (x + 0.5, layer - 0.2), (x + 0.5, layer + 0.1), color=f"C{t}")
        _arrow(soft, (x + 0.5, -0.2), (x + 0.5, 0.1), color=f"C{t}")
    _box(soft, 0, -0.7, width, 0.5, r"input $x$", color="0.5")
    for layer in range(1, layers + 1):
        for t in range(n_tasks - 1):
            x = 1.4 * t
            _arrow(soft, (x + 1.0, layer - 0.45), (x + 1.4, layer + 0.35), color="0.55", lw=1)
            _arrow(soft, (x + 1.4, layer - 0.45), (x + 1.0, layer + 0.35), color="0.55", lw=1)
    soft.text(width / 2, layers + 1.3, r"columns mixed by cross-stitch units $S$", ha="center",
              fontsize=9, color="0.3")
    soft.set_title("soft sharing: a column per task, linked", fontsize=10)
    return axes
