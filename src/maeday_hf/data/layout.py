"""File listing and image/mask pairing for folder datasets, with errors that name the exact missing or extra path."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from ..images import IMAGE_SUFFIXES, list_images  # noqa: F401 - list_images is part of this module's API

MASK_SUFFIX = "_mask"
"""MVTec AD names the mask of `<stem>.png` `<stem>_mask.png`; FOD follows it."""

_MAX_LISTED = 10


def require_dir(folder: Path, expectation: str) -> Path:
    """Return `folder` if it is a directory, else raise `FileNotFoundError` naming it and what was expected there."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Missing folder {folder}: expected {expectation}.")
    return folder


def _listing(paths: Iterable[Path]) -> str:
    paths = sorted(str(p) for p in paths)
    shown = ", ".join(paths[:_MAX_LISTED])
    return shown + (f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else "")


def pair_masks(images: list[Path], mask_dir: Path, *, required: bool = True) -> dict[Path, Path]:
    """Map each image `<stem>.<ext>` to `mask_dir/<stem>_mask.<ext'>`, checking the pairing both ways.

    Args:
        images (`list[Path]`): Images that should have a mask.
        mask_dir (`Path`): Folder holding the masks (may be absent when `required=False`).
        required (`bool`, *optional*, defaults to `True`): Every image needs a mask; else images may lack one.

    Raises:
        `FileNotFoundError`: a required mask is missing (the message names every expected mask path).
        `ValueError`: a mask has no image (an extra file, named), or a mask's size differs from its image's.
    """
    stems = {image.stem: image for image in images}
    masks, extra = {}, []
    for mask in list_images(mask_dir) if mask_dir.is_dir() else []:
        stem = mask.stem.removesuffix(MASK_SUFFIX)
        if mask.stem.endswith(MASK_SUFFIX) and stem in stems:
            masks[stem] = mask
        else:
            extra.append(mask)
    if extra:
        raise ValueError(
            f"Mask(s) without a matching image: {_listing(extra)}; expected <stem>{MASK_SUFFIX}.png for an image "
            f"<stem>.png among {len(images)} images."
        )
    missing = [mask_dir / f"{image.stem}{MASK_SUFFIX}.png" for image in images if image.stem not in masks]
    if missing and required:
        raise FileNotFoundError(f"Missing ground-truth mask(s): {_listing(missing)}.")
    pairs = {stems[stem]: mask for stem, mask in masks.items()}
    for image, mask in pairs.items():
        with Image.open(image) as opened_image, Image.open(mask) as opened_mask:
            if opened_image.size != opened_mask.size:
                raise ValueError(
                    f"Mask {mask} is {opened_mask.size[0]}x{opened_mask.size[1]} but its image {image} is "
                    f"{opened_image.size[0]}x{opened_image.size[1]}; a mask must have its image's size."
                )
    return pairs
