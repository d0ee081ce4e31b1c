"""Threshold curves from weighted scores: exact counting over sorted scores, or a streamed fixed histogram.

Every metric in this package is a function of one object, [`ThresholdCounts`]: for a descending list of thresholds, the
weighted number of positives and negatives scoring at or above each threshold. ROC-AUC uses unit weights; AUPRO
weighs each anomalous pixel by `1 / size of its ground-truth region`, so the positive rate becomes the mean per-region
overlap.

Two ways to get the counts:

- [`count_exact`]: sort all scores (memory `O(num_scores)`); thresholds are the distinct scores, as in scikit-learn.
- [`ScoreHistogram`]: a fixed grid of `num_bins` equal bins over a known `[low, high]`, filled image by image with
  `np.bincount` (memory `O(num_bins)`, independent of the number of pixels). Thresholds are the bin lower edges,
  where the counts are exact; inside a bin the order of scores is lost. [`tie_area`] bounds what this costs (see there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ThresholdCounts:
    """Cumulative weighted counts at descending thresholds.

    Args:
        positives (`np.ndarray` of shape `(num_thresholds,)`):
            Weighted positives scoring `>=` each threshold, non-decreasing; the last entry is the total.
        negatives (`np.ndarray` of shape `(num_thresholds,)`):
            Same for negatives.
    """

    positives: np.ndarray
    negatives: np.ndarray

    @property
    def total_positives(self) -> float:
        return float(self.positives[-1]) if self.positives.size else 0.0

    @property
    def total_negatives(self) -> float:
        return float(self.negatives[-1]) if self.negatives.size else 0.0

    def rates(self) -> tuple[np.ndarray, np.ndarray]:
        """True- and false-positive rates with the `(0, 0)` origin prepended, each of shape `(num_thresholds + 1,)`."""
        if self.total_positives <= 0 or self.total_negatives <= 0:
            raise ValueError(
                f"Rates need both classes, got total positive weight {self.total_positives} and total negative weight "
                f"{self.total_negatives}; a ROC curve is undefined when one class is absent."
            )
        tpr = np.concatenate([[0.0], self.positives / self.total_positives])
        fpr = np.concatenate([[0.0], self.negatives / self.total_negatives])
        return tpr, fpr


def count_exact(
    scores: np.ndarray, positive_weights: np.ndarray, negative_weights: np.ndarray
) -> ThresholdCounts:
    """Exact cumulative counts with one threshold per distinct score (ties collapsed, as in scikit-learn).

    Args:
        scores (`np.ndarray` of shape `(num_scores,)`): Higher means more anomalous.
        positive_weights (`np.ndarray` of shape `(num_scores,)`): Weight of each score as a positive (0 for negatives).
        negative_weights (`np.ndarray` of shape `(num_scores,)`): Weight of each score as a negative (0 for positives).

    Returns:
        [`ThresholdCounts`] with one entry per distinct score, highest first.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    positives = np.cumsum(np.asarray(positive_weights, dtype=np.float64).ravel()[order])
    negatives = np.cumsum(np.asarray(negative_weights, dtype=np.float64).ravel()[order])
    # Keep the last index of each run of equal scores: that is where a threshold at this score stops counting.
    last_of_run = np.flatnonzero(np.diff(sorted_scores, append=-np.inf) != 0)
    return ThresholdCounts(positives=positives[last_of_run], negatives=negatives[last_of_run])


