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

Zero-shot means no training frames: by default each config has a single `test` split. The paper compares zero-shot
MAEDAY with 1-shot PatchCore, which needs an object-free reference frame: `load_fod(..., num_reference=R)` moves R
frames without objects (the same R on every machine, chosen by `shot_indices` with seed 0) into a `train` split of
reference frames, so that k-shot methods draw their shots there and every method is scored on the same other frames;
`load_fod_with_references` holds out the evaluation protocol's number (`REFERENCE_FRAMES`, at most half), and the
published dataset has the same split.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import datasets
from PIL import Image

from .features import GOOD, anomaly_features
from .layout import list_checked_images, pair_masks, require_dir, upright_size
from .shots import shot_indices

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


def _read_boxes(path: Path, object_frames: dict[str, Path]) -> dict[str, list[list[float]]]:
    """`boxes.json` validated: keys are foreign_object frame names (`object_frames`: name -> file), values lists of
    ordered 4-number boxes inside their frame (pixel edges: 0 <= x_min < x_max <= width, as the frame is shown upright).

    Raises:
        `ValueError`: invalid JSON, or anything but `{"<frame>.png": [[x_min, y_min, x_max, y_max], ...]}` with finite
            numbers, min < max, inside the frame (the message names the file, and the frame and box at fault).
    """
    if not path.is_file():
        return {}
    try:
        boxes = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected {{file name: {_BOX_FORMAT}}}.") from None
    if not isinstance(boxes, dict):
        raise ValueError(f"{path} must hold an object {{file name: {_BOX_FORMAT}}}, got {type(boxes).__name__}.")
    unknown = sorted(set(boxes) - set(object_frames))
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
        _check_boxes_inside(path, name, frame_boxes, object_frames[name])
    return {name: [[float(v) for v in box] for box in frame_boxes] for name, frame_boxes in boxes.items()}


def _check_boxes_inside(path: Path, name: str, frame_boxes: list[list], frame: Path) -> None:
    """A box reaching past its frame was drawn in other coordinates (another resolution, the frame before it was
    rotated upright): refused, naming the frame's size."""
    if not frame_boxes:
        return
    with Image.open(frame) as opened:
        width, height = upright_size(opened)
    for box in frame_boxes:
        if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
            raise ValueError(
                f"{path}: box {json.dumps(box)} of {name} reaches outside the frame, which is {width}x{height} "
                f"(EXIF orientation applied); boxes are pixel coordinates with 0 <= x_min < x_max <= {width} and "
                f"0 <= y_min < y_max <= {height}."
            )


_EXPECTED_ENTRIES = {NORMAL_DIR: True, OBJECT_DIR: True, MASK_DIR: True, BOXES_FILE: False}
"""What a config folder holds: name -> whether it is a folder. The masks and the boxes are optional, so a misnamed one
would silently drop out."""


