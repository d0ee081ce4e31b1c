"""Heatmap overlays of anomaly maps on the query image."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered dark-blue -> cyan -> yellow -> red map.
_COLORMAP_ANCHORS = np.array(
    [[0.0, 0.0, 0.3], [0.0, 0.3, 0.9], [0.0, 0.8, 0.8], [0.9, 0.9, 0.0], [1.0, 0.4, 0.0], [0.8, 0.0, 0.0]]
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped), shape `(H, W)`, to uint8 RGB `(H, W, 3)`."""
    positions = np.clip(values, 0.0, 1.0) * (len(_COLORMAP_ANCHORS) - 1)
    lower = np.floor(positions).astype(int).clip(max=len(_COLORMAP_ANCHORS) - 2)
    weight = (positions - lower)[..., None]
    rgb = (1 - weight) * _COLORMAP_ANCHORS[lower] + weight * _COLORMAP_ANCHORS[lower + 1]
    return np.round(rgb * 255).astype(np.uint8)


def overlay_heatmap(
    image: Image.Image, anomaly_map: np.ndarray, vmin: float = 0.0, vmax: float | None = None, alpha: float = 0.5
) -> Image.Image:
    """Blend a colour-coded `anomaly_map` `(H, W)` over `image` (same size).

    `vmin`/`vmax` fix the colour scale; pass the same values for every image of a set so colours compare across
    images (`vmax` defaults to this map's maximum).
    """
    if anomaly_map.shape != (image.height, image.width):
        raise ValueError(f"anomaly_map has shape {anomaly_map.shape}, expected the image's (H, W) = {image.height, image.width}.")
    vmax = float(anomaly_map.max()) if vmax is None else vmax
    scaled = (anomaly_map - vmin) / max(vmax - vmin, 1e-12)
    heat = colorize(scaled).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.round((1 - alpha) * base + alpha * heat).astype(np.uint8))
