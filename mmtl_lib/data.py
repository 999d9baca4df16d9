"""Omniglot for few-shot learning: load once, cache as a tensor, sample whole meta-batches at once.

Omniglot (Lake, Salakhutdinov and Tenenbaum, 2015) has 1623 handwritten characters from 50
alphabets, each drawn by 20 people ("drawers"). A few-shot task picks ``n_way`` characters and
gives ``k_shot`` labelled images of each (the *support* set) and ``n_query`` more to classify (the
*query* set). Three steps, each a function:

1. :func:`load_omniglot` decodes the 32,460 PNGs once into a ``uint8`` tensor
   ``[n_characters, 20, image_size, image_size]`` (ink = 255, background = 0), caches it in a
   user cache directory and reloads it from there in well under a second.
2. :func:`omniglot_split` returns the class ids of a train / val / test subset under the
   ``"maml"`` split (Finn et al. 2017), the ``"vinyals"`` split (Vinyals et al. 2016) or the
   ``"lake"`` split (Lake et al. 2015: background alphabets to learn from, evaluation alphabets
   to test on).
3. :class:`EpisodeSampler` draws ``meta_batch_size`` tasks of a subset as one
   :class:`~mmtl_lib.tasks.TaskBatch`, with tensor indexing on the device (no ``DataLoader``).

:func:`omniglot_tasks` does all three. **Class ids** encode a character and a rotation:
``class_id = quarter_turns * n_characters + character``, so an id below ``n_characters`` is
simply an index into the character tensor, and the ids ``>= n_characters`` are the rotated
copies that Vinyals et al. (and Reptile) add as new classes. Rotations are counter-clockwise, by
``quarter_turns * 90`` degrees (:func:`torch.rot90` on the last two dims, as PIL's
``Image.rotate`` does for the published split files).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import checks
from .errors import ConfigError, DataError
from .tasks import TaskBatch

DRAWERS = 20
"""Images per Omniglot character: one by each of 20 people."""
N_CHARACTERS = 1623
HALVES = ("images_background", "images_evaluation")
SPLITS = ("maml", "vinyals", "lake")
SUBSETS = ("train", "val", "test", "trainval")
ROTATIONS = ("none", "random", "classes")
CACHE_FORMAT = 2  # 2: the cache stores content hashes of its images and character names
PNG_SIZE = 105
"""Side of every Omniglot PNG, in pixels."""
PNG_MODES = ("1", "L")
"""The PIL modes an Omniglot PNG may have: 1-bit (as published) or 8-bit grey."""

# The Vinyals et al. (2016) split as published with Prototypical Networks (Snell et al. 2017,
# data/omniglot/splits/vinyals/*.txt): whole alphabets, except that Gurmukhi's characters 42-45 are
# test characters and the rest of Gurmukhi is train. tests/test_data.py checks this rule against
# the published files.
VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_TEST_ALPHABETS = (
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
    "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
)
VINYALS_TEST_CHARACTERS = tuple(f"Gurmukhi/character{i}" for i in range(42, 46))
VINYALS_SIZES = {"train": 1028, "val": 172, "test": 423, "trainval": 1200}

# Lake, Salakhutdinov and Tenenbaum (2015): the 30 alphabets of images_background (964
# characters) are for learning, the 20 of images_evaluation (659) for testing only. Validation,
# where asked for, holds out whole background alphabets (every sixth in name order, 158
# characters), because the test measures transfer to new alphabets and validation should measure
# the same thing; held-out characters of training alphabets would be easier, and would select
# settings for the wrong kind of generalisation.
LAKE_BACKGROUND_ALPHABETS = (
    "Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian", "Asomtavruli_(Georgian)",
    "Balinese", "Bengali", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Braille", "Burmese_(Myanmar)",
    "Cyrillic", "Early_Aramaic", "Futurama", "Grantha", "Greek", "Gujarati", "Hebrew",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Japanese_(hiragana)", "Japanese_(katakana)", "Korean",
    "Latin", "Malay_(Jawi_-_Arabic)", "Mkhedruli_(Georgian)", "N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Sanskrit", "Syriac_(Estrangelo)", "Tagalog", "Tifinagh",
)
LAKE_VAL_ALPHABETS = LAKE_BACKGROUND_ALPHABETS[5::6]
LAKE_SIZES = {"train": 806, "val": 158, "test": 659, "trainval": 964}


class OmniglotNotFoundError(DataError, FileNotFoundError):
    """The Omniglot image folders are not where they were looked for (and could not be downloaded)."""


class OmniglotImages(NamedTuple):
    """Omniglot as one tensor.

    Attributes:
        images: ``uint8`` ``[n_characters, 20, image_size, image_size]``; ink 255, background 0
            (the PNGs' white paper inverted), resized with antialiasing (Lanczos).
        characters: the ``n_characters`` names ``"Alphabet/characterNN"``, in the order of
            ``images``: the ``images_background`` half first, then ``images_evaluation``, each
            sorted by name (Python's string order).
        n_background: how many of them come from ``images_background`` (964 in the full set).
    """

    images: Tensor
    characters: tuple[str, ...]
    n_background: int


def user_cache_dir() -> Path:
    """Where derived data (and, if downloaded, Omniglot itself) is kept.

    ``$MMTL_CACHE`` if set, else ``$XDG_CACHE_HOME/mmtl``, else ``~/.cache/mmtl``.
    """
    if os.environ.get("MMTL_CACHE"):
        return Path(os.environ["MMTL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mmtl"


def _omniglot_py(folder: Path) -> Path:
    """``folder/omniglot-py`` or, if ``folder`` itself holds the halves, ``folder``."""
    if not (folder / "omniglot-py").is_dir() and any((folder / h).is_dir() for h in HALVES):
        return folder
    return folder / "omniglot-py"


def _not_found_message(candidates: Sequence[Path], extra: str = "") -> str:
    lines = ["Omniglot was not found. Looked for its image folders at:"]
    for folder in candidates:
        for half in HALVES:
            lines.append(f"  {_omniglot_py(folder) / half}  (missing)")
    lines.append(
        "To provide the data, set the environment variable MMTL_DATA (or pass root=...) to a folder "
        "that contains omniglot-py/images_background/<Alphabet>/<characterNN>/*.png and "
        "omniglot-py/images_evaluation/... (the extracted images_background.zip and "
        "images_evaluation.zip of https://github.com/brendenlake/omniglot), or call again with "
        "download=True on a machine that is online."
    )
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def find_omniglot(root=None, *, download: bool = True) -> Path:
    """The ``omniglot-py`` folder that holds ``images_background`` and ``images_evaluation``.

    Looks in ``root`` if given, else in ``$MMTL_DATA`` (if set) and then :func:`user_cache_dir`;
    ``root`` may be the folder that contains ``omniglot-py`` or ``omniglot-py`` itself. A folder
    that holds only one of the two halves is accepted with a warning (its characters are all that
    will load). If neither half is found anywhere and ``download`` is true, both halves are
    downloaded with :class:`torchvision.datasets.Omniglot` into ``root`` (if given) or the
    user cache directory.

    Raises:
        OmniglotNotFoundError: nothing found and ``download`` false or failing; the message lists
            every folder looked at and says how to provide the data.
    """
    if root is not None:
        candidates = [Path(root).expanduser()]
    else:
        candidates = [Path(os.environ["MMTL_DATA"]).expanduser()] if os.environ.get("MMTL_DATA") else []
        candidates.append(user_cache_dir())
    for folder in candidates:
        found = [h for h in HALVES if (_omniglot_py(folder) / h).is_dir()]
        if len(found) == len(HALVES):
            return _omniglot_py(folder)
        if found:
            missing = _omniglot_py(folder) / next(h for h in HALVES if h not in found)
            warnings.warn(
                f"{missing} is missing: only the characters of {found[0]} will load", stacklevel=2
            )
            return _omniglot_py(folder)
    if not download:
        raise OmniglotNotFoundError(_not_found_message(candidates, "(download=False: no download tried)"))
    target = candidates[0] if root is not None else candidates[-1]
    try:
        from torchvision.datasets import Omniglot

        for background in (True, False):
            Omniglot(str(target), background=background, download=True)
    except Exception as error:  # offline, read-only target, ...
        raise OmniglotNotFoundError(
            _not_found_message(candidates, f"Downloading into {target} failed: {error!r}")
        ) from error
    return target / "omniglot-py"


def _scan(folder: Path) -> tuple[list[str], list[list[Path]], int, str]:
    """Character names, their PNG paths, the background count and a fingerprint of the files.

    The fingerprint hashes every PNG's path, size and modification time, so that any added,
    removed, replaced or touched file invalidates a cache built from the folder.
    """
    names, paths, lines = [], [], []
    n_background = 0
    for half in HALVES:
        if not (folder / half).is_dir():
            continue
        for alphabet in sorted(e.name for e in os.scandir(folder / half) if e.is_dir()):
            for character in sorted(e.name for e in os.scandir(folder / half / alphabet) if e.is_dir()):
                entries = sorted(
                    (e for e in os.scandir(folder / half / alphabet / character) if e.name.endswith(".png")),
                    key=lambda e: e.name,
                )
                if len(entries) != DRAWERS:
                    raise DataError(
                        f"{folder / half / alphabet / character} holds {len(entries)} PNGs; every "
                        f"Omniglot character has {DRAWERS} (one per drawer): is the copy complete?"
                    )
                names.append(f"{alphabet}/{character}")
                paths.append([Path(e.path) for e in entries])
                for e in entries:
                    stat = e.stat()
                    lines.append(f"{half}/{alphabet}/{character}/{e.name}\t{stat.st_size}\t{stat.st_mtime_ns}")
                n_background += half == HALVES[0]
    if not names:
        raise OmniglotNotFoundError(f"{folder} holds no character folders <Alphabet>/<characterNN>/*.png")
    if len(set(names)) != len(names):
        raise DataError(f"{folder}: the same Alphabet/characterNN appears in both halves")
    fingerprint = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return names, paths, n_background, fingerprint


def _decode(path: Path, image_size: int) -> np.ndarray:
    """One PNG -> ``uint8`` ``[image_size, image_size]``, ink 255 on background 0.

    Refuses, rather than converts, a file that is not an Omniglot PNG (``PNG_SIZE`` square, mode
    ``"1"`` or ``"L"``): squashing a colour image of another size into the tensor would train on
    something that is not the data set without anyone noticing.

    Raises:
        DataError: the file cannot be decoded (truncated, corrupt) or is not an Omniglot PNG; the
            message names the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.size != (PNG_SIZE, PNG_SIZE) or image.mode not in PNG_MODES:
                width, height = image.size
                raise DataError(
                    f"{path} is a {width}x{height} {image.format} image of mode {image.mode!r}, not an "
                    f"Omniglot image: those are {PNG_SIZE}x{PNG_SIZE} PNGs of mode "
                    f"{' or '.join(map(repr, PNG_MODES))}; restore the original file"
                )
            gray = image.convert("L")  # 1-bit -> 0/255, so that Lanczos can antialias
    # what PIL raises for a truncated or corrupt file (SyntaxError: a broken PNG chunk)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{path} cannot be decoded ({error}): the file is truncated or corrupt; "
                        "restore the original") from error
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(gray, dtype=np.uint8)


def load_omniglot(
    root=None,
    *,
    image_size: int = 28,
    cache_dir=None,
    download: bool = True,
    rebuild: bool = False,
    verbose: bool = False,
) -> OmniglotImages:
    """All Omniglot characters as one ``uint8`` tensor, decoded once and then read from a cache.

    Args:
        root: where the data lies (see :func:`find_omniglot`); it is only read.
        image_size: side of the square images, 28 as in the MAML paper; the 105x105 originals are
            resized with Lanczos antialiasing.
        cache_dir: where the tensor is cached, default :func:`user_cache_dir`. One file per data
            folder and image size, ``omniglot_<size>px_<hash of the folder's path>.pt``.
        download: allow downloading the data if it is not found.
        rebuild: decode again even if the cache is fresh.
        verbose: print where the data came from and how long it took.

    The cache stores a fingerprint of the PNG files (every path, size and modification time);
    when it disagrees with the folder, the tensor is rebuilt. It also stores SHA-256 hashes of
    the image tensor and of the character names, checked on every load (about 15 ms for the 25 MB
    of 28-pixel images): a cache whose bytes were damaged is rebuilt with a warning that names
    it, instead of feeding wrong images to a run. A full build decodes 32,460 PNGs (about 7 s on
    one laptop core); a cached load takes a fraction of a second.

    Returns:
        an :class:`OmniglotImages`: ``images`` ``[n_characters, 20, image_size, image_size]``,
        the character names and the number from ``images_background``.

    Raises:
        DataError: a character folder without 20 PNGs, or a PNG that is truncated, corrupt or
            not an Omniglot image (each message names the file or folder).
    """
    image_size = checks.positive_int("image_size", image_size)
    start = time.perf_counter()
    folder = find_omniglot(root, download=download)
    names, paths, n_background, fingerprint = _scan(folder)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir()
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    cache_file = cache_dir / f"omniglot_{image_size}px_{key}.pt"
    if cache_file.is_file() and not rebuild:
        images = _cached_images(cache_file, fingerprint, image_size, names)
        if images is not None:
            if verbose:
                print(f"Omniglot from the cache {cache_file} ({time.perf_counter() - start:.2f} s)")
            return OmniglotImages(images, tuple(names), n_background)
    images = np.empty((len(names), DRAWERS, image_size, image_size), dtype=np.uint8)
    for i, character in enumerate(paths):
        for j, path in enumerate(character):
            images[i, j] = _decode(path, image_size)
    data = OmniglotImages(torch.from_numpy(images), tuple(names), n_background)
    record = {
        "format": CACHE_FORMAT, "fingerprint": fingerprint, "image_size": image_size,
        "characters": names, "n_background": n_background, "images": data.images,
        "images_sha256": _tensor_sha256(data.images), "characters_sha256": _names_sha256(names),
    }
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.partial")
        torch.save(record, partial)
        os.replace(partial, cache_file)  # atomic: a concurrent reader sees the old or the new file
    except OSError as error:
        warnings.warn(f"could not write the cache {cache_file}: {error!r}", stacklevel=2)
    if verbose:
        print(
            f"Omniglot decoded from {folder} in {time.perf_counter() - start:.1f} s "
            f"({len(names)} characters), cached in {cache_file}"
        )
    return data


def _tensor_sha256(images: Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().data).hexdigest()


def _names_sha256(names: Sequence[str]) -> str:
    """SHA-256 of the names, one line each (every line ends in a newline)."""
    return hashlib.sha256("".join(f"{name}\n" for name in names).encode()).hexdigest()


def _cached_images(cache_file: Path, fingerprint: str, image_size: int, names: list[str]) -> Tensor | None:
    """The images of ``cache_file`` if it was built from these files and is intact, else ``None``.

    A cache built from other files (or by another version) is stale and silently rebuilt; one
    whose content fails its hashes, or that cannot be read, is damaged, and the rebuild warns.
    """
    def damaged(why: str) -> None:
        warnings.warn(f"the Omniglot cache {cache_file} is damaged ({why}): rebuilding it", stacklevel=4)

    try:
        cached = torch.load(cache_file, weights_only=True)
    except Exception as error:  # whatever unpickling a damaged file raises: the cache is rebuilt
        return damaged(f"unreadable: {error!r}")
    if not isinstance(cached, dict):
        return damaged(f"it holds a {type(cached).__name__}, not a cache record")
    if (
        cached.get("format") != CACHE_FORMAT
        or cached.get("fingerprint") != fingerprint
        or cached.get("image_size") != image_size
        or list(cached.get("characters", ())) != names
    ):
        return None
    images = cached.get("images")
    shape = (len(names), DRAWERS, image_size, image_size)
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != shape:
        return damaged(f"its images are not a uint8 tensor of shape {shape}")
    if cached.get("characters_sha256") != _names_sha256(names):
        return damaged("its character names do not match their stored hash")
    if cached.get("images_sha256") != _tensor_sha256(images):
        return damaged("its images do not match their stored hash")
    return images


def class_ids(characters: Tensor, quarter_turns: Tensor | int, n_characters: int) -> Tensor:
    """Class ids of (character, rotation) pairs: ``quarter_turns * n_characters + characters``."""
    return torch.as_tensor(quarter_turns) % 4 * n_characters + characters


def split_class_ids(classes: Tensor, n_characters: int) -> tuple[Tensor, Tensor]:
    """``(characters, quarter_turns)`` of class ids; the inverse of :func:`class_ids`."""
    return classes % n_characters, classes // n_characters


def _with_rotations(characters: Tensor, n_characters: int) -> Tensor:
    return torch.cat([class_ids(characters, k, n_characters) for k in range(4)])


def omniglot_split(
    characters: Sequence[str],
    split: str = "maml",
    subset: str = "train",
    *,
    seed: int = 1,
    validation: bool = False,
    rotations_as_classes: bool | None = None,
    n_train: int = 1200,
    n_val: int = 100,
) -> Tensor:
    """The class ids of one subset of a few-shot split of Omniglot.

    Args:
        characters: the character names, ``OmniglotImages.characters``.
        split: ``"maml"``: all characters shuffled with ``seed``; the first ``n_train`` (1200)
            are ``"trainval"``, the rest (423) ``"test"`` (Finn et al. 2017, after Santoro et al.
            2016). With ``validation`` the last ``n_val`` (100) of those 1200 become ``"val"``
            and ``"train"`` keeps 1100; without, ``"train"`` is all 1200. The shuffle is
            :func:`torch.randperm`, not the reference code's ``random.shuffle``, so the characters
            differ from theirs (their counts do not).
            ``"vinyals"``: the fixed split of Vinyals et al. (2016) as published with Prototypical
            Networks: 1028 train, 172 val, 423 test characters (``"trainval"``: 1200), chosen by
            alphabet. Needs all 1623 characters.
            ``"lake"``: Lake et al.'s (2015) original split: ``"trainval"`` is the 30 alphabets
            of ``images_background`` (964 characters), ``"test"`` the 20 alphabets of
            ``images_evaluation`` (659), used for testing only. With ``validation``, whole
            background alphabets are held out as ``"val"`` (:data:`LAKE_VAL_ALPHABETS`, every
            sixth in name order: 158 characters) and ``"train"`` keeps 806; without, ``"train"``
            is all 964. Alphabets, not characters, are held out because the test is on new
            alphabets. Needs all 1623 characters.
        subset: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        seed: the ``"maml"`` shuffle's seed (ignored by the others).
        validation: ``"maml"`` and ``"lake"``: hold characters out of ``"train"`` as ``"val"``.
        rotations_as_classes: add each character's rotations by 90, 180 and 270 degrees as three
            new classes (4x the classes). Default: true for ``"vinyals"`` (4112 / 688 / 1692
            classes), false for ``"maml"`` and ``"lake"``.
        n_train, n_val: the ``"maml"`` sizes; change them only for a subset of the data.

    Returns:
        ``int64`` class ids ``[n_classes]``, sorted (see the module's docstring for the encoding):
        with rotations off, indices into ``OmniglotImages.images``.
    """
    checks.one_of("split", split, SPLITS)
    checks.one_of("subset", subset, SUBSETS)
    n = len(characters)
    if rotations_as_classes is None:
        rotations_as_classes = split == "vinyals"
    if split == "maml":
        n_train = checks.positive_int("n_train", n_train)
        n_val = checks.positive_int("n_val", n_val)
        if n_train >= n:
            raise ConfigError(
                f"n_train = {n_train} is not allowed: split='maml' needs fewer training characters "
                f"than the {n} in the data, so that some are left to test on"
            )
        if validation and n_val >= n_train:
            raise ConfigError(f"n_val = {n_val} is not allowed: it must be < n_train = {n_train}")
        if subset == "val" and not validation:
            raise ConfigError(
                "subset = 'val' is not allowed with split='maml' and validation=False: pass "
                f"validation=True to hold {n_val} of the {n_train} training characters out"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        n_fit = n_train - n_val if validation else n_train
        chosen = {
            "train": order[:n_fit], "val": order[n_fit:n_train],
            "trainval": order[:n_train], "test": order[n_train:],
        }[subset]
    elif split == "lake":
        chosen = _lake_split(characters, subset, validation)
    else:
        if n != N_CHARACTERS:
            raise DataError(
                f"split='vinyals' needs all {N_CHARACTERS} Omniglot characters (images_background "
                f"and images_evaluation); the data has {n}"
            )
        in_subset = []
        for name in characters:
            alphabet = name.split("/")[0]
            if name in VINYALS_TEST_CHARACTERS or alphabet in VINYALS_TEST_ALPHABETS:
                in_subset.append(subset == "test")
            elif alphabet in VINYALS_VAL_ALPHABETS:
                in_subset.append(subset in ("val", "trainval"))
            else:
                in_subset.append(subset in ("train", "trainval"))
        chosen = torch.tensor(in_subset).nonzero().flatten()
        if len(chosen) != VINYALS_SIZES[subset]:
            raise DataError(
                f"split='vinyals', subset={subset!r} found {len(chosen)} characters, not the "
                f"published {VINYALS_SIZES[subset]}: are these the canonical Omniglot folder names?"
            )
    chosen = chosen.sort().values
    return _with_rotations(chosen, n) if rotations_as_classes else chosen


def _lake_split(characters: Sequence[str], subset: str, validation: bool) -> Tensor:
    """The indices of ``subset`` of Lake et al.'s background / evaluation split (see :func:`omniglot_split`)."""
    if len(characters) != N_CHARACTERS:
        raise DataError(
            f"split='lake' needs all {N_CHARACTERS} Omniglot characters (images_background and "
            f"images_evaluation); the data has {len(characters)}"
        )
    if subset == "val" and not validation:
        raise ConfigError(
            "subset = 'val' is not allowed with split='lake' and validation=False: pass validation=True "
            f"to hold the background alphabets {', '.join(LAKE_VAL_ALPHABETS)} out"
        )
    alphabets = [name.split("/")[0] for name in characters]
    background = [a in LAKE_BACKGROUND_ALPHABETS for a in alphabets]
    held_out = [a in LAKE_VAL_ALPHABETS for a in alphabets]
    if subset == "test":
        keep = [not b for b in background]
    elif subset == "val":
        keep = held_out
    elif subset == "train" and validation:
        keep = [b and not h for b, h in zip(background, held_out)]
    else:  # "trainval", or "train" without validation
        keep = background
    chosen = torch.tensor(keep).nonzero().flatten()
    size = LAKE_SIZES["trainval" if subset == "train" and not validation else subset]
    if len(chosen) != size:
        raise DataError(
            f"split='lake', subset={subset!r} found {len(chosen)} characters, not the {size} of Omniglot's "
            "images_background / images_evaluation: are these the canonical Omniglot folder names?"
        )
    return chosen


class EpisodeSampler:
    """Draws meta-batches of ``n_way``-way, ``k_shot``-shot classification tasks.

    Each task picks ``n_way`` distinct classes of ``classes`` and, for each, ``k_shot + n_query``
    distinct drawers: the first ``k_shot`` images go to the support set, the others to the query
    set, so the two never share an image. Label ``i`` of a task is the ``i``-th class drawn, in
    random order, so the mapping class -> label differs from task to task (a learner cannot
    memorise it). Everything is drawn for the whole meta-batch at once, as index tensors, and
    the images are gathered from a device-resident ``uint8`` tensor.

    Args:
        images: ``uint8`` ``[n_characters, n_drawers, image_size, image_size]``, e.g.
            ``load_omniglot().images``; moved to ``device`` once.
        classes: ``int64`` ``[n_classes]`` class ids, e.g. from :func:`omniglot_split`.
        n_way, k_shot, n_query: classes per task, support and query images per class.
        rotation: ``"none"``: each class as its id says (rotated classes, if the ids encode
            them, are rotated). ``"random"``: in addition, each class of each task is turned by a
            random multiple of 90 degrees, the same for all its images in that task (the MAML
            reference code's augmentation); not allowed with rotated class ids, since it would
            turn rotated classes into each other.
        device: where the images live and the batches are built.
        characters: the names of the ``n_characters`` image rows, ``OmniglotImages.characters``;
            they make :meth:`identity` name the classes (``None``: it hashes class ids only).
    """

    def __init__(
        self,
        images: Tensor,
        classes: Tensor,
        n_way: int,
        k_shot: int,
        n_query: int,
        *,
        rotation: str = "none",
        device="cpu",
        characters: Sequence[str] | None = None,
    ):
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ConfigError(
                "images must be a uint8 tensor [n_characters, n_drawers, image_size, image_size], "
                f"got {getattr(images, 'dtype', type(images).__name__)} of shape "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        n_characters, n_drawers, height, width = images.shape
        if height != width:
            raise ConfigError(f"images must be square to rotate them, got {height}x{width}")
        classes = torch.as_tensor(classes).cpu()
        if classes.dim() != 1 or classes.dtype not in (torch.int64, torch.int32) or len(classes) == 0:
            raise ConfigError(f"classes must be a non-empty 1-d int64 tensor, got {classes!r:.200}")
        if classes.min() < 0 or classes.max() >= 4 * n_characters:
            raise ConfigError(
                f"classes must lie in [0, {4 * n_characters}) for {n_characters} characters "
                f"(id = quarter_turns * n_characters + character), got {classes.min()}..{classes.max()}"
            )
        if len(classes.unique()) != len(classes):
            raise ConfigError("classes holds duplicate class ids")
        if characters is not None:
            characters = tuple(characters)
            if len(characters) != n_characters or not all(isinstance(c, str) for c in characters):
                raise ConfigError(
                    f"characters must be the {n_characters} names of the image rows (strings), got "
                    f"{len(characters)} entries"
                )
        self.characters = characters
        self.rotation = checks.one_of("rotation", rotation, ROTATIONS[:2])
        if rotation == "random" and bool((classes >= n_characters).any()):
            raise ConfigError(
                "rotation = 'random' is not allowed with rotated class ids (rotations as classes): "
                "random turns would make the rotated classes of a character indistinguishable"
            )
        self.n_way = checks.positive_int("n_way", n_way)
        self.k_shot = checks.positive_int("k_shot", k_shot)
        self.n_query = checks.positive_int("n_query", n_query)
        if self.n_way > len(classes):
            raise ConfigError(
                f"n_way = {n_way} is not allowed: it exceeds the {len(classes)} classes of this split"
            )
        if self.k_shot + self.n_query > n_drawers:
            raise ConfigError(
                f"k_shot + n_query = {self.k_shot + self.n_query} exceeds the {n_drawers} drawers "
                f"per Omniglot character (k_shot = {k_shot}, n_query = {n_query})"
            )
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.classes = classes.long()
        self.n_characters, self.n_drawers, self.image_size = n_characters, n_drawers, height
        self._rotated = self.rotation == "random" or bool((self.classes >= n_characters).any())
        # rot90 as a gather: _turns[k][p] is the source pixel of output pixel p after k quarter turns
        pixels = torch.arange(height * width).view(height, width)
        self._turns = torch.stack([torch.rot90(pixels, k, (0, 1)).flatten() for k in range(4)])
        self._turns = self._turns.to(self.device)
        # uint8 -> [0, 1] off the CPU by table lookup: CUDA divides by a scalar as a multiplication
        # by its reciprocal, so x / 255 there can differ in the last bit from x / 255 on the CPU
        # (which made this table); on the CPU the division is faster than the lookup
        self._to_float = (torch.arange(256, dtype=torch.float32) / 255).to(self.device)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def identity(self) -> dict:
        """What this sampler draws from, in plain JSON values, for a checkpoint to record and compare.

        ``{"dataset": "omniglot", "image_size", "n_classes", "classes_sha256", "rotation",
        "named"}``. ``classes_sha256`` is the SHA-256 of one line per class, in the order of
        ``classes``, each ending in a newline: ``"Alphabet/characterNN@rotD"`` with ``D`` the
        degrees its class id turns it by (0, 90, 180, 270). So any change to which characters a
        split holds (an alphabet missing from the data folder reshuffles the ``"maml"`` split)
        changes it. Built without ``characters``, the lines are ``"#index@rotD"`` (an image row
        index) and ``"named"`` is false: such an identity cannot tell data sets with the same
        number of characters apart.
        """
        characters, turns = split_class_ids(self.classes, self.n_characters)
        names = self.characters if self.characters is not None else [f"#{i}" for i in range(self.n_characters)]
        lines = [f"{names[c]}@rot{90 * k}" for c, k in zip(characters.tolist(), turns.tolist())]
        return {
            "dataset": "omniglot", "image_size": int(self.image_size), "n_classes": self.n_classes,
            "classes_sha256": _names_sha256(lines), "rotation": self.rotation, "named": self.characters is not None,
        }

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler(n_classes={self.n_classes}, n_way={self.n_way}, k_shot={self.k_shot}, "
            f"n_query={self.n_query}, rotation={self.rotation!r}, image_size={self.image_size}, "
            f"device={self.device})"
        )

    def sample(self, meta_batch_size: int, *, generator: torch.Generator | None = None) -> TaskBatch:
        """``meta_batch_size`` tasks as one :class:`~mmtl_lib.tasks.TaskBatch` on ``device``.

        Args:
            generator: the source of randomness (on any device); ``None``: torch's global one.

        Returns:
            support ``x`` ``[meta_batch_size, n_way * k_shot, 1, image_size, image_size]`` float32
            in [0, 1] (ink 1) and ``y`` ``[meta_batch_size, n_way * k_shot]`` int64 labels in
            ``0..n_way-1``, grouped by label (``k_shot`` of label 0, then of label 1, ...);
            query likewise with ``n_query``. ``info``:
            ``classes`` ``[meta_batch_size, n_way]``: the class id of each label;
            ``class_index`` ``[meta_batch_size, n_way]``: its position in ``self.classes``
            (global labels ``0..n_classes-1`` for a pretraining baseline);
            ``rotation`` ``[meta_batch_size, n_way]``: quarter turns applied to each label's images;
            ``drawers`` ``[meta_batch_size, n_way, k_shot + n_query]``: which drawers' images
            were used, support first.
        """
        b = checks.positive_int("meta_batch_size", meta_batch_size)
        n, k, q = self.n_way, self.k_shot, self.n_query
        rng = {"generator": generator, "device": generator.device if generator is not None else "cpu"}
        # the n largest of n_classes uniform numbers, in decreasing order: a uniformly random
        # ordered sample without replacement (topk is linear in n_classes, argsort is not)
        class_index = torch.rand(b, self.n_classes, **rng).topk(n, dim=1).indices.cpu()
        drawers = torch.rand(b, n, self.n_drawers, **rng).argsort(dim=2)[:, :, : k + q].cpu()
        classes = self.classes[class_index]
        characters, turns = split_class_ids(classes, self.n_characters)
        if self.rotation == "random":
            turns = torch.randint(0, 4, (b, n), **rng).cpu()
        characters, drawers_d = characters.to(self.device), drawers.to(self.device)
        x = self.images[characters[:, :, None], drawers_d]  # [b, n, k + q, size, size] uint8
        if self._rotated:
            index = self._turns[turns.to(self.device)][:, :, None, :].expand(-1, -1, k + q, -1)
            x = x.flatten(3).gather(3, index).view_as(x)
        # float32 in [0, 1], the same bits on every device (see _to_float)
        x = x.float().div_(255) if self.device.type == "cpu" else self._to_float[x.long()]
        x = x.unsqueeze(3)  # [b, n, k + q, 1, size, size]
        size = (1, self.image_size, self.image_size)
        labels = torch.arange(n, device=self.device)
        support = (
            x[:, :, :k].reshape(b, n * k, *size),
            labels.repeat_interleave(k).expand(b, -1).contiguous(),
        )
        query = (
            x[:, :, k:].reshape(b, n * q, *size),
            labels.repeat_interleave(q).expand(b, -1).contiguous(),
        )
        info = {"classes": classes, "class_index": class_index, "rotation": turns, "drawers": drawers}
        return TaskBatch(support, query, {name: t.to(self.device) for name, t in info.items()})


def omniglot_tasks(
    split: str = "maml",
    subset: str = "train",
    *,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 15,
    image_size: int = 28,
    rotation: str | None = None,
    seed: int = 1,
    validation: bool = False,
    root=None,
    cache_dir=None,
    download: bool = True,
    device="cpu",
) -> EpisodeSampler:
    """An :class:`EpisodeSampler` over one subset of Omniglot, from the data folder in one call.

    ``rotation``: ``"classes"`` (rotations by 90, 180, 270 degrees as new classes: Vinyals et al.,
    Reptile), ``"random"`` (a random quarter turn per class per task: the MAML code) or ``"none"``;
    default ``"classes"`` for ``split="vinyals"`` and ``"none"`` for ``split="maml"``.
    The other arguments are those of :func:`load_omniglot`, :func:`omniglot_split` and
    :class:`EpisodeSampler`. For example, 20-way 1-shot MAML training tasks on a GPU::

        tasks = omniglot_tasks("maml", "train", n_way=20, k_shot=1, n_query=1, rotation="random",
                               device="cuda")
        batch = tasks.sample(16, generator=torch.Generator().manual_seed(0))
    """
    checks.one_of("split", split, SPLITS)
    checks.one_of("subset", subset, SUBSETS)
    if rotation is None:
        rotation = "classes" if split == "vinyals" else "none"
    checks.one_of("rotation", rotation, ROTATIONS)
    for name, value in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query)):
        checks.positive_int(name, value)
    if k_shot + n_query > DRAWERS:  # fail before loading anything
        raise ConfigError(
            f"k_shot + n_query = {k_shot + n_query} exceeds the {DRAWERS} drawers per Omniglot "
            f"character (k_shot = {k_shot}, n_query = {n_query})"
        )
    data = load_omniglot(root, image_size=image_size, cache_dir=cache_dir, download=download)
    classes = omniglot_split(
        data.characters, split, subset, seed=seed, validation=validation,
        rotations_as_classes=rotation == "classes",
    )
    return EpisodeSampler(
        data.images, classes, n_way, k_shot, n_query,
        rotation="random" if rotation == "random" else "none", device=device, characters=data.characters,
    )
