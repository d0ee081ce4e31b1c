"""The MAEDAY foreign-object-detection (FOD) set: ground frames with and without objects, for zero-shot detection.

The paper captures two surfaces, `indoor` (wooden floor) and `outdoor` (asphalt), 20-50 frames with foreign objects and
about as many without, per surface. Every frame has an image label; frames with objects may also have a pixel mask
and/or bounding boxes. Expected layout:

```
<root>/<indoor|outdoor>/normal/<stem>.png             frames without objects          (label good)
<root>/<indoor|outdoor>/foreign_object/<stem>.png     frames with objects             (label anomaly)
<root>/<indoor|outdoor>/masks/<stem>_mask.png         optional, foreign_object frames only, 0 / 255
<root>/<indoor|outdoor>/boxes.json                    optional, {"<stem>.png": [[x_min, y_min, x_max, y_max], ...]}
```

Zero-shot means no training frames: each config has a single `test` split.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import datasets

from .features import GOOD, anomaly_features
from .layout import list_images, pair_masks, require_dir

logger = logging.getLogger(__name__)

FOD_CONFIGS: tuple[str, ...] = ("indoor", "outdoor")
"""Surfaces: `indoor` is a wooden floor, `outdoor` asphalt pavement."""

NORMAL_DIR = "normal"
OBJECT_DIR = "foreign_object"
MASK_DIR = "masks"
BOXES_FILE = "boxes.json"
_BOX_FORMAT = "[[x_min, y_min, x_max, y_max], ...]"
"""What `boxes.json` holds for each frame name."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_boxes(path: Path, object_names: set[str]) -> dict[str, list[list[float]]]:
    """`boxes.json` validated: keys are foreign_object frame names, values lists of ordered 4-number boxes.

    Raises:
        `ValueError`: invalid JSON, or anything but `{"<frame>.png": [[x_min, y_min, x_max, y_max], ...]}` with finite
            numbers and min < max (the message names the file, and the frame and box at fault).
    """
    if not path.is_file():
        return {}
    try:
        boxes = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected {{file name: {_BOX_FORMAT}}}.") from None
    if not isinstance(boxes, dict):
        raise ValueError(f"{path} must hold an object {{file name: {_BOX_FORMAT}}}, got {type(boxes).__name__}.")
    unknown = sorted(set(boxes) - object_names)
    if unknown:
        raise ValueError(f"{path} has boxes for {unknown}, which are not frames in {path.parent / OBJECT_DIR}.")
    for name, frame_boxes in boxes.items():
        if not isinstance(frame_boxes, list) or not all(isinstance(box, list) for box in frame_boxes):
            raise ValueError(
                f"{path}: the boxes of {name} are {json.dumps(frame_boxes):.80}; expected a list of boxes "
                f"{_BOX_FORMAT} (a single box too is wrapped in a list)."
            )
        for box in frame_boxes:
            if len(box) != 4 or not all(map(_is_number, box)) or not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(
                    f"{path}: box {json.dumps(box)} of {name} is not [x_min, y_min, x_max, y_max] of finite numbers "
                    "with min < max."
                )
    return {name: [[float(v) for v in box] for box in frame_boxes] for name, frame_boxes in boxes.items()}


def fod_examples(root: str | os.PathLike, config: str) -> dict[str, list]:
    """Validated columns of one FOD config (paths, labels, boxes), nothing decoded.

    Raises:
        `ValueError`: unknown config, a mask or box for a frame that does not exist or has no object.
        `FileNotFoundError`: the config folder or its `normal` / `foreign_object` folder is missing.
    """
    if config not in FOD_CONFIGS:
        raise ValueError(f"Unknown FOD config {config!r}; expected one of {FOD_CONFIGS}.")
    config_dir = require_dir(Path(root) / config, f"the FOD layout <root>/{config}/{{{NORMAL_DIR},{OBJECT_DIR}}}")
    expectation = f"frames in <root>/{config}/{NORMAL_DIR} and <root>/{config}/{OBJECT_DIR}"
    normal = list_images(require_dir(config_dir / NORMAL_DIR, expectation))
    objects = list_images(require_dir(config_dir / OBJECT_DIR, expectation))
    masks = pair_masks(objects, config_dir / MASK_DIR, required=False)
    boxes = _read_boxes(config_dir / BOXES_FILE, {p.name for p in objects})
    frames = normal + objects
    logger.info("FOD %s: %d frames without and %d with objects (%d masks, %d with boxes)", config, len(normal),
                len(objects), len(masks), len(boxes))
    return {
        "image": [str(p) for p in frames],
        "mask": [str(masks[p]) if p in masks else None for p in frames],
        "label": [0] * len(normal) + [1] * len(objects),
        "defect_type": [GOOD] * len(normal) + [OBJECT_DIR] * len(objects),
        "category": [config] * len(frames),
        "boxes": [boxes.get(p.name, []) for p in frames],
    }


def load_fod(root: str | os.PathLike, config: str) -> datasets.DatasetDict:
    """One FOD surface as a `DatasetDict` with a single `test` split.

    Args:
        root (`str` or `os.PathLike`): Folder holding `indoor/` and/or `outdoor/` in the layout of this module.
        config (`str`): `"indoor"` or `"outdoor"`.

    Returns:
        `datasets.DatasetDict` `{"test": Dataset}` with the shared features plus `boxes`
        (`[[x_min, y_min, x_max, y_max], ...]`, empty when none); `mask` is `None` where a frame has no mask.
    """
    columns = fod_examples(root, config)
    dataset = datasets.Dataset.from_dict(columns, features=anomaly_features(with_boxes=True))
    return datasets.DatasetDict({"test": dataset})
