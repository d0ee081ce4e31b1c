"""Heatmap overlays of anomaly maps on the query image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .images import to_rgb

# Anchor colours of a jet-like dark-blue -> cyan -> yellow -> red map, as anomaly-detection papers draw their maps. Not
# perceptually ordered: its brightness peaks at yellow (0.6) and falls towards the dark red top, so a greyscale print
# loses the order; read the hue.
_COLORMAP_ANCHORS = np.array(
    [[0.0, 0.0, 0.3], [0.0, 0.3, 0.9], [0.0, 0.8, 0.8], [0.9, 0.9, 0.0], [1.0, 0.4, 0.0], [0.8, 0.0, 0.0]]
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped), shape `(H, W)`, to uint8 RGB `(H, W, 3)`. NaN gets the top colour: a pixel
    the model could not score is shown as suspect, not as normal."""
    positions = np.clip(np.nan_to_num(values, nan=1.0), 0.0, 1.0) * (len(_COLORMAP_ANCHORS) - 1)
    lower = np.floor(positions).astype(int).clip(max=len(_COLORMAP_ANCHORS) - 2)
    weight = (positions - lower)[..., None]
    rgb = (1 - weight) * _COLORMAP_ANCHORS[lower] + weight * _COLORMAP_ANCHORS[lower + 1]
    return np.round(rgb * 255).astype(np.uint8)


def finite_max(values: np.ndarray, default: float = 0.0) -> float:
    """The largest finite value of `values`, of any numeric dtype (`default` if there is none)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.max()) if finite.size else default


def overlay_heatmap(
    image: Image.Image, anomaly_map: np.ndarray, vmin: float = 0.0, vmax: float | None = None, alpha: float = 0.5
) -> Image.Image:
    """Blend a colour-coded `anomaly_map` `(H, W)` over `image` (its size once upright: the pipeline's maps are of the
    EXIF-oriented image, see `images.to_rgb`).

    `vmin`/`vmax` fix the colour scale; pass the same values for every image of a set so colours compare across
    images (`vmax` defaults to this map's largest finite value). `alpha` in [0, 1] is the heatmap's weight.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    image = to_rgb(image)
    if anomaly_map.shape != (image.height, image.width):
        raise ValueError(
            f"anomaly_map has shape {anomaly_map.shape}, expected the upright image's (H, W) = "
            f"{(image.height, image.width)}."
        )
    if vmax is None:  # (a map wholly below vmin gets a scale of zero width at vmin, not vmax < vmin)
        vmax = max(finite_max(anomaly_map, default=vmin), vmin)
    if not (np.isfinite(vmin) and np.isfinite(vmax) and vmin <= vmax):
        raise ValueError(f"The colour scale needs finite vmin <= vmax, got vmin={vmin}, vmax={vmax}.")
    # A scale of zero width (a constant map) shows values above vmin at the top, without dividing by zero; any
    # positive width is used as it is, however small (maps of tiny values keep their contrast).
    span = max(float(vmax) - float(vmin), np.finfo(np.float64).tiny)
    base = np.asarray(image)
    blended = np.empty_like(base)
    # In bands of rows: the float64 work takes ~100 bytes per pixel, which for a whole 20,000 x 20,000 image would be
    # 40 GB; a band holds at most _PIXELS_PER_BAND pixels, or one row where a row is longer. Each pixel's result is
    # the same either way.
    rows_per_band = max(1, _PIXELS_PER_BAND // max(1, image.width))
    for top in range(0, image.height, rows_per_band):
        band = slice(top, top + rows_per_band)
        with np.errstate(over="ignore"):
            scaled = (np.asarray(anomaly_map[band], dtype=np.float64) - vmin) / span
        heat = colorize(scaled).astype(np.float32)
        blended[band] = np.round((1 - alpha) * base[band].astype(np.float32) + alpha * heat).astype(np.uint8)
    return Image.fromarray(blended)


_PIXELS_PER_BAND = 1 << 20
