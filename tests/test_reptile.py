"""Reptile's batched (vmap) backend: the same update as the task-by-task loop, and its refusals."""

import pytest
import torch
import torch.nn.functional as F

import mmtl_lib as ml


def sine_tasks(n=4, dtype=torch.float64):
    return ml.Sinusoid(6, 3, dtype=dtype).sample(n, generator=ml.generator(3))


@pytest.mark.parametrize("optimizer", [None, ml.adam(betas=(0.0, 0.999))])
def test_reptile_vmap_backend_writes_the_same_meta_gradient_as_the_loop(optimizer):
    tasks = sine_tasks()
    grads, losses = {}, {}
    for backend in ("loop", "vmap"):
        torch.manual_seed(0)
        model = ml.MLP(1, (8, 8), 1).double()
        learner = ml.Reptile(model, F.mse_loss, inner_lr=0.05, inner_steps=3, inner_optimizer=optimizer,
                             backend=backend)
        losses[backend], _ = learner.meta_backward(tasks)
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads["loop"].abs().max() > 1e-4  # the direction is not trivially zero
    assert torch.allclose(grads["vmap"], grads["loop"], rtol=1e-10, atol=1e-12)
    assert torch.allclose(losses["vmap"], losses["loop"], rtol=1e-10)


def test_reptile_vmap_with_one_step_is_a_joint_training_gradient_step():
    # k = 1: theta - mean_i phi_i = alpha * grad of the mean of the task losses (equal task sizes).
    tasks = sine_tasks()
    torch.manual_seed(0)
    model = ml.MLP(1, (8, 8), 1).double()
    learner = ml.Reptile(model, F.mse_loss, inner_lr=0.1, inner_steps=1, backend="vmap")
    learner.meta_backward(tasks)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    params = dict(model.named_parameters())
    x, y = tasks.support
    pooled = torch.stack([F.mse_loss(ml.forward(model, params, xi), yi) for xi, yi in zip(x, y)]).mean()
    want = 0.1 * torch.cat([g.flatten() for g in torch.autograd.grad(pooled, list(params.values()))])
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


def test_reptile_vmap_refuses_mini_batches_running_statistics_and_unknown_backends():
    model = ml.MLP(1, (8,), 1)
    with pytest.raises(ml.ConfigError, match="inner_batch_size = 2 is not allowed with backend='vmap'"):
        ml.Reptile(model, F.mse_loss, inner_lr=0.1, inner_steps=1, inner_batch_size=2, backend="vmap")
    with pytest.raises(ml.ConfigError, match="backend = 'jit' is not allowed"):
        ml.Reptile(model, F.mse_loss, inner_lr=0.1, inner_steps=1, backend="jit")
    running = ml.MLP(1, (8,), 1, batch_norm="running")
    with pytest.raises(ml.ConfigError, match="running BatchNorm statistics"):
        ml.Reptile(running, F.mse_loss, inner_lr=0.1, inner_steps=1, backend="vmap")


def test_reptile_sweep_benchmark_smoke(monkeypatch, tmp_path, capsys):
    import importlib
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        sweep = importlib.import_module("reptile_sweep")
        out = tmp_path / "sweep.json"
        report = sweep.main(["--iterations", "3", "--alphas", "0.01", "--ks", "1", "--betas", "0.001",
                             "--test-tasks", "4", "--json", str(out)])
    finally:
        for name in ("reptile_sweep", "common"):
            sys.modules.pop(name, None)
    cells = json.loads(out.read_text())["cells"]
    assert [c["algorithm"] for c in cells] == ["maml", "fomaml", "reptile"] == [
        c["algorithm"] for c in report["cells"]]
    assert [c["test_steps"] for c in cells] == [1, 1, 2]  # Reptile takes k + 1 steps
    assert all(c["mse"] > 0 for c in cells)
    assert "test MSE" in capsys.readouterr().out
