"""A small synthetic defect set: textures and simple objects with scratches, stains and holes, with exact masks.

For demos and tests where MVTec AD cannot be downloaded. Every image is a pure function of (category, defect type,
seed), so the same seed always gives the same pixels. `write_synthetic_mvtec` lays the set out exactly like the MVTec AD
folder (`<category>/train/good`, `test/<good|defect>`, `ground_truth/<defect>/<stem>_mask.png`), so the same loaders,
CLI and protocol run on it.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic_io import folders_removed_on_failure, make_partial_dir, replace_folder

TEXTURE_CATEGORIES: tuple[str, ...] = ("stripes", "weave", "wood")
OBJECT_CATEGORIES: tuple[str, ...] = ("disc", "plate")
CATEGORIES: tuple[str, ...] = TEXTURE_CATEGORIES + OBJECT_CATEGORIES
DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "hole")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(size, dtype=np.float32)
    return np.meshgrid(coords, coords, indexing="ij")


def _texture(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    rows, cols = _grid(size)
    phase = rng.uniform(0, 2 * np.pi)
    if category == "stripes":
        period = size / 10
        pattern = 0.5 + 0.35 * np.sin(2 * np.pi * (rows + 0.3 * cols) / period + phase)
        base = np.array([0.55, 0.45, 0.35])
    elif category == "weave":
        period = size / 14
        pattern = 0.5 + 0.25 * (np.sin(2 * np.pi * rows / period + phase) * np.sin(2 * np.pi * cols / period + phase))
        base = np.array([0.35, 0.45, 0.6])
    elif category == "wood":
        center = rng.uniform(-0.5 * size, 0.0), rng.uniform(0, size)
        radius = np.hypot(rows - center[0], cols - center[1])
        pattern = 0.5 + 0.3 * np.sin(2 * np.pi * radius / (size / 12) + phase) ** 2
        base = np.array([0.7, 0.5, 0.3])
    else:
        raise ValueError(f"Unknown texture category {category!r}; expected one of {TEXTURE_CATEGORIES}.")
    image = pattern[..., None] * base[None, None, :] * 1.4
    return image + rng.normal(0, 0.02, size=image.shape)


def _object(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    rows, cols = _grid(size)
    image = np.full((size, size, 3), 0.15) + rng.normal(0, 0.01, size=(size, size, 3))
    center = size / 2 + rng.uniform(-0.03, 0.03, size=2) * size
    if category == "disc":
        inside = np.hypot(rows - center[0], cols - center[1]) < 0.32 * size
        inner = np.hypot(rows - center[0], cols - center[1]) < 0.12 * size
        image[inside] = [0.75, 0.72, 0.65]
        image[inner] = [0.3, 0.3, 0.32]
    elif category == "plate":
        half = 0.3 * size
        inside = (np.abs(rows - center[0]) < half) & (np.abs(cols - center[1]) < half)
        image[inside] = [0.6, 0.62, 0.7]
        for dr in (-0.15, 0.15):
            for dc in (-0.15, 0.15):
                bolt = np.hypot(rows - center[0] - dr * size, cols - center[1] - dc * size) < 0.035 * size
                image[bolt] = [0.25, 0.25, 0.25]
    else:
        raise ValueError(f"Unknown object category {category!r}; expected one of {OBJECT_CATEGORIES}.")
    return image


def make_normal_image(category: str, size: int = 224, seed: int = 0) -> Image.Image:
    """A defect-free image of `category`, RGB, `size` x `size`."""
    if category not in CATEGORIES:
        raise ValueError(f"Unknown synthetic category {category!r}; expected one of {CATEGORIES}.")
    rng = np.random.default_rng([seed, CATEGORIES.index(category), 0])
    image = _texture(category, size, rng) if category in TEXTURE_CATEGORIES else _object(category, size, rng)
    return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))


def _defect_mask(defect_type: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mask bool (size, size), colour (3,)) for one defect placed in the central region."""
    rows, cols = _grid(size)
    center = rng.uniform(0.3, 0.7, size=2) * size
    if defect_type == "scratch":
        angle = rng.uniform(0, np.pi)
        length, width = rng.uniform(0.2, 0.35) * size, max(1.5, 0.012 * size)
        along = (rows - center[0]) * np.cos(angle) + (cols - center[1]) * np.sin(angle)
        across = -(rows - center[0]) * np.sin(angle) + (cols - center[1]) * np.cos(angle)
        mask = (np.abs(along) < length / 2) & (np.abs(across) < width)
        colour = np.array([0.95, 0.95, 0.9])
    elif defect_type == "stain":
        radii = rng.uniform(0.05, 0.1, size=2) * size
        mask = ((rows - center[0]) / radii[0]) ** 2 + ((cols - center[1]) / radii[1]) ** 2 < 1
        colour = np.array([0.55, 0.2, 0.1])
    elif defect_type == "hole":
        mask = np.hypot(rows - center[0], cols - center[1]) < rng.uniform(0.03, 0.06) * size
        colour = np.array([0.02, 0.02, 0.02])
    else:
        raise ValueError(f"Unknown defect type {defect_type!r}; expected one of {DEFECT_TYPES}.")
    return mask, colour