def _check_config_entries(config_dir: Path) -> None:
    """Refuse an entry named like an expected one but in other letter case (`Masks/`, `Boxes.json`), or an expected
    name of the wrong kind (a `boxes.json` folder); warn about anything else not hidden."""
    by_folded = {name.casefold(): name for name in _EXPECTED_ENTRIES}
    for entry in sorted(config_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        expected = by_folded.get(entry.name.casefold())
        if expected is not None and expected != entry.name:
            right = config_dir / expected
            if right.exists() and os.path.samefile(right, entry):  # (a case-insensitive file system: it is read)
                continue
            if right.exists():
                logger.warning("%s is left out: the FOD layout reads %s beside it.", entry, right)
                continue
            raise ValueError(f"{entry} is named {entry.name!r}; the FOD layout reads {expected!r} (names are "
                             f"case-sensitive), so it would be left out: rename it.")
        if expected is None:
            logger.warning("%s is not part of the FOD layout (%s) and is left out.", entry, ", ".join(_EXPECTED_ENTRIES))
        elif entry.is_dir() != _EXPECTED_ENTRIES[expected]:
            raise ValueError(f"{entry} is {'a folder' if entry.is_dir() else 'a file'}; the FOD layout expects "
                             f"{'a folder' if _EXPECTED_ENTRIES[expected] else 'a JSON file'} there.")


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
    _check_config_entries(config_dir)
    normal = list_checked_images(require_dir(config_dir / NORMAL_DIR, expectation))
    objects = list_checked_images(require_dir(config_dir / OBJECT_DIR, expectation))
    masks = pair_masks(objects, config_dir / MASK_DIR, required=False)
    boxes = _read_boxes(config_dir / BOXES_FILE, {p.name: p for p in objects})
    frames = normal + objects
    logger.info("FOD %s: %d frames without and %d with objects (%d masks, %d with boxes)", config, len(normal),
                len(objects), len(masks), len(boxes))
    return {
        "image": [str(p) for p in frames],
        "mask": [str(masks[p]) if p in masks else None for p in frames],
        "label": [0] * len(normal) + [1] * len(objects),
        "defect_type": [GOOD] * len(normal) + [OBJECT_DIR] * len(objects),
        "category": [config] * len(frames),
        # Boxes belong to frames with objects: a frame without, of the same file name, has none.
        "boxes": [[] for _ in normal] + [boxes.get(p.name, []) for p in objects],
    }


def load_fod(root: str | os.PathLike, config: str, num_reference: int = 0) -> datasets.DatasetDict:
    """One FOD surface as a `DatasetDict`: a `test` split, and with `num_reference` a `train` split of reference frames.

    Args:
        root (`str` or `os.PathLike`): Folder holding `indoor/` and/or `outdoor/` in the layout of this module.
        config (`str`): `"indoor"` or `"outdoor"`.
        num_reference (`int`, defaults to 0): frames without objects held out of `test` as the `train` split (the
            shots of k-shot baselines); 0 keeps every frame in `test`.

    Returns:
        `datasets.DatasetDict` `{"test": Dataset}` (or `{"train", "test"}`) with the shared features plus `boxes`
        (`[[x_min, y_min, x_max, y_max], ...]`, empty when none); `mask` is `None` where a frame has no mask.

    Raises:
        `ValueError`: `num_reference` is negative, or leaves no frame without objects in `test`.
    """
    if isinstance(num_reference, bool) or not isinstance(num_reference, int) or num_reference < 0:
        raise ValueError(f"num_reference must be an integer >= 0, got {num_reference!r}.")
    return _splits(fod_examples(root, config), config, num_reference)


def _splits(columns: dict[str, list], config: str, num_reference: int) -> datasets.DatasetDict:
    dataset = datasets.Dataset.from_dict(columns, features=anomaly_features(with_boxes=True))
    if num_reference == 0:
        return datasets.DatasetDict({"test": dataset})
    normal = [index for index, label in enumerate(columns["label"]) if label == 0]
    if num_reference >= len(normal):
        raise ValueError(
            f"FOD {config}: num_reference={num_reference} would leave none of its {len(normal)} frames without "
            f"objects in the test split; hold out fewer."
        )
    reference = sorted(normal[i] for i in shot_indices(len(normal), num_reference, seed=0))
    test = sorted(set(range(len(dataset))) - set(reference))
    return datasets.DatasetDict({"train": dataset.select(reference), "test": dataset.select(test)})


REFERENCE_FRAMES = 5
"""Frames without objects per surface held out as reference frames by `load_fod_with_references` (at most half)."""


def load_fod_with_references(root: str | os.PathLike, config: str) -> datasets.DatasetDict:
    """`load_fod` with `min(REFERENCE_FRAMES, frames without objects // 2)` reference frames held out as `train`: the
    split the evaluation protocol (`fod:DIR`) and `maeday-publish-dataset fod` use."""
    columns = fod_examples(root, config)  # read once: listing and pairing open every image and mask
    return _splits(columns, config, min(REFERENCE_FRAMES, columns["label"].count(0) // 2))
