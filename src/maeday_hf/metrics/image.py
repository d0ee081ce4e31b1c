"""Image-level metrics: ROC-AUC and F1-max of one score per image against good (0) / anomaly (1) labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .curves import ThresholdCounts, count_exact, f1_max, roc_area


def _as_vector(values, dtype: torch.dtype | None = None) -> np.ndarray:
    """Flat NumPy copy of a sequence, array or tensor (one that requires grad, or bfloat16, which NumPy lacks, too)."""
    tensor = torch.as_tensor(values, dtype=dtype).detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy().ravel()


def _image_counts(gt_labels: Sequence[int] | np.ndarray | torch.Tensor, pred_scores) -> ThresholdCounts:
    labels = _as_vector(gt_labels)
    scores = _as_vector(pred_scores, torch.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"Got {labels.size} labels but {scores.size} scores; expected one score per image.")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"Labels must be 0 (good) or 1 (anomaly), got values {np.unique(labels).tolist()}.")
    if not np.isfinite(scores).all():
        raise ValueError("Image scores contain NaN or infinity.")
    positives = labels.astype(np.float64)
    return count_exact(scores, positives, 1.0 - positives)


def image_roc_auc(
    gt_labels: Sequence[int] | np.ndarray | torch.Tensor, pred_scores: Sequence[float] | np.ndarray | torch.Tensor
) -> float:
    """Image-level ROC-AUC (equal to `sklearn.metrics.roc_auc_score`).

    Args:
        gt_labels (`Sequence[int]` of length `num_images`): 0 for good, 1 for anomaly.
        pred_scores (`Sequence[float]` of length `num_images`): Higher means more anomalous.

    Returns:
        `float` in `[0, 1]`.
    """
    return roc_area(_image_counts(gt_labels, pred_scores))


def image_f1_max(
    gt_labels: Sequence[int] | np.ndarray | torch.Tensor, pred_scores: Sequence[float] | np.ndarray | torch.Tensor
) -> float:
    """Largest F1 over all score thresholds (the maximum of `2PR / (P + R)` along `sklearn`'s precision-recall curve).

    Args:
        gt_labels (`Sequence[int]` of length `num_images`): 0 for good, 1 for anomaly.
        pred_scores (`Sequence[float]` of length `num_images`): Higher means more anomalous.

    Returns:
        `float` in `[0, 1]`.
    """
    return f1_max(_image_counts(gt_labels, pred_scores))
