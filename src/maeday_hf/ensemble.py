"""Label-free ensembles of anomaly detectors: normalise each method's outputs, then sum them.

The paper says only that "the models' output images and pixel-level scores are summed". MAEDAY's reconstruction
errors and PatchCore's feature distances live on unrelated scales, so a plain sum lets whichever method has the larger
numbers decide, and changes with either method's units. By default each method is therefore first brought to a
common scale (this normalisation is this package's, not the paper's), with a standardisation fitted, per method, on
statistics that use no labels:

* image scores: `(score - center) / scale` over the method's scores on the unlabeled query set;
* pixel maps: the same, with one `center`/`scale` pooled over every pixel of the method's maps on that set.

`method="zscore"` (default) uses mean and standard deviation; `method="robust"` uses median and interquartile range,
which a handful of extreme anomalies cannot dominate (pixel quantiles on an evenly strided subsample of at most 4M
values, so full-resolution maps of a whole test split are never concatenated). Either way the normalised values, and so
the ensemble, do not change when a constant is added to one method's scores or when they are multiplied by a positive
factor. `method="none"` takes the paper's words literally: the raw outputs are summed (`IDENTITY` statistics), so
results do not depend on the other images either.

The statistics are transductive: they come from the unlabeled test images scored together (the whole test split of a
category in the protocol), never from their labels. With a single query image there is no spread to measure; the
scale falls back to 1 (a warning is logged). Statistics fitted elsewhere (e.g. on held-out normal images) can be passed
as `stats` instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

NormalizationMethod = Literal["zscore", "robust", "none"]
NORMALIZATION_METHODS: tuple[str, ...] = ("zscore", "robust", "none")
# A spread at or below this fraction of the values' magnitude is treated as no spread at all: the methods' outputs are
# float32 (about 6e-8 relative rounding per operation), so a spread of a few float32 steps is rounding, not signal, and
# dividing by it would blow rounding noise up to unit variance.
_RELATIVE_EPS = 1e-6
# Interquartile range / mean absolute deviation of a normal distribution (1.349 sigma / 0.798 sigma): the robust
# spread of values with a zero IQR (more than half of them equal, e.g. sparse maps) is put on the IQR's scale.
_IQR_PER_MEAN_ABSOLUTE_DEVIATION = 1.3489795003921634 / math.sqrt(2 / math.pi)
# Pixel quantiles ("robust") are taken on an evenly strided subsample of at most this many values.
_MAX_QUANTILE_VALUES = 2**22

MapsInput = np.ndarray | Sequence[np.ndarray]


@dataclass(frozen=True)
class NormalizationStats:
    """Affine normalisation of one method's outputs: `(value - center) / scale`, for image scores and for maps."""

    score_center: float
    score_scale: float
    map_center: float
    map_scale: float

    def __post_init__(self) -> None:
        for name in ("score_scale", "map_scale"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"Expected a finite positive `{name}`, got {value}.")


IDENTITY = NormalizationStats(score_center=0.0, score_scale=1.0, map_center=0.0, map_scale=1.0)
"""No normalisation: the outputs as they are (`method="none"`, the paper's plain sum)."""


def validate_normalization_method(method: str) -> str:
    if method not in NORMALIZATION_METHODS:
        raise ValueError(f"Expected the normalisation `method` in {NORMALIZATION_METHODS}, got {method!r}.")
    return method


def _center_and_scale(chunks: Sequence[np.ndarray], method: NormalizationMethod) -> tuple[float, float]:
    """Center and spread of all values in `chunks` (one per image), without concatenating full-size maps."""
    count = sum(chunk.size for chunk in chunks)
    magnitude = max(float(np.abs(chunk).max()) for chunk in chunks)
    if method == "zscore":
        # Two passes in float64: the mean, then squared deviations from it (no E[x²] − E[x]² cancellation).
        center = sum(float(chunk.sum(dtype=np.float64)) for chunk in chunks) / count
        scale = math.sqrt(sum(float(np.square(chunk - center, dtype=np.float64).sum()) for chunk in chunks) / count)
    else:
        # Quantiles of a deterministic, evenly strided subsample of at most _MAX_QUANTILE_VALUES values.
        stride = max(1, math.ceil(count / _MAX_QUANTILE_VALUES))
        values = np.concatenate([chunk.ravel()[::stride] for chunk in chunks]).astype(np.float64)
        q25, center, q75 = (float(q) for q in np.percentile(values, [25, 50, 75]))
        scale = q75 - q25
        if not scale > _RELATIVE_EPS * magnitude:  # over half the values equal: their mean distance to the median
            scale = _IQR_PER_MEAN_ABSOLUTE_DEVIATION * float(np.abs(values - center).mean())
    if not scale > _RELATIVE_EPS * magnitude:
        logger.warning("Cannot measure the spread of %d values (all ~%.4g); normalising with scale 1.", count, center)
        scale = 1.0
    return center, scale


