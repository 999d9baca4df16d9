"""Omniglot alphabets as tasks split by drawer, and GradNorm's synthetic regression tasks."""

import os
from pathlib import Path

import pytest
import torch

from mmtl_lib import data, mtl_data
from mmtl_lib.errors import ConfigError
from mmtl_lib.runtime import generator

REPO = Path(__file__).resolve().parents[1]
FULL_ROOT = Path(os.environ.get("MMTL_DATA") or REPO.parent / "shared" / "data" / "omniglot")
HAVE_FULL = all((FULL_ROOT / "omniglot-py" / h).is_dir() for h in data.HALVES)


def numbered_omniglot():
    """Constant 2x2 images whose value ``character * 20 + drawer`` tells where each came from;
    three alphabets of 2, 3 and 1 characters."""
    characters = ["Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02",
                  "Beta/character03", "Gamma/character01"]
    values = torch.arange(len(characters) * data.DRAWERS, dtype=torch.uint8).view(len(characters), data.DRAWERS)
    return values[:, :, None, None].expand(-1, -1, 2, 2).contiguous(), characters


def test_alphabet_tasks_split_every_character_by_the_same_drawers_with_labels_in_character_order():
    images, characters = numbered_omniglot()
    train_drawers = [0, 3, 7]
    tasks = mtl_data.alphabet_tasks(images, characters, ["Beta", "Alpha"], train_drawers=train_drawers)
    assert list(tasks) == ["Beta", "Alpha"]
    beta = tasks["Beta"]
    assert beta.characters == ("Beta/character01", "Beta/character02", "Beta/character03")
    test_drawers = [d for d in range(data.DRAWERS) if d not in train_drawers]
    for (x, y), drawers in ((beta.train, train_drawers), (beta.test, test_drawers)):
        assert x.shape == (3 * len(drawers), 1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
        value = (x[:, 0, 0, 0] * 255).round().long()
        row, drawer = value // data.DRAWERS, value % data.DRAWERS
        assert torch.equal(row, y + 2)  # Beta's characters are rows 2, 3, 4 of the tensor
        assert sorted(set(drawer.tolist())) == drawers
        # drawer by drawer, label by label: x[d * n_characters + c]
        assert torch.equal(y, torch.arange(3).repeat(len(drawers)))
        assert torch.equal(drawer, torch.tensor(drawers).repeat_interleave(3))
    # every (character, drawer) pair lands in exactly one of train and test
    assert len(beta.train[1]) + len(beta.test[1]) == 3 * data.DRAWERS


def test_alphabet_tasks_default_split_is_15_train_and_5_test_drawers():
    images, characters = numbered_omniglot()
    tasks = mtl_data.alphabet_tasks(images, characters, ["Gamma"])
    assert len(tasks["Gamma"].train[1]) == 15 and len(tasks["Gamma"].test[1]) == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"alphabets": ["Delta"]}, "not in the data"),
    ({"alphabets": []}, "at least one"),
    ({"alphabets": ["Alpha", "Alpha"]}, "each once"),
    ({"train_drawers": list(range(20))}, "left to test"),
    ({"train_drawers": [0, 20]}, "0..19"),
    ({"train_drawers": [1, 1]}, "distinct"),
    ({"train_drawers": []}, "distinct"),
])
def test_alphabet_tasks_rejects_bad_arguments_naming_them(kwargs, message):
    images, characters = numbered_omniglot()
    kwargs = {"alphabets": ["Alpha"], **kwargs}
    with pytest.raises(ConfigError, match=message):
        mtl_data.alphabet_tasks(images, characters, **kwargs)
    with pytest.raises(ConfigError, match="characters has"):
        mtl_data.alphabet_tasks(images, characters[:-1], ["Alpha"])


@pytest.mark.skipif(not HAVE_FULL, reason=f"the full Omniglot is not at {FULL_ROOT} (set MMTL_DATA)")
def test_book_alphabets_exist_with_their_documented_character_counts():
    loaded = data.load_omniglot(FULL_ROOT, image_size=14, download=False)
    tasks = mtl_data.alphabet_tasks(loaded.images, loaded.characters)
    assert list(tasks) == list(mtl_data.ALPHABETS)
    counts = [len(t.characters) for t in tasks.values()]
    assert sum(counts) == 264 and min(counts) == 22 and max(counts) == 55


def test_gradnorm_regression_shapes_scales_and_determinism():
    tasks = mtl_data.gradnorm_regression(4, n_train=30, n_test=20, max_sigma=1000.0, generator=generator(0))
    assert torch.allclose(tasks.sigma, torch.tensor([1.0, 10.0, 100.0, 1000.0]))
    (x, y), (xt, yt) = tasks.train, tasks.test
    assert x.shape == (30, 250) and y.shape == (30, 4, 100) and xt.shape == (20, 250) and yt.shape == (20, 4, 100)
    assert torch.allclose(x.norm(dim=1), torch.full((30,), 250**0.5))  # unit-norm inputs, scaled
    assert (y.abs() <= tasks.sigma[None, :, None]).all()  # |sigma tanh| <= sigma
    again = mtl_data.gradnorm_regression(4, n_train=30, n_test=20, max_sigma=1000.0, generator=generator(0))
    assert torch.equal(again.test[1], yt)
    with pytest.raises(ConfigError, match="max_sigma"):
        mtl_data.gradnorm_regression(4, max_sigma=0.5)