class ScoreHistogram:
    """Weighted score histograms over a fixed range, filled in chunks: bounded memory for any number of pixels.

    Args:
        low (`float`): Smallest score that will be added.
        high (`float`): Largest score that will be added.
        num_bins (`int`): Number of equal-width bins over `[low, high]`.
        num_channels (`int`): How many weight channels to accumulate (e.g. negatives, positives, per-region positives).

    Example:

    ```python
    >>> import numpy as np
    >>> from maeday_hf.metrics.curves import ScoreHistogram
    >>> histogram = ScoreHistogram(0.0, 1.0, num_bins=4, num_channels=2)
    >>> histogram.update(np.array([0.1, 0.9]), np.array([[0.0, 1.0], [1.0, 0.0]]))
    >>> histogram.counts(positive_channel=1, negative_channel=0).positives
    array([0., 0., 0., 1.])
    ```
    """

    def __init__(self, low: float, high: float, num_bins: int, num_channels: int = 2) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
        if not (np.isfinite(low) and np.isfinite(high)) or high < low:
            raise ValueError(f"Histogram range must be finite with low <= high, got [{low}, {high}].")
        self.low = float(low)
        self.high = float(high)
        # A constant score map gets one bin: every threshold then ties, which is what the data says.
        self.num_bins = int(num_bins) if high > low else 1
        span = self.high - self.low
        if self.num_bins > 1 and not (np.isfinite(span) and np.isfinite(self.num_bins / span)):
            # (a range wider than float64 holds, or so narrow its bins would be narrower than the smallest float)
            raise ValueError(
                f"Scores in [{self.low!r}, {self.high!r}] span a range the histogram cannot divide into {self.num_bins} "
                f"bins; pass num_bins=None for the exact computation."
            )
        self.bins = np.zeros((num_channels, self.num_bins), dtype=np.float64)

    def bin_indices(self, scores: np.ndarray) -> np.ndarray:
        """Bin of each score, `int64` of the same shape; scores outside `[low, high]` raise."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.size and (scores.min() < self.low or scores.max() > self.high):
            raise ValueError(
                f"Scores in [{scores.min()}, {scores.max()}] fall outside the histogram range "
                f"[{self.low}, {self.high}]."
            )
        if self.num_bins == 1:
            return np.zeros(scores.shape, dtype=np.int64)
        scaled = (scores - self.low) * (self.num_bins / (self.high - self.low))
        return np.minimum(scaled.astype(np.int64), self.num_bins - 1)

    def update(self, scores: np.ndarray, weights: np.ndarray) -> None:
        """Add scores of shape `(n,)` with weights of shape `(n, num_channels)`."""
        indices = self.bin_indices(np.asarray(scores).ravel())
        weights = np.asarray(weights, dtype=np.float64).reshape(indices.size, -1)
        for channel in range(self.bins.shape[0]):
            self.bins[channel] += np.bincount(indices, weights=weights[:, channel], minlength=self.num_bins)

    def add_binned(self, indices: np.ndarray, channel: int, weights: np.ndarray | None = None) -> None:
        """Add already-binned scores (from [`bin_indices`]) to one channel; lets callers skip zero weights."""
        self.bins[channel] += np.bincount(indices.ravel(), weights=weights, minlength=self.num_bins)

    def counts(self, positive_channel: int, negative_channel: int) -> ThresholdCounts:
        """Cumulative counts at the bin lower edges, highest bin first."""
        return ThresholdCounts(
            positives=np.cumsum(self.bins[positive_channel][::-1]),
            negatives=np.cumsum(self.bins[negative_channel][::-1]),
        )


def roc_area(counts: ThresholdCounts, max_fpr: float = 1.0) -> float:
    """Area under the (weighted) ROC curve up to `max_fpr`, divided by `max_fpr`, trapezoidal rule.

    With `max_fpr < 1` the curve is cut by linear interpolation at `max_fpr` (the MVTec AD protocol for AUPRO). No
    McClish correction is applied: the result is the plain normalised partial area.
    """
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}.")
    tpr, fpr = counts.rates()
    if max_fpr < 1:
        stop = int(np.searchsorted(fpr, max_fpr, side="right"))
        if stop < fpr.size:
            # fpr[stop - 1] <= max_fpr < fpr[stop]: interpolate the crossing point.
            fraction = (max_fpr - fpr[stop - 1]) / (fpr[stop] - fpr[stop - 1])
            crossing = tpr[stop - 1] + fraction * (tpr[stop] - tpr[stop - 1])
            tpr = np.append(tpr[:stop], crossing)
            fpr = np.append(fpr[:stop], max_fpr)
    # Trapezoidal rule written out: np.trapezoid needs numpy 2, np.trapz is gone there.
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2 / max_fpr)


def tie_area(counts: ThresholdCounts, max_fpr: float = 1.0) -> float:
    """Upper bound on how far [`roc_area`] can move when the order of scores inside each threshold step is unknown.

    Between two consecutive thresholds the true curve is monotone, so it stays inside the rectangle spanned by the two
    points, and its area over a step lies between the rectangle's lower and upper edge. Over a step wholly below
    `max_fpr` the trapezoid is the midpoint of that range, so it is off by at most half the rectangle, `Δtpr · Δfpr / 2`.
    Over the step that crosses `max_fpr` the estimate is the linear interpolation cut at `max_fpr`, which lies in the
    same range over the part up to `max_fpr`: off by at most `Δtpr · (max_fpr - fpr_start)`. The sum, divided by
    `max_fpr`, bounds the difference between the histogram estimate and the exact area.
    """
    tpr, fpr = counts.rates()
    rise, start, end = np.diff(tpr), fpr[:-1], fpr[1:]
    below = end <= max_fpr
    crossing = (start < max_fpr) & ~below
    bound = np.sum(rise[below] * (end[below] - start[below])) / 2 + np.sum(rise[crossing] * (max_fpr - start[crossing]))
    return float(bound / max_fpr)


def f1_max(counts: ThresholdCounts) -> float:
    """Largest F1 score over the thresholds, `2·TP / (TP + FP + P)`; thresholds with nothing predicted are skipped."""
    total = counts.total_positives
    if total <= 0:
        raise ValueError("F1 is undefined without positives: the ground truth has no anomalous sample or pixel.")
    denominator = counts.positives + counts.negatives + total
    return float(np.max(2 * counts.positives / denominator))


def f1_max_gap(counts: ThresholdCounts) -> float:
    """Upper bound on how much higher the exact F1-max can be than [`f1_max`] of histogram counts.

    Inside a bin, a threshold catches at most the positives of the bin's lower edge and at least the negatives of its
    upper edge, so `F1 <= 2·TP_low / (TP_low + FP_high + P)`. The histogram estimate is never above the exact value.
    """
    total = counts.total_positives
    previous_negatives = np.concatenate([[0.0], counts.negatives[:-1]])
    optimistic = 2 * counts.positives / (counts.positives + previous_negatives + total)
    return float(max(optimistic.max() - f1_max(counts), 0.0))
