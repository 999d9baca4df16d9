"""Fault injection for the data and the values a learner consumes (issue 10, "data proves itself").

Each test damages one thing and asserts the answer: a named error, or the recovered, correct
result. The Omniglot here is fake, written into a temporary folder (five alphabets of three
characters, 20 random 105x105 1-bit PNGs each), and MMTL_CACHE points at a temporary folder, so
neither the real data nor the real cache is touched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmtl_lib as ml
from mmtl_lib import data
from mmtl_lib.errors import ConfigError, DataError

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
ALPHABETS = {"images_background": ("Alpha", "Beta", "Gamma"), "images_evaluation": ("Delta", "Epsilon")}
CHARACTERS = 3  # per alphabet: 15 in all
N_TRAIN = 8  # the "maml" split's training characters for this small set (the real one: 1200 of 1623)


def write_png(path: Path, rng: np.random.Generator) -> None:
    Image.fromarray(rng.random((data.PNG_SIZE, data.PNG_SIZE)) > 0.1).save(path)  # mode "1": white paper


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake-omniglot")
    rng = np.random.default_rng(0)
    for half, alphabets in ALPHABETS.items():
        for alphabet in alphabets:
            for c in range(1, CHARACTERS + 1):
                folder = root / "omniglot-py" / half / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(1, data.DRAWERS + 1):
                    write_png(folder / f"{c:04d}_{d:02d}.png", rng)
    return root


@pytest.fixture
def fake(template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the fake Omniglot, found through MMTL_DATA, cached in a temporary MMTL_CACHE."""
    root = tmp_path / "data"
    shutil.copytree(template, root)
    monkeypatch.setenv("MMTL_DATA", str(root))
    monkeypatch.setenv("MMTL_CACHE", str(tmp_path / "cache"))
    # the "maml" split sized for 15 characters instead of 1623
    monkeypatch.setattr(data, "omniglot_split", functools.partial(data.omniglot_split, n_train=N_TRAIN, n_val=2))
    return root


def png(root: Path, alphabet="Beta", character=2, drawer=5) -> Path:
    half = next(h for h, names in ALPHABETS.items() if alphabet in names)
    return root / "omniglot-py" / half / alphabet / f"character{character:02d}" / f"{character:04d}_{drawer:02d}.png"


def one_line(error: BaseException) -> str:
    """What the command line prints: the message on one line."""
    return " ".join(str(error).split())


# --- the identity of the data a sampler draws from -----------------------------------------------


