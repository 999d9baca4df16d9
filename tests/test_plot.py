"""The plotting helpers draw what they promise (Agg backend, no display)."""

import matplotlib

matplotlib.use("Agg")

import math  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmtl_lib import plot  # noqa: E402
from mmtl_lib.errors import ConfigError  # noqa: E402
from mmtl_lib.tasks import TaskBatch  # noqa: E402


def image_tasks(n_way=3, k_shot=2, n_query=4, size=6, tasks=2):
    labels = torch.arange(n_way)
    x_s = torch.rand(tasks, n_way * k_shot, 1, size, size)
    x_q = torch.rand(tasks, n_way * n_query, 1, size, size)
    y_s = labels.repeat_interleave(k_shot).expand(tasks, -1)
    y_q = labels.repeat_interleave(n_query).expand(tasks, -1)
    classes = torch.stack([torch.randperm(50)[:n_way] for _ in range(tasks)])
    return TaskBatch((x_s, y_s), (x_q, y_q), {"classes": classes})


def test_episode_places_each_labels_support_and_query_images_in_its_row():
    tasks = image_tasks()
    fig, ax = plt.subplots()
    plot.episode(ax, tasks, 1, max_query=3, pad=2, class_names={int(tasks.info["classes"][1, 0]): "alpha"})
    canvas = ax.get_images()[0].get_array()
    assert canvas.shape == (3 * 8 + 2, (2 + 1 + 3) * 8 + 2)  # 3 rows; 2 support, gap, 3 query
    size, step = 6, 8
    # label 1's second support image and its third query image, where the grid puts them
    assert torch.allclose(torch.as_tensor(canvas[2 + step:2 + step + size, 2 + step:2 + step + size]),
                          tasks.support[0][1][3, 0])
    query = tasks.query[0][1][4 + 2, 0]
    assert torch.allclose(torch.as_tensor(canvas[2 + step:2 + step + size, 2 + 5 * step:2 + 5 * step + size]), query)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "label 0\nalpha" and labels[2].startswith("label 2\nclass ")
    plt.close(fig)


def test_learning_curve_draws_training_and_validation_records_against_seconds():
    history = [{"iteration": 50, "seconds": 1.0, "metric": 0.3},
               {"iteration": 100, "seconds": 2.0, "metric": 0.5, "val_metric": 0.4},
               {"iteration": 150, "seconds": 3.0, "metric": 0.6, "val_metric": 0.55}]
    fig, ax = plt.subplots()
    plot.learning_curve(ax, history, x="seconds", label="MAML", scale=100)
    train, val = ax.get_lines()
    assert list(train.get_xdata()) == [1.0, 2.0, 3.0] and list(train.get_ydata()) == [30.0, 50.0, 60.0]
    assert list(val.get_xdata()) == [2.0, 3.0] and [round(v, 6) for v in val.get_ydata()] == [40.0, 55.0]
    assert val.get_color() == train.get_color() and val.get_label() == "MAML validation"
    with pytest.raises(ConfigError, match="neither"):
        plot.learning_curve(ax, [{"iteration": 1, "loss": math.pi}])
    plt.close(fig)
