"""The one schema every anomaly-detection dataset here shares (MVTec AD, FOD, the synthetic set)."""

from __future__ import annotations

import io
from typing import NamedTuple

import datasets
import numpy as np
from PIL import Image

from ..images import to_rgb

LABEL_NAMES: tuple[str, str] = ("good", "anomaly")
"""`label` class names: 0 is good, 1 is anomaly (`gt_label`)."""

GOOD = "good"
"""`defect_type` of defect-free images (MVTec AD's folder name)."""


def anomaly_features(with_boxes: bool = False) -> datasets.Features:
    """Features of one example.

    - `image` (`Image`): the photo, decoded in its stored mode (`"L"` for MVTec's grayscale categories, else `"RGB"`).
    - `mask` (`Image` or `None`): binary ground truth at the image's size (0 background, 255 anomaly); `None` when the
      image is good or the anomaly is not annotated per pixel.
    - `label` (`ClassLabel` `["good", "anomaly"]`).
    - `defect_type` (`string`): `"good"` or the defect folder name (e.g. `"broken_large"`, `"foreign_object"`).
    - `category` (`string`): e.g. `"bottle"`, `"indoor"`.
    - `boxes` (only with `with_boxes=True`; list of `[x_min, y_min, x_max, y_max]` in pixels, empty when none).
    """
    features = {
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "label": datasets.ClassLabel(names=list(LABEL_NAMES)),
        "defect_type": datasets.Value("string"),
        "category": datasets.Value("string"),
    }
    if with_boxes:
        features["boxes"] = datasets.List(datasets.List(datasets.Value("float32"), length=4))
    return datasets.Features(features)


_INTEGER_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def mask_array(mask: Image.Image) -> np.ndarray:
    """A ground-truth mask as the metrics read it, `(height, width)` uint8, non-zero where anomalous, whatever mode it
    was stored in: a palette mask by its colours (not its palette indices), RGB / LA / RGBA by their grey level, a
    16- or 32-bit one by its values (0/1 labels as well as 0/65535). Fully transparent pixels of a mask with alpha
    (an annotation tool's layer: the defect painted on a transparent background, whatever colour that background
    holds) are normal."""
    if mask.mode in _INTEGER_MODES:
        return (np.asarray(mask) != 0).astype(np.uint8) * 255
    grey = np.asarray(to_rgb(mask).convert("L"))
    if mask.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = np.asarray(mask.convert("RGBA").getchannel("A"))
        grey = np.where(alpha > 0, grey, 0).astype(np.uint8)
    return grey


class MaskCheck(NamedTuple):
    """What `check_mask` found in a decoded mask."""

    binary: bool
    """At most two grey levels (a lossy JPEG mask is not, and every one of its pixels above 0 counts as anomalous)."""
    num_anomalous_pixels: int
    """Pixels that count as anomalous (above 0, as `mask_array` reads them)."""


def check_mask(mask: dict | None, name: str) -> MaskCheck:
    """Decode a mask column entry as `datasets.Image(decode=False)` gives it (`{"path", "bytes"}`), so that a damaged
    file fails here, named, and not after the category was scored.

    Returns:
        `MaskCheck`: whether it is binary, and how many of its pixels are anomalous (a missing mask: none).

    Raises:
        ValueError: the mask cannot be decoded.
    """
    if mask is None:
        return MaskCheck(binary=True, num_anomalous_pixels=0)
    source = io.BytesIO(mask["bytes"]) if mask.get("bytes") is not None else mask.get("path")
    where = mask.get("path") or name
    try:
        with Image.open(source) as image:
            image.load()
            levels = np.bincount(mask_array(image).ravel(), minlength=256)  # (linear: no sort of a whole image)
            return MaskCheck(binary=np.count_nonzero(levels) <= 2, num_anomalous_pixels=int(levels[1:].sum()))
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"Cannot read the ground-truth mask {where!r}: {error}") from None