def test_identity_is_plain_json_naming_the_classes_in_order(fake):
    sampler = ml.omniglot_tasks("maml", "test", n_way=2, k_shot=1, n_query=1, download=False)
    identity = sampler.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert {k: v for k, v in identity.items() if k != "classes_sha256"} == {
        "dataset": "omniglot", "image_size": 28, "n_classes": 15 - N_TRAIN, "rotation": "none", "named": True}
    names = data.load_omniglot(download=False).characters
    text = "".join(f"{names[c]}@rot0\n" for c in sampler.classes.tolist())
    assert identity["classes_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert ml.omniglot_tasks("maml", "test", n_way=2, k_shot=1, n_query=1, download=False).identity() == identity


def test_identity_encodes_rotations_and_says_when_it_has_no_names():
    images = torch.zeros(3, data.DRAWERS, 4, 4, dtype=torch.uint8)
    classes = torch.tensor([0, 4])  # character 0, and character 1 turned 90 degrees (id 1 * 3 + 1)
    named = ml.EpisodeSampler(images, classes, 2, 1, 1, characters=["A/character01", "A/character02", "B/character01"])
    text = "A/character01@rot0\nA/character02@rot90\n"
    assert named.identity()["classes_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    anonymous = ml.EpisodeSampler(images, classes, 2, 1, 1).identity()
    assert anonymous["named"] is False
    assert anonymous["classes_sha256"] == hashlib.sha256(b"#0@rot0\n#1@rot90\n").hexdigest()
    with pytest.raises(ConfigError, match="characters must be the 3 names of the image rows .* got 2 entries"):
        ml.EpisodeSampler(images, classes, 2, 1, 1, characters=["A/character01", "A/character02"])


@pytest.mark.parametrize("remove", ["Gamma", "Delta/character03"])
def test_removing_an_alphabet_or_a_character_changes_the_identity_of_the_maml_split(fake, remove):
    def identities():
        return {subset: ml.omniglot_tasks("maml", subset, n_way=2, k_shot=1, n_query=1, download=False).identity()
                for subset in ("train", "test")}

    before = identities()
    alphabet = remove.split("/")[0]
    half = next(h for h, names in ALPHABETS.items() if alphabet in names)
    shutil.rmtree(fake / "omniglot-py" / half / remove)
    after = identities()
    for subset in ("train", "test"):
        assert after[subset]["classes_sha256"] != before[subset]["classes_sha256"], subset
    assert after["test"]["n_classes"] < before["test"]["n_classes"]


def test_a_character_folder_with_the_wrong_number_of_pngs_is_a_data_error_naming_it(fake):
    png(fake).unlink()
    with pytest.raises(DataError, match=r"Beta/character02 holds 19 PNGs; every Omniglot character has 20"):
        data.load_omniglot(download=False)


# --- the cache proves itself ---------------------------------------------------------------------


def zero_images_in_place(path: Path, images: torch.Tensor) -> None:
    """Zero the image bytes inside the saved file, leaving the rest (and the stored hash) alone."""
    raw = bytearray(path.read_bytes())
    start = raw.find(images.numpy().tobytes())
    assert start >= 0
    raw[start:start + images.numel()] = bytes(images.numel())
    path.write_bytes(raw)


def resave(path: Path, **changes) -> None:
    record = torch.load(path, weights_only=True)
    torch.save({**record, **changes}, path)


DAMAGE = {
    "image bytes zeroed in the file": lambda path, images: zero_images_in_place(path, images),
    "images replaced, hash kept": lambda path, images: resave(path, images=torch.zeros_like(images)),
    "character hash changed": lambda path, images: resave(path, characters_sha256="0" * 64),
    "images of another shape": lambda path, images: resave(path, images=images[:, :, :14, :14].clone()),
    "truncated file": lambda path, images: path.write_bytes(path.read_bytes()[:1000]),
    "not a record": lambda path, images: torch.save(images, path),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_rebuilt_with_a_warning_naming_it(fake, tmp_path, damage):
    built = data.load_omniglot(download=False)
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    DAMAGE[damage](cache_file, built.images)
    with pytest.warns(UserWarning, match=rf"the Omniglot cache {cache_file} is damaged .*: rebuilding it"):
        loaded = data.load_omniglot(download=False)
    assert torch.equal(loaded.images, built.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is intact again
        assert torch.equal(data.load_omniglot(download=False).images, built.images)


def test_a_cache_of_an_older_format_is_rebuilt_without_a_warning(fake, tmp_path, monkeypatch):
    built = data.load_omniglot(download=False)
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    resave(cache_file, format=1, images=torch.zeros_like(built.images))
    decoded = []
    decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda path, size: decoded.append(path) or decode(path, size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(data.load_omniglot(download=False).images, built.images)
    assert len(decoded) == 15 * data.DRAWERS


# --- broken image files --------------------------------------------------------------------------


def test_a_truncated_png_is_a_data_error_naming_the_file(fake):
    path = png(fake)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as error:
        data.load_omniglot(download=False)
    assert f"{path} cannot be decoded" in one_line(error.value) and "truncated or corrupt" in one_line(error.value)


def test_an_empty_file_is_a_data_error_naming_it(fake):
    path = png(fake)
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{path} cannot be decoded"):
        data.load_omniglot(download=False)


@pytest.mark.parametrize("size, mode, fmt, description", [
    ((64, 48), "RGB", "PNG", "64x48 PNG image of mode 'RGB'"),
    ((105, 105), "RGB", "PNG", "105x105 PNG image of mode 'RGB'"),
    ((80, 80), "L", "PNG", "80x80 PNG image of mode 'L'"),
    ((105, 105), "L", "JPEG", "105x105 JPEG image of mode 'L'"),
])
def test_an_image_that_is_not_an_omniglot_png_is_refused_naming_file_format_and_expectation(
        fake, size, mode, fmt, description):
    path = png(fake)
    Image.new(mode, size, "white").save(path, format=fmt)
    with pytest.raises(DataError) as error:
        data.load_omniglot(download=False)
    message = one_line(error.value)
    assert f"{path} is a {description}, not an Omniglot image" in message
    assert "105x105 PNGs of mode '1' or 'L'" in message


def test_an_8_bit_grey_png_of_the_right_size_is_accepted_as_is(fake):
    built = data.load_omniglot(download=False, image_size=105)
    path = png(fake)
    with Image.open(path) as image:
        grey = image.convert("L")
    grey.save(path)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))  # a new fingerprint
    assert torch.equal(data.load_omniglot(download=False, image_size=105).images, built.images)


def test_the_command_line_reports_a_broken_image_in_one_line_with_status_2(fake, tmp_path):
    path = png(fake)
    path.write_bytes(path.read_bytes()[:100])
    run = subprocess.run(
        [sys.executable, "-m", "mmtl_lib", "train", "--preset", "cpu", "--out", str(tmp_path / "run"), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "MMTL_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]


# --- NaN and infinity in a task batch ------------------------------------------------------------


def sine_tasks(n=3):
    return ml.Sinusoid(5, 5).sample(n, generator=ml.generator(0))


def with_value(tasks, where, task, value):
    (sx, sy), (qx, qy) = (t.clone() for t in tasks.support), (t.clone() for t in tasks.query)
    tensors = {"support x": sx, "support y": sy, "query x": qx, "query y": qy}
    tensors[where][task, 0] = value
    return ml.TaskBatch((sx, sy), (qx, qy), tasks.info)


@pytest.mark.parametrize("where", ["support x", "support y", "query x", "query y"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_task_data_is_a_data_error_naming_the_tensor_and_task_count(where, value):
    with pytest.raises(DataError, match=rf"tasks hold NaN or infinite values: {where} in 1 of 3 tasks"):
        with_value(sine_tasks(), where, 1, value).check()


def test_non_finite_support_is_refused_by_evaluate_meta_loss_and_meta_backward_before_any_gradient():
    bad = with_value(sine_tasks(), "support x", 0, float("nan"))
    model = ml.MLP(1, (8,), 1)
    learner = ml.MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=1)
    for call in (
        lambda: ml.evaluate(learner, bad),
        lambda: ml.meta_loss(model, dict(model.named_parameters()), bad, F.mse_loss, inner_steps=1, inner_lr=0.01),
        lambda: learner.meta_backward(bad),
    ):
        with pytest.raises(DataError, match="support x in 1 of 3 tasks"):
            call()
    assert all(p.grad is None for p in model.parameters())


def test_integer_labels_pass_the_finiteness_check():
    images = torch.zeros(4, data.DRAWERS, 4, 4, dtype=torch.uint8)
    tasks = ml.EpisodeSampler(images, torch.arange(4), 2, 1, 1).sample(2)
    assert tasks.support[1].dtype == torch.int64 and tasks.check() is tasks


# --- NaN in a multi-task loss, and DWA's zero loss -----------------------------------------------


def weighting(name):
    kw = {"GradNorm": dict(alpha=1.5), "RLW": dict(generator=torch.Generator().manual_seed(0)),
          "PCGrad": dict(generator=torch.Generator().manual_seed(0))}.get(name, {})
    return ml.mtl.WEIGHTINGS[name](2, **kw)


def two_task_losses(model, x):
    out = model(x)
    return {"depth": F.mse_loss(out["depth"], torch.zeros_like(out["depth"])),
            "normals": F.mse_loss(out["normals"], torch.ones_like(out["normals"]))}


@pytest.mark.parametrize("name", list(ml.mtl.WEIGHTINGS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_task_loss_is_refused_naming_the_task_before_any_state_changes(name, value):
    torch.manual_seed(0)
    model = ml.HardSharing(torch.nn.Linear(3, 4), {"depth": torch.nn.Linear(4, 1), "normals": torch.nn.Linear(4, 1)})
    method = weighting(name)
    x = torch.randn(6, 3)
    method.backward(two_task_losses(model, x), model.shared_parameters())  # one good step: state to protect
    model.zero_grad()
    for p in method.parameters():
        p.grad = None
    state = {k: v.clone() for k, v in method.state_dict().items()}
    losses = two_task_losses(model, x)
    losses["normals"] = losses["normals"] * value
    with pytest.raises(ConfigError, match=rf"losses \{{'normals': {value}\}} are not finite: {name} refuses"):
        method.backward(losses, model.shared_parameters())
    assert all(torch.equal(v, state[k]) for k, v in method.state_dict().items())
    assert all(p.grad is None for p in [*model.parameters(), *method.parameters()])
    with pytest.raises(ConfigError, match=r"losses \{'task 1': nan\} are not finite"):
        method.backward(torch.stack([losses["depth"], torch.tensor(float("nan"))]), model.shared_parameters())


def test_dwa_with_a_task_loss_of_zero_counts_its_ratio_as_one():
    dwa = ml.DWA(2, temperature=2.0)
    for loss in ([0.0, 1.0], [0.0, 0.5]):  # epochs e-2 and e-1: task 0 at exactly 0 throughout
        dwa.backward(torch.tensor(loss, requires_grad=True))
    expected = 2 * torch.softmax(torch.tensor([1.0, 0.5]) / 2.0, dim=0)
    assert torch.allclose(dwa.current_weights(), expected)
    dwa.backward(torch.tensor([3.0, 0.5], requires_grad=True))  # from 0 to 3: still ratio 1, not inf
    weights = dwa.current_weights()
    assert torch.isfinite(weights).all() and torch.allclose(weights.sum(), torch.tensor(2.0))


def test_gradnorm_with_a_first_loss_of_zero_keeps_finite_weights():
    torch.manual_seed(0)
    model = ml.HardSharing(torch.nn.Linear(3, 4), {"depth": torch.nn.Linear(4, 1), "normals": torch.nn.Linear(4, 1)})
    method = ml.GradNorm(2, alpha=1.5)
    x = torch.randn(6, 3)
    for scale in (0.0, 1.0):  # task "depth" starts at a loss of exactly 0
        losses = two_task_losses(model, x)
        out = method.backward({"depth": losses["depth"] * scale, "normals": losses["normals"]},
                              model.shared_parameters())
    # before: L_grad NaN, and the zero-start task's weight silently never moved (gradient 0)
    assert torch.isfinite(out["L_grad"]) and (method.loss_weights.grad != 0).all()
    assert torch.isfinite(method.loss_weights.grad).all()


# --- params that do not fit the model ------------------------------------------------------------


def sine_model_and_params():
    torch.manual_seed(0)
    model = ml.MLP(1, (8,), 1)
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}


def missing(params):
    return {k: v for k, v in params.items() if k != "head.weight"}


def extra(params):
    return {**params, "head.scale": torch.ones(1)}


def misshaped(params):
    return {**params, "head.weight": torch.zeros(1, 9)}


@pytest.mark.parametrize("change, match", [
    (missing, r"params does not match the model's parameters: missing \['head.weight'\], not in the model \[\]"),
    (extra, r"missing \[\], not in the model \['head.scale'\]"),
    (misshaped, r"params\['head.weight'\] is \(1, 9\), the model's is \(1, 8\)"),
])
def test_params_that_do_not_fit_the_model_are_refused_naming_them(change, match):
    model, params = sine_model_and_params()
    task = sine_tasks(1).task(0)
    with pytest.raises(ConfigError, match=match):
        ml.adapt(model, change(params), task.support, F.mse_loss, inner_steps=1, inner_lr=0.1)
    with pytest.raises(ConfigError, match=match):
        ml.inner_loop(model, change(params), task.support, F.mse_loss, inner_steps=0, inner_lr=0.1)
    for backend in ("loop", "vmap"):  # under vmap, a tensor's shape is the per-task shape
        with pytest.raises(ConfigError, match=match):
            ml.meta_loss(model, change(params), sine_tasks(), F.mse_loss, backend=backend, inner_steps=1, inner_lr=0.1)


def test_fitting_params_pass_for_zero_heads_and_learned_rates_under_vmap():
    model, params = sine_model_and_params()
    zero_head = {k: torch.zeros_like(v) if k.startswith("head.") else v for k, v in params.items()}
    rates = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    for inner_lr in (0.1, rates):
        losses, _ = ml.meta_loss(model, zero_head, sine_tasks(), F.mse_loss, backend="vmap", inner_steps=1,
                                 inner_lr=inner_lr)
        assert torch.isfinite(losses).all()