def make_sample(
    category: str, defect_type: str | None = None, size: int = 224, seed: int = 0
) -> tuple[Image.Image, Image.Image | None]:
    """An image of `category`, with one defect of `defect_type` (or none), and its mask (mode "L", 255 = defect)."""
    image = make_normal_image(category, size, seed)
    if defect_type is None:
        return image, None
    if defect_type not in DEFECT_TYPES:
        raise ValueError(f"Unknown defect type {defect_type!r}; expected one of {DEFECT_TYPES}.")
    rng = np.random.default_rng([seed, DEFECT_TYPES.index(defect_type), 1])
    mask, colour = _defect_mask(defect_type, size, rng)
    pixels = np.asarray(image, dtype=np.float32) / 255
    alpha = 0.85 if defect_type == "stain" else 1.0
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * colour
    defective = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return defective, Image.fromarray(mask.astype(np.uint8) * 255)


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


MIN_IMAGE_SIZE = 24
"""Smallest side for which every defect changes at least one pixel (its mask is never empty): the smallest hole,
radius 0.03 x side, then still covers a pixel centre (radius > sqrt(2) / 2)."""
MAX_IMAGE_SIZE = 4096
"""Largest side written: generating one image takes ~72 bytes per pixel (1.2 GB at 4096), and Pillow refuses to read
back images over 178,956,970 pixels (13,378 px square) by default."""
_SEEDS_PER_SPLIT = 1_000

SYNTHETIC_MARKER = ".maeday-synthetic.json"
"""Written into every category folder with the settings it was written with. Only a folder holding it (or an empty
one) is ever replaced: a category name such as `wood` may well name a folder of real images."""


