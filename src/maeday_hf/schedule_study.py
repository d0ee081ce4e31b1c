"""Fewer masks: does the balanced schedule reach the paper's map quality with fewer masked reconstructions?

E is a Monte Carlo average of N per-mask error maps. With the paper's i.i.d. random masks a patch is kept (visible,
hence well reconstructed) in a binomial number of the N masks, so its error is averaged over a varying share of easy
reconstructions; the `balanced` schedule keeps every patch equally often (counts within 1), removing that part of the
variance. Since the cost is linear in N, a schedule that reaches the same map with fewer masks is a direct speed-up.

`compare_mask_schedules` measures, per schedule, N and seed, on a labelled test set:

- `map_deviation`: how far the map is from the converged one, `||E_N - E_ref|| / ||E_ref||` per image (averaged over
  the images), `E_ref` from `reference_num_masks` random masks drawn with a separate seed;
- pixel and image ROC-AUC.

`scripts/study_mask_schedule.py` runs it on the synthetic set; the README reports the numbers. The pipeline's default
stays the paper's N = 32 random masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from .masking import make_mask_noise
from .metrics import image_roc_auc, pixel_roc_auc
from .reconstruction import count_patches
from .scoring import maeday_anomaly_maps

MASK_SCHEDULES = ("random", "balanced")
REFERENCE_SEED = 1_000_003  # disjoint from the seeds the compared maps use


def map_deviation(anomaly_maps: torch.Tensor, reference_maps: torch.Tensor) -> float:
    """Mean over images of `||E - E_ref|| / ||E_ref||` (Frobenius norms of each `(height, width)` map)."""
    differences = (anomaly_maps - reference_maps).flatten(1).norm(dim=1)
    return float((differences / reference_maps.flatten(1).norm(dim=1)).mean())


@dataclasses.dataclass
class ScheduleResult:
    schedule: str
    num_masks: int
    seed: int
    map_deviation: float
    pixel_roc_auc: float
    image_roc_auc: float


def compare_mask_schedules(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    gt_masks: Sequence[np.ndarray],
    labels: Sequence[int],
    num_masks_grid: Sequence[int] = (4, 8, 16, 32),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    reference_num_masks: int = 512,
    mask_ratio: float = 0.75,
) -> list[ScheduleResult]:
    """Maps of `pixel_values` under each schedule x N x seed, scored against the converged map and the labels.

    Args:
        pixel_values (`torch.Tensor` of shape `(num_images, 3, height, width)`): processed test images.
        gt_masks: one boolean `(height, width)` defect mask per image (all False for good images).
        labels: 1 for a defective image, 0 for a good one.
        num_masks_grid, seeds: each value once (a repeat would be scored again and counted as another seed).
    """
    for name, values in (("num_masks_grid", num_masks_grid), ("seeds", seeds)):
        repeated = sorted({value for value in values if list(values).count(value) > 1})
        if repeated:
            raise ValueError(f"{name} repeats {repeated}: each value once (a repeat would count as another seed).")
    num_patches = count_patches(model, pixel_values)

    def maps_for(noise: torch.Tensor) -> dict[str, torch.Tensor]:
        return maeday_anomaly_maps(model, pixel_values, noise, mask_ratio)

    reference = maps_for(make_mask_noise(reference_num_masks, num_patches, mask_ratio, "random", REFERENCE_SEED))
    results = []
    for schedule in MASK_SCHEDULES:
        for num_masks in num_masks_grid:
            for seed in seeds:
                outputs = maps_for(make_mask_noise(num_masks, num_patches, mask_ratio, schedule, seed))
                results.append(ScheduleResult(
                    schedule=schedule,
                    num_masks=num_masks,
                    seed=seed,
                    map_deviation=map_deviation(outputs["anomaly_map"], reference["anomaly_map"]),
                    pixel_roc_auc=pixel_roc_auc(gt_masks, list(outputs["anomaly_map"].cpu().numpy()), num_bins=None),
                    image_roc_auc=image_roc_auc(labels, outputs["pred_score"].cpu().numpy()),
                ))
    return results


def summarize(results: Sequence[ScheduleResult]) -> list[dict[str, float | int | str]]:
    """Mean and standard deviation over seeds, per schedule and N (the population standard deviation, `ddof=0`, as
    the protocol's tables use; the sample one is sqrt(n / (n - 1)) times larger: 1.12x for 5 seeds)."""
    rows = []
    for schedule in MASK_SCHEDULES:
        for num_masks in sorted({result.num_masks for result in results}):
            group = [r for r in results if r.schedule == schedule and r.num_masks == num_masks]
            if not group:
                continue
            row: dict[str, float | int | str] = {"schedule": schedule, "num_masks": num_masks, "num_seeds": len(group)}
            for field in ("map_deviation", "pixel_roc_auc", "image_roc_auc"):
                values = np.array([getattr(r, field) for r in group])
                row[f"{field}_mean"] = float(values.mean())
                row[f"{field}_std"] = float(values.std())
            rows.append(row)
    return rows
