"""Small problems that several test files share."""

import torch

import mmtl_lib as ml


def image_tasks(n_tasks=4, n_way=3, k_shot=1, n_query=2, size=14, seed=0):
    """Random ``n_way``-way images in the shape of Omniglot episodes: ``[n_tasks, n_way * k, 1, size, size]``."""
    g = torch.Generator().manual_seed(seed)

    def labels(k):
        return torch.arange(n_way).repeat_interleave(k).expand(n_tasks, -1).clone()

    sx = torch.rand(n_tasks, n_way * k_shot, 1, size, size, generator=g)
    qx = torch.rand(n_tasks, n_way * n_query, 1, size, size, generator=g)
    return ml.TaskBatch((sx, labels(k_shot)), (qx, labels(n_query)))


def conv4(n_way=3, **kw):
    """A narrow Conv4 on 14x14 images, initialised from seed 0."""
    torch.manual_seed(0)
    return ml.Conv4(n_way, filters=4, image_size=14, **kw)


def double(tasks):
    """``tasks`` with float64 inputs (labels unchanged)."""
    return ml.TaskBatch((tasks.support[0].double(), tasks.support[1]), (tasks.query[0].double(), tasks.query[1]))


TIMING = {"seconds", "elapsed", "train_seconds", "eval_seconds"}
"""Keys of wall-clock times, which no two runs share."""


def assert_identical(a, b, where="state"):
    """Equal tensors (bit for bit), numbers and containers, apart from wall-clock times."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            if key not in TIMING:
                assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
