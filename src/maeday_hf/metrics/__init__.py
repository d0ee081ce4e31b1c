"""Anomaly-detection metrics: plain functions and `evaluate` modules loadable offline by path.

```python
>>> import evaluate
>>> from maeday_hf.metrics import METRIC_PATHS
>>> image_metric = evaluate.load(METRIC_PATHS["image_anomaly"])   # image_roc_auc, image_f1_max
>>> pixel_metric = evaluate.load(METRIC_PATHS["pixel_anomaly"])   # pixel_roc_auc, pixel_f1_max, aupro
```
"""

from __future__ import annotations

from pathlib import Path

from .components import label_components
from .image import image_f1_max, image_roc_auc
from .pixel import (
    DEFAULT_MAX_FPR,
    DEFAULT_NUM_BINS,
    PixelMetrics,
    aupro,
    compute_pixel_metrics,
    pixel_f1_max,
    pixel_roc_auc,
)

_HERE = Path(__file__).resolve().parent

METRIC_PATHS: dict[str, str] = {name: str(_HERE / name) for name in ("image_anomaly", "pixel_anomaly")}
"""Folder of each `evaluate` module shipped with the package (`<name>/<name>.py`); pass one to `evaluate.load`."""

__all__ = [
    "DEFAULT_MAX_FPR",
    "DEFAULT_NUM_BINS",
    "METRIC_PATHS",
    "PixelMetrics",
    "aupro",
    "compute_pixel_metrics",
    "image_f1_max",
    "image_roc_auc",
    "label_components",
    "pixel_f1_max",
    "pixel_roc_auc",
]
