import math

import pytest
import torch

import mmtl_lib as ml


def test_sinusoid_matches_the_maml_paper_distribution():
    tasks = ml.Sinusoid(5, 7).sample(2000, generator=ml.generator(0))
    (sx, sy), (_, qy) = tasks.support, tasks.query
    assert sx.shape == (2000, 5, 1) and qy.shape == (2000, 7, 1)
    amp, phase = tasks.info["amplitude"], tasks.info["phase"]
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and amp.mean().item() == pytest.approx(2.55, abs=0.1)
    assert 0 <= phase.min() and phase.max() <= math.pi
    assert -5 <= sx.min() and sx.max() <= 5
    assert torch.allclose(sy, amp[:, None, None] * torch.sin(sx - phase[:, None, None]))


def test_sampling_is_repeatable_by_seed():
    a = ml.Sinusoid(4, 4).sample(3, generator=ml.generator(7))
    b = ml.Sinusoid(4, 4).sample(3, generator=ml.generator(7))
    c = ml.Sinusoid(4, 4).sample(3, generator=ml.generator(8))
    assert torch.equal(a.support[0], b.support[0]) and not torch.equal(a.support[0], c.support[0])


def test_task_batch_indexing_and_device_move():
    tasks = ml.Sinusoid(4, 5).sample(3)
    t = tasks.task(1)
    assert t.support[0].shape == (4, 1) and t.info["amplitude"].shape == ()
    assert tasks.n_tasks == 3 and tasks.check() is tasks
    assert tasks.to("cpu").query[1].shape == (3, 5, 1)
    part = tasks.slice(1, 3)
    assert part.n_tasks == 2 and torch.equal(part.support[0][0], t.support[0])
    assert torch.equal(part.info["phase"], tasks.info["phase"][1:])


def test_task_families_are_samplers_and_bound_methods_are_not():
    images = torch.zeros(6, 20, 4, 4, dtype=torch.uint8)
    families = [(ml.Sinusoid(2, 3), 3), (ml.SinusoidTaskSet.imbalanced(2, 3), 3), (ml.MultimodalFunctions(2, 3), 3),
                (ml.EpisodeSampler(images, torch.arange(6), 3, 2, 3), 3 * 3)]
    for family, n_query in families:
        assert isinstance(family, ml.Sampler)
        batch = family.sample(2, generator=ml.generator(0))
        assert isinstance(batch, ml.TaskBatch) and batch.n_tasks == 2 and batch.query[0].shape[1] == n_query
    assert not isinstance(ml.Sinusoid(2, 3).sample, ml.Sampler)


@pytest.mark.parametrize("call, match", [
    (lambda: ml.Sinusoid(0, 3), r"k_shot = 0 is not allowed"),
    (lambda: ml.Sinusoid(3, -1), r"n_query = -1 is not allowed"),
    (lambda: ml.Sinusoid(3, 3, amplitude=(5.0, 0.1)), r"amplitude = \(5.0, 0.1\) is not allowed"),
    (lambda: ml.Sinusoid(3, 3).sample(0), r"meta_batch_size = 0 is not allowed"),
    (lambda: ml.MultimodalFunctions(3, 3, modes=("cubic",)), r"modes = 'cubic' is not allowed"),
    (lambda: ml.MultimodalFunctions(3, 3, modes=()), r"modes is empty"),
    (lambda: ml.MultimodalFunctions(3, 3, noise_std=-1.0), r"noise_std = -1.0 is not allowed"),
    (lambda: ml.head_names(torch.nn.Linear(2, 2)), r"Linear has no submodule 'head'"),
    (lambda: ml.set_threads(0), r"n = 0 is not allowed"),
])
def test_task_families_and_models_refuse_bad_arguments_by_name(call, match):
    with pytest.raises(ml.ConfigError, match=match):
        call()


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


@pytest.mark.parametrize("steps", [None, 3])
def test_batch_norms_fused_and_elementary_kernels_compute_the_same_function(steps, monkeypatch):
    torch.manual_seed(0)
    bn = ml.models.BatchNorm(3, steps=steps).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for vmapped in (False, True):  # the kernel BatchNorm picks under torch.func.vmap
        monkeypatch.setattr(ml.models, "under_vmap", lambda vmapped=vmapped: vmapped)
        y = bn(x)
        results.append((y, torch.autograd.grad((y ** 3).sum(), [x, bn.weight, bn.bias], create_graph=True)))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert all(torch.allclose(u, v, rtol=1e-10, atol=1e-12) for u, v in zip(ga, gb))
    # and their second derivatives too: what MAML's meta-gradient differentiates
    second = [torch.autograd.grad(sum((g * g).sum() for g in grads), [x, bn.weight]) for _, grads in results]
    assert all(torch.allclose(u, v, rtol=1e-9, atol=1e-11) for u, v in zip(*second))


