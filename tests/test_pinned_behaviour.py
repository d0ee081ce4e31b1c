"""Behaviour a mutation review found unpinned, each checked against a plain reference or rule written here: the maps'
resize to the image, the threshold's strict comparison and validation, image modes and arrays read as images, the device
normalisation following the processor, norm_pix targets, calibration views, the colour scale and what the fine-tune card
states. (When a calibrated threshold holds: `test_calibrated_defaults.py`.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from maeday_hf.images import load_rgb_image
from maeday_hf.masking import make_mask_noise
from maeday_hf.scoring import maeday_anomaly_maps


def _bilinear_half_pixel(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Plain bilinear resize with half-pixel centres (pixel i's centre at i + 0.5, edges clamped): what a map resized
    "to the image's own size" means, written out in NumPy."""

    def taps(out_size: int, in_size: int):
        position = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
        position = np.clip(position, 0.0, in_size - 1)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, position - low

    y0, y1, wy = taps(height, values.shape[0])
    x0, x1, wx = taps(width, values.shape[1])
    values = values.astype(np.float64)
    top = values[y0][:, x0] * (1 - wx) + values[y0][:, x1] * wx
    bottom = values[y1][:, x0] * (1 - wx) + values[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


@pytest.fixture(scope="module")
def query():
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, (45, 70, 3), dtype=np.uint8))


# --- pipeline: postprocess --------------------------------------------------------------------------------------


def test_maps_come_back_at_the_image_size_by_a_half_pixel_bilinear_resize(detector, query):
    """The maps (anomaly and uncertainty) at the original size are the model-resolution maps resized bilinearly
    with pixel centres aligned (align_corners=False): with corners aligned the map is shifted by up to half a model
    pixel (here ~1 image pixel), so masks miss the defect's edge."""
    result = detector(query, num_masks=3, seed=1, bf16=False, return_uncertainty=True)
    pixel_values = detector.image_processor(images=query, return_tensors="pt")["pixel_values"]
    noise = make_mask_noise(3, 16, 0.75, "random", seed=1)
    expected = maeday_anomaly_maps(detector.model, pixel_values, noise, 0.75, bf16=False, return_uncertainty=True)
    for key in ("anomaly_map", "uncertainty_map"):
        reference = _bilinear_half_pixel(expected[key][0].numpy(), 45, 70)
        assert result[key].shape == (45, 70)
        np.testing.assert_allclose(result[key], reference, rtol=1e-5, atol=1e-7, err_msg=key)


def test_a_threshold_equal_to_the_score_labels_normal_with_an_empty_mask(detector):
    """`label` is "anomalous" only for score > threshold, `mask` only where map > threshold (strictly). At
    the model's own size the map's peak is the score: a threshold equal to it must give a normal label and an empty
    mask (not a "normal" label with a marked pixel, nor an "anomalous" one), and one just below it the peak alone."""
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    plain = detector(image, num_masks=2)
    score = plain["score"]
    assert score == float(plain["anomaly_map"].max())  # no resize: the peak is the score
    at_score = detector(image, num_masks=2, threshold=score)
    assert at_score["label"] == "normal"
    assert not np.asarray(at_score["mask"]).any()
    below = detector(image, num_masks=2, threshold=float(np.nextafter(score, -np.inf)))
    assert below["label"] == "anomalous"
    np.testing.assert_array_equal(np.asarray(below["mask"]) > 0, plain["anomaly_map"] == plain["anomaly_map"].max())


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_a_threshold_that_is_not_finite_is_refused(detector, threshold):
    """A NaN threshold would label every image normal with an empty mask (every comparison is False), silently;
    an infinite one labels everything one way. Both are refused, at the call and at construction."""
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        detector(image, num_masks=2, threshold=threshold)


# --- images -------------------------------------------------------------------------------------------------------


