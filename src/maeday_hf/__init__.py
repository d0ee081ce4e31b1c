"""MAEDAY: zero- and few-shot image anomaly detection with a Masked Autoencoder, Hugging Face native.

Importing the package registers the `"anomaly-detection"` task with `transformers`:

```python
>>> import maeday_hf
>>> from transformers import pipeline
>>> detector = pipeline("anomaly-detection", model="facebook/vit-mae-base")
```
"""

from __future__ import annotations

from transformers.pipelines import PIPELINE_REGISTRY

from .ensemble import NormalizationStats, compute_normalization_stats, ensemble_predictions, ensemble_scores
from .images import load_rgb_image
from .masking import make_mask_noise
from .patchcore import PatchCore, PatchCoreConfig, fit_patchcores
from .pipeline import DEFAULT_CHECKPOINT, TASK, AnomalyDetectionPipeline
from .scoring import gaussian_filter, maeday_anomaly_maps

__version__ = "0.1.0"


def register_pipeline() -> None:
    """Register `AnomalyDetectionPipeline` under the task name `"anomaly-detection"` (idempotent)."""
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is AnomalyDetectionPipeline:
        return
    (task_impl,) = AnomalyDetectionPipeline._registered_impl.values()
    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=AnomalyDetectionPipeline,
        pt_model=task_impl["pt"],
        default=task_impl["default"],
        type=task_impl["type"],
    )


register_pipeline()

# Heavier entry points (Trainer, peft, datasets) load on first use.
_LAZY_EXPORTS = {
    "FinetuneConfig": "finetune",  # the function itself: `from maeday_hf.finetune import finetune`
    "load_detector": "modeling",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_CHECKPOINT",
    "TASK",
    "FinetuneConfig",
    "AnomalyDetectionPipeline",
    "NormalizationStats",
    "PatchCore",
    "PatchCoreConfig",
    "compute_normalization_stats",
    "ensemble_predictions",
    "ensemble_scores",
    "fit_patchcores",
    "gaussian_filter",
    "load_detector",
    "load_rgb_image",
    "maeday_anomaly_maps",
    "make_mask_noise",
    "register_pipeline",
]
