"""MVTec AD from its official extracted folder as a `datasets.DatasetDict` per category (`train`, `test`).

Expected layout (the archive from mvtec.com, extracted):

```
<root>/<category>/train/good/000.png
<root>/<category>/test/good/000.png
<root>/<category>/test/<defect_type>/000.png
<root>/<category>/ground_truth/<defect_type>/000_mask.png
```

Any category folder with this shape loads (the synthetic set uses the same layout); a folder that is missing, or a
mask that is missing or extra, raises an error naming the path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets

from .features import GOOD, anomaly_features
from .layout import is_hidden, list_checked_images, pair_masks, require_dir

logger = logging.getLogger(__name__)

MVTEC_OBJECTS: tuple[str, ...] = (
    "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)
"""The 10 object categories, in the order of the paper's tables."""

MVTEC_TEXTURES: tuple[str, ...] = ("carpet", "grid", "leather", "tile", "wood")
"""The 5 texture categories, in the order of the paper's tables."""

MVTEC_CATEGORIES: tuple[str, ...] = MVTEC_OBJECTS + MVTEC_TEXTURES
"""All 15 MVTec AD categories (folder names: `metal_nut` with an underscore)."""

MVTEC_GRAYSCALE: tuple[str, ...] = ("grid", "screw", "zipper")
"""Categories stored as single-channel PNGs; their `image` decodes in mode `"L"`."""


def _category_dir(root: Path, category: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(
            f"MVTec AD root {root} is not a folder; expected the extracted archive with <root>/<category>/train/good/*.png."
        )
    category_dir = root / category
    if not category_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and not is_hidden(p))
        raise ValueError(
            f"Unknown category {category!r}: no folder {category_dir}. Categories found under {root}: {found}; "
            f"MVTec AD has {list(MVTEC_CATEGORIES)}."
        )
    return category_dir


def _examples(images: list[Path], masks: dict[Path, Path], defect_type: str, category: str) -> dict[str, list]:
    return {
        "image": [str(p) for p in images],
        "mask": [str(masks[p]) if p in masks else None for p in images],
        "label": [int(defect_type != GOOD)] * len(images),
        "defect_type": [defect_type] * len(images),
        "category": [category] * len(images),
    }


def _merge(parts: list[dict[str, list]]) -> dict[str, list]:
    return {key: [value for part in parts for value in part[key]] for key in parts[0]}


def mvtec_examples(root: str | os.PathLike, category: str) -> dict[str, dict[str, list]]:
    """Validated file lists of one category: `{"train": columns, "test": columns}` with paths (nothing decoded).

    Raises:
        `FileNotFoundError`: `root`, `train/good`, `test/good` or a defect's mask is missing (named).
        `ValueError`: the category folder does not exist, or a mask / mask folder has no matching test image (named).
    """
    root = Path(root)
    category_dir = _category_dir(root, category)
    expectation = "the MVTec AD layout <category>/{train/good, test/<good|defect>, ground_truth/<defect>}"
    train_dir = require_dir(category_dir / "train" / GOOD, expectation)
    test_dir = require_dir(category_dir / "test", expectation)
    require_dir(test_dir / GOOD, expectation)
    truth_dir = category_dir / "ground_truth"

    defect_types = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and not is_hidden(p))
    truth_folders = [p for p in truth_dir.iterdir() if p.is_dir() and not is_hidden(p)] if truth_dir.is_dir() else []
    extra_truth = sorted(str(p) for p in truth_folders if p.name == GOOD or p.name not in defect_types)
    if extra_truth:
        raise ValueError(f"Ground-truth folder(s) without a test defect folder: {extra_truth}.")

    test_parts = []
    for defect_type in defect_types:  # "good" sorts among the defects; keep folder order, it is reproducible
        images = list_checked_images(test_dir / defect_type)
        masks = {} if defect_type == GOOD else pair_masks(images, truth_dir / defect_type)
        test_parts.append(_examples(images, masks, defect_type, category))
    train = _examples(list_checked_images(train_dir), {}, GOOD, category)
    if not train["image"]:
        raise FileNotFoundError(f"No training images in {train_dir}; expected *.png files.")
    test = _merge(test_parts)
    num_defect_types = len(defect_types) - 1
    logger.info("MVTec %s: %d train, %d test images, %d defect types", category, len(train["image"]), len(test["image"]),
                num_defect_types)
    return {"train": train, "test": test}


def load_mvtec(root: str | os.PathLike, category: str) -> datasets.DatasetDict:
    """One MVTec AD category as a `DatasetDict` with `train` (good only) and `test` splits.

    Args:
        root (`str` or `os.PathLike`): The extracted archive (holding `bottle/`, `cable/`, ...).
        category (`str`): A folder under `root`, e.g. `"bottle"` (see [`MVTEC_CATEGORIES`]).

    Returns:
        `datasets.DatasetDict` with features from [`~maeday_hf.data.features.anomaly_features`]: `image`, `mask`
        (`None` for good), `label` (good/anomaly), `defect_type`, `category`. Images are referenced by path, not copied.

    Example:

    ```python
    >>> from maeday_hf.data import load_mvtec
    >>> bottle = load_mvtec("/data/mvtec_anomaly_detection", "bottle")
    >>> bottle["test"][0]["label"], bottle["test"].features["label"].names
    (1, ['good', 'anomaly'])
    ```
    """
    features = anomaly_features()
    splits = mvtec_examples(root, category)
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(columns, features=features) for split, columns in splits.items()}
    )