def test_an_8_bit_mode_i_image_with_white_pixels_reads_as_8_bit():
    """Mode "I" holding 8-bit values (`.convert("I")` of an "L" image, `Image.fromarray` of int32 0..255) is
    read as 16-bit only if a value exceeds 255: an 8-bit image that reaches white (255) must stay 8-bit, not turn
    nearly black."""
    grey = np.array([[0, 1, 128], [200, 254, 255]], dtype=np.uint8)
    expected = np.repeat(grey[..., None], 3, axis=-1)
    assert np.array_equal(np.asarray(load_rgb_image(Image.fromarray(grey).convert("I"))), expected)
    assert np.array_equal(np.asarray(load_rgb_image(Image.fromarray(grey.astype(np.int32)))), expected)
    # One value above 255: 16-bit, rescaled from 0..65535.
    sixteen = np.array([[0, 256, 65535]], dtype=np.int32)
    assert np.asarray(load_rgb_image(Image.fromarray(sixteen)))[0, :, 0].tolist() == [0, 1, 255]


def test_a_mode_f_image_of_unit_floats_with_rounding_above_1_reads_as_unit_floats():
    """A [0, 1] float image whose top value came out a rounding step above 1 (1 + 1e-6, float32 arithmetic) is
    still a [0, 1] image, clipped, not a 0..255 one (which would read nearly black)."""
    values = np.array([[0.0, 0.25, 0.5, 1.0 + 1e-6]], dtype=np.float32)
    loaded = np.asarray(load_rgb_image(Image.fromarray(values, mode="F")))
    assert loaded[0, :, 0].tolist() == [0, 64, 128, 255]


def test_an_rgba_array_drops_its_alpha_channel():
    """An (H, W, 4) array is R, G, B, alpha: the alpha is dropped, the colour channels kept in order."""
    rgba = np.random.default_rng(5).integers(0, 256, (6, 7, 4), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_rgb_image(rgba)), rgba[..., :3])
    unit = rgba.astype(np.float32) / 255
    assert np.array_equal(np.asarray(load_rgb_image(unit)), rgba[..., :3])


def test_a_boolean_array_reads_as_black_and_white():
    """A bool image (a binary mask, a thresholded image) is black and white (0 and 255), not 0 and 1."""
    binary = np.array([[True, False], [False, True]])
    loaded = np.asarray(load_rgb_image(binary))
    assert loaded.dtype == np.uint8 and loaded[..., 0].tolist() == [[255, 0], [0, 255]]
    assert np.array_equal(loaded, np.repeat(loaded[..., :1], 3, axis=-1))


# --- preprocessing --------------------------------------------------------------------------------------------------


def test_a_processor_that_does_not_rescale_is_followed_on_the_device(tiny_checkpoint):
    """A ViT processor with do_rescale=False (mean and std in 0..255 units) is normalised on the device exactly
    as it would normalise on the CPU: no 1/255 rescale it does not do."""
    from transformers import ViTImageProcessor

    from maeday_hf.preprocessing import DeviceNormalization

    processor = ViTImageProcessor(size={"height": 32, "width": 32}, do_rescale=False,
                                  image_mean=[123.7, 116.3, 103.5], image_std=[58.4, 57.1, 57.4])
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    normalise = DeviceNormalization.from_processor(processor)
    pixels = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(normalise(pixels), expected.float(), rtol=0, atol=1e-5)
    # And through the pipeline: the same map as the processor's own pixels give.
    detector = pipeline("anomaly-detection", model=tiny_checkpoint, image_processor=processor, device="cpu")
    ours = detector._forward(detector.preprocess(image), num_masks=2, bf16=False)["anomaly_map"]
    reference = {"pixel_values": expected.float(), "original_size": torch.tensor([[40, 50]])}
    torch.testing.assert_close(ours, detector._forward(reference, num_masks=2, bf16=False)["anomaly_map"],
                               rtol=1e-5, atol=1e-6)


def test_an_edit_of_the_processors_std_alone_is_followed(tiny_checkpoint):
    """The device normalisation is derived again when any setting it reads changes, the std alone included (a
    stale std would score every later image in the wrong units)."""
    detector = pipeline("anomaly-detection", model=tiny_checkpoint, device="cpu")
    processor = detector.image_processor
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    from maeday_hf.preprocessing import DeviceNormalization

    detector.preprocess(image)  # (the shortcuts are made for the processor as it is)
    processor.image_std = [0.5, 0.1, 0.9]
    item = detector.preprocess(image)  # (each item carries the constants `_forward` finishes it with)
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(DeviceNormalization.apply(item["pixels"], item["pixel_normalization"]), expected,
                               rtol=0, atol=1e-5)


# --- reconstruction targets ------------------------------------------------------------------------------------------


