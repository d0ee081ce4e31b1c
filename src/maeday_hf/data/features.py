"""The one schema every anomaly-detection dataset here shares (MVTec AD, FOD, the synthetic set)."""

from __future__ import annotations

import datasets

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
