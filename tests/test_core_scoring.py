"""Fidelity of every scoring step against plain references written here (the paper's order of operations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import RecordedOps, make_tiny_model
from maeday_hf.masking import make_mask_noise
from maeday_hf.reconstruction import patches_to_image, squared_error_per_patch_pixel
from maeday_hf.scoring import _runs, gaussian_filter, gaussian_kernel1d, maeday_anomaly_maps


def reference_gaussian_filter(image: np.ndarray, kernel_size: int = 7, sigma: float = 1.4) -> np.ndarray:
    """2-D Gaussian (outer product of the sampled 1-D Gaussian), mirror borders without edge repeat, direct sum."""
    half = kernel_size // 2
    taps = np.exp(-((np.arange(kernel_size) - half) ** 2) / (2 * sigma**2))
    kernel = np.outer(taps, taps) / np.outer(taps, taps).sum()
    padded = np.pad(image.astype(np.float64), half, mode="reflect")
    out = np.zeros(image.shape, dtype=np.float64)
    for dy in range(kernel_size):
        for dx in range(kernel_size):
            out += kernel[dy, dx] * padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    return out


def reference_maeday(model, pixel_values: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
    """Paper Eq. 1 literally: per mask, per channel squared error, filter each channel, sum channels; mean; max.

    Returns (anomaly_map (H, W), score, per-mask filtered maps (N, H, W)) for a single image.
    """
    original_ratio = model.config.mask_ratio
    model.config.mask_ratio = mask_ratio
    patch_size = model.config.patch_size
    image = pixel_values[0].double().numpy()  # (C, H, W)
    filtered_maps = []
    try:
        for mask_noise in noise:
            with torch.no_grad():
                logits = model(pixel_values=pixel_values, noise=mask_noise[None]).logits[0]  # (L, p*p*C)
            # Reference patchify of the image: (L, p, p, C) in row-major patch order.
            channels, height, width = image.shape
            grid = height // patch_size
            patches = image.reshape(channels, grid, patch_size, grid, patch_size).transpose(1, 3, 2, 4, 0)
            patches = patches.reshape(grid * grid, patch_size * patch_size * channels)
            if model.config.norm_pix_loss:
                mean = patches.mean(axis=-1, keepdims=True)
                var = patches.var(axis=-1, ddof=1, keepdims=True)
                patches = (patches - mean) / np.sqrt(var + 1e-6)
            squared = (logits.double().numpy() - patches) ** 2
            squared = squared.reshape(grid, grid, patch_size, patch_size, channels).transpose(4, 0, 2, 1, 3)
            squared = squared.reshape(channels, height, width)
            filtered_maps.append(sum(reference_gaussian_filter(squared[c]) for c in range(channels)))
    finally:
        model.config.mask_ratio = original_ratio
    filtered_maps = np.stack(filtered_maps)
    anomaly_map = filtered_maps.mean(axis=0)
    return anomaly_map, anomaly_map.max(), filtered_maps


def test_gaussian_taps_match_the_formula():
    taps = gaussian_kernel1d(7, 1.4, dtype=torch.float64).numpy()
    expected = np.exp(-((np.arange(7) - 3) ** 2) / (2 * 1.4**2))
    np.testing.assert_allclose(taps, expected / expected.sum(), rtol=1e-12)


def test_gaussian_filter_matches_reference_including_borders():
    maps = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    filtered = gaussian_filter(maps).numpy()
    for index in range(3):
        np.testing.assert_allclose(filtered[index], reference_gaussian_filter(maps[index].numpy()), rtol=1e-10)


def test_gaussian_filter_preserves_constants_at_the_border():
    constant = torch.full((1, 12, 12), 2.5)
    torch.testing.assert_close(gaussian_filter(constant), constant)


def test_gaussian_filter_rejects_too_small_maps():
    with pytest.raises(ValueError, match="3x3"):
        gaussian_filter(torch.zeros(1, 3, 3))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.0])
@pytest.mark.parametrize("mask_batch_size", [3, 5])  # chunks that split the image's masks, one chunk of all of them
def test_anomaly_map_and_score_match_the_paper_reference(norm_pix_loss, mask_ratio, mask_batch_size):
    model = make_tiny_model(seed=2, norm_pix_loss=norm_pix_loss).double()
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = make_mask_noise(5, 16, mask_ratio, "random", seed=9)
    outputs = maeday_anomaly_maps(
        model, pixel_values, noise, mask_ratio, mask_batch_size=mask_batch_size, return_uncertainty=True
    )
    expected_map, expected_score, filtered_maps = reference_maeday(model, pixel_values, noise, mask_ratio)
    np.testing.assert_allclose(outputs["anomaly_map"][0].numpy(), expected_map, rtol=1e-5, atol=1e-6)
    assert outputs["pred_score"][0].item() == pytest.approx(expected_score, rel=1e-5)
    np.testing.assert_allclose(outputs["uncertainty_map"][0].numpy(), filtered_maps.std(axis=0), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mask_batch_size", [1, 4, 6, 9, 12, 100])
def test_every_images_map_and_spread_match_the_reference_whatever_the_chunks(mask_batch_size):
    # Whole images per chunk (6, 12, 100), parts of images next to others (4, 9), one pair per forward (1).
    model = make_tiny_model(seed=3).double()
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    noise = make_mask_noise(6, 16, 0.75, "random", seed=2)
    outputs = maeday_anomaly_maps(
        model, pixel_values, noise, 0.75, mask_batch_size=mask_batch_size, return_uncertainty=True
    )
    for index in range(3):
        expected_map, _, filtered_maps = reference_maeday(model, pixel_values[index : index + 1], noise, 0.75)
        np.testing.assert_allclose(outputs["anomaly_map"][index].numpy(), expected_map, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            outputs["uncertainty_map"][index].numpy(), filtered_maps.std(axis=0), rtol=1e-7, atol=1e-10
        )


@pytest.mark.parametrize(("start", "stop", "num_masks"), [(0, 9, 4), (3, 14, 4), (5, 6, 4), (4, 12, 4), (2, 5, 7),
                                                           (0, 21, 7), (6, 30, 6)])
def test_runs_split_a_chunk_into_images_sharing_their_masks(start, stop, num_masks):
    pairs = []
    runs = list(_runs(start, stop, num_masks))
    assert len(runs) <= 3
    for first_image, end_image, first_mask, end_mask in runs:
        assert end_image - first_image == 1 or (first_mask, end_mask) == (0, num_masks)
        pairs += [(image, mask) for image in range(first_image, end_image) for mask in range(first_mask, end_mask)]
    assert pairs == [divmod(pair, num_masks) for pair in range(start, stop)]  # every pair once, in the chunk's order


def test_noise_without_masks_is_refused():
    model = make_tiny_model(seed=5)
    with pytest.raises(ValueError, match="no masks"):
        maeday_anomaly_maps(model, torch.zeros(1, 3, 32, 32), torch.zeros(0, 16), 0.75)


@pytest.mark.parametrize(
    "noise_shape, kwargs, error, fragment",
    [
        # A negative chunk size ran no forward at all and returned all-zero maps; 0 or 2.5 failed inside range().
        ((2, 16), dict(mask_batch_size=-1), ValueError, "mask_batch_size must be >= 1, got -1"),
        ((2, 16), dict(mask_batch_size=0), ValueError, "mask_batch_size must be >= 1"),
        ((2, 16), dict(mask_batch_size=2.5), TypeError, "mask_batch_size must be a positive integer"),
        # No patch visible (16 * 0 = 0 kept), or a ratio outside [0, 1): plausible-looking maps of nothing.
        ((2, 16), dict(mask_ratio=1.0), ValueError, r"mask_ratio must be in \[0, 1\)"),
        ((2, 16), dict(mask_ratio=0.95), ValueError, "keeps int"),
        ((2, 16), dict(mask_ratio=-0.5), ValueError, r"mask_ratio must be in \[0, 1\)"),
        ((2, 9), {}, ValueError, "noise has 9 columns, but the model cuts these images into 16 patches"),
        ((16,), {}, ValueError, r"noise must have shape \(num_masks, num_patches\), got \(16,\)"),
    ],
)
def test_bad_scoring_arguments_are_refused(noise_shape, kwargs, error, fragment):
    model = make_tiny_model(seed=5)
    kwargs = {"mask_ratio": 0.75, **kwargs}
    with pytest.raises(error, match=fragment):
        maeday_anomaly_maps(model, torch.zeros(1, 3, 32, 32), torch.rand(noise_shape), **kwargs)


@pytest.mark.parametrize("mask_batch_size", [4, 5, 24])
def test_errors_are_summed_per_image_without_scattered_adds(mask_batch_size):
    # On CUDA, index_add_ / scatter_add / accumulating index_put_ add through atomics in no fixed order: the same
    # seed would give maps that differ in their last bits from run to run. Plain reductions do not.
    model = make_tiny_model(seed=5)
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noise = make_mask_noise(6, 16, 0.75, seed=1)
    recorded = RecordedOps()
    with recorded:
        maeday_anomaly_maps(model, pixel_values, noise, 0.75, mask_batch_size=mask_batch_size, return_uncertainty=True)
    assert "convolution" in recorded.names  # (the recorder sees the model's ops)
    assert not recorded.names & {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_put", "index_put_",
                                 "put", "put_", "scatter_reduce", "scatter_reduce_", "_index_put_impl_"}


def test_mask_ratio_zero_sees_everything_so_masks_do_not_matter():
    model = make_tiny_model(seed=4)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = maeday_anomaly_maps(model, pixel_values, make_mask_noise(4, 16, 0.0, seed=0), 0.0, return_uncertainty=True)
    second = maeday_anomaly_maps(model, pixel_values, make_mask_noise(4, 16, 0.0, seed=1), 0.0)
    torch.testing.assert_close(first["anomaly_map"], second["anomaly_map"], rtol=1e-4, atol=1e-5)
    assert first["uncertainty_map"].max() < 1e-2 * first["anomaly_map"].max()


def test_more_masking_changes_the_result():
    model = make_tiny_model(seed=4)
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    visible = maeday_anomaly_maps(model, pixel_values, make_mask_noise(4, 16, 0.0), 0.0)["anomaly_map"]
    masked = maeday_anomaly_maps(model, pixel_values, make_mask_noise(4, 16, 0.75), 0.75)["anomaly_map"]
    assert not torch.allclose(visible, masked, rtol=1e-3)


@pytest.mark.parametrize("mask_batch_size", [1, 4, 7, 1000])
def test_chunking_and_batching_do_not_change_results(mask_batch_size):
    model = make_tiny_model(seed=5)
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noise = make_mask_noise(6, 16, 0.75, "balanced", seed=1)
    together = maeday_anomaly_maps(model, pixel_values, noise, 0.75, mask_batch_size=mask_batch_size)
    for index in range(3):
        alone = maeday_anomaly_maps(model, pixel_values[index : index + 1], noise, 0.75, mask_batch_size=5)
        torch.testing.assert_close(together["anomaly_map"][index], alone["anomaly_map"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together["pred_score"][index], alone["pred_score"][0], rtol=1e-5, atol=1e-6)


def test_model_is_left_as_found():
    model = make_tiny_model(seed=6, mask_ratio=0.4)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    maeday_anomaly_maps(model, torch.randn(1, 3, 32, 32), make_mask_noise(3, 16, 0.75), 0.75)
    assert model.config.mask_ratio == 0.4
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_local_defect_raises_the_map_where_it_is():
    # Checks the plumbing (error lands where the input changed), not the model: with mask ratio 0 the tiny model's
    # reconstruction is a smooth function of the input, so a large local change raises the local error.
    model = make_tiny_model(seed=7)
    clean = torch.zeros(1, 3, 32, 32)
    defect = clean.clone()
    defect[:, :, 8:16, 16:24] = 6.0
    noise = make_mask_noise(4, 16, 0.0)
    difference = (
        maeday_anomaly_maps(model, defect, noise, 0.0)["anomaly_map"]
        - maeday_anomaly_maps(model, clean, noise, 0.0)["anomaly_map"]
    )[0]
    inside = difference[8:16, 16:24].mean()
    outside = torch.cat([difference[:, :8].flatten(), difference[:, 28:].flatten()]).mean()
    assert inside > 10 * outside.abs()


def test_patch_layout_errors_equal_the_unpatchified_channel_sum():
    model = make_tiny_model()
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    targets = model.patchify(images)
    predicted = (targets + 0.3 * torch.randn(targets.shape, generator=generator)).to(torch.bfloat16)
    expected = model.unpatchify(predicted.float() - targets).square().sum(dim=1)  # (2, 32, 32)
    errors = squared_error_per_patch_pixel(model, predicted, targets)
    assert errors.dtype == torch.float32 and errors.shape == (2, targets.shape[1], model.config.patch_size**2)
    torch.testing.assert_close(patches_to_image(model, errors, 32, 32), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask_batch_size", [3, 4])
def test_a_float64_model_scores_float32_pixels_in_float64_whatever_the_chunks(mask_batch_size):
    model = make_tiny_model(seed=2).double()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = make_mask_noise(4, 16, 0.75, seed=0)
    outputs = maeday_anomaly_maps(model, pixel_values, noise, 0.75, mask_batch_size=mask_batch_size)
    expected = maeday_anomaly_maps(model, pixel_values.double(), noise, 0.75, mask_batch_size=4)
    assert outputs["anomaly_map"].dtype == torch.float64
    torch.testing.assert_close(outputs["anomaly_map"], expected["anomaly_map"], rtol=1e-12, atol=1e-12)


def test_patches_to_image_inverts_the_models_patchify_on_a_wide_image():
    model = make_tiny_model()
    patch = model.config.patch_size
    image = torch.randn(2, 3, 2 * patch, 3 * patch, generator=torch.Generator().manual_seed(0))
    patches = model.patchify(image, interpolate_pos_encoding=True)  # the model's own order, 2 x 3 patches
    channel_sums = squared_error_per_patch_pixel(model, patches, torch.zeros_like(patches))
    expected = image.square().sum(dim=1)
    torch.testing.assert_close(patches_to_image(model, channel_sums, 2 * patch, 3 * patch), expected)