def test_norm_pix_targets_of_a_nearly_flat_patch_use_the_mae_loss_epsilon_inside_the_root():
    """With norm_pix_loss each target patch is (x - mean) / sqrt(var + 1e-6), var the unbiased variance, as the
    MAE loss has it. On nearly flat patches the epsilon's place matters: a dark background with one grey level of
    sensor noise, under ViTImageProcessor's default 0.5 / 0.5 normalisation (every channel alike), has var ~ 3e-6;
    outside the root its targets, and so its errors, would come out ~15 % larger (orders of magnitude on flatter
    patches)."""
    from conftest import make_tiny_model
    from maeday_hf.reconstruction import reconstruction_targets

    model = make_tiny_model(seed=2, norm_pix_loss=True)
    rng = np.random.default_rng(0)
    grey = np.full((32, 32, 3), 3, dtype=np.uint8)
    grey[rng.random((32, 32)) < 0.05] += 1  # one grey level of noise on a dark, flat background
    grey[16:, 16:] = rng.integers(0, 256, (16, 16, 3))  # and a textured corner
    normalised = (grey / 255.0 - 0.5) / 0.5  # (H, W, C), as ViTImageProcessor's defaults make it
    pixel_values = torch.from_numpy(normalised.transpose(2, 0, 1)[None].copy())  # (float64: no rounding in the means)
    targets = reconstruction_targets(model, pixel_values)[0].double().numpy()
    # Plain reference: patches row by row, pixels row by row, channels last (ViTMAE's patchify), then normalised.
    values = pixel_values[0].double().numpy().transpose(1, 2, 0)
    patches = np.stack([values[i:i + 8, j:j + 8].reshape(-1) for i in range(0, 32, 8) for j in range(0, 32, 8)])
    expected = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(targets, expected, rtol=1e-4, atol=1e-4)


# --- calibration ----------------------------------------------------------------------------------------------------


def test_calibration_views_of_each_shot_come_from_their_own_generators(monkeypatch):
    """The augmented calibration view j of shot i is drawn from view_generator(seed, i * V + j, CALIBRATION_VIEWS):
    two shots get different crops and rotations (two identical shots give the same view 0, the shot itself, but not
    the same augmented views), so V views per shot are V x shots distinct samples of the normal scores."""
    import maeday_hf.calibration
    from conftest import make_tiny_model
    from maeday_hf.shot_views import CALIBRATION_VIEWS, random_crop_rotate, view_generator

    model = make_tiny_model(seed=1)
    shot = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shots = torch.cat([shot, shot])
    seen = {}
    real = maeday_hf.calibration.maeday_anomaly_maps

    def recording(model, views, *args, **kwargs):
        seen["views"] = views.clone()
        return real(model, views, *args, **kwargs)

    monkeypatch.setattr(maeday_hf.calibration, "maeday_anomaly_maps", recording)
    calibration = maeday_hf.calibration.calibrate_threshold(model, shots, num_views_per_shot=3, num_masks=2, seed=5)
    views = seen["views"]
    assert len(views) == 6 and len(calibration.scores) == 6
    for shot_index in range(2):
        assert torch.equal(views[3 * shot_index], shots[shot_index])
        for view_index in (1, 2):
            generator = view_generator(5, 3 * shot_index + view_index, CALIBRATION_VIEWS)
            expected = random_crop_rotate(shots[shot_index], generator, 0.75, 15.0, size=(32, 32))
            torch.testing.assert_close(views[3 * shot_index + view_index], expected, rtol=0, atol=0)
    assert not torch.allclose(views[1], views[4]) and not torch.allclose(views[2], views[5])


# --- heatmaps -----------------------------------------------------------------------------------------------------


_ANCHORS = np.array(
    [[0.0, 0.0, 0.3], [0.0, 0.3, 0.9], [0.0, 0.8, 0.8], [0.9, 0.9, 0.0], [1.0, 0.4, 0.0], [0.8, 0.0, 0.0]]
)


