"""The image processor's work, split where that pays: resizing on the CPU, rescale and normalise on the model's device.

A query goes through the checkpoint's own image processor, so the model sees exactly what it was trained on. Two
shortcuts give the same pixels with less work, each only where it is known to:

- `ProcessorResize`: for a processor that resizes with PIL to a fixed size and then only rescales and normalises
  (ViT's PIL backend), the RGB image is resized with PIL directly. The processor converts the image to a NumPy array
  and back to PIL around the same `Image.resize` call, which costs more than the resize itself for large inputs
  (4.8 ms against 3.0 ms for a 1024 x 1024 image on one CPU core, `scripts/benchmark.py`), enough to starve a GPU. The shortcut is enabled
  only after it has given the processor's exact bytes on probe images.
- `DeviceNormalization`: the resized uint8 pixels travel to the device (4x fewer bytes than float32) and are rescaled
  and normalised there.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from PIL import Image


class ProcessorResize:
    """`image_processor(image, do_rescale=False, do_normalize=False)["pixel_values"]` for an RGB PIL image, computed
    as one `Image.resize`, for processors where that is exactly what they do (`from_processor` checks)."""

    def __init__(self, height: int, width: int, resample: int):
        self.height = height
        self.width = width
        self.resample = resample

    @classmethod
    def from_processor(cls, image_processor) -> ProcessorResize | None:
        """The shortcut for `image_processor`, or None where it would not give the processor's exact pixels.

        The processor must resize to a fixed height and width and do nothing else that moves pixels (no center crop,
        no padding), and the shortcut must reproduce its uint8 output bit for bit on probe images, shrunk and
        enlarged, which rules out backends that resample differently (e.g. torchvision's)."""
        size = getattr(image_processor, "size", None) or {}
        height, width = size.get("height"), size.get("width")
        if (
            not getattr(image_processor, "do_resize", False)
            or not isinstance(height, int)
            or not isinstance(width, int)
            or getattr(image_processor, "do_center_crop", False)
            or getattr(image_processor, "do_pad", False)
        ):
            return None
        resample = getattr(image_processor, "resample", None)
        resample = Image.Resampling.BILINEAR if resample is None else resample
        try:
            shortcut = cls(height, width, int(resample))
            rng = np.random.default_rng(0)
            for probe_height, probe_width in ((3 * height + 5, 2 * width + 3), (height // 2 + 3, width - 1)):
                probe = Image.fromarray(rng.integers(0, 256, (probe_height, probe_width, 3), dtype=np.uint8))
                expected = image_processor(images=probe, do_rescale=False, do_normalize=False, return_tensors="pt")
                expected = expected["pixel_values"]
                if expected.dtype != torch.uint8 or not torch.equal(shortcut(probe), expected):
                    return None
        except Exception:  # noqa: BLE001 - a processor that cannot be probed keeps its own path
            return None
        return shortcut

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> `(1, 3, height, width)` uint8 tensor."""
        resized = np.array(image.resize((self.width, self.height), resample=self.resample))
        return torch.from_numpy(resized).permute(2, 0, 1).unsqueeze(0).contiguous()


def _per_channel(values) -> tuple[float, ...] | None:
    """A processor's mean or std: one number for every channel, or one per channel."""
    if values is None:
        return None
    if isinstance(values, numbers.Real):
        return (float(values),)
    return tuple(float(value) for value in values)


class DeviceNormalization:
    """The last two steps of a ViT image processor, rescale and normalise, run on the model's device.

    The processor still resizes each image on the CPU (so its resampling is exactly the checkpoint's), but hands over
    uint8 pixels: four times fewer bytes to move, and the float arithmetic happens where the model is. Each
    preprocessed item carries its own constants (`constants()`), so items made before and after an edit of the
    processor are each finished as they were started. `from_processor` returns None for processors whose steps it
    does not know; those run whole on the CPU.
    """

    def __init__(self, rescale_factor: float | None, image_mean, image_std, num_channels: int = 3):
        self.rescale_factor = rescale_factor
        self.image_mean = _per_channel(image_mean)
        self.image_std = _per_channel(image_std)
        self.num_channels = num_channels
        rescale = (1.0 if rescale_factor is None else float(rescale_factor),)
        mean = (0.0,) if self.image_mean is None else self.image_mean
        std = (1.0,) if self.image_std is None else self.image_std
        rows = [torch.tensor(values, dtype=torch.float32).expand(num_channels) for values in (rescale, mean, std)]
        self._constants = torch.stack(rows)[None]  # made once: every preprocessed item carries it (never written)

    @classmethod
    def from_processor(cls, image_processor) -> DeviceNormalization | None:
        # Only processors whose pipeline is convert -> resize -> rescale -> normalise (ViT's, either backend).
        if not type(image_processor).__name__.startswith("ViTImageProcessor"):
            return None
        rescale = image_processor.rescale_factor if image_processor.do_rescale else None
        if image_processor.do_normalize:
            return cls(rescale, image_processor.image_mean, image_processor.image_std)
        return cls(rescale, None, None)

    def constants(self) -> torch.Tensor:
        """`(1, 3, num_channels)` float32: the rescale factor, the mean and the std per channel (1, 0 and 1 where the
        processor skips a step, which leaves the pixels exactly as they are)."""
        return self._constants

    @staticmethod
    def apply(pixels: torch.Tensor, constants: torch.Tensor) -> torch.Tensor:
        """`(batch_size, C, H, W)` resized pixels (uint8, or float in 0..255) and their `(batch_size, 3, C)`
        constants (on the same device) -> float32 model input, `(pixels * rescale - mean) / std`."""
        rescale, mean, std = (constants[:, row, :, None, None] for row in range(3))
        return (pixels.to(torch.float32) * rescale - mean) / std

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(batch_size, C, H, W)` resized pixels -> float32 model input, with this processor's constants."""
        return self.apply(pixels, self.constants().to(pixels.device).expand(len(pixels), -1, -1))


_SETTINGS_READ = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_pad", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std",
)


class ProcessorShortcuts:
    """`(DeviceNormalization | None, ProcessorResize | None)` for an image processor, derived again whenever the
    processor, or one of the settings the shortcuts depend on, changes (a user may edit `pipeline.image_processor`)."""

    def __init__(self):
        self._state: tuple = (None, (None, None))  # (key, shortcuts), replaced as one object: thread-safe reads

    def __call__(self, image_processor) -> tuple[DeviceNormalization | None, ProcessorResize | None]:
        key = (id(image_processor), type(image_processor),
               tuple(repr(getattr(image_processor, name, None)) for name in _SETTINGS_READ))
        known_key, shortcuts = self._state
        if key != known_key:
            normalization = DeviceNormalization.from_processor(image_processor)
            resize = ProcessorResize.from_processor(image_processor) if normalization is not None else None
            shortcuts = (normalization, resize)
            self._state = (key, shortcuts)
        return shortcuts

