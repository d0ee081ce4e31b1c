"""The core package's synthetic defect set ([`maeday_hf.synthetic`]) exposed through the MVTec AD builder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets

from ..synthetic import CATEGORIES as SYNTHETIC_CATEGORIES
from ..synthetic import synthetic_settings, write_synthetic_mvtec, written_settings
from .mvtec import load_mvtec

logger = logging.getLogger(__name__)


def load_synthetic_dataset(
    root: str | os.PathLike, category: str = SYNTHETIC_CATEGORIES[0], **write_kwargs
) -> datasets.DatasetDict:
    """Write (if not already there) and load one synthetic category as a `DatasetDict` with MVTec AD's features.

    Args:
        root (`str` or `os.PathLike`): Folder for the synthetic MVTec-layout tree.
        category (`str`, *optional*): One of `maeday_hf.synthetic.CATEGORIES` (textures and simple objects).
        write_kwargs: Passed to `write_synthetic_mvtec` (`num_train`, `num_test_good`, `num_test_per_defect`,
            `image_size`, `seed`) when the category has to be written: when it is not there, or was written with
            other values of the settings given here (a category folder written before 2026-11-29 records none, and
            is loaded as it is).

    Returns:
        `datasets.DatasetDict` with `train` and `test`, as [`load_mvtec`] returns.
    """
    if category not in SYNTHETIC_CATEGORIES:
        raise ValueError(f"Unknown synthetic category {category!r}; expected one of {SYNTHETIC_CATEGORIES}.")
    category_dir = Path(root) / category
    written = written_settings(category_dir)
    asked = synthetic_settings(category, **write_kwargs)
    if not (category_dir / "train").is_dir() or (
        # (only the settings asked for: with none, the category there is loaded as it was written)
        written is not None and any(written.get(key) != asked[key] for key in write_kwargs)
    ):
        write_synthetic_mvtec(root, categories=[category], **write_kwargs)
    elif written is None and write_kwargs:
        logger.warning(
            "%s records no settings (written before 2026-11-29, or not by maeday-hf): loaded as it is, not checked "
            "against %s; remove it to have it written with them.", category_dir, write_kwargs,
        )
    return load_mvtec(root, category)