def test_the_colour_scale_runs_linearly_between_its_anchor_colours():
    """A value's colour is the linear blend of the two anchor colours around it, rounded to the nearest 8-bit
    level: no colour beyond the two anchors (a jump half-way between them), no level truncated."""
    from maeday_hf.visualize import colorize

    values = np.linspace(0.0, 1.0, 2001)
    positions = values * (len(_ANCHORS) - 1)
    expected = np.stack([np.interp(positions, np.arange(len(_ANCHORS)), _ANCHORS[:, channel]) for channel in range(3)],
                        axis=-1)
    colours = colorize(values[None]).astype(int)[0]
    assert np.abs(colours - expected * 255).max() <= 0.5 + 1e-9
    # Half-way between two anchors: their mean colour.
    assert colorize(np.array([[0.1, 0.3, 0.5]])).tolist() == [[[0, 38, 153], [0, 140, 217], [115, 217, 102]]]


def test_the_colour_scale_runs_from_vmin_to_vmax():
    """With a colour scale from vmin to vmax, a value is placed at (value - vmin) / (vmax - vmin) of it: the
    middle of [1, 3] gets the middle colour, vmin the bottom one, vmax the top one, whatever vmin is."""
    from maeday_hf.visualize import colorize, overlay_heatmap

    image = Image.new("RGB", (3, 1), (10, 20, 30))
    anomaly_map = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    overlay = np.asarray(overlay_heatmap(image, anomaly_map, vmin=1.0, vmax=3.0, alpha=1.0))
    assert overlay.tolist() == colorize(np.array([[0.0, 0.5, 1.0]])).tolist()
    half = np.asarray(overlay_heatmap(image, anomaly_map, vmin=1.0, vmax=3.0, alpha=0.5)).astype(float)
    expected = np.round(0.5 * np.array([10, 20, 30]) + 0.5 * colorize(np.array([[0.0, 0.5, 1.0]])).astype(float))
    np.testing.assert_array_equal(half, expected)


# --- the fine-tune's model card -------------------------------------------------------------------------------------


def _card(**calibration):
    from maeday_hf.model_card import render_model_card

    calibration = {"threshold": 1.2345678, "scores": [0.5] * 8, "num_std": 2.5, "num_masks": 16, "mask_ratio": 0.6,
                   "num_views_per_shot": 4, "precision": "bfloat16", "augmented": True, **calibration}
    card = render_model_card(
        name="org/bottle-2shot", base_model="facebook/vit-mae-base", shot_names=["a.png", "b.png"],
        recipe={"lora_rank": 32}, losses=[(1, 0.5)], calibration=calibration, full_finetune=False,
    )
    return " ".join(card.split())


def test_the_fine_tune_card_states_the_calibration_it_was_made_with():
    """The card's threshold line gives the calibration's own numbers: the threshold, k
    (num_std), the top-score factor 1 + TOP_SCORE_MARGIN = 1.01, the number of views scored (all of them: shots x views
    per shot), the masks, the mask ratio and the precision they were scored with."""
    assert ("`1.23457` = max(mean + 2.5 x std, 1.01 x max) of the image scores of 8 normal views (each shot as is and "
            "augmented), scored with 16 masks at mask ratio 0.6 in bfloat16.") in _card()
    assert "of the image scores of 3 normal views" in _card(scores=[0.1, 0.2, 0.3], num_views_per_shot=3)
    assert "mean + 3.0 x std" in _card(num_std=3.0) and "in float32." in _card(precision="float32")


def test_the_fine_tune_card_says_whether_the_shots_were_augmented():
    """One view per shot is each shot as it is (not "and augmented"); without augmentation the card says so."""
    assert "normal views (each shot as is), scored" in _card(scores=[0.5, 0.6], num_views_per_shot=1)
    assert "(each shot as is: the fine-tune used no augmentation)" in _card(augmented=False, num_views_per_shot=1)


# --- more modes ---------------------------------------------------------------------------------------------


def test_a_big_endian_16_bit_image_is_rescaled_like_a_native_one():
    """Pillow's "I;16B" (big-endian 16-bit TIFFs) is 16-bit: rescaled from 0..65535 like "I;16", not clipped to
    white by a plain convert("RGB")."""
    values = np.array([[0, 300, 30000, 65535]], dtype=np.uint16)
    big_endian = Image.fromarray(values.astype(">u2"))
    assert big_endian.mode == "I;16B"
    expected = np.round(values / 257.0).astype(np.uint8)
    assert np.asarray(load_rgb_image(big_endian))[0, :, 0].tolist() == expected[0].tolist()
    assert np.array_equal(np.asarray(load_rgb_image(big_endian)), np.asarray(load_rgb_image(Image.fromarray(values))))
