"""The k normal shots, and the augmented, masked views of them that fill each fine-tuning batch.

Paper (Sec. 3): "The batch size is set to 32, so the few available shots are used multiple times to fill the batch
(but with different random masks each time)", with random crop and random rotation. View `i` of a run is shot
`i % k`, cropped, rotated and masked with randomness drawn from its own generator seeded by `(seed, i)`: the views
do not depend on the order they are drawn in, on the number of processes, or on global RNG state.

Augmentations run in torch on the processed `pixel_values` (no torchvision):

- random crop: a square covering a uniform share in `[min_crop_scale, 1]` of the image area, at a uniform position,
  resized back to the model's size (bilinear);
- random rotation: a uniform angle in `[-max_rotation_degrees, max_rotation_degrees]` about the centre, borders filled
  by reflection (a constant fill would add straight edges the shots never have).

The paper gives no ranges; the defaults are mild so that views stay normal images of the same object.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .data.layout import list_images
from .images import IMAGE_SUFFIXES, load_rgb_image

_SEED_STRIDE = 2**32


def view_generator(seed: int, view_index: int) -> torch.Generator:
    """A CPU generator private to view `view_index` of the run seeded `seed`."""
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + view_index) % 2**63)


def expand_shot_paths(shots: Sequence[str | os.PathLike]) -> list[Path]:
    """Files stay as given; a folder gives its image files (sorted, not recursive)."""
    paths: list[Path] = []
    for entry in shots:
        path = Path(entry)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise ValueError(f"No shot images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {os.fspath(path)!r}.")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        else:
            raise FileNotFoundError(f"Shot image not found: {os.fspath(path)!r}.")
    return paths


def load_shot_images(shots: Sequence[Any]) -> tuple[list[Image.Image], list[str]]:
    """Decode every shot now, so a bad file fails before training.

    Args:
        shots: image paths, folders of images, PIL images or arrays (mixed is fine).

    Returns:
        `(images, names)`: RGB PIL images and a short name per shot (file path, or `"<image i>"`).

    Raises:
        ValueError: no shots, or a file that is not a readable image.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(shots, (str, os.PathLike)):
        shots = [shots]
    entries: list[Any] = []
    for shot in shots:
        if isinstance(shot, (str, os.PathLike)):
            entries.extend(expand_shot_paths([shot]))
        else:
            entries.append(shot)
    if not entries:
        raise ValueError("No shots given: few-shot fine-tuning needs at least one normal image (k >= 1).")
    images = [load_rgb_image(entry) for entry in entries]
    names = [os.fspath(entry) if isinstance(entry, Path) else f"<image {index}>" for index, entry in enumerate(entries)]
    return images, names


def shots_from_split(split, k: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """The k shots `maeday_hf.data.select_shots(split, k, seed)` picks, so every method sees the same shots.

    Returns:
        `(images, names)` with names `"<split index i>"`.
    """
    from .data import select_shots, shot_indices

    indices = shot_indices(len(split), k, seed)  # raises for k < 1 or k > len(split)
    selected = select_shots(split, k, seed)
    images = [load_rgb_image(example["image"]) for example in selected]
    return images, [f"train[{index}]" for index in indices]


def random_crop_rotate(
    pixel_values: torch.Tensor,
    generator: torch.Generator,
    min_crop_scale: float = 0.75,
    max_rotation_degrees: float = 15.0,
) -> torch.Tensor:
    """One random crop (resized back) and rotation of an image.

    Args:
        pixel_values (`torch.Tensor` of shape `(num_channels, height, width)`).
        generator (`torch.Generator`): CPU generator, the only source of randomness.

    Returns:
        `torch.Tensor` of the same shape and dtype.
    """
    _, height, width = pixel_values.shape
    scale = min_crop_scale + (1 - min_crop_scale) * torch.rand((), generator=generator).item()
    crop_h = max(1, round(height * math.sqrt(scale)))
    crop_w = max(1, round(width * math.sqrt(scale)))
    top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
    angle = math.radians(max_rotation_degrees * (2 * torch.rand((), generator=generator).item() - 1))

    image = pixel_values[None, :, top : top + crop_h, left : left + crop_w].float()
    if (crop_h, crop_w) != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
    if angle != 0.0:
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=image.dtype)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return image[0].to(pixel_values.dtype)


class ShotViews(torch.utils.data.Dataset):
    """`num_views` augmented, masked views of k shots: view `i` is shot `i % k`.

    Args:
        pixel_values (`torch.Tensor` of shape `(num_shots, num_channels, height, width)`): the processed shots.
        num_views (`int`): dataset length (steps x batch size covers one epoch).
        num_patches (`int`): L, length of each view's mask noise.
        seed (`int`): run seed.
        augment (`bool`): crop and rotate (else only the mask changes between copies).

    Each item is `{"pixel_values": (C, H, W), "noise": (L,)}`.
    """

    def __init__(
        self,
        pixel_values: torch.Tensor,
        num_views: int,
        num_patches: int,
        seed: int = 0,
        augment: bool = True,
        min_crop_scale: float = 0.75,
        max_rotation_degrees: float = 15.0,
    ):
        if pixel_values.ndim != 4 or pixel_values.shape[0] < 1:
            raise ValueError(f"pixel_values must be (num_shots >= 1, C, H, W), got shape {tuple(pixel_values.shape)}.")
        self.pixel_values = pixel_values
        self.num_views = num_views
        self.num_patches = num_patches
        self.seed = seed
        self.augment = augment
        self.min_crop_scale = min_crop_scale
        self.max_rotation_degrees = max_rotation_degrees

    def __len__(self) -> int:
        return self.num_views

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = view_generator(self.seed, index)
        image = self.pixel_values[index % self.pixel_values.shape[0]]
        if self.augment:
            image = random_crop_rotate(image, generator, self.min_crop_scale, self.max_rotation_degrees)
        # "small is keep, large is remove": a fresh random mask for every copy.
        noise = torch.rand(self.num_patches, generator=generator)
        return {"pixel_values": image, "noise": noise}
