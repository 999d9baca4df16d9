import math

import pytest
import torch

import mmtl_lib as ml


def test_sinusoid_matches_the_maml_paper_distribution():
    tasks = ml.Sinusoid().sample(2000, 5, 7, generator=ml.generator(0))
    (sx, sy), (_, qy) = tasks.support, tasks.query
    assert sx.shape == (2000, 5, 1) and qy.shape == (2000, 7, 1)
    amp, phase = tasks.info["amplitude"], tasks.info["phase"]
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and amp.mean().item() == pytest.approx(2.55, abs=0.1)
    assert 0 <= phase.min() and phase.max() <= math.pi
    assert -5 <= sx.min() and sx.max() <= 5
    assert torch.allclose(sy, amp[:, None, None] * torch.sin(sx - phase[:, None, None]))


def test_sampling_is_repeatable_by_seed():
    a = ml.Sinusoid().sample(3, 4, 4, generator=ml.generator(7))
    b = ml.Sinusoid().sample(3, 4, 4, generator=ml.generator(7))
    c = ml.Sinusoid().sample(3, 4, 4, generator=ml.generator(8))
    assert torch.equal(a.support[0], b.support[0]) and not torch.equal(a.support[0], c.support[0])


def test_task_batch_indexing_and_device_move():
    tasks = ml.Sinusoid().sample(3, 4, 5)
    t = tasks.task(1)
    assert t.support[0].shape == (4, 1) and t.info["amplitude"].shape == ()
    assert tasks.n_tasks == 3
    assert tasks.to("cpu").query[1].shape == (3, 5, 1)


def test_conv4_shapes_follow_the_maml_paper():
    model = ml.Conv4(5)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    assert model.head.in_features == 64
    assert sum(p.numel() for p in model.parameters()) == 112_261
    assert ml.head_names(model) == ["head.weight", "head.bias"]
    small = ml.Conv4(20, filters=16, image_size=14)
    assert small(torch.zeros(3, 1, 14, 14)).shape == (3, 20)


def test_mlp_is_the_40_40_sinusoid_regressor():
    model = ml.MLP(1, (40, 40), 1)
    assert [tuple(p.shape) for p in model.parameters()] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    fc = ml.MLP(784, (256, 128, 64, 64), 5, batch_norm="transductive")
    assert fc(torch.zeros(4, 1, 28, 28)).shape == (4, 5)


def test_default_device_and_threads():
    assert ml.default_device().type in {"cpu", "cuda", "mps"}
    assert ml.set_threads(1) == 1 and torch.get_num_threads() == 1


def test_library_batch_norm_equals_torch_batch_norm_in_value_and_gradient():
    torch.manual_seed(0)
    ours, theirs = ml.models.BatchNorm(3).double(), torch.nn.BatchNorm2d(3, track_running_stats=False).double()
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    a, b = ours(x), theirs(x)
    assert torch.allclose(a, b, atol=1e-12)
    ga = torch.autograd.grad((a ** 3).sum(), [x, ours.weight])
    gb = torch.autograd.grad((b ** 3).sum(), [x, theirs.weight])
    assert all(torch.allclose(u, v, atol=1e-10) for u, v in zip(ga, gb))


def test_benchmark_reports_record_the_machine(tmp_path, capsys):
    from mmtl_lib.runtime import machine, run_seeds, save_report

    results, seconds = run_seeds(lambda seed: seed * 2, 3)
    assert results == [0, 2, 4] and seconds >= 0
    save_report(str(tmp_path / "out" / "r.json"), {"x": 1})
    report = __import__("json").loads((tmp_path / "out" / "r.json").read_text())
    assert report == {"machine": machine(), "x": 1} and "torch" in report["machine"]


def test_processor_names_the_cpu_model_from_proc_cpuinfo(monkeypatch):
    import builtins
    import io
    import platform

    cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU @ 2.0GHz\n"
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO(cpuinfo)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert ml.processor("cpu") == "Example CPU @ 2.0GHz"
    assert ml.machine("cpu").startswith("Example CPU @ 2.0GHz, ")
    assert f"{torch.get_num_threads()} thread(s)" in ml.machine("cpu")
    cpuinfo = "processor\t: 0\n"  # some kernels (ARM) name no model: fall back to the platform's name
    assert ml.processor("cpu") == (platform.processor() or platform.machine())


def test_benchmark_argument_checks_name_the_option(capsys):
    import argparse

    from mmtl_lib.runtime import check_arguments

    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--methods", default="EW,STL")
    args = p.parse_args([])
    check_arguments(p, args, ("seeds",), ("EW", "STL"))
    assert args.methods == ["EW", "STL"]
    for argv, message in ((["--seeds", "0"], "--seeds = 0 is not allowed"), (["--methods", "EW,X"], "unknown ['X']")):
        with pytest.raises(SystemExit) as exit_info:
            check_arguments(p, p.parse_args(argv), ("seeds",), ("EW", "STL"))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_zero_head_takes_one_inner_step_to_a_prototype_classifier():
    torch.manual_seed(0)
    n_way, k_shot, alpha = 5, 2, 0.4
    model = ml.Conv4(n_way, filters=8, image_size=14, head_init="zeros").double()
    assert not model.head.weight.any() and not model.head.bias.any()
    x = torch.randn(n_way * k_shot, 1, 14, 14, dtype=torch.float64)
    y = torch.arange(n_way).repeat_interleave(k_shot)
    params = dict(model.named_parameters())
    adapted = ml.adapt(model, params, (x, y), torch.nn.functional.cross_entropy, steps=1, inner_lr=alpha)
    features = model.body(x).detach()
    mu_c = features.view(n_way, k_shot, -1).mean(1)
    expected = alpha / n_way * (mu_c - features.mean(0))
    torch.testing.assert_close(adapted["head.weight"], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adapted["head.bias"], torch.zeros(n_way, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(adapted["body.0.0.weight"], params["body.0.0.weight"])  # no signal reaches the body
    with pytest.raises(ValueError, match="head_init"):
        ml.Conv4(5, head_init="small")