def _as_map_list(anomaly_maps: MapsInput) -> list[np.ndarray]:
    if isinstance(anomaly_maps, np.ndarray):
        if anomaly_maps.ndim != 3:
            raise ValueError(f"Expected anomaly maps of shape (num_images, H, W), got shape {anomaly_maps.shape}.")
        return list(anomaly_maps)
    maps = [np.asarray(anomaly_map) for anomaly_map in anomaly_maps]
    for index, anomaly_map in enumerate(maps):
        if anomaly_map.ndim != 2:
            raise ValueError(
                f"Expected each anomaly map to have shape (H, W), map {index} has shape {anomaly_map.shape}."
            )
    return maps


def _check_scores_and_maps(scores: np.ndarray, maps: list[np.ndarray]) -> None:
    if scores.ndim != 1:
        raise ValueError(f"Expected image scores of shape (num_images,), got shape {scores.shape}.")
    if scores.shape[0] == 0:
        raise ValueError("Expected at least one image score, got none.")
    if len(maps) != scores.shape[0]:
        raise ValueError(
            f"Got {scores.shape[0]} image scores but {len(maps)} anomaly maps; expected one map per score."
        )
    if not np.all(np.isfinite(scores)) or not all(np.all(np.isfinite(m)) for m in maps):
        raise ValueError("Expected finite image scores and anomaly maps, found NaN or inf.")


def compute_normalization_stats(
    scores: np.ndarray | Sequence[float], anomaly_maps: MapsInput, method: NormalizationMethod = "zscore"
) -> NormalizationStats:
    """Fit one method's normalisation on its unlabeled outputs.

    Args:
        scores (`np.ndarray` of shape `(num_images,)`): image scores.
        anomaly_maps (`np.ndarray` of shape `(num_images, H, W)`, or a sequence of `(H_i, W_i)` arrays): pixel maps.
        method (`"zscore"`, `"robust"` or `"none"`): mean/std, median/IQR, or no normalisation ([`IDENTITY`]).

    Returns:
        [`NormalizationStats`].
    """
    validate_normalization_method(method)
    scores = np.asarray(scores, dtype=np.float64)
    maps = _as_map_list(anomaly_maps)
    _check_scores_and_maps(scores, maps)
    if method == "none":
        return IDENTITY
    score_center, score_scale = _center_and_scale([scores], method)
    map_center, map_scale = _center_and_scale(maps, method)
    return NormalizationStats(score_center, score_scale, map_center, map_scale)


def normalize_scores(
    scores: np.ndarray | Sequence[float],
    anomaly_maps: MapsInput,
    stats: NormalizationStats | None = None,
    method: NormalizationMethod = "zscore",
) -> tuple[np.ndarray, MapsInput]:
    """Standardise one method's image scores and pixel maps.

    Args:
        scores (`np.ndarray` of shape `(num_images,)`).
        anomaly_maps (`np.ndarray` of shape `(num_images, H, W)`, or a sequence of `(H_i, W_i)` arrays).
        stats ([`NormalizationStats`], *optional*): fitted elsewhere; by default fitted on these outputs.
        method (`"zscore"`, `"robust"` or `"none"`): used when `stats` is None.

    Returns:
        `scores` `(num_images,)` float64 and the maps float32, in the form they came in (stacked array or list).
    """
    stacked = isinstance(anomaly_maps, np.ndarray)
    scores = np.asarray(scores, dtype=np.float64)
    maps = _as_map_list(anomaly_maps)
    _check_scores_and_maps(scores, maps)
    if stats is None:
        stats = compute_normalization_stats(scores, maps, method)
    normalized_scores = (scores - stats.score_center) / stats.score_scale
    normalized_maps = [
        ((m.astype(np.float64) - stats.map_center) / stats.map_scale).astype(np.float32) for m in maps
    ]
    return normalized_scores, (np.stack(normalized_maps) if stacked else normalized_maps)


