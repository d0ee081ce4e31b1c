"""Pixel-level metrics over a whole category: pixel ROC-AUC, pixel F1-max and AUPRO, streamed image by image.

Method. By default (`num_bins=DEFAULT_NUM_BINS`) a first pass takes the global `[min, max]` of the anomaly maps (or use
`score_range`), a second pass drops every pixel into one of `num_bins` equal bins with `np.bincount`, in three weight
channels: normal pixels, anomalous pixels, and anomalous pixels weighted by `1 / size of their ground-truth region`.
Memory is `O(num_bins)` plus one image; time is linear in the number of pixels. `num_bins=None` sorts all pixels instead
(exact, memory `O(num_pixels)`), which equals scikit-learn and the MVTec AD reference code.

Error bound of the histogram. The counts at every bin edge are exact, so the curves are exact at `num_bins + 1` points
and only the order of the pixels inside a bin is lost. Per bin, the exact curve and the estimate both lie in the
rectangle between the bin's two edge points, hence (see [`~maeday_hf.metrics.curves.tie_area`]):

- `|pixel_roc_auc - exact| <= ½ Σ_b ΔTPR_b · ΔFPR_b` (`<= ½ max_b ΔFPR_b`: half the largest share of normal
  pixels in any one bin);
- `|aupro - exact| <= Σ_{b: FPR_b < max_fpr} ΔPRO_b · ΔFPR_b / max_fpr`;
- `0 <= exact_f1_max - pixel_f1_max <= max_b 2 TP_b / (TP_b + FP_{b+1} + P) - pixel_f1_max`.

[`compute_pixel_metrics`] returns these bounds, computed from the data, next to the values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .components import label_components
from .curves import ScoreHistogram, ThresholdCounts, count_exact, f1_max, f1_max_gap, roc_area, tie_area

DEFAULT_NUM_BINS = 1 << 16
"""Bins of the streamed histogram: 65 536 bins × 3 channels × 8 bytes = 1.5 MiB, whatever the number of pixels."""

DEFAULT_MAX_FPR = 0.3
"""AUPRO integration limit of the MVTec AD protocol."""

# Channels of the histogram.
_NEGATIVE, _POSITIVE, _REGION = 0, 1, 2


@dataclass(frozen=True)
class PixelMetrics:
    """Pixel metrics of one category and, for the histogram method, data-dependent bounds on their error.

    The `*_error_bound` fields are 0 for the exact method. `aupro` and its bound are `None` when not requested.
    """

    pixel_roc_auc: float
    pixel_f1_max: float
    aupro: float | None
    pixel_roc_auc_error_bound: float
    pixel_f1_max_error_bound: float
    aupro_error_bound: float | None


def _as_array(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != torch.float64:
            value = value.float()  # NumPy has no bfloat16
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _as_scores(value) -> np.ndarray:
    """Scores in their own float precision (float32 stays float32, float64 stays float64: rounding a float64 map to
    float32 would merge close scores and flush tiny ones to 0); other dtypes as float64."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in (torch.float32,
                                                                                              torch.float64):
        value = value.float()  # NumPy has no bfloat16
    scores = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if scores.dtype in (np.float32, np.float64):
        return scores
    return scores.astype(np.float32 if scores.dtype == np.float16 else np.float64)


