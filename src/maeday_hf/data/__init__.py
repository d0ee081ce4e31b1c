"""Anomaly-detection datasets as `datasets.DatasetDict`s: MVTec AD, the FOD set, the synthetic set; shots; publishing.

All share one schema ([`anomaly_features`]): `image`, `mask` (`None` for good), `label` (good/anomaly), `defect_type`,
`category` (FOD adds `boxes`).
"""

from __future__ import annotations

from .features import LABEL_NAMES, anomaly_features
from .fod import FOD_CONFIGS, load_fod, load_fod_with_references
from .mvtec import MVTEC_CATEGORIES, MVTEC_GRAYSCALE, MVTEC_OBJECTS, MVTEC_TEXTURES, load_mvtec
from .publish import load_hub_folder, push_configs_to_hub, write_hub_folder
from .shots import select_shots, shot_indices
from .synthetic import SYNTHETIC_CATEGORIES, load_synthetic_dataset

__all__ = [
    "FOD_CONFIGS",
    "LABEL_NAMES",
    "MVTEC_CATEGORIES",
    "MVTEC_GRAYSCALE",
    "MVTEC_OBJECTS",
    "MVTEC_TEXTURES",
    "SYNTHETIC_CATEGORIES",
    "anomaly_features",
    "load_fod",
    "load_fod_with_references",
    "load_hub_folder",
    "load_mvtec",
    "load_synthetic_dataset",
    "push_configs_to_hub",
    "select_shots",
    "shot_indices",
    "write_hub_folder",
]