def ensemble_scores(
    scores_per_method: Sequence[np.ndarray | Sequence[float]],
    maps_per_method: Sequence[MapsInput],
    stats: Sequence[NormalizationStats | None] | None = None,
    method: NormalizationMethod = "zscore",
) -> tuple[np.ndarray, MapsInput]:
    """Sum the normalised image scores and pixel maps of several methods (MAEDAY + PatchCore, or 2×PatchCore).

    Takes no labels: each method is normalised with its own label-free statistics (see the module docstring).

    Args:
        scores_per_method (`Sequence[np.ndarray]`): per method, image scores `(num_images,)`, images in the same order.
        maps_per_method (`Sequence`): per method, maps `(num_images, H, W)` or a sequence of `(H_i, W_i)` arrays; the
            methods' maps of one image must have the same shape.
        stats (`Sequence[NormalizationStats | None]`, *optional*): per method; `None` entries are fitted on that
            method's outputs.
        method (`"zscore"`, `"robust"` or `"none"`): statistics fitted when not given (`"none"`: the plain sum).

    Returns:
        Ensemble `scores` `(num_images,)` float64 and `anomaly_maps` float32, stacked if the first method's maps were.

    Example:

    ```python
    >>> from maeday_hf.ensemble import ensemble_scores
    >>> scores, maps = ensemble_scores([maeday_scores, patchcore_scores], [maeday_maps, patchcore_maps])
    ```
    """
    validate_normalization_method(method)
    if len(scores_per_method) == 0:
        raise ValueError("Expected the outputs of at least one method, got none.")
    if len(maps_per_method) != len(scores_per_method):
        raise ValueError(
            f"Got image scores for {len(scores_per_method)} methods but maps for {len(maps_per_method)}; "
            "expected the same."
        )
    stats = list(stats) if stats is not None else [None] * len(scores_per_method)
    if len(stats) != len(scores_per_method):
        raise ValueError(
            f"Got {len(stats)} normalisation stats for {len(scores_per_method)} methods; expected one each."
        )
    num_images = len(scores_per_method[0])
    for index, scores in enumerate(scores_per_method):
        if len(scores) != num_images:
            raise ValueError(
                f"Method 0 scored {num_images} images but method {index} scored {len(scores)}; "
                "expected the same images."
            )

    stacked = isinstance(maps_per_method[0], np.ndarray)
    total_scores = np.zeros(num_images, dtype=np.float64)
    total_maps: list[np.ndarray] | None = None
    for index, (scores, maps, method_stats) in enumerate(zip(scores_per_method, maps_per_method, stats)):
        normalized_scores, normalized_maps = normalize_scores(scores, _as_map_list(maps), method_stats, method)
        total_scores += normalized_scores
        if total_maps is None:
            total_maps = normalized_maps
            continue
        for image, (total, addend) in enumerate(zip(total_maps, normalized_maps)):
            if total.shape != addend.shape:
                raise ValueError(
                    f"Image {image}: method 0 gave a map of shape {total.shape} but method {index} gave "
                    f"{addend.shape}; resize the maps to the image size before ensembling."
                )
        total_maps = [total + addend for total, addend in zip(total_maps, normalized_maps)]
    return total_scores, (np.stack(total_maps) if stacked else total_maps)


def ensemble_predictions(
    predictions_per_method: Sequence[Sequence[Mapping[str, Any]]],
    stats: Sequence[NormalizationStats | None] | None = None,
    method: NormalizationMethod = "zscore",
) -> list[dict[str, Any]]:
    """[`ensemble_scores`] on per-image prediction dicts (`{"score": float, "anomaly_map": np.ndarray (H0, W0)}`).

    Args:
        predictions_per_method (`Sequence[Sequence[Mapping]]`): per method, one dict per image, images in the same
            order (e.g. the MAEDAY pipeline's outputs and `PatchCore.predict`'s).

    Returns:
        One `dict` per image with `"score"` (`float`) and `"anomaly_map"` (`np.ndarray` `(H0, W0)`, float32).
    """
    scores_per_method = [
        np.array([p["score"] for p in predictions], dtype=np.float64) for predictions in predictions_per_method
    ]
    maps_per_method = [[np.asarray(p["anomaly_map"]) for p in predictions] for predictions in predictions_per_method]
    scores, maps = ensemble_scores(scores_per_method, maps_per_method, stats, method)
    return [{"score": float(score), "anomaly_map": anomaly_map} for score, anomaly_map in zip(scores, maps)]
