"""Small plotting helpers for the chapters (matplotlib only, imported on demand).

Each function draws on an ``Axes`` it is given and returns it, so that a chapter keeps control of
the figure layout. Nothing here is imported by ``mmtl_lib`` itself: ``from mmtl_lib import plot``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .errors import ConfigError


def sine_task(ax, amplitude: float, phase: float, *, x_range=(-5.0, 5.0), support=None,
              label="ground truth", color="C3", n_points=200, **line_kw):
    """Draw the ground-truth sine ``amplitude * sin(x - phase)`` and, if given, its support set.

    Args:
        ax: a matplotlib ``Axes``.
        amplitude, phase: the task's parameters (floats or 0-dim tensors).
        support: ``(x, y)`` of shape ``[k_shot, 1]`` each, drawn as triangles.
        line_kw: passed to ``ax.plot`` for the sine.
    """
    x = torch.linspace(*x_range, n_points)
    ax.plot(x, float(amplitude) * torch.sin(x - float(phase)), color=color, label=label, **line_kw)
    if support is not None:
        sx, sy = support
        ax.plot(sx.flatten(), sy.flatten(), "^", color="C4", markersize=7, label="used for grad")
    return ax


def predictions(ax, x: Tensor, curves: Mapping[str, Tensor], *, cmap="Greens", linestyle=":"):
    """Draw one dotted line per entry of ``curves`` (label -> predictions at ``x``), in shades
    of ``cmap`` from light (first) to dark (last): e.g. before, after 1 and after 10 steps."""
    import matplotlib

    colors = matplotlib.colormaps[cmap]
    n = len(curves)
    for i, (label, y) in enumerate(curves.items()):
        shade = 0.4 + 0.55 * (i / max(n - 1, 1))
        ax.plot(x.flatten(), y.detach().flatten(), linestyle, color=colors(shade), linewidth=2,
                label=label)
    return ax


def error_curve(ax, steps: Sequence[int], per_task: Mapping[int, Tensor], *, label, color=None,
                marker="o", linestyle="-"):
    """Mean of a per-task metric against the number of steps, with a shaded 95% interval.

    Args:
        per_task: step -> ``[n_tasks]`` tensor, as returned by :func:`mmtl_lib.evaluate`.
    """
    from .evaluation import gaussian_ci95

    stats = [gaussian_ci95(per_task[s]) for s in steps]
    line, = ax.plot(steps, [m for m, _ in stats], marker=marker, linestyle=linestyle, color=color,
                    label=label)
    ax.fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats],
                    color=line.get_color(), alpha=0.2)
    return ax


def smoothed(values: Sequence[float] | Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Means of consecutive blocks of ``window`` values: ``(block centres, block means)``, for a
    readable training curve. A last, incomplete block is dropped."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if window < 1:
        raise ConfigError(f"window = {window!r} is not allowed: it must be an integer >= 1")
    n = values.numel() // window
    if n == 0:
        raise ConfigError(f"window = {window} is longer than the {values.numel()} values")
    means = values[: n * window].reshape(n, window).mean(1)
    centres = torch.arange(n, dtype=torch.float64) * window + (window + 1) / 2
    return centres, means


def episode(ax, tasks, i: int = 0, *, max_query: int = 5, pad: int = 2, class_names=None):
    """Draw task ``i`` of a meta-batch of image tasks as one grid: a row per label, its support
    images on the left and (up to ``max_query`` of) its query images on the right.

    Args:
        ax: a matplotlib ``Axes``.
        tasks: a :class:`~mmtl_lib.tasks.TaskBatch` of images ``[meta_batch_size, n, 1, h, w]``
            whose support and query are grouped by label (as :class:`~mmtl_lib.EpisodeSampler`
            draws them); with ``info["classes"]`` the rows name each label's class id.
        class_names: optional ``class id -> name`` (a mapping or a function) for the row labels.
    """
    task = tasks.task(i)
    (sx, sy), (qx, qy) = task.support, task.query
    n_way = int(sy.max()) + 1
    k_shot = int((sy == 0).sum())
    n_show = min(int((qy == 0).sum()), max_query)
    size = sx.shape[-1]
    cols = k_shot + 1 + n_show  # one blank column between support and query
    canvas = torch.full((n_way * (size + pad) + pad, cols * (size + pad) + pad), float("nan"))
    for label in range(n_way):
        images = [*sx[sy == label][:, 0], None, *qx[qy == label][:n_show, 0]]
        for col, image in enumerate(images):
            if image is not None:
                top, left = pad + label * (size + pad), pad + col * (size + pad)
                canvas[top:top + size, left:left + size] = image.detach().float().cpu()
    ax.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    rows = []
    for label in range(n_way):
        text = f"label {label}"
        if "classes" in task.info:
            cid = int(task.info["classes"][label])
            name = class_names(cid) if callable(class_names) else (class_names or {}).get(cid, f"class {cid}")
            text += f"\n{name}"
        rows.append(text)
    ax.set_yticks([pad + r * (size + pad) + size / 2 for r in range(n_way)], rows, fontsize=8)
    centre = lambda first, n: pad + (first + n / 2) * (size + pad) - pad / 2
    ax.set_xticks([centre(0, k_shot), centre(k_shot + 1, n_show)],
                  [f"support ({k_shot}-shot)", f"query (first {n_show})"])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return ax


def learning_curve(ax, history: Sequence[Mapping], *, x: str = "iteration", train_key: str = "metric",
                   val_key: str = "val_metric", label: str = "", color=None, scale: float = 1.0,
                   show_train: bool = True):
    """Draw a :class:`~mmtl_lib.train.Trainer` history: the training metric (each record is
    already a mean over ``log_every`` iterations) as a thin line and the validation metric as a
    line with markers, in one colour, against ``x`` (``"iteration"`` or ``"seconds"``).

    ``scale`` multiplies the values (100 for percent); ``label`` prefixes the legend entries.
    """
    train = [(r[x], r[train_key] * scale) for r in history if train_key in r]
    val = [(r[x], r[val_key] * scale) for r in history if val_key in r]
    if not train and not val:
        raise ConfigError(f"the history holds neither {train_key!r} nor {val_key!r}")
    if show_train and train:
        line, = ax.plot(*zip(*train), color=color, alpha=0.45, linewidth=1,
                        label=f"{label} training query".strip())
        color = line.get_color()
    if val:
        ax.plot(*zip(*val), marker="o", markersize=3, color=color, label=f"{label} validation".strip())
    return ax
