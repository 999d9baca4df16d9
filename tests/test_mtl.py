"""Multi-task architectures and loss weightings do what their papers say."""

import math

import pytest
import torch
from torch import nn

from mmtl_lib import mtl
from mmtl_lib.errors import ConfigError


def linear_tasks(n_tasks, seed):
    """Least-squares losses ``L_t = 0.5 ||A_t theta - b_t||^2`` ``[n_tasks]`` of one shared ``theta``."""
    g = torch.Generator().manual_seed(seed)
    theta = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
    problems = [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64))
                for _ in range(n_tasks)]

    def losses():
        return torch.stack([0.5 * ((a @ theta - b) ** 2).sum() for a, b in problems])

    return theta, losses


# --- architectures ---------------------------------------------------------------------------


def hard_sharing():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    return mtl.HardSharing(trunk, {"a": nn.Linear(8, 1), "b": nn.Linear(8, 3)})


def test_hard_sharing_shapes_and_parameter_split():
    model = hard_sharing()
    out = model(torch.randn(4, 5))
    assert list(out) == ["a", "b"] and out["a"].shape == (4, 1) and out["b"].shape == (4, 3)
    assert list(model(torch.randn(2, 5), tasks=["b"])) == ["b"]
    shared, a, b = model.shared_parameters(), model.task_parameters("a"), model.task_parameters("b")
    ids = [{id(p) for p in group} for group in (shared, a, b)]
    assert len(shared) == 4 and len(a) == len(b) == 2
    assert set.union(*ids) == {id(p) for p in model.parameters()} and sum(map(len, ids)) == len(set.union(*ids))
    assert [tuple(p.shape) for p in model.last_shared_parameters()] == [(8, 8), (8,)]


def test_cross_stitch_at_identity_equals_independent_columns():
    torch.manual_seed(0)
    net = mtl.cross_stitch_mlp(["a", "b", "c"], 5, (8, 8), {"a": 1, "b": 2, "c": 3}, self_weight=1.0)
    x = torch.randn(4, 5)
    out = net(x)
    for t, column in net.columns.items():
        h = x
        for block in column:
            h = block(h)
        assert torch.equal(out[t], h)
    assert [o.shape[1] for o in out.values()] == [1, 2, 3]
    assert len(net.stitch_parameters()) == 2


def test_cross_stitch_default_initialisation_mixes_columns_with_rows_summing_to_one():
    torch.manual_seed(0)
    net = mtl.cross_stitch_mlp(["a", "b", "c"], 5, (8,), 2)
    alpha = net.units[0].alpha
    assert torch.allclose(alpha.diagonal(), torch.full((3,), 0.9))
    assert torch.allclose(alpha.sum(1), torch.ones(3)) and torch.allclose(alpha[0, 1], torch.tensor(0.05))
    out = net(torch.randn(4, 5))
    out["a"].sum().backward()
    # Through the unit, task a's loss reaches task b's column.
    assert net.columns["b"][0][0].weight.grad.abs().sum() > 0


def test_architectures_refuse_bad_arguments():
    with pytest.raises(ConfigError, match="heads is empty"):
        mtl.HardSharing(nn.Linear(2, 2), {})
    with pytest.raises(ConfigError, match=r"tasks \['z'\] are not allowed"):
        hard_sharing()(torch.randn(1, 5), tasks=["z"])
    with pytest.raises(ConfigError, match="self_weight = 1.5"):
        mtl.CrossStitchUnit(2, 1.5)
    with pytest.raises(ConfigError, match="same number"):
        mtl.CrossStitch({"a": [nn.Linear(2, 2)], "b": [nn.Linear(2, 2), nn.Linear(2, 2)]})
    with pytest.raises(ConfigError, match="of one shape"):
        mtl.CrossStitch({"a": [nn.Linear(2, 2), nn.Linear(2, 1)], "b": [nn.Linear(2, 3), nn.Linear(3, 1)]})(
            torch.randn(1, 2))


# --- weightings ------------------------------------------------------------------------------


def test_ew_is_the_gradient_of_the_summed_losses():
    model = hard_sharing()
    x, y = torch.randn(6, 5), {"a": torch.randn(6, 1), "b": torch.randn(6, 3)}

    def losses():
        out = model(x)
        return {t: ((out[t] - y[t]) ** 2).mean() for t in out}

    sum(losses().values()).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = mtl.EW(2).backward(losses())
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))
    assert torch.equal(out["weights"], torch.ones(2))