def _iter_pairs(gt_masks: Iterable, anomaly_maps: Iterable) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validated `(mask, scores)` per image: bool and float of the same `(height, width)`; a `None` mask means good."""
    missing = object()
    masks_iter, maps_iter = iter(gt_masks), iter(anomaly_maps)
    index = 0
    while True:
        mask, scores = next(masks_iter, missing), next(maps_iter, missing)
        if mask is missing and scores is missing:
            return
        if mask is missing or scores is missing:
            raise ValueError(f"gt_masks and anomaly_maps differ in length: one of them ends at image {index}.")
        scores = _as_scores(scores)
        scores = scores.squeeze(0) if scores.ndim == 3 and scores.shape[0] == 1 else scores
        mask = np.zeros(scores.shape, dtype=bool) if mask is None else _as_array(mask, None) != 0  # non-zero: anomalous
        mask = mask.squeeze(0) if mask.ndim == 3 and mask.shape[0] == 1 else mask
        if scores.ndim != 2 or mask.shape != scores.shape:
            raise ValueError(
                f"Image {index}: expected an anomaly map (height, width) and a mask of the same shape, got map "
                f"{tuple(scores.shape)} and mask {tuple(mask.shape)}; resize the map to the mask before scoring."
            )
        if not np.isfinite(scores).all():
            raise ValueError(f"Image {index}: the anomaly map contains NaN or infinity.")
        yield mask, scores
        index += 1


def _region_weights(mask: np.ndarray, connectivity: Literal[4, 8]) -> np.ndarray:
    """`1 / region size` on each anomalous pixel (in `mask[mask]` order): each region then sums to 1."""
    labels, num_regions = label_components(mask, connectivity)
    if num_regions == 0:
        return np.zeros(0, dtype=np.float64)
    region_of_pixel = labels[mask] - 1
    return 1.0 / np.bincount(region_of_pixel)[region_of_pixel]


def _score_range(anomaly_maps: Iterable) -> tuple[float, float]:
    low, high = np.inf, -np.inf
    for scores in anomaly_maps:
        scores = _as_scores(scores)
        if scores.size:
            low, high = min(low, float(scores.min())), max(high, float(scores.max()))
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("anomaly_maps is empty or not finite: no score range to build the histogram on.")
    return low, high


def _histogram_counts(
    pairs: Iterator[tuple[np.ndarray, np.ndarray]],
    score_range: tuple[float, float],
    num_bins: int,
    with_regions: bool,
    connectivity: Literal[4, 8],
) -> tuple[ScoreHistogram, int]:
    histogram = ScoreHistogram(*score_range, num_bins=num_bins, num_channels=3)
    num_images = 0
    for mask, scores in pairs:
        indices = histogram.bin_indices(scores)
        positive = indices[mask]
        histogram.add_binned(indices[~mask], _NEGATIVE)
        histogram.add_binned(positive, _POSITIVE)
        if with_regions:
            histogram.add_binned(positive, _REGION, _region_weights(mask, connectivity))
        num_images += 1
    return histogram, num_images


def _exact_counts(
    pairs: Iterator[tuple[np.ndarray, np.ndarray]], with_regions: bool, connectivity: Literal[4, 8]
) -> tuple[ThresholdCounts, ThresholdCounts | None]:
    scores, positives, regions = [], [], []
    for mask, image_scores in pairs:
        scores.append(image_scores.ravel())
        positives.append(mask.ravel())
        if with_regions:
            region = np.zeros(mask.shape, dtype=np.float64)
            region[mask] = _region_weights(mask, connectivity)
            regions.append(region.ravel())
    if not scores:
        raise ValueError("No images given: gt_masks and anomaly_maps are empty.")
    scores_all = np.concatenate(scores)
    # Sort once here; count_exact's own stable sort of already-sorted scores is then linear.
    order = np.argsort(-scores_all, kind="stable")
    scores_all = scores_all[order]
    positive = np.concatenate(positives)[order].astype(np.float64)
    negative = 1.0 - positive
    pixel = count_exact(scores_all, positive, negative)
    region_counts = count_exact(scores_all, np.concatenate(regions)[order], negative) if with_regions else None
    return pixel, region_counts


def compute_pixel_metrics(
    gt_masks: Iterable[np.ndarray | torch.Tensor | None],
    anomaly_maps: Iterable[np.ndarray | torch.Tensor],
    *,
    include_aupro: bool = True,
    max_fpr: float = DEFAULT_MAX_FPR,
    num_bins: int | None = DEFAULT_NUM_BINS,
    score_range: tuple[float, float] | None = None,
    connectivity: Literal[4, 8] = 8,
) -> PixelMetrics:
    """Pixel ROC-AUC, pixel F1-max and AUPRO of a category in one streamed pass (two if the score range is unknown).

    Args:
        gt_masks (`Iterable` of `(height, width)` arrays or `None`):
            Ground truth per image; non-zero is anomalous, `None` means a good image (all zero).
        anomaly_maps (`Iterable` of `(height, width)` arrays):
            Scores per pixel, at the mask's size. A stacked `(num_images, height, width)` array or tensor works too.
        include_aupro (`bool`, *optional*, defaults to `True`): Label ground-truth regions and compute AUPRO.
        max_fpr (`float`, *optional*, defaults to 0.3): AUPRO integration limit; the area is divided by it.
        num_bins (`int` or `None`, *optional*, defaults to 65 536):
            Histogram bins; `None` sorts all pixels for the exact values (memory grows with the number of pixels).
        score_range (`tuple[float, float]`, *optional*):
            `(min, max)` of all scores, known in advance; the inputs are then read once, so generators work. Without it
            they are read twice (first for the range) and must be re-iterable (lists, arrays).
        connectivity (`int`, *optional*, defaults to 8): Neighbourhood for ground-truth regions (MVTec AD: 8).

    Returns:
        [`PixelMetrics`].

    Raises:
        `TypeError`: `anomaly_maps` is a one-pass iterator (e.g. a generator) and the histogram needs `score_range`.
        `ValueError`: lengths or shapes differ, a map is not finite, or there are no anomalous or no normal pixels.

    Example:

    ```python
    >>> import numpy as np
    >>> from maeday_hf.metrics import compute_pixel_metrics
    >>> masks = [np.zeros((8, 8)), np.pad(np.ones((2, 2)), 3)]
    >>> maps = [np.zeros((8, 8)), np.pad(np.ones((2, 2)), 3)]
    >>> compute_pixel_metrics(masks, maps).pixel_roc_auc
    1.0
    ```
    """
    pairs = _iter_pairs(gt_masks, anomaly_maps)
    if num_bins is None:
        pixel_counts, region_counts = _exact_counts(pairs, include_aupro, connectivity)
    else:
        if score_range is None:
            if iter(anomaly_maps) is anomaly_maps:  # a generator: the range pass would use up the maps
                raise TypeError(
                    f"anomaly_maps is a one-pass {type(anomaly_maps).__name__}, but without score_range it is read "
                    "twice (first for the score range); pass score_range=(min, max) or the maps as a list or array."
                )
            score_range = _score_range(anomaly_maps)
        histogram, num_images = _histogram_counts(pairs, score_range, num_bins, include_aupro, connectivity)
        if num_images == 0:
            raise ValueError("No images given: gt_masks and anomaly_maps are empty.")
        pixel_counts = histogram.counts(_POSITIVE, _NEGATIVE)
        region_counts = histogram.counts(_REGION, _NEGATIVE) if include_aupro else None
    if pixel_counts.total_positives == 0 or pixel_counts.total_negatives == 0:
        raise ValueError(
            f"Pixel metrics need anomalous and normal pixels, got {pixel_counts.total_positives:.0f} anomalous and "
            f"{pixel_counts.total_negatives:.0f} normal; a category without ground-truth masks cannot be scored per "
            "pixel."
        )
    if num_bins is None:
        auc_bound = f1_bound = 0.0
        pro_bound = 0.0 if include_aupro else None
    else:
        auc_bound, f1_bound = tie_area(pixel_counts), f1_max_gap(pixel_counts)
        pro_bound = tie_area(region_counts, max_fpr) if include_aupro else None
    return PixelMetrics(
        pixel_roc_auc=roc_area(pixel_counts),
        pixel_f1_max=f1_max(pixel_counts),
        aupro=roc_area(region_counts, max_fpr) if include_aupro else None,
        pixel_roc_auc_error_bound=auc_bound,
        pixel_f1_max_error_bound=f1_bound,
        aupro_error_bound=pro_bound,
    )


def pixel_roc_auc(
    gt_masks: Iterable[np.ndarray | torch.Tensor | None],
    anomaly_maps: Iterable[np.ndarray | torch.Tensor],
    num_bins: int | None = DEFAULT_NUM_BINS,
) -> float:
    """Pixel-level ROC-AUC over all pixels of all images; [`compute_pixel_metrics`] has arguments and error bound."""
    return compute_pixel_metrics(gt_masks, anomaly_maps, include_aupro=False, num_bins=num_bins).pixel_roc_auc


def pixel_f1_max(
    gt_masks: Iterable[np.ndarray | torch.Tensor | None],
    anomaly_maps: Iterable[np.ndarray | torch.Tensor],
    num_bins: int | None = DEFAULT_NUM_BINS,
) -> float:
    """Largest pixel-level F1 over thresholds; see [`compute_pixel_metrics`] for arguments and error bound."""
    return compute_pixel_metrics(gt_masks, anomaly_maps, include_aupro=False, num_bins=num_bins).pixel_f1_max


def aupro(
    gt_masks: Iterable[np.ndarray | torch.Tensor | None],
    anomaly_maps: Iterable[np.ndarray | torch.Tensor],
    max_fpr: float = DEFAULT_MAX_FPR,
    num_bins: int | None = DEFAULT_NUM_BINS,
    connectivity: Literal[4, 8] = 8,
) -> float:
    """Area under the per-region-overlap curve up to `max_fpr`, divided by `max_fpr` (MVTec AD protocol).

    At each threshold, PRO is the mean over all connected ground-truth regions (of all images) of the fraction of the
    region scoring at or above the threshold, and FPR is the fraction of all normal pixels doing so. See
    [`compute_pixel_metrics`] for arguments and the error bound.
    """
    return compute_pixel_metrics(
        gt_masks, anomaly_maps, max_fpr=max_fpr, num_bins=num_bins, connectivity=connectivity
    ).aupro
