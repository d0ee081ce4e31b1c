"""File listing and image/mask pairing for folder datasets, with errors that name the exact missing or extra path."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from PIL import ExifTags, Image

from ..images import IMAGE_SUFFIXES, check_image_file, is_hidden, list_images  # noqa: F401 - part of this module's API

MASK_SUFFIX = "_mask"
"""MVTec AD names the mask of `<stem>.png` `<stem>_mask.png`; FOD follows it."""

_MAX_LISTED = 10

_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
"""EXIF orientations that turn the image by 90° (transpose, rotate 90/270, transverse): width and height swap."""

_PNG_TEXT_CHUNKS = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})
"""PNG chunks that can carry an orientation (EXIF, or XMP / raw EXIF in text)."""


def require_dir(folder: Path, expectation: str) -> Path:
    """Return `folder` if it is a directory, else raise `FileNotFoundError` naming it and what was expected there."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Missing folder {folder}: expected {expectation}.")
    return folder


def _listing(paths: Iterable[Path]) -> str:
    paths = sorted(str(p) for p in paths)
    shown = ", ".join(paths[:_MAX_LISTED])
    return shown + (f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else "")


def _png_has_trailing_text(path: str) -> bool:
    """Whether a PNG has metadata chunks after its pixel data, which Pillow reads only by decoding the whole image."""
    with open(path, "rb") as file:
        file.seek(8)  # signature
        seen_pixels = False
        while len(header := file.read(8)) == 8:
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"IEND":
                break
            seen_pixels = seen_pixels or kind == b"IDAT"
            if seen_pixels and kind in _PNG_TEXT_CHUNKS:
                return True
            file.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return False


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation of an opened image file (1 = upright), as `ImageOps.exif_transpose` reads it after decoding."""
    if image.format == "PNG" and image.filename and not _png_has_trailing_text(image.filename):
        # Everything is in the header already: skip PngImageFile.getexif, which decodes the pixels to look further.
        exif = Image.Image.getexif(image)
    else:
        exif = image.getexif()
    return exif.get(ExifTags.Base.Orientation, 1)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """`(width, height)` of an opened image file as shown and as decoded here: EXIF orientation applied.

    `datasets.Image` and [`~maeday_hf.images.to_rgb`] both turn images upright, so masks, images and anomaly maps all
    have this size.
    """
    width, height = image.size
    return (height, width) if exif_orientation(image) in _TRANSPOSING_ORIENTATIONS else (width, height)


def list_checked_images(folder: Path) -> list[Path]:
    """`list_images`, with each file's header read: a file with an image suffix that holds no image (empty, another
    format, an HTML page saved as .png) is named now, not when a published row is decoded."""
    images = list_images(folder)
    for image in images:
        check_image_file(image)
    return images


def _check_mask_size(image: Path, mask: Path) -> None:
    with Image.open(image) as opened_image, Image.open(mask) as opened_mask:
        image_size, mask_size = upright_size(opened_image), upright_size(opened_mask)
        if image_size == mask_size:
            return
        if image_size != opened_image.size and mask_size == opened_image.size:
            raise ValueError(
                f"Mask {mask} is {mask_size[0]}x{mask_size[1]}: the stored size of its image {image}, which has EXIF "
                f"orientation {exif_orientation(opened_image)} and so is shown and decoded upright at "
                f"{image_size[0]}x{image_size[1]}; draw the mask on the upright image."
            )
        raise ValueError(
            f"Mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is {image_size[0]}x{image_size[1]} "
            "(EXIF orientation applied); a mask must have its image's size."
        )


def _by_stem(paths: Iterable[Path], stem_of) -> dict[str, Path]:
    """`{stem: path}`, refusing two files with one stem (`a.png` and `a.jpg`): only one of them could be paired."""
    by_stem: dict[str, Path] = {}
    for path in paths:
        stem = stem_of(path)
        if stem in by_stem:
            raise ValueError(
                f"{by_stem[stem]} and {path} share the stem {stem!r}; expected one file per stem, so that images and "
                f"masks pair up unambiguously."
            )
        by_stem[stem] = path
    return by_stem


def pair_masks(images: list[Path], mask_dir: Path, *, required: bool = True) -> dict[Path, Path]:
    """Map each image `<stem>.<ext>` to `mask_dir/<stem>_mask.<ext'>`, checking the pairing both ways.

    Args:
        images (`list[Path]`): Images that should have a mask.
        mask_dir (`Path`): Folder holding the masks (may be absent when `required=False`).
        required (`bool`, *optional*, defaults to `True`): Every image needs a mask; else images may lack one.

    Raises:
        `FileNotFoundError`: a required mask is missing (the message names every expected mask path).
        `ValueError`: a mask has no image (an extra file, named); two images or two masks share a stem; or a mask's
            size differs from its image's as shown (EXIF orientation applied, as `datasets.Image` decodes it).
    """
    stems = _by_stem(images, lambda image: image.stem)
    mask_files = list_checked_images(mask_dir) if mask_dir.is_dir() else []
    extra = [mask for mask in mask_files if not mask.stem.endswith(MASK_SUFFIX) or
             mask.stem.removesuffix(MASK_SUFFIX) not in stems]
    if extra:
        raise ValueError(
            f"Mask(s) without a matching image: {_listing(extra)}; expected <stem>{MASK_SUFFIX}.png for an image "
            f"<stem>.png among {len(images)} images."
        )
    masks = _by_stem(mask_files, lambda mask: mask.stem.removesuffix(MASK_SUFFIX))
    missing = [mask_dir / f"{image.stem}{MASK_SUFFIX}.png" for image in images if image.stem not in masks]
    if missing and required:
        raise FileNotFoundError(f"Missing ground-truth mask(s): {_listing(missing)}.")
    pairs = {stems[stem]: mask for stem, mask in masks.items()}
    for image, mask in pairs.items():
        _check_mask_size(image, mask)
    return pairs