def test_uw_learns_the_closed_form_log_variance_log_L():
    # For fixed losses, exp(-s) L + s is minimised at s* = log L.
    fixed = torch.tensor([0.05, 1.0, 30.0])
    uw = mtl.UW(3)
    opt = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        uw.backward(fixed.clone().requires_grad_())
        opt.step()
    assert torch.allclose(uw.log_vars.detach(), fixed.log(), atol=1e-4)
    assert torch.allclose(uw.backward(fixed.clone().requires_grad_())["weights"], 1 / fixed, rtol=1e-3)


def linear_losses(theta, scales):
    """``L_t = c_t (1 + theta_t)``: at ``theta = 0`` the loss is ``c_t`` and its gradient ``c_t e_t``."""
    return torch.tensor(scales) * (1 + theta)


def test_gradnorm_weights_sum_to_T_and_favour_the_task_that_trains_slower():
    theta = nn.Parameter(torch.zeros(3))
    gn = mtl.GradNorm(3, alpha=1.5, layer=[theta])
    opt = torch.optim.SGD(gn.parameters(), lr=0.1)
    gn.backward(linear_losses(theta, [1.0, 2.0, 2.0]))  # records L(0)
    opt.zero_grad()
    theta.grad = None
    # Tasks 1 and 2 halved their losses, task 0 did not; all three gradient norms are 1.
    out = gn.backward(linear_losses(theta, [1.0, 1.0, 1.0]))
    assert torch.equal(out["grad_norms"], torch.ones(3))
    assert torch.equal(theta.grad, out["weights"])  # the network gets grad sum_t w_t L_t
    opt.step()
    assert gn.loss_weights.sum().item() != pytest.approx(3.0)  # the update moved the sum ...
    gn.renormalise()
    assert gn.loss_weights.sum().item() == pytest.approx(3.0)  # ... renormalisation restores it
    w = gn.loss_weights.detach()
    assert w[0] > 1 > w[1] and w[1] == w[2]
    assert gn.backward(linear_losses(theta, [1.0, 1.0, 1.0]))["weights"].sum().item() == pytest.approx(3.0)


def test_gradnorm_with_constant_loss_ratios_equalises_the_gradient_norms():
    # Loss ratios stay 1, so the target is the mean norm: w_t c_t equal, w = 2 (10, 1) / 11.
    theta = nn.Parameter(torch.zeros(2))
    gn = mtl.GradNorm(2, alpha=1.5, layer=[theta])
    opt = torch.optim.SGD(gn.parameters(), lr=2e-3)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
    for _ in range(400):
        opt.zero_grad()
        out = gn.backward(linear_losses(theta, [1.0, 10.0]))
        opt.step()
        decay.step()
    assert out["grad_norms"][0] == pytest.approx(out["grad_norms"][1].item(), rel=0.02)
    assert torch.allclose(out["weights"], torch.tensor([20 / 11, 2 / 11]), rtol=0.02)


def test_gradnorm_counts_a_task_that_does_not_reach_the_layer_as_gradient_norm_zero():
    theta = nn.Parameter(torch.zeros(2))
    losses = torch.stack([1 + theta[0], torch.tensor(2.0, requires_grad=True)])
    out = mtl.GradNorm(2, layer=[theta]).backward(losses)
    assert torch.equal(out["grad_norms"], torch.tensor([1.0, 0.0]))


def test_dwa_weights_sum_to_T_and_favour_the_task_whose_loss_fell_less():
    dwa = mtl.DWA(3, temperature=2.0, steps_per_epoch=2)
    history = [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]  # two epochs of 2 steps
    seen = []
    for step in history:
        seen.append(dwa.backward(torch.tensor(step, requires_grad=True))["weights"])
    assert all(torch.equal(w, torch.ones(3)) for w in seen)  # the first two epochs
    w = dwa.backward(torch.ones(3, requires_grad=True))["weights"]
    assert w.sum().item() == pytest.approx(3.0)
    assert w[0] > w[1] > w[2]
    want = 3 * torch.softmax(torch.tensor([3 / 4, 2 / 4, 1 / 4]) / 2.0, 0)
    assert torch.allclose(w, want)


def test_dwa_per_step_uses_equal_weights_for_the_first_two_steps():
    dwa = mtl.DWA(2)
    ws = [dwa.backward(torch.tensor(v, requires_grad=True))["weights"] for v in ([1.0, 1.0], [0.5, 1.0], [1.0, 1.0])]
    assert torch.equal(ws[0], torch.ones(2)) and torch.equal(ws[1], torch.ones(2))
    assert ws[2][1] > ws[2][0]  # task 1's loss did not fall


