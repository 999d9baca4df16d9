"""Tests of mmtl_lib.metric: Prototypical and Matching networks, their math and their fit with the
library's training and evaluation."""

import pytest
import torch
import torch.nn.functional as F

import mmtl_lib as ml
from mmtl_lib.metric import cosine_similarity, prototype_logits, squared_euclidean

torch.set_num_threads(1)


def mlp_embedding(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return ml.MLP(6, (7,), 4).to(dtype)


def episode(n_way=3, k_shot=2, n_query=2, features=6, seed=0, dtype=torch.float64):
    """One task of random vectors, labels grouped 0..n_way-1: support [n_way * k_shot, features]."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(n_way * k_shot, features, generator=g, dtype=dtype)
    qx = torch.randn(n_way * n_query, features, generator=g, dtype=dtype)
    return (sx, torch.arange(n_way).repeat_interleave(k_shot)), (qx, torch.arange(n_way).repeat_interleave(n_query))


def as_batch(support, query):
    return ml.TaskBatch(tuple(t[None] for t in support), tuple(t[None] for t in query))


def test_prototypes_are_the_class_means_in_any_label_order():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 3, 0, 2, 1, 3, 0, 0, 1, 2])
    got = ml.prototypes(z, labels)
    want = torch.stack([z[labels == n].mean(0) for n in range(4)])
    assert got.shape == (4, 5) and torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(got, z[:4])  # not simply the first examples


def test_squared_euclidean_protonet_is_a_linear_classifier_on_the_embedding():
    # Snell et al. sec. 2.4: -||f - c_n||^2 = 2 c_n.f - ||c_n||^2 - ||f||^2, and the last term is the
    # same for every class, so the softmax is that of W_n = 2 c_n, b_n = -||c_n||^2.
    learner = ml.ProtoNet(mlp_embedding())
    support, (qx, _) = episode()
    adapted = learner.adapt(support)
    c = adapted.buffers["prototypes"]
    logits = learner.predict(adapted, qx)
    f = learner.embed(qx).detach()
    linear = f @ (2 * c).T - (c * c).sum(1)
    offset = logits - linear
    assert torch.allclose(offset, -(f * f).sum(1, keepdim=True).expand_as(offset), rtol=1e-12, atol=1e-12)
    assert torch.allclose(logits.softmax(1), linear.softmax(1), rtol=1e-12, atol=1e-14)
    cosine = ml.ProtoNet(learner.model, distance="cosine").predict(adapted, qx)
    assert not torch.allclose(cosine.softmax(1), linear.softmax(1), atol=1e-3)  # the check can fail


@pytest.mark.parametrize("name", ["protonet", "matching"])
def test_relabelling_the_classes_permutes_the_logits(name):
    learner = ml.ProtoNet(mlp_embedding()) if name == "protonet" else ml.MatchingNet(mlp_embedding())
    (sx, sy), (qx, _) = episode(n_way=4, k_shot=3)
    relabel = torch.tensor([2, 0, 3, 1])  # class n becomes class relabel[n]
    logits = learner.predict(learner.adapt((sx, sy)), qx)
    moved = learner.predict(learner.adapt((sx, relabel[sy])), qx)
    assert torch.allclose(moved[:, relabel], logits, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(moved, logits)
    # and the order of the support examples does not matter
    order = torch.randperm(len(sy), generator=torch.Generator().manual_seed(0))
    shuffled = learner.predict(learner.adapt((sx[order], sy[order])), qx)
    assert torch.allclose(shuffled, logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, distance", [("protonet", "euclidean"), ("protonet", "cosine"), ("matching", None)])
def test_episode_gradient_matches_float64_finite_differences(name, distance):
    model = mlp_embedding(seed=3)
    learner = ml.ProtoNet(model, distance=distance) if name == "protonet" else ml.MatchingNet(model)
    support, query = episode(seed=4)
    tasks = as_batch(support, query)
    learner.meta_backward(tasks)
    params = dict(model.named_parameters())
    grads = {k: p.grad.clone() for k, p in params.items()}

    def loss() -> float:
        with torch.no_grad():
            f = learner.embed
            return F.cross_entropy(learner.logits(f(query[0]), learner.summarise(f(support[0]), support[1])),
                                   query[1]).item()

    eps = 1e-6
    for k, p in params.items():
        numeric = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = loss()
                p.view(-1)[i] -= 2 * eps
                down = loss()
                p.view(-1)[i] += eps
            numeric.view(-1)[i] = (up - down) / (2 * eps)
        assert torch.allclose(grads[k], numeric, rtol=1e-5, atol=1e-8), k
    assert any(g.abs().max() > 1e-4 for g in grads.values())  # a zero gradient would pass trivially


def test_matching_attention_sums_to_one_and_one_shot_matching_is_cosine_protonet():
    g = torch.Generator().manual_seed(2)
    q, s = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    a = ml.matching_attention(q, s)
    assert a.shape == (7, 4) and (a > 0).all()
    assert torch.allclose(a.sum(1), torch.ones(7, dtype=torch.float64), rtol=1e-14)
    # Snell et al. sec. 2.5: with one shot, the prototypes are the support examples, and matching
    # networks' softmax over cosine similarities is ProtoNet's with the cosine distance.
    model = mlp_embedding()
    support, (qx, _) = episode(n_way=4, k_shot=1)
    matching, proto = ml.MatchingNet(model), ml.ProtoNet(model, distance="cosine")
    pm = matching.predict(matching.adapt(support), qx).softmax(1)
    pp = proto.predict(proto.adapt(support), qx).softmax(1)
    assert torch.allclose(pm, pp, rtol=1e-10, atol=1e-14)
    support5, _ = episode(n_way=4, k_shot=5)  # with more shots they differ
    pm5 = matching.predict(matching.adapt(support5), qx).softmax(1)
    pp5 = proto.predict(proto.adapt(support5), qx).softmax(1)
    assert not torch.allclose(pm5, pp5, atol=1e-3)


def test_distances_closed_forms():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(squared_euclidean(a, b), torch.cdist(a, b) ** 2, rtol=1e-10)
    assert torch.allclose(cosine_similarity(a, b), F.cosine_similarity(a[:, None], b[None], dim=-1), rtol=1e-10)
    assert torch.allclose(prototype_logits(a, b, "cosine"), cosine_similarity(a, b) - 1)


def test_conv4_embedding_is_conv4_without_its_head():
    net = ml.conv4_embedding(filters=8, image_size=14)
    assert net(torch.rand(5, 1, 14, 14)).shape == (5, 8)
    assert not any(name.startswith("head") for name, _ in net.named_parameters())


@pytest.mark.parametrize("make, match", [
    (lambda: ml.ProtoNet(mlp_embedding(), distance="manhattan"), r"distance = 'manhattan' is not allowed"),
    (lambda: ml.ProtoNet("conv4"), r"embedding = 'conv4' is not allowed: it must be a torch.nn.Module"),
    (lambda: ml.MatchingNet(None), r"embedding = None is not allowed"),
    (lambda: ml.prototypes(torch.zeros(4, 2), torch.tensor([0, 0, 2, 2])),
     r"labels must hold every class 0..n_way-1 at least once, got the counts \[2, 0, 2\]"),
    (lambda: ml.prototypes(torch.zeros(4, 2), torch.tensor([0.0, 1.0, 0.0, 1.0])), r"labels must be an integer"),
    (lambda: ml.prototypes(torch.zeros(4, 2), torch.tensor([0, 1, 0])), r"labels must be .* \[n_support\] = \[4\]"),
    (lambda: ml.prototypes(torch.zeros(4), torch.tensor([0, 1, 0, 1])), r"embeddings must be \[n_support, D\]"),
    (lambda: ml.ProtoNet(mlp_embedding()).adapt(episode()[0], inner_steps=2), r"inner_steps = 2 is not allowed"),
    (lambda: ml.evaluate(ml.ProtoNet(mlp_embedding()), as_batch(*episode()), inner_steps=1),
     r"inner_steps = 1 is not allowed for ProtoNet"),
])
def test_bad_input_is_refused_by_name(make, match):
    with pytest.raises(ml.ConfigError, match=match):
        make()


class Clusters:
    """Tasks of N classes drawn from 30 fixed class centres in 2 of 16 dimensions, the other 14
    noise: an embedding that learns to ignore the noise classifies well."""

    def __init__(self, n_way=5, k_shot=1, n_query=5):
        g = torch.Generator().manual_seed(0)
        self.centres = torch.zeros(30, 16)
        self.centres[:, :2] = 3 * torch.randn(30, 2, generator=g)
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query

    def sample(self, meta_batch_size, *, generator=None):
        b, n = meta_batch_size, self.n_way
        classes = torch.rand(b, 30, generator=generator).topk(n, dim=1).indices

        def draw(k):
            centres = self.centres[classes].repeat_interleave(k, dim=1)
            noise = torch.randn(centres.shape, generator=generator) * torch.tensor([0.3] * 2 + [3.0] * 14)
            return centres + noise, torch.arange(n).repeat_interleave(k).expand(b, -1)

        return ml.TaskBatch(draw(self.k_shot), draw(self.n_query))


@pytest.mark.parametrize("make", [lambda m: ml.ProtoNet(m), lambda m: ml.MatchingNet(m)])
def test_trainer_and_evaluate_fit_metric_learners_and_the_loss_falls(make):
    torch.manual_seed(0)
    learner = make(ml.MLP(16, (32,), 8))
    sampler = Clusters()
    before = ml.evaluate(learner, sampler, n_tasks=100, metric=ml.accuracy)
    trainer = ml.Trainer(learner, sampler, meta_batch_size=4, outer_lr=3e-3, metric=ml.accuracy, seed=0)
    history = trainer.fit(120, log_every=20, progress=False)
    after = ml.evaluate(learner, sampler, n_tasks=100, metric=ml.accuracy)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert after.inner_steps == [0] and after.mean() > before.mean() + 0.05
    assert learner.test_inner_steps == 0 and learner.inner_lr is None and not learner.vmappable
    assert learner.name in ("protonet", "matching")