def write_synthetic_mvtec(
    root: str | os.PathLike,
    categories: tuple[str, ...] | list[str] = CATEGORIES,
    num_train: int = 8,
    num_test_good: int = 4,
    num_test_per_defect: int = 3,
    image_size: int = 224,
    seed: int = 0,
) -> Path:
    """Write the synthetic set in the MVTec AD layout under `root` and return `root`.

    Layout per category: `train/good/000.png`, `test/good/000.png`, `test/<defect>/000.png`,
    `ground_truth/<defect>/000_mask.png`. Each category appears whole or not at all (written aside, then renamed).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{os.fspath(root)!r} is a file; expected a folder (created if missing).")
    for category in categories:
        if category not in CATEGORIES:
            raise ValueError(f"Unknown synthetic category {category!r}; expected one of {CATEGORIES}.")
    for name, count in (("num_train", num_train), ("num_test_good", num_test_good),
                        ("num_test_per_defect", num_test_per_defect)):
        # Each split draws from its own block of 1,000 sample seeds: more would repeat the next split's images. At
        # least one of each: the MVTec loaders refuse a category without train/good, test/good or a defect's images.
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _SEEDS_PER_SPLIT:
            raise ValueError(f"{name} must be an integer in [1, {_SEEDS_PER_SPLIT}], got {count!r}.")
    if (isinstance(image_size, bool) or not isinstance(image_size, int)
            or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
        raise ValueError(
            f"image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (smaller defects can vanish from "
            f"their mask; larger images take over a GB each to generate), got {image_size!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    for category in categories:
        _require_replaceable(root / category)
    with folders_removed_on_failure(root):
        for category in categories:
            settings = synthetic_settings(category, num_train=num_train, num_test_good=num_test_good,
                                          num_test_per_defect=num_test_per_defect, image_size=image_size, seed=seed)
            # Each category is written whole into a folder of its own, then renamed into place: a reader (or a
            # concurrent writer, e.g. another process of an `accelerate launch`) never sees half a category.
            partial = make_partial_dir(root, prefix=f".{category}.partial-")
            try:
                _write_category(partial, category, num_train, num_test_good, num_test_per_defect, image_size, seed)
                (partial / SYNTHETIC_MARKER).write_text(json.dumps(settings, indent=2) + "\n")
                try:
                    # (checked again once renamed aside: a folder may have appeared there while this one was written)
                    replace_folder(partial, root / category,
                                   check_replaced=lambda previous: _require_replaceable(previous, root / category))
                except OSError:
                    if written_settings(root / category) != settings:  # not a concurrent writer that finished first
                        raise
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    return root


def synthetic_settings(category: str, **settings: int) -> dict:
    """What `SYNTHETIC_MARKER` records: the category and the settings that fix its files (`num_train`,
    `num_test_good`, `num_test_per_defect`, `image_size`, `seed`; the defaults of `write_synthetic_mvtec` for those
    not given)."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(write_synthetic_mvtec).parameters.items()
                if name not in ("root", "categories")}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"Unknown synthetic set settings {sorted(unknown)}; expected some of {sorted(defaults)}.")
    return {"category": category, **defaults, **settings}


def written_settings(category_dir: str | os.PathLike) -> dict | None:
    """The settings a category folder was written with (its `SYNTHETIC_MARKER`), or None if it has none."""
    try:
        return json.loads((Path(category_dir) / SYNTHETIC_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _require_replaceable(category_dir: Path, name: Path | None = None) -> None:
    """Refuse to replace anything but a synthetic category folder (`SYNTHETIC_MARKER` in it) or an empty folder.
    `name`: the path to name in the error (`category_dir` itself by default)."""
    if not (category_dir.exists() or category_dir.is_symlink()):
        return
    if category_dir.is_dir() and not category_dir.is_symlink():
        if (category_dir / SYNTHETIC_MARKER).is_file() or not any(category_dir.iterdir()):
            return
    raise ValueError(
        f"{os.fspath(name or category_dir)!r} exists and holds no {SYNTHETIC_MARKER} (which maeday-hf writes into "
        f"every synthetic category since 2026-11-29); writing the synthetic set there would replace it. Choose "
        f"another folder, or remove it first if it is an older synthetic set."
    )


def _write_category(
    category_dir: Path, category: str, num_train: int, num_test_good: int, num_test_per_defect: int,
    image_size: int, seed: int,
) -> None:
    for index in range(num_train):
        image, _ = make_sample(category, None, image_size, seed=10_000 * seed + index)
        _save_png(image, category_dir / "train" / "good" / f"{index:03d}.png")
    for index in range(num_test_good):
        image, _ = make_sample(category, None, image_size, seed=10_000 * seed + _SEEDS_PER_SPLIT + index)
        _save_png(image, category_dir / "test" / "good" / f"{index:03d}.png")
    for defect_type in DEFECT_TYPES:
        for index in range(num_test_per_defect):
            image, mask = make_sample(category, defect_type, image_size, seed=10_000 * seed + 2 * _SEEDS_PER_SPLIT + index)
            _save_png(image, category_dir / "test" / defect_type / f"{index:03d}.png")
            _save_png(mask, category_dir / "ground_truth" / defect_type / f"{index:03d}_mask.png")
