"""A detection threshold from the normal shots alone (no anomalous image, no test label).

After fine-tuning, every shot is scored through the zero-shot scoring path (`maeday_anomaly_maps`) as it is and in a
few augmented views (the same crop/rotation family as in training, from a separate seed stream), with the masks the
pipeline draws by default (its `seed=0`, random schedule) whatever the training seed: a shot's calibration score is
then the score the detector gives it. The image scores of these normal views give the threshold

    threshold = mean + num_std * std      (num_std = 3 by default),

or their top score when that is larger, raised by `TOP_SCORE_MARGIN` (1 %): none of the normal views is then labelled
anomalous, and since the image score is the maximum of the anomaly map, none of their pixels is either. The pipeline
uses one threshold for the score and the map, so this one number serves both.

The margin is there because the detector reaches a view's score again by another path: its own preprocessing and
batches, perhaps another device, and another precision (it runs a float32 model in bf16 where the device multiplies
bf16 in hardware, in float32 elsewhere). Without it the view that set the threshold sits exactly on it, and rounding
alone lifts it above.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from .masking import make_mask_noise, validate_positive_int
from .reconstruction import count_patches, runs_in_bfloat16_by_default
from .scoring import maeday_anomaly_maps
from .shot_views import CALIBRATION_VIEWS, random_crop_rotate, view_generator

logger = logging.getLogger(__name__)

TOP_SCORE_MARGIN = 1e-2
"""Relative margin above the top normal score, when that sets the threshold. Measured differences of the same image
score: another batch and chunk size or the pipeline's preprocessing, up to 3.5e-7 (tiny model, CPU); bf16 against
float32, up to 0.16 % on a CPU and 0.29 % on an H200 (ViT-B, N = 32, README Speed); bf16 through another matrix kernel
(oneDNN on and off), up to 0.29 % with 1 mask and 0.16 % with 4 (ViT-B size). 1 % leaves more than 3x room."""
PIPELINE_MASK_SEED = 0
"""`AnomalyDetectionPipeline`'s default `seed` of the masks (with the default `"random"` schedule)."""


@dataclasses.dataclass
class Calibration:
    """Scores of normal shot views and the threshold derived from them (saved as `calibration.json`)."""

    threshold: float
    scores: list[float]
    mean: float
    std: float
    num_std: float
    num_views_per_shot: int
    num_masks: int
    mask_ratio: float
    seed: int
    mask_seed: int
    precision: str = "float32"
    """The precision the views were scored in: `"bfloat16"` for a float32 model on a device that multiplies bf16 in
    hardware (as the pipeline would there), else the model's dtype."""
    augmented: bool = True
    """Whether the views beyond each shot itself were augmented (False: the fine-tune trained without augmentation,
    so each shot is scored once, as it is)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def calibrate_threshold(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    num_views_per_shot: int = 4,
    num_masks: int = 32,
    mask_ratio: float = 0.75,
    num_std: float = 3.0,
    seed: int = 0,
    mask_batch_size: int | None = None,
    min_crop_scale: float = 0.75,
    max_rotation_degrees: float = 15.0,
    mask_seed: int = PIPELINE_MASK_SEED,
    augment: bool = True,
    source_pixel_values: torch.Tensor | None = None,
) -> Calibration:
    """Score the shots (plus `num_views_per_shot - 1` augmented views of each) and derive a threshold.

    Args:
        model (`ViTMAEForPreTraining`): the fine-tuned (merged) model, in eval mode.
        pixel_values (`torch.Tensor` of shape `(num_shots, num_channels, height, width)`): the processed shots.
        num_masks, mask_ratio: as at inference (the pipeline's defaults: 32 and 0.75).
        seed (`int`): seeds the augmented views (the run seed).
        mask_seed (`int`, defaults to the pipeline's default, 0): the masks are the ones the pipeline draws for its
            `seed=mask_seed` (random schedule), so the scores match what it returns for the same image.
        augment (`bool`, defaults to `True`): as in training; without augmentation the model saw no cropped or rotated
            views, so only the shots themselves are scored (`num_views_per_shot` is then 1: more copies of a shot,
            with the same masks, would score the same).
        source_pixel_values (`torch.Tensor` of shape `(num_shots, num_channels, source_height, source_width)`,
            *optional*): the shots processed at a larger size, to cut the augmented views from, as in training
            (`shot_views.render_views`); each shot itself is scored from `pixel_values`, as the pipeline sees it.

    The threshold is `max(mean + num_std * std, max score * (1 + TOP_SCORE_MARGIN))` over the views' scores, `std`
    the sample standard deviation (n - 1 in the denominator: a handful of views underestimates the spread less); NaN
    if any score is not finite (a diverged fine-tune). The views are scored in the precision the pipeline picks on
    the model's device (`Calibration.precision`).

    Returns:
        `Calibration`.
    """
    num_shots = pixel_values.shape[0]
    if num_shots == 0:
        raise ValueError("No shots to calibrate on: pixel_values holds 0 images.")
    num_views_per_shot = validate_positive_int(num_views_per_shot, "num_views_per_shot")
    if not augment:
        num_views_per_shot = 1
    sources = pixel_values if source_pixel_values is None else source_pixel_values
    size = tuple(pixel_values.shape[-2:])
    views = []
    for shot_index in range(num_shots):
        views.append(pixel_values[shot_index])
        for view_index in range(1, num_views_per_shot):
            generator = view_generator(seed, shot_index * num_views_per_shot + view_index, CALIBRATION_VIEWS)
            views.append(random_crop_rotate(
                sources[shot_index], generator, min_crop_scale, max_rotation_degrees, size=size
            ))
    views = torch.stack(views)
    device = next(model.parameters()).device
    num_patches = count_patches(model, views)
    noise = make_mask_noise(num_masks, num_patches, mask_ratio, "random", mask_seed)
    bf16 = runs_in_bfloat16_by_default(model, device)
    outputs = maeday_anomaly_maps(
        model, views.to(device), noise, mask_ratio, mask_batch_size=mask_batch_size, bf16=bf16
    )
    scores = outputs["pred_score"].cpu().tolist()
    if len(scores) < 8:
        logger.warning(
            "Calibrating the threshold from only %d normal views: their spread is a poor estimate, so expect "
            "mislabelled queries; %s.", len(scores),
            "raise calibration_views_per_shot (or use more shots)" if augment else "use more shots",
        )
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1))
    top = max(scores)
    threshold = max(mean + num_std * std, top + abs(top) * TOP_SCORE_MARGIN)
    if not all(math.isfinite(score) for score in scores):
        threshold = math.nan  # (Python's max skips a NaN that is not its first argument)
    logger.info("Calibrated threshold %.6g from %d normal views (mean %.6g, std %.6g, max %.6g)", threshold,
                len(scores), mean, std, top)
    return Calibration(
        threshold=threshold,
        scores=scores,
        mean=mean,
        std=std,
        num_std=num_std,
        num_views_per_shot=num_views_per_shot,
        num_masks=num_masks,
        mask_ratio=mask_ratio,
        seed=seed,
        mask_seed=mask_seed,
        precision="bfloat16" if bf16 else str(next(model.parameters()).dtype).removeprefix("torch."),
        augmented=augment,
    )