def test_rlw_weights_are_positive_sum_to_one_and_repeat_by_seed():
    def draws(seed):
        rlw = mtl.RLW(4, generator=torch.Generator().manual_seed(seed))
        return torch.stack([rlw.backward(torch.ones(4, requires_grad=True))["weights"] for _ in range(20)])

    a, b, c = draws(0), draws(0), draws(1)
    assert (a > 0).all() and torch.allclose(a.sum(1), torch.ones(20))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std(0).min() > 0.05  # weights change from step to step


def test_pcgrad_leaves_no_conflict_with_the_gradient_it_projected_against():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    pc = mtl.pcgrad_project(g)
    assert pc[0] @ g[1] == pytest.approx(0.0, abs=1e-7) and pc[1] @ g[0] == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(pc[0], torch.tensor([0.5, 0.5]))
    # Three tasks, task 0 in conflict with both others, which agree with each other: for every order
    # of projection no projected gradient conflicts with an original one.
    g3 = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0], [-1.0, 0.0, 2.0]])
    for seed in range(6):
        pc3 = mtl.pcgrad_project(g3, torch.Generator().manual_seed(seed))
        assert (pc3 @ g3.T).min() >= -1e-6
        assert torch.allclose(pc3[1:], torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]))


def test_pcgrad_with_three_tasks_can_reopen_an_earlier_conflict():
    # The guarantee is per projection: projecting g_0 against g_2 re-creates its conflict with g_1,
    # whichever of the two comes first.
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -3.0]])
    for seed in range(6):
        pc = mtl.pcgrad_project(g, torch.Generator().manual_seed(seed))
        assert (pc[0] @ g[1:].T).min() < -0.1


def test_pcgrad_without_conflicts_is_the_sum_and_task_parameters_get_their_own_gradient():
    model = hard_sharing()
    x = torch.randn(6, 5)

    def losses():
        out = model(x)
        return {"a": out["a"].square().mean(), "b": out["b"].square().mean()}

    sum(losses().values()).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = mtl.PCGrad(2).backward(losses(), model.shared_parameters())
    assert out["conflicts"] == 0  # both losses pull the outputs to 0 through the same trunk features
    assert all(torch.allclose(p.grad, w, atol=1e-7) for p, w in zip(model.parameters(), want))


def test_pcgrad_backward_writes_the_projected_sum_onto_the_shared_parameters():
    theta, losses = linear_tasks(3, seed=1)
    current = losses()
    grads = torch.stack([torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in current])
    theta.grad = torch.ones(3, dtype=torch.float64)  # existing gradients are accumulated into
    out = mtl.PCGrad(3, torch.Generator().manual_seed(0)).backward(current, [theta])
    want = mtl.pcgrad_project(grads, torch.Generator().manual_seed(0)).sum(0) + 1
    assert torch.allclose(theta.grad, want)
    assert out["conflicts"] == 1
    assert not torch.allclose(want, grads.sum(0) + 1, atol=0.1)  # the surgery changed the direction


def test_weightings_accept_dicts_and_refuse_bad_input():
    assert torch.equal(mtl.EW(2).backward({"a": torch.tensor(1.0, requires_grad=True),
                                           "b": torch.tensor(2.0, requires_grad=True)})["weights"], torch.ones(2))
    with pytest.raises(ConfigError, match=r"losses has shape \(3,\).*n_tasks = 2"):
        mtl.EW(2).backward(torch.ones(3, requires_grad=True))
    with pytest.raises(ConfigError, match="losses has 1 entries"):
        mtl.UW(2).backward({"a": torch.tensor(1.0)})
    with pytest.raises(ConfigError, match="shared_params = None is not allowed for PCGrad"):
        mtl.PCGrad(2).backward(torch.ones(2, requires_grad=True))
    with pytest.raises(ConfigError, match="alpha = -1"):
        mtl.GradNorm(2, alpha=-1)
    with pytest.raises(ConfigError, match="temperature = 0"):
        mtl.DWA(2, temperature=0)
    with pytest.raises(ConfigError, match="n_tasks = 0"):
        mtl.RLW(0)


def test_learned_weights_are_parameters_and_state_is_checkpointed():
    assert [p.shape for p in mtl.UW(3).parameters()] == [(3,)]
    assert [p.shape for p in mtl.GradNorm(3).parameters()] == [(3,)]
    assert list(mtl.EW(3).parameters()) == [] and list(mtl.DWA(3).parameters()) == []
    dwa = mtl.DWA(2)
    for v in ([2.0, 2.0], [1.0, 2.0]):
        dwa.backward(torch.tensor(v, requires_grad=True))
    restored = mtl.DWA(2)
    restored.load_state_dict(dwa.state_dict())
    assert torch.equal(restored.current_weights(), dwa.current_weights())
    assert not math.isclose(dwa.current_weights()[0].item(), 1.0)
