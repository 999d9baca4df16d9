"""The conceptual diagrams draw what their docstrings promise (Agg backend, no display)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import image_tasks  # noqa: E402

from mmtl_lib import ConfigError, Sinusoid, diagrams  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_episodes_draw_every_support_image_and_at_most_max_query_per_label():
    train = image_tasks(n_tasks=3, n_way=3, k_shot=2, n_query=4)
    test = image_tasks(n_tasks=2, n_way=3, k_shot=2, n_query=4, seed=1)
    _, ax = plt.subplots()
    diagrams.meta_learning_episodes(ax, train, test, n_train=2, n_test=1, max_query=3)
    # three panels, each 3 labels x (2 support + 3 query) images
    assert len(ax.images) == 3 * 3 * (2 + 3)
    titles = [t.get_text() for t in ax.texts if "task" in t.get_text()]
    assert titles == ["meta-training task 1", "meta-training task 2", "meta-test task 1"]


def test_episodes_refuse_non_image_tasks_and_too_many_panels():
    _, ax = plt.subplots()
    sines = Sinusoid(k_shot=5, n_query=5).sample(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="train_tasks must be a TaskBatch of images"):
        diagrams.meta_learning_episodes(ax, sines, image_tasks())
    with pytest.raises(ConfigError, match="n_test = 5 is not allowed: it must be an integer from 1 to 4"):
        diagrams.meta_learning_episodes(ax, image_tasks(), image_tasks(), n_test=5)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_graph_has_one_hessian_term_and_one_support_gradient_per_inner_step(steps):
    _, ax = plt.subplots()
    diagrams.maml_graph(ax, inner_steps=steps)
    texts = [t.get_text() for t in ax.texts]
    assert sum("H(" in t for t in texts) == steps
    assert sum(r"\nabla\mathcal{L}^{s}" in t for t in texts) == steps


def test_maml_graph_refuses_zero_steps():
    _, ax = plt.subplots()
    with pytest.raises(ConfigError, match="inner_steps = 0"):
        diagrams.maml_graph(ax, inner_steps=0)


def test_parameter_sharing_draws_a_head_per_task_and_a_column_per_task():
    _, axes = plt.subplots(1, 2)
    diagrams.parameter_sharing(axes, n_tasks=4)
    hard, soft = axes
    assert sum("head" in t.get_text() for t in hard.texts) == 4
    assert sum(t.get_text().startswith("task ") for t in soft.texts) == 4


def test_parameter_sharing_needs_two_axes():
    _, ax = plt.subplots()
    with pytest.raises(ConfigError, match="exactly 2"):
        diagrams.parameter_sharing([ax])
