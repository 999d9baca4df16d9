"""The sine-regression plotting helpers draw what they promise (Agg backend, no display)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import mmtl_lib as ml  # noqa: E402
from mmtl_lib import gaussian_ci95, plot  # noqa: E402


def test_smoothed_returns_block_means_at_block_centres_and_drops_the_tail():
    centres, means = plot.smoothed(torch.arange(7.0), window=3)
    assert centres.tolist() == [2.0, 5.0]  # iterations 1..3 and 4..6, counted from 1
    assert means.tolist() == [1.0, 4.0]
    with pytest.raises(ml.ConfigError, match="longer"):
        plot.smoothed([1.0, 2.0], window=3)


def test_error_curve_draws_the_mean_and_a_band_of_the_95_percent_interval():
    per_task = {0: torch.tensor([1.0, 3.0, 2.0]), 1: torch.tensor([0.5, 0.7, 0.6])}
    fig, ax = plt.subplots()
    plot.error_curve(ax, [0, 1], per_task, label="MAML")
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0, 1]
    assert [round(y, 6) for y in line.get_ydata()] == [2.0, 0.6]
    band = ax.collections[0].get_paths()[0].vertices
    mean, half = gaussian_ci95(per_task[0])
    assert band[:, 1].max() == pytest.approx(mean + half)
    assert band[:, 1].min() == pytest.approx(0.6 - gaussian_ci95(per_task[1])[1])
    plt.close(fig)
    # an Evaluation draws the same
    fig, ax = plt.subplots()
    plot.error_curve(ax, [0, 1], ml.Evaluation(per_task), label="MAML")
    assert [round(y, 6) for y in ax.get_lines()[0].get_ydata()] == [2.0, 0.6]
    assert (ax.collections[0].get_paths()[0].vertices == band).all()
    plt.close(fig)


def test_sine_task_and_predictions_draw_one_line_per_curve():
    fig, ax = plt.subplots()
    support = (torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]]))
    plot.sine_task(ax, 2.0, 0.0, support=support, n_points=11)
    x = torch.linspace(-5, 5, 11)
    plot.predictions(ax, x, {"pre-update": torch.zeros(11), "1 step": torch.ones(11)})
    truth, points, before, after = ax.get_lines()
    assert truth.get_ydata() == pytest.approx((2.0 * torch.sin(x)).tolist(), abs=1e-6)
    assert list(points.get_xdata()) == [0.0, 1.0]
    assert [before.get_label(), after.get_label()] == ["pre-update", "1 step"]
    assert before.get_color() != after.get_color()  # light to dark
    plt.close(fig)
