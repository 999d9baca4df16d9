"""Tests of mmtl_lib.data: Omniglot loading and caching, the few-shot splits, the episode sampler.

The full data set is read from $MMTL_DATA, else ../shared/data/omniglot beside the repository;
tests that need it skip when it is absent. The full tensor is cached where load_omniglot caches by
default ($MMTL_CACHE, else the user cache directory), so only the first run pays for decoding it.
Tests of the loader itself work on a copy of three small alphabets in a temporary folder, and
never touch the network.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mmtl_lib import data
from mmtl_lib.data import (
    EpisodeSampler,
    OmniglotNotFoundError,
    class_ids,
    find_omniglot,
    load_omniglot,
    omniglot_split,
    omniglot_tasks,
    split_class_ids,
    user_cache_dir,
)
from mmtl_lib.errors import ConfigError, DataError

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
FULL_ROOT = Path(os.environ.get("MMTL_DATA") or REPO.parent / "shared" / "data" / "omniglot")
HAVE_FULL = all((FULL_ROOT / "omniglot-py" / h).is_dir() for h in data.HALVES)
needs_full = pytest.mark.skipif(
    not HAVE_FULL, reason=f"the full Omniglot is not at {FULL_ROOT} (set MMTL_DATA to a folder with omniglot-py/)"
)
# three small alphabets of images_background: 14 + 14 + 17 = 45 characters
TINY_ALPHABETS = ("Blackfoot_(Canadian_Aboriginal_Syllabics)", "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Tagalog")
ONLY_BACKGROUND = pytest.mark.filterwarnings("ignore:.*images_evaluation is missing")


@pytest.fixture(scope="session")
def omniglot():
    if not HAVE_FULL:
        pytest.skip(f"the full Omniglot is not at {FULL_ROOT} (set MMTL_DATA to a folder with omniglot-py/)")
    return load_omniglot(FULL_ROOT, download=False)


@pytest.fixture
def tiny_root(tmp_path):
    source = FULL_ROOT / "omniglot-py" / "images_background"
    if not source.is_dir():
        pytest.skip(f"Omniglot's images_background is not at {source} (set MMTL_DATA)")
    for alphabet in TINY_ALPHABETS:
        shutil.copytree(source / alphabet, tmp_path / "data" / "omniglot-py" / "images_background" / alphabet)
    return tmp_path / "data"


def numbered_images(n_characters=12, size=4):
    """Constant images whose value ``character * 20 + drawer`` survives any rotation."""
    values = torch.arange(n_characters * data.DRAWERS, dtype=torch.uint8).view(n_characters, data.DRAWERS)
    return values[:, :, None, None].expand(-1, -1, size, size).contiguous()


def decode_numbered(x):
    """``(characters, drawers)`` of images made by :func:`numbered_images`, from their pixels."""
    value = (x[..., 0, 0, 0] * 255).round().long()
    assert torch.equal((x * 255).round().long(), value[..., None, None, None].expand_as(x).long())
    return value // data.DRAWERS, value % data.DRAWERS


# --- loading and caching -------------------------------------------------------------------------


def test_full_omniglot_tensor_has_canonical_shape_names_and_ink_convention(omniglot):
    images, characters, n_background = omniglot
    assert images.shape == (1623, 20, 28, 28) and images.dtype == torch.uint8
    assert len(characters) == 1623 and n_background == 964
    assert list(characters[:n_background]) == sorted(characters[:n_background])
    assert list(characters[n_background:]) == sorted(characters[n_background:])
    assert characters[0] == "Alphabet_of_the_Magi/character01" and characters[964] == "Angelic/character01"
    mean = images.float().mean() / 255
    assert 0.03 < mean < 0.2  # mostly background (0), strokes are ink (255)
    assert images[:, :, 0, :].float().mean() < 2  # the border is background
    assert images.max() == 255


@needs_full
def test_cached_load_decodes_no_image(omniglot, monkeypatch):
    # What makes the second load fast, checked without a clock: it reads the cached tensor and
    # decodes none of the 32,460 PNGs.
    def no_decoding(*args, **kwargs):
        raise AssertionError("the cached load decoded a PNG")

    monkeypatch.setattr(data, "_decode", no_decoding)
    again = load_omniglot(FULL_ROOT, download=False)
    assert torch.equal(again.images, omniglot.images)


@ONLY_BACKGROUND
def test_cache_is_built_outside_the_data_root_and_reused(tiny_root, tmp_path, monkeypatch):
    before = sorted(p for p in tiny_root.rglob("*"))
    cache = tmp_path / "cache"
    built = load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert built.images.shape == (45, 20, 28, 28) and built.n_background == 45
    assert built.characters[0] == "Blackfoot_(Canadian_Aboriginal_Syllabics)/character01"
    assert len(list(cache.glob("omniglot_28px_*.pt"))) == 1
    assert sorted(p for p in tiny_root.rglob("*")) == before  # nothing written into the data

    def no_decoding(*args):
        raise AssertionError("decoded although the cache is fresh")

    monkeypatch.setattr(data, "_decode", no_decoding)
    cached = load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert torch.equal(cached.images, built.images) and cached.characters == built.characters


@ONLY_BACKGROUND
def test_stale_cache_is_rebuilt_when_a_file_changes(tiny_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    built = load_omniglot(tiny_root, cache_dir=cache, download=False)
    decoded = []
    decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda path, size: decoded.append(path) or decode(path, size))

    # replace character 0's drawer 0 by its drawer 1: same names, new content and mtime
    first = sorted((tiny_root / "omniglot-py" / "images_background" / TINY_ALPHABETS[0] / "character01").iterdir())
    shutil.copyfile(first[1], first[0])
    stat = first[0].stat()
    os.utime(first[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert len(decoded) == 45 * 20
    assert torch.equal(rebuilt.images[0, 0], built.images[0, 1])
    assert torch.equal(rebuilt.images[1:], built.images[1:])

    decoded.clear()
    shutil.rmtree(tiny_root / "omniglot-py" / "images_background" / TINY_ALPHABETS[2])
    smaller = load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert smaller.images.shape[0] == 28 and len(decoded) == 28 * 20
    decoded.clear()
    load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert decoded == []


@ONLY_BACKGROUND
def test_pixels_are_the_inverted_pngs_and_resizing_is_configurable(tiny_root, tmp_path):
    import numpy as np
    from PIL import Image

    full = load_omniglot(tiny_root, image_size=105, cache_dir=tmp_path / "cache", download=False)
    png = sorted((tiny_root / "omniglot-py" / "images_background" / TINY_ALPHABETS[0] / "character01").iterdir())[0]
    with Image.open(png) as image:
        paper = torch.from_numpy(np.array(image.convert("L")))
    assert torch.equal(full.images[0, 0], 255 - paper)  # white paper -> 0, black ink -> 255

    small = load_omniglot(tiny_root, image_size=14, cache_dir=tmp_path / "cache", download=False)
    assert small.images.shape == (45, 20, 14, 14)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    grey = ((small.images > 0) & (small.images < 255)).float().mean()
    assert grey > 0.02  # antialiased, not thresholded


def test_only_one_half_loads_with_a_warning(tiny_root, tmp_path):
    with pytest.warns(UserWarning, match="images_evaluation is missing"):
        loaded = load_omniglot(tiny_root, cache_dir=tmp_path / "cache", download=False)
    assert loaded.n_background == len(loaded.characters) == 45


@ONLY_BACKGROUND
def test_data_root_from_environment_and_omniglot_py_itself(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MMTL_DATA", str(tiny_root))
    monkeypatch.setenv("MMTL_CACHE", str(tmp_path / "env-cache"))
    assert find_omniglot(download=False) == tiny_root / "omniglot-py"
    assert load_omniglot(download=False).images.shape[0] == 45
    assert len(list((tmp_path / "env-cache").glob("*.pt"))) == 1
    assert find_omniglot(tiny_root / "omniglot-py", download=False) == tiny_root / "omniglot-py"


def test_user_cache_dir_prefers_mmtl_cache_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTL_CACHE", str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MMTL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "mmtl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == Path.home() / ".cache" / "mmtl"


def test_missing_data_error_names_every_folder_and_mmtl_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTL_DATA", str(tmp_path / "set-by-env"))
    monkeypatch.delenv("MMTL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(OmniglotNotFoundError, match="MMTL_DATA") as error:
        load_omniglot(download=False)
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, DataError)
    for folder in (tmp_path / "set-by-env", tmp_path / "xdg" / "mmtl"):
        for half in data.HALVES:
            assert str(folder / "omniglot-py" / half) in str(error.value)
    assert "download=False" in str(error.value)


def test_failed_download_is_reported_with_the_same_advice(tmp_path, monkeypatch):
    import torchvision.datasets

    attempts = []

    def offline(root, background, download):
        attempts.append((root, background))
        raise OSError("no network (test)")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", offline)
    with pytest.raises(OmniglotNotFoundError, match=r"(?s)MMTL_DATA.*Downloading into .* failed.*no network"):
        find_omniglot(tmp_path / "empty", download=True)
    assert attempts == [(str(tmp_path / "empty"), True)]


@ONLY_BACKGROUND
def test_character_without_twenty_drawers_is_an_error(tiny_root, tmp_path):
    folder = tiny_root / "omniglot-py" / "images_background" / TINY_ALPHABETS[1] / "character03"
    sorted(folder.iterdir())[-1].unlink()
    with pytest.raises(DataError, match="character03 holds 19 PNGs"):
        load_omniglot(tiny_root, cache_dir=tmp_path / "cache", download=False)


# --- splits ---------------------------------------------------------------------------------------

NAMES = [f"Alphabet{a:02d}/character{c:02d}" for a in range(50) for c in range(1, 34)][:1623]


def test_maml_split_is_1200_train_423_test_and_1100_100_423_with_validation():
    sets = {s: set(omniglot_split(NAMES, "maml", s).tolist()) for s in ("train", "test", "trainval")}
    assert (len(sets["train"]), len(sets["test"])) == (1200, 423)
    assert sets["train"] == sets["trainval"] and not sets["train"] & sets["test"]
    assert sets["train"] | sets["test"] == set(range(1623))
    held = {s: set(omniglot_split(NAMES, "maml", s, validation=True).tolist()) for s in ("train", "val", "test")}
    assert [len(held[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert held["train"] | held["val"] == sets["trainval"] and held["test"] == sets["test"]
    assert not held["train"] & held["val"]
    assert set(omniglot_split(NAMES, "maml", "test", seed=2).tolist()) != sets["test"]
    rotated = omniglot_split(NAMES, "maml", "test", rotations_as_classes=True)
    assert set(split_class_ids(rotated, 1623)[0].tolist()) == sets["test"] and len(rotated) == 4 * 423


def test_vinyals_split_is_class_disjoint_and_keeps_rotations_of_a_character_together(omniglot):
    n = len(omniglot.characters)
    subsets = {s: omniglot_split(omniglot.characters, "vinyals", s) for s in ("train", "val", "test")}
    assert [len(subsets[s]) for s in ("train", "val", "test")] == [4112, 688, 1692]
    characters = {s: split_class_ids(c, n)[0] for s, c in subsets.items()}
    assert [len(set(characters[s].tolist())) for s in subsets] == [1028, 172, 423]
    for s, c in characters.items():
        assert torch.equal(c.bincount(minlength=n)[c], torch.full_like(c, 4)), s  # all four rotations
    assert set(characters["train"].tolist()).isdisjoint(characters["val"].tolist())
    assert set(characters["train"].tolist()).isdisjoint(characters["test"].tolist())
    assert set(characters["val"].tolist()).isdisjoint(characters["test"].tolist())
    trainval = omniglot_split(omniglot.characters, "vinyals", "trainval")
    assert set(trainval.tolist()) == set(subsets["train"].tolist()) | set(subsets["val"].tolist())
    plain = omniglot_split(omniglot.characters, "vinyals", "test", rotations_as_classes=False)
    assert torch.equal(plain, characters["test"].unique())


def test_lake_split_trains_on_background_alphabets_and_tests_on_all_evaluation_alphabets(omniglot):
    folder = FULL_ROOT / "omniglot-py"
    on_disk = {half: {p.name for p in (folder / half).iterdir() if p.is_dir()} for half in data.HALVES}
    assert set(data.LAKE_BACKGROUND_ALPHABETS) == on_disk["images_background"]
    names = omniglot.characters
    subsets = {s: omniglot_split(names, "lake", s, validation=True) for s in ("train", "val", "test", "trainval")}
    assert [len(subsets[s]) for s in ("train", "val", "test", "trainval")] == [806, 158, 659, 964]
    sets = {s: set(c.tolist()) for s, c in subsets.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] == sets["trainval"]
    assert sets["trainval"] | sets["test"] == set(range(1623))

    def alphabets(s):
        return {names[c].split("/")[0] for c in sets[s]}

    assert alphabets("test") == on_disk["images_evaluation"] and len(alphabets("test")) == 20
    assert alphabets("trainval") == on_disk["images_background"] and len(alphabets("trainval")) == 30
    assert all(c >= omniglot.n_background for c in sets["test"])  # test characters: images_evaluation only
    assert alphabets("val") == set(data.LAKE_VAL_ALPHABETS) and not alphabets("val") & alphabets("train")
    without = {s: omniglot_split(names, "lake", s) for s in ("train", "test")}
    assert set(without["train"].tolist()) == sets["trainval"] and torch.equal(without["test"], subsets["test"])
    rotated = omniglot_split(names, "lake", "test", rotations_as_classes=True)
    assert len(rotated) == 4 * 659 and set(split_class_ids(rotated, 1623)[0].tolist()) == sets["test"]


@needs_full
def test_lake_split_is_wired_through_the_configuration():
    import mmtl_lib as ml

    config = ml.preset("cpu", split="lake")
    samplers = ml.samplers(config, torch.device("cpu"))
    assert [samplers[s].n_classes for s in ("train", "val", "test")] == [806, 158, 659]
    with pytest.raises(ConfigError, match=r"split = 'lakes' is not allowed"):
        ml.preset("cpu", split="lakes")


@needs_full
def test_vinyals_split_matches_the_published_split_files(omniglot):
    folder = FULL_ROOT / "splits" / "vinyals"
    if not folder.is_dir():
        pytest.skip(f"no published split files at {folder}")
    index = {name: i for i, name in enumerate(omniglot.characters)}
    for subset in ("train", "val", "test", "trainval"):
        lines = (folder / f"{subset}.txt").read_text().split()
        published = {
            int(class_ids(torch.tensor(index[line.rsplit("/", 1)[0]]), int(line[-3:]) // 90, 1623))
            for line in lines
        }
        assert set(omniglot_split(omniglot.characters, "vinyals", subset).tolist()) == published, subset


# --- the episode sampler -------------------------------------------------------------------------


def test_episode_shapes_dtypes_and_range(omniglot):
    classes = omniglot_split(omniglot.characters, "vinyals", "train")
    sampler = EpisodeSampler(omniglot.images, classes, n_way=5, k_shot=2, n_query=3)
    batch = sampler.sample(4, generator=torch.Generator().manual_seed(0))
    (sx, sy), (qx, qy) = batch.support, batch.query
    assert sx.shape == (4, 10, 1, 28, 28) and qx.shape == (4, 15, 1, 28, 28)
    assert sy.shape == (4, 10) and qy.shape == (4, 15)
    assert sx.dtype == qx.dtype == torch.float32 and sy.dtype == qy.dtype == torch.int64
    assert 0 <= sx.min() and sx.max() <= 1 and qx.max() == 1
    assert batch.info["classes"].shape == batch.info["rotation"].shape == (4, 5)
    assert batch.info["drawers"].shape == (4, 5, 5)
    assert torch.equal(classes[batch.info["class_index"]], batch.info["classes"])
    assert batch.n_tasks == 4 and batch.task(1).support[0].shape == (10, 1, 28, 28)


def test_labels_are_balanced_match_the_classes_and_are_permuted_across_tasks():
    images = numbered_images()
    sampler = EpisodeSampler(images, torch.arange(12), n_way=5, k_shot=3, n_query=4)
    batch = sampler.sample(40, generator=torch.Generator().manual_seed(1))
    (sx, sy), (qx, qy) = batch.support, batch.query
    assert torch.equal(sy.sort(dim=1).values, torch.arange(5).repeat_interleave(3).expand(40, -1))
    assert torch.equal(qy.sort(dim=1).values, torch.arange(5).repeat_interleave(4).expand(40, -1))
    for x, y in ((sx, sy), (qx, qy)):
        characters, _ = decode_numbered(x)
        assert torch.equal(characters, batch.info["classes"].gather(1, y))  # label i is class i
    classes = batch.info["classes"]
    assert all(len(set(row)) == 5 for row in classes.tolist())
    assert not torch.equal(classes, classes.sort(dim=1).values)  # class -> label is not sorted
    assert len({tuple(row) for row in classes.tolist()}) > 30


def test_support_and_query_never_share_an_image():
    images = numbered_images()
    sampler = EpisodeSampler(images, torch.arange(12), n_way=12, k_shot=7, n_query=13)
    batch = sampler.sample(20, generator=torch.Generator().manual_seed(2))
    s_char, s_drawer = decode_numbered(batch.support[0])
    q_char, q_drawer = decode_numbered(batch.query[0])
    for t in range(20):
        support = set(zip(s_char[t].tolist(), s_drawer[t].tolist(), strict=True))
        query = set(zip(q_char[t].tolist(), q_drawer[t].tolist(), strict=True))
        assert len(support) == 12 * 7 and len(query) == 12 * 13 and not support & query
    drawers = batch.info["drawers"]
    assert torch.equal(drawers[:, :, :7].flatten(1), s_drawer.view(20, 12, 7).flatten(1))
    assert torch.equal(drawers.sort(dim=2).values, torch.arange(20).expand(20, 12, 20))


def test_support_and_query_images_differ_pixelwise_on_omniglot(omniglot):
    classes = omniglot_split(omniglot.characters, "maml", "train")
    batch = EpisodeSampler(omniglot.images, classes, 20, 5, 15).sample(2, generator=torch.Generator().manual_seed(3))
    for t in range(2):
        support = batch.support[0][t].flatten(1)
        query = batch.query[0][t].flatten(1)
        assert not (support[:, None] == query[None]).all(dim=2).any()


def test_rotated_classes_and_random_rotation_turn_the_stored_images(omniglot):
    def check(batch):  # 6 tasks, 3-way, k_shot 2, n_query 3
        characters, turns = batch.info["classes"] % 1623, batch.info["rotation"]
        for t in range(6):
            for label in range(3):
                for j, drawer in enumerate(batch.info["drawers"][t, label].tolist()):
                    source = omniglot.images[characters[t, label], drawer]
                    want = torch.rot90(source, int(turns[t, label]), (0, 1)).float() / 255
                    got = batch.support[0][t, label * 2 + j] if j < 2 else batch.query[0][t, label * 3 + j - 2]
                    assert torch.equal(got[0], want)
        return turns

    vinyals = omniglot_split(omniglot.characters, "vinyals", "test")
    batch = EpisodeSampler(omniglot.images, vinyals, 3, 2, 3).sample(6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(check(batch), batch.info["classes"] // 1623)
    maml = omniglot_split(omniglot.characters, "maml", "train")
    sampler = EpisodeSampler(omniglot.images, maml, 3, 2, 3, rotation="random")
    turns = check(sampler.sample(6, generator=torch.Generator().manual_seed(5)))
    assert len(set(turns.flatten().tolist())) == 4


def test_same_seed_same_meta_batch_and_another_seed_another():
    sampler = EpisodeSampler(numbered_images(size=6), torch.arange(12), 5, 1, 2, rotation="random")
    a, b, c = (sampler.sample(8, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    for one, two in ((a.support, b.support), (a.query, b.query)):
        assert all(torch.equal(u, v) for u, v in zip(one, two, strict=True))
    assert all(torch.equal(a.info[k], b.info[k]) for k in a.info)
    assert not torch.equal(a.info["classes"], c.info["classes"])


@needs_full
def test_omniglot_tasks_builds_a_sampler_in_one_call():
    tasks = omniglot_tasks("vinyals", "test", n_way=5, k_shot=1, n_query=5, root=FULL_ROOT, download=False)
    assert tasks.n_classes == 1692 and tasks.rotation == "none"
    batch = tasks.sample(2, generator=torch.Generator().manual_seed(0))
    assert batch.support[0].shape == (2, 5, 1, 28, 28) and batch.query[0].shape == (2, 25, 1, 28, 28)
    random = omniglot_tasks("maml", "test", n_way=5, k_shot=1, n_query=1, rotation="random", root=FULL_ROOT)
    assert random.n_classes == 423 and random.rotation == "random"
    if torch.cuda.is_available():
        on_gpu = omniglot_tasks("maml", "train", root=FULL_ROOT, device="cuda").sample(2)
        assert on_gpu.support[0].is_cuda and on_gpu.info["classes"].is_cuda


# Pinned: checkpoints record these identities, so a change to the split or to the hashing rule
# would make every recorded run refuse its data. Change them only together with a note to users.
PINNED_IDENTITIES = {
    ("maml", "train"): (1200, "7aa938570aa296afc321ca0da0d5d4096dd6f2c4c11d4c41da810d42df0b4195"),
    ("maml", "test"): (423, "7219c5939fdad9da14402b893b5aac47cb716c6ee3724af2009118771ac1caab"),
    ("vinyals", "test"): (1692, "7f6e1faa87b2f6e0055c162cfee2bb35dd87c68430e1d1ee318aa5a696d0c53c"),
}


@pytest.mark.parametrize("split, subset", PINNED_IDENTITIES)
def test_identity_of_the_full_omniglot_splits_is_pinned(omniglot, split, subset):
    classes = omniglot_split(omniglot.characters, split, subset)
    sampler = EpisodeSampler(omniglot.images, classes, 5, 1, 1, characters=omniglot.characters)
    n_classes, sha256 = PINNED_IDENTITIES[split, subset]
    assert sampler.identity() == {"dataset": "omniglot", "image_size": 28, "n_classes": n_classes,
                                  "classes_sha256": sha256, "rotation": "none", "named": True}


# --- bad input ------------------------------------------------------------------------------------

IMAGES = numbered_images()
ROTATED = torch.tensor([0, 1, 12 + 0])  # character 0, character 1, character 0 turned 90 degrees


@pytest.mark.parametrize(
    "call, match, error",
    [
        (lambda: EpisodeSampler(IMAGES, torch.arange(12), 13, 1, 1),
         r"n_way = 13 .*exceeds the 12 classes", ConfigError),
        (lambda: EpisodeSampler(IMAGES, torch.arange(12), 5, 5, 20),
         r"k_shot \+ n_query = 25 exceeds the 20 drawers per Omniglot character", ConfigError),
        (lambda: EpisodeSampler(IMAGES, torch.arange(12), 0, 1, 1), r"n_way = 0 is not allowed", ConfigError),
        (lambda: EpisodeSampler(IMAGES, torch.arange(12), 5, 0, 1), r"k_shot = 0 is not allowed", ConfigError),
        (lambda: EpisodeSampler(IMAGES, torch.arange(12), 5, 1, -1), r"n_query = -1 is not allowed", ConfigError),
        (lambda: EpisodeSampler(IMAGES, torch.arange(12), 2.5, 1, 1), r"n_way = 2.5 is not allowed", ConfigError),
        (lambda: EpisodeSampler(IMAGES, torch.arange(12), 5, 1, 1).sample(0), r"meta_batch_size = 0", ConfigError),
        (lambda: EpisodeSampler(IMAGES, torch.arange(12), 5, 1, 1, rotation="sideways"),
         r"rotation = 'sideways' is not allowed: it must be one of", ConfigError),
        (lambda: EpisodeSampler(IMAGES, ROTATED, 2, 1, 1, rotation="random"),
         r"rotation = 'random' is not allowed", ConfigError),
        (lambda: EpisodeSampler(IMAGES.float(), torch.arange(12), 5, 1, 1),
         r"images must be a uint8 tensor", ConfigError),
        (lambda: EpisodeSampler(IMAGES, torch.tensor([0, 48]), 2, 1, 1), r"classes must lie in \[0, 48\)", ConfigError),
        (lambda: omniglot_split(NAMES, "lakes"), r"split = 'lakes' is not allowed: it must be one of", ConfigError),
        (lambda: omniglot_split(NAMES[:1000], "lake"), r"split='lake' needs all 1623 .* has 1000", DataError),
        (lambda: omniglot_split(NAMES, "lake"), r"split='lake', subset='train' found 0 characters, not the 964",
         DataError),
        (lambda: omniglot_split(NAMES, "lake", "val"), r"subset = 'val' is not allowed with split='lake' and "
                                                       r"validation=False", ConfigError),
        (lambda: omniglot_split(NAMES, "maml", "validation"), r"subset = 'validation' is not allowed", ConfigError),
        (lambda: omniglot_split(NAMES, "maml", "val"), r"subset = 'val' is not allowed .*validation=True", ConfigError),
        (lambda: omniglot_split(NAMES[:1000], "maml"), r"n_train = 1200 is not allowed", ConfigError),
        (lambda: omniglot_split(NAMES[:1000], "vinyals"), r"split='vinyals' needs all 1623 .* has 1000", DataError),
        (lambda: omniglot_split(NAMES, "vinyals"), r"found 1623 characters, not the published 1028", DataError),
        (lambda: load_omniglot(image_size=0, download=False), r"image_size = 0 is not allowed", ConfigError),
        (lambda: omniglot_tasks(k_shot=5, n_query=16, download=False),
         r"k_shot \+ n_query = 21 exceeds the 20 drawers", ConfigError),
        (lambda: omniglot_tasks(rotation="flip", download=False), r"rotation = 'flip' is not allowed", ConfigError),
        (lambda: omniglot_tasks(split="vinyal", download=False), r"split = 'vinyal' is not allowed", ConfigError),
    ],
)
def test_bad_arguments_raise_errors_that_name_them(call, match, error):
    with pytest.raises(error, match=match):
        call()