def test_under_vmap_sees_vmap_at_any_depth_of_transforms():
    seen = []

    def probe(x):
        seen.append(ml.models.under_vmap())
        return (x * x).sum()

    probe(torch.ones(2))
    torch.func.grad(probe)(torch.ones(2))
    torch.func.vmap(probe)(torch.ones(3, 2))
    torch.func.vmap(torch.func.grad(probe))(torch.ones(3, 2))
    assert seen == [False, False, True, True]


def papers_conv4(model: ml.Conv4) -> torch.nn.Module:
    """Conv4 from torch.nn layers in the paper's order (conv, BatchNorm, ReLU, pool), with ``model``'s weights."""
    def block(conv, bn, pool):
        layers = [torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1),
                  torch.nn.BatchNorm2d(conv.out_channels, track_running_stats=False), torch.nn.ReLU(),
                  torch.nn.MaxPool2d(2) if isinstance(pool, torch.nn.MaxPool2d) else torch.nn.Identity()]
        return torch.nn.Sequential(*layers)

    blocks = [block(b[0], b[1], b[2]) for b in list(model.body)[:4]]
    net = torch.nn.Module()
    net.body = torch.nn.Sequential(*blocks, torch.nn.Flatten())
    net.head = torch.nn.Linear(model.head.in_features, model.head.out_features)
    net.forward = lambda x: net.head(net.body(x))
    net.load_state_dict(model.state_dict())
    return net.to(next(model.parameters()).dtype)


def test_conv4_computes_the_papers_layer_order_on_channels_last_activations():
    # Conv4 pools before its ReLU and runs on channels-last activations on a CPU: the same
    # function, values and gradients, as the paper's layers in NCHW.
    torch.manual_seed(0)
    model = ml.Conv4(5, filters=8).double()
    reference = papers_conv4(model)
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(5).repeat(2)[:6]
    activations = []
    model.body[0][0].register_forward_hook(lambda m, i, o: activations.append(o))
    got, want = model(x), reference(x)
    assert activations[0].is_contiguous(memory_format=torch.channels_last) and not activations[0].is_contiguous()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(torch.nn.functional.cross_entropy(got, y), list(model.parameters()))
    g_want = torch.autograd.grad(torch.nn.functional.cross_entropy(want, y), list(reference.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g_got, g_want))


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


def test_zero_head_takes_one_inner_step_to_a_prototype_classifier():
    torch.manual_seed(0)
    n_way, k_shot, alpha = 5, 2, 0.4
    model = ml.Conv4(n_way, filters=8, image_size=14, head_init="zeros").double()
    assert not model.head.weight.any() and not model.head.bias.any()
    x = torch.randn(n_way * k_shot, 1, 14, 14, dtype=torch.float64)
    y = torch.arange(n_way).repeat_interleave(k_shot)
    params = dict(model.named_parameters())
    adapted = ml.adapt(model, params, (x, y), torch.nn.functional.cross_entropy, inner_steps=1, inner_lr=alpha)
    features = model.body(x).detach()
    mu_c = features.view(n_way, k_shot, -1).mean(1)
    expected = alpha / n_way * (mu_c - features.mean(0))
    torch.testing.assert_close(adapted["head.weight"], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adapted["head.bias"], torch.zeros(n_way, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(adapted["body.0.0.weight"], params["body.0.0.weight"])  # no signal reaches the body
    with pytest.raises(ml.ConfigError, match="head_init = 'small' is not allowed"):
        ml.Conv4(5, head_init="small")


def test_conv4_runs_channels_last_eagerly_and_nchw_where_batch_norm_is_the_formula():
    # The compile backend traces inside elementary_batch_norm(): the formula's float32 batch sums
    # are precise on NCHW activations, not on channels-last ones (models.Conv2d).
    model = ml.Conv4(3, filters=4, image_size=14)
    layouts = []
    model.body[1][0].register_forward_hook(lambda m, i, o: layouts.append(i[0].is_contiguous()))
    x = torch.rand(4, 1, 14, 14)
    eager = model(x)
    with ml.models.elementary_batch_norm():
        formula = model(x)
    assert layouts == [False, True]
    assert torch.allclose(eager, formula, rtol=1e-4, atol=1e-5)


def test_batch_norm_of_a_single_value_per_channel_is_its_bias():
    # The fused kernel refuses one value per channel; BatchNorm then computes the formula, whose
    # centred input is 0 (Omniglot's "one image alone" exercise scores it at chance).
    bn = ml.models.BatchNorm(3)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    out = bn(torch.randn(1, 3, 1, 1))
    assert torch.equal(out, bn.bias.detach().view(1, 3, 1, 1))
