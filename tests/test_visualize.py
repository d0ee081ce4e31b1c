"""Heatmap overlays: the colour scale, unscorable pixels, and images as the pipeline sees them (upright, 8-bit RGB)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ExifTags, Image

from maeday_hf.visualize import colorize, finite_max, overlay_heatmap


def test_colour_scale_ends_and_clipping():
    values = np.array([[-1.0, 0.0, 1.0, 2.0]])
    rgb = colorize(values)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert (rgb[0, 0] == rgb[0, 1]).all() and (rgb[0, 2] == rgb[0, 3]).all()  # clipped to the ends
    assert tuple(rgb[0, 1]) == (0, 0, 76) and tuple(rgb[0, 2]) == (204, 0, 0)  # dark blue ... red


def test_unscorable_pixels_are_shown_as_suspect_and_leave_the_scale_alone():
    anomaly_map = np.array([[0.0, 1.0], [np.nan, np.inf]], dtype=np.float32)
    assert finite_max(anomaly_map) == 1.0 and finite_max(np.full((2, 2), np.nan)) == 0.0
    assert finite_max(np.array([[1, 5]], dtype=np.uint8)) == 5.0  # integer maps too
    overlay = np.asarray(overlay_heatmap(Image.new("RGB", (2, 2)), anomaly_map, alpha=1.0))
    assert (overlay[1, 0] == overlay[0, 1]).all() and (overlay[1, 1] == overlay[0, 1]).all()  # the top colour


def test_overlay_of_an_exif_rotated_16_bit_image_uses_the_upright_8_bit_one():
    values = np.full((4, 6), 30000, dtype=np.uint16)  # stored 6 wide, 4 high; shown rotated: 4 wide, 6 high
    image = Image.fromarray(values)
    exif = image.getexif()
    exif[ExifTags.Base.Orientation] = 6
    image = Image.open(_saved(image, exif))
    overlay = overlay_heatmap(image, np.zeros((6, 4), dtype=np.float32), alpha=0.0)
    assert overlay.size == (4, 6)
    assert np.asarray(overlay).max() == round(30000 / 257)  # rescaled from 16 bits, not clipped to white
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, np.zeros((6, 4), dtype=np.float32), alpha=1.5)


def _saved(image, exif):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    buffer.seek(0)
    return buffer


def test_the_colour_scale_is_checked_and_keeps_the_contrast_of_tiny_maps():
    image = Image.new("RGB", (2, 1))
    for vmin, vmax in ((1.0, 0.5), (0.0, float("nan")), (float("-inf"), 1.0)):
        with pytest.raises(ValueError, match="vmin <= vmax"):
            overlay_heatmap(image, np.zeros((1, 2)), vmin=vmin, vmax=vmax)
    tiny = np.array([[0.0, 5e-30]])  # its own scale: the two ends of the colour map
    overlay = np.asarray(overlay_heatmap(image, tiny, alpha=1.0))
    assert tuple(overlay[0, 0]) == (0, 0, 76) and tuple(overlay[0, 1]) == (204, 0, 0)
    constant = np.asarray(overlay_heatmap(image, np.array([[0.0, 1.0]]), vmin=1.0, vmax=1.0, alpha=1.0))
    assert tuple(constant[0, 0]) == tuple(constant[0, 1]) == (0, 0, 76)  # at vmin, on a scale of zero width
    above = np.asarray(overlay_heatmap(image, np.array([[0.0, 2.0]]), vmin=0.0, vmax=0.0, alpha=1.0))
    assert tuple(above[0, 1]) == (204, 0, 0)


def _reference_overlay(image, anomaly_map, vmin, vmax, alpha):
    """The blend written plainly on the whole image at once, in float64."""
    span = max(vmax - vmin, np.finfo(np.float64).tiny)
    heat = colorize((np.asarray(anomaly_map, dtype=np.float64) - vmin) / span).astype(np.float64)
    return np.round((1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * heat).astype(np.uint8)


def test_overlays_in_bands_of_rows_equal_the_whole_image_blend(monkeypatch):
    import maeday_hf.visualize as visualize

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 23, 3), dtype=np.uint8))
    anomaly_map = rng.random((37, 23)).astype(np.float32) * 3
    expected = _reference_overlay(image, anomaly_map, 0.0, float(anomaly_map.max()), 0.4)
    for pixels_per_band in (1, 50, 23 * 37, 1 << 20):  # one row per band (and fewer pixels than a row) to one band
        monkeypatch.setattr(visualize, "_PIXELS_PER_BAND", pixels_per_band)
        assert np.array_equal(np.asarray(overlay_heatmap(image, anomaly_map, alpha=0.4)), expected)


def test_a_large_overlay_takes_a_bounded_amount_of_memory():
    import tracemalloc

    side = 1500
    image = Image.new("RGB", (side, side), "gray")
    anomaly_map = np.linspace(0, 1, side * side, dtype=np.float32).reshape(side, side)
    tracemalloc.start()
    try:
        overlay_heatmap(image, anomaly_map)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The image's own uint8 copies (~6 bytes a pixel) and bands of at most 2**20 pixels; the whole-image float64
    # blend took ~100 bytes a pixel (225 MB here).
    assert peak < 8 * side * side + 150 * (1 << 20), peak


def test_a_map_wholly_below_vmin_gets_the_bottom_colour_without_a_vmax():
    overlay = np.asarray(overlay_heatmap(Image.new("RGB", (3, 1)), np.array([[-3.0, -2.0, -1.0]]), alpha=1.0))
    assert [tuple(pixel) for pixel in overlay[0]] == [(0, 0, 76)] * 3
