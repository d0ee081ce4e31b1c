"""Reconstruction error -> Gaussian smoothing -> mean over masks -> pixel anomaly map and image score (paper Eq. 1).

    E_i = sum_c (I^c - R_i^c)^2 * g,     E = mean_i E_i,     S = max(E)

`g` is a Gaussian (kernel 7, sigma 1.4) applied per channel. Filtering, the channel sum and the mean over masks are
all linear, so `E = g * mean_i sum_c (I^c - R_i^c)^2`: the filter runs once per image instead of 3N times, with the
same result up to float rounding (the tests check this against the paper's order of operations).

Borders: the filter pads by mirroring about the edge pixel without repeating it (`torch.nn.functional.pad(...,
mode="reflect")`, OpenCV's BORDER_REFLECT_101), so an error at the border is neither diluted by zeros nor doubled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masking import require_visible_patches, validate_mask_ratio, validate_positive_int
from .reconstruction import (
    mask_ratio_set_to,
    patches_to_image,
    predict_patches,
    reconstruction_targets,
    squared_error_per_patch_pixel,
)

GAUSSIAN_KERNEL_SIZE = 7
GAUSSIAN_SIGMA = 1.4


def gaussian_kernel1d(
    kernel_size: int = GAUSSIAN_KERNEL_SIZE,
    sigma: float = GAUSSIAN_SIGMA,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, shape `(kernel_size,)`; the 2-D kernel is their outer product."""
    offsets = torch.arange(kernel_size, device=device, dtype=torch.float64) - (kernel_size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (taps / taps.sum()).to(dtype)


def gaussian_filter(
    maps: torch.Tensor, kernel_size: int = GAUSSIAN_KERNEL_SIZE, sigma: float = GAUSSIAN_SIGMA
) -> torch.Tensor:
    """Separable Gaussian filter of each map, reflect-101 borders.

    Args:
        maps (`torch.Tensor` of shape `(batch_size, height, width)`).

    Returns:
        `torch.Tensor` of the same shape.
    """
    batch_size, height, width = maps.shape
    pad = kernel_size // 2
    if min(height, width) <= pad:
        raise ValueError(f"Maps of size {height}x{width} are too small for a {kernel_size}-tap Gaussian filter.")
    taps = gaussian_kernel1d(kernel_size, sigma, dtype=torch.float64).tolist()
    padded = F.pad(maps.unsqueeze(1), (pad, pad, pad, pad), mode="reflect").squeeze(1)
    # Weighted sums of shifted slices, along the rows then the columns: in the maps' own precision on every device
    # (a convolution would run in TF32 under cuDNN's default on recent GPUs), and cheap for one channel per image.
    rows = sum(tap * padded[:, :, offset : offset + width] for offset, tap in enumerate(taps))
    return sum(tap * rows[:, offset : offset + height, :] for offset, tap in enumerate(taps))


def default_mask_batch_size(device: torch.device) -> int:
    """(image, mask) pairs per forward: 1024 on an accelerator (32 images x 32 masks keep a GPU busy; a ViT-H pass of
    1024 x 50 tokens stays within a few GiB in bf16), 128 on a CPU (beyond that a CPU gains nothing, memory grows)."""
    return 128 if torch.device(device).type == "cpu" else 1024


def image_scores(anomaly_maps: torch.Tensor) -> torch.Tensor:
    """S = max(E): `(batch_size, height, width)` -> `(batch_size,)`."""
    return anomaly_maps.flatten(1).amax(dim=1)


@torch.no_grad()
def maeday_anomaly_maps(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    noise: torch.Tensor,
    mask_ratio: float,
    mask_batch_size: int | None = None,
    return_uncertainty: bool = False,
    kernel_size: int = GAUSSIAN_KERNEL_SIZE,
    sigma: float = GAUSSIAN_SIGMA,
    bf16: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Zero-shot MAEDAY for a batch of images: N masked reconstructions each, compared with the input.

    Every image gets the same N masks (the rows of `noise`), so an image's result does not depend on what it is
    batched with. The `batch_size * N` (image, mask) pairs run through the model in chunks of at most
    `mask_batch_size`, and their error maps are summed per image by plain reductions (no scattered adds), so memory
    does not grow with N and a seed gives the same maps bit for bit on every run.

    Args:
        model (`ViTMAEForPreTraining`): left unchanged (its mask ratio is set only for this call).
        pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`): processed images.
        noise (`torch.Tensor` of shape `(num_masks, num_patches)`): one mask per row, see `masking.make_mask_noise`.
        mask_ratio (`float`): fraction of patches masked; with `noise` it fixes which patches each mask keeps.
        mask_batch_size (`int`, *optional*): most (image, mask) pairs per forward pass; by default
            `default_mask_batch_size(device)`.
        return_uncertainty (`bool`): also return the per-pixel standard deviation of the N filtered maps E_i.
        bf16 (`bool`, *optional*): the model's forward in bfloat16 weights (`reconstruction.bfloat16_copy`; default:
            where the device multiplies bf16 in hardware, `reconstruction.runs_bfloat16_natively`); errors,
            filtering and averaging always run in float32.

    Returns:
        `dict` with `anomaly_map` `(batch_size, height, width)`, `pred_score` `(batch_size,)` and, if asked,
        `uncertainty_map` `(batch_size, height, width)`; float32, on the model's device.
    """
    batch_size, _, height, width = pixel_values.shape
    mask_ratio = validate_mask_ratio(mask_ratio)
    if mask_batch_size is not None:
        validate_positive_int(mask_batch_size, "mask_batch_size")
    if noise.ndim != 2:
        raise ValueError(f"noise must have shape (num_masks, num_patches), got {tuple(noise.shape)}.")
    num_masks = noise.shape[0]
    if num_masks == 0:
        raise ValueError("noise holds no masks (0 rows): MAEDAY averages N >= 1 masked reconstructions.")
    device = pixel_values.device
    noise = noise.to(device)
    # Errors in float32, or in float64 where the model or the pixels are: both branches below accumulate in it.
    model_dtype = next(model.parameters()).dtype
    error_dtype = torch.promote_types(torch.promote_types(pixel_values.dtype, model_dtype), torch.float32)
    target_patches = reconstruction_targets(model, pixel_values.to(error_dtype))
    num_patches = target_patches.shape[1]
    if noise.shape[1] != num_patches:
        raise ValueError(
            f"noise has {noise.shape[1]} columns, but the model cuts these images into {num_patches} patches "
            f"(one noise value per patch: masking.make_mask_noise(num_masks, {num_patches}, ...))."
        )
    require_visible_patches(num_patches, mask_ratio)
    patch_area = model.config.patch_size**2

    # Summed over masks (and channels) in patch layout; rearranged into an image once, at the end.
    error_sum = torch.zeros(batch_size, num_patches, patch_area, device=device, dtype=target_patches.dtype)
    spread = (
        _RunningSpread(torch.zeros(batch_size, height, width, device=device, dtype=target_patches.dtype))
        if return_uncertainty else None
    )
    if mask_batch_size is None:
        mask_batch_size = default_mask_batch_size(device)
    num_pairs = batch_size * num_masks
    with mask_ratio_set_to(model, mask_ratio):
        for start in range(0, num_pairs, mask_batch_size):
            stop = min(start + mask_batch_size, num_pairs)
            chunk = torch.arange(start, stop, device=device)
            # The chunk's images are consecutive: each is embedded once, whatever number of its masks is in the chunk.
            first_chunk_image = start // num_masks
            predicted = predict_patches(
                model, pixel_values[first_chunk_image : (stop - 1) // num_masks + 1], noise[chunk % num_masks],
                bf16=bf16, image_index=chunk // num_masks - first_chunk_image, upcast=False,
            )
            row = 0
            for first_image, end_image, first_mask, end_mask in _runs(start, stop, num_masks):
                # Images of this run of the chunk, the same masks each: their predictions against their targets,
                # broadcast (no gathered copies), summed over the masks by a plain reduction, the same on every run
                # (a scattered add, index_add_, would follow the order of CUDA's atomics).
                shape = (end_image - first_image, end_mask - first_mask)
                errors = squared_error_per_patch_pixel(
                    model, predicted[row : row + shape[0] * shape[1]].unflatten(0, shape),
                    target_patches[first_image:end_image, None],
                )
                row += shape[0] * shape[1]
                error_sum[first_image:end_image] += errors.sum(dim=1)
                if spread is not None:
                    error_maps = patches_to_image(model, errors.flatten(0, 1), height, width)
                    spread.update(first_image, gaussian_filter(error_maps, kernel_size, sigma).unflatten(0, shape))

    anomaly_map = gaussian_filter(patches_to_image(model, error_sum / num_masks, height, width), kernel_size, sigma)
    outputs = {"anomaly_map": anomaly_map, "pred_score": image_scores(anomaly_map)}
    if spread is not None:
        outputs["uncertainty_map"] = spread.std()
    return outputs


def _runs(start: int, stop: int, num_masks: int):
    """The (image, mask) pairs `start` to `stop` (pair `i` is image `i // num_masks`, mask `i % num_masks`) as at most
    three runs of images that share their masks: `(first_image, end_image, first_mask, end_mask)`, in order. The
    first and last can be parts of one image's masks; the middle one holds whole images."""
    while start < stop:
        image, mask = divmod(start, num_masks)
        if mask == 0 and stop - start >= num_masks:
            num_images = (stop - start) // num_masks
            yield image, image + num_images, 0, num_masks
            start += num_images * num_masks
        else:
            end_mask = min(num_masks, mask + stop - start)
            yield image, image + 1, mask, end_mask
            start += end_mask - mask


class _RunningSpread:
    """Per-image mean and sum of squared deviations of maps arriving in chunks (Chan et al.'s parallel update).

    Stable where `E[x^2] - E[x]^2` cancels: the maps' spread is often far smaller than their mean.
    """

    def __init__(self, like: torch.Tensor):
        self.count = torch.zeros(like.shape[0], device=like.device, dtype=like.dtype)
        self.mean = torch.zeros_like(like)
        self.sum_squared_deviations = torch.zeros_like(like)

    def update(self, first_image: int, maps: torch.Tensor) -> None:
        """Add `maps` of shape `(num_images, num_maps, height, width)`: `num_maps` more maps of each of the images
        `first_image`, `first_image + 1`, ..."""
        images = slice(first_image, first_image + maps.shape[0])
        num_maps = maps.shape[1]
        chunk_mean = maps.mean(dim=1)
        chunk_ssd = (maps - chunk_mean[:, None]).square().sum(dim=1)
        count = self.count[images]
        weight = num_maps / (count + num_maps)
        delta = chunk_mean - self.mean[images]
        self.sum_squared_deviations[images] += chunk_ssd + delta.square() * (count * weight)[:, None, None]
        self.mean[images] += delta * weight[:, None, None]
        self.count[images] += num_maps

    def std(self) -> torch.Tensor:
        """Population standard deviation per pixel, `(batch_size, height, width)`."""
        return (self.sum_squared_deviations / self.count.clamp_min(1)[:, None, None]).sqrt()
