"""The k normal shots, and the augmented, masked views of them that fill each fine-tuning batch.

Paper (Sec. 3): "The batch size is set to 32, so the few available shots are used multiple times to fill the batch
(but with different random masks each time)", with random crop and random rotation. View `i` of a run is shot
`i % k`, cropped, rotated and masked with randomness drawn from its own generator seeded by `(seed, i)`: the views
do not depend on the order they are drawn in, on the number of processes, or on global RNG state.

Augmentations run in torch on processed shots (no torchvision), a whole batch at once on the training device, as one
affine resampling per view:

- random crop: covering a uniform share in `[min_crop_scale, 1]` of the image area, at a uniform position, resized to
  the model's size;
- random rotation: a uniform angle in `[-max_rotation_degrees, max_rotation_degrees]` about the crop's centre; where
  the rotated crop reaches past the image, the border is filled by reflection (a constant fill would add straight
  edges the shots never have).

The views are cut from the shots at up to `view_supersampling` times the model's input size (no more than the shots'
own resolution, `view_source_scale`), resampled there (bilinear) and then downsampled to the model's size with
antialiasing, as the processor's resize is: a crop is taken from the detail of the original, as the queries are. Cut
from the shots already resized to the model's input, a crop was upsampled instead, and the views kept 55-65 % of the
queries' fine detail (Laplacian energy of 1024 px textures) against 75-80 % this way and 80-90 % for a crop of the
original resized by the processor itself.

The paper gives no ranges; the defaults are mild so that views stay normal images of the same object.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import IMAGE_SUFFIXES, is_single_image, is_url, list_images, load_rgb_image, redact_url
from .masking import random_mask_noise

logger = logging.getLogger(__name__)

TRAINING_VIEWS = 0
"""`view_generator` stream of the fine-tune's training views (`ShotViews`)."""
CALIBRATION_VIEWS = 1
"""`view_generator` stream of the calibration's augmented views (`calibration.calibrate_threshold`)."""


def view_generator(seed: int, view_index: int, stream: int = TRAINING_VIEWS) -> torch.Generator:
    """A CPU generator private to view `view_index` of `stream` in the run seeded `seed`.

    torch's CPU generator keeps only the lower 32 bits of its seed, so `(seed, stream, view_index)` is hashed into 32
    bits (numpy's `SeedSequence`) rather than packed: packing them as `seed * 2**32 + view_index` gave every seed the
    same views and masks. Two views of one run share a generator seed with odds of about views² / 2**33 (3e-4 for the
    paper's 50 steps x 32 views): the same crop and mask twice, which changes nothing else.
    """
    state = np.random.SeedSequence([seed, stream, view_index]).generate_state(1, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]))


def expand_shot_paths(shots: Sequence[str | os.PathLike]) -> list[Path]:
    """Files stay as given; a folder gives its image files (sorted, not recursive)."""
    paths: list[Path] = []
    for entry in shots:
        path = Path(entry)
        if path.is_dir():
            found = list_images(path)
            if not found:
                subfolders = sorted(entry.name for entry in path.iterdir() if entry.is_dir())
                raise ValueError(
                    f"No shot images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {os.fspath(path)!r}"
                    + (f" (its subfolders {', '.join(subfolders[:5])}{', ...' if len(subfolders) > 5 else ''} are not "
                       f"searched: give the folder of normal images itself, e.g. CATEGORY/train/good)."
                       if subfolders else ".")
                )
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        else:
            raise FileNotFoundError(f"Shot image not found: {os.fspath(path)!r}.")
    return paths


def load_shot_images(shots: Sequence[Any]) -> tuple[list[Image.Image], list[str]]:
    """Decode every shot now, so a bad file fails before training.

    Args:
        shots: image paths, URLs, folders of images, PIL images or `(H, W, C)` / `(H, W)` arrays (mixed is fine), a single
            one of them (an array is one image, not a list of rows), or an `(N, H, W, C)` array of N shots.

    Returns:
        `(images, names)`: RGB PIL images and a short name per shot (file path, or `"<image i>"`).

    Raises:
        ValueError: no shots, or a file that is not a readable image.
        FileNotFoundError: a path that does not exist.
        TypeError: a shot (or `shots`) of another type, e.g. a `torch.Tensor`.
    """
    if isinstance(shots, torch.Tensor) or is_single_image(shots):
        shots = [shots]  # one shot: an (H, W[, C]) array is one image, not rows (load_rgb_image refuses a tensor)
    elif not isinstance(shots, Iterable):
        raise TypeError(
            f"shots must be an image path, folder, PIL image or array, or a list of them; got {type(shots).__name__}."
        )
    entries: list[Any] = []
    seen_files: dict[str, Path] = {}  # real path -> as first given
    for shot in shots:
        if isinstance(shot, str) and is_url(shot):
            entries.append(shot)  # a URL, fetched as it is (a Path would fold its "//")
        elif isinstance(shot, (str, os.PathLike)):
            for path in expand_shot_paths([shot]):
                # The same file twice (listed again, or also in a given folder) would count as two shots and weigh
                # twice in every batch.
                first = seen_files.setdefault(os.path.realpath(path), path)
                if first is path:
                    entries.append(path)
                elif os.fspath(first) == os.fspath(path):
                    logger.warning("Shot %r given again: used once.", os.fspath(path))
                else:
                    logger.warning("Shot %r is %r given again: used once.", os.fspath(path), os.fspath(first))
        else:
            entries.append(shot)
    if not entries:
        raise ValueError("No shots given: few-shot fine-tuning needs at least one normal image (k >= 1).")
    images = [load_rgb_image(entry) for entry in entries]
    names = [_shot_name(entry, index) for index, entry in enumerate(entries)]
    return images, names


def _shot_name(entry: Any, index: int) -> str:
    """How a shot is recorded (training log, model card): its path, or its URL without `user:password@`, query and
    fragment (where access tokens travel), or its position."""
    if isinstance(entry, str) and is_url(entry):
        return redact_url(entry).split("?", 1)[0].split("#", 1)[0]
    return os.fspath(entry) if isinstance(entry, (Path, str)) else f"<image {index}>"


def shots_from_split(split, k: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """The k shots `maeday_hf.data.select_shots(split, k, seed)` picks, so every method sees the same shots.

    Returns:
        `(images, names)` with names `"<category> train[i] (shot seed s)"` (without the category where the split has
        no `category` column): enough to pick the same shots again.
    """
    from .data import select_shots, shot_indices

    indices = shot_indices(len(split), k, seed)  # raises for k < 1 or k > len(split)
    _require_normal_rows(split, indices)
    selected = select_shots(split, k, seed)
    images = [load_rgb_image(example["image"]) for example in selected]
    categories = selected["category"] if "category" in selected.column_names else [None] * len(indices)
    return images, [
        f"{'' if category is None else f'{category} '}train[{index}] (shot seed {seed})"
        for category, index in zip(categories, indices)
    ]


def _require_normal_rows(split, indices) -> None:
    """Refuse shots that a `label` column (0 = good) marks anomalous: the shots are the normal images a fine-tune
    learns to reconstruct (a test split passed instead of the train split, say)."""
    if "label" not in split.column_names:
        return
    labels = split.select_columns(["label"])["label"]
    anomalous = [index for index in indices if labels[index] != 0]
    if anomalous:
        raise ValueError(
            f"{len(anomalous)} of the {len(indices)} shots are labelled anomalous (rows "
            f"{', '.join(map(str, anomalous[:5]))}{', ...' if len(anomalous) > 5 else ''}): shots must be normal images; "
            f"pass the category's train split (or filter its rows to label 0, good)."
        )


def shots_from_rows(split) -> tuple[list[Image.Image], list[str]]:
    """Every row of `split` (a `datasets.Dataset` with an `image` column) as a shot, such as the k rows
    `maeday_hf.data.select_shots` returns.

    Returns:
        `(images, names)` with names `"<category> row i"` (without the category where the split has no `category`
        column).
    """
    if "image" not in split.column_names:
        raise ValueError(f"The shots' dataset has no 'image' column (columns: {split.column_names}).")
    if len(split) == 0:
        raise ValueError("No shots given: the dataset has no rows; few-shot fine-tuning needs at least one normal "
                         "image.")
    _require_normal_rows(split, range(len(split)))
    images = [load_rgb_image(image) for image in split["image"]]
    categories = split["category"] if "category" in split.column_names else [None] * len(split)
    return images, [
        f"{'' if category is None else f'{category} '}row {index}" for index, category in enumerate(categories)
    ]


def crop_rotate_transform(
    generator: torch.Generator, height: int, width: int, min_crop_scale: float = 0.75, max_rotation_degrees: float = 15.0
) -> torch.Tensor:
    """One random crop (resized back to the full image) and rotation, as the affine map `F.affine_grid` takes.

    The crop covers a uniform share in `[min_crop_scale, 1]` of the image area (the same share of each side) at a
    uniform position; the rotation is a uniform angle in `[-max_rotation_degrees, max_rotation_degrees]` about the
    crop's centre. Composing them into one map resamples the image once instead of twice.

    Returns:
        `torch.Tensor` of shape `(2, 3)`, float32: output -> input, in normalised coordinates.
    """
    scale = min_crop_scale + (1 - min_crop_scale) * torch.rand((), generator=generator).item()
    side = math.sqrt(scale)  # the crop's side, as a share of the image's
    centre_x = (1 - side) * (2 * torch.rand((), generator=generator).item() - 1)
    centre_y = (1 - side) * (2 * torch.rand((), generator=generator).item() - 1)
    angle = math.radians(max_rotation_degrees * (2 * torch.rand((), generator=generator).item() - 1))
    cos, sin = math.cos(angle), math.sin(angle)
    # A rotation in pixels, expressed in coordinates normalised per axis (exact for non-square images too).
    return torch.tensor(
        [
            [side * cos, -side * sin * height / width, centre_x],
            [side * sin * width / height, side * cos, centre_y],
        ],
        dtype=torch.float32,
    )


RENDER_CHUNK_BYTES = 256 * 2**20
"""Most bytes `render_views` holds at the shots' resolution at once: the views gathered, their sampling grid and the
resampled views, before downsampling them."""


def view_source_scale(image_sizes: Iterable[tuple[int, int]], size: tuple[int, int], view_supersampling: float) -> float:
    """How many times the model's input size the views are cut from: `view_supersampling`, or less where a shot is
    smaller (no shot is enlarged beyond its own resolution for it), and at least 1.

    Args:
        image_sizes: `(height, width)` of each decoded shot.
        size: `(height, width)` of the model's input.
        view_supersampling: the most.
    """
    height, width = size
    available = min(min(image_height / height, image_width / width) for image_height, image_width in image_sizes)
    return max(1.0, min(float(view_supersampling), available))


def render_views(
    shots: torch.Tensor, shot_index: torch.Tensor, transforms: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """The views, all at once, on the shots' device: bilinear, borders filled by reflection.

    Args:
        shots (`torch.Tensor` of shape `(num_shots, num_channels, height, width)`).
        shot_index (`torch.Tensor` of shape `(batch_size,)`): which shot each view shows.
        transforms (`torch.Tensor` of shape `(batch_size, 2, 3)`): from `crop_rotate_transform`.
        size (`(int, int)`, *optional*): the views' height and width, when smaller than the shots': each view is
            resampled at the shots' resolution, then downsampled with antialiasing (bilinear, as the processor's
            resize), in chunks that hold at most `RENDER_CHUNK_BYTES` at the shots' resolution.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_channels, *size)` (default the shots' height and width), the shots'
        dtype.
    """
    shot_index = shot_index.to(shots.device)
    transforms = transforms.to(shots.device, shots.dtype)
    num_channels, height, width = shots.shape[1:]
    if size is None or tuple(size) == (height, width):
        return _resample(shots[shot_index], transforms)
    view_bytes = (2 * num_channels + 2) * height * width * shots.element_size()  # (gathered, resampled; (x, y) grid)
    chunk = max(1, RENDER_CHUNK_BYTES // view_bytes)
    return torch.cat([
        F.interpolate(
            _resample(shots[shot_index[start:start + chunk]], transforms[start:start + chunk]),
            size=tuple(size), mode="bilinear", antialias=True, align_corners=False,
        )
        for start in range(0, len(shot_index), chunk)
    ])


def _resample(images: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(transforms, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_crop_rotate(
    pixel_values: torch.Tensor,
    generator: torch.Generator,
    min_crop_scale: float = 0.75,
    max_rotation_degrees: float = 15.0,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One random crop (resized) and rotation of an image (see `crop_rotate_transform`).

    Args:
        pixel_values (`torch.Tensor` of shape `(num_channels, height, width)`).
        generator (`torch.Generator`): CPU generator, the only source of randomness.
        size (`(int, int)`, *optional*): the view's height and width, when smaller (see `render_views`).

    Returns:
        `torch.Tensor` of shape `(num_channels, *size)` (default the image's), the image's dtype.
    """
    height, width = size if size is not None else pixel_values.shape[-2:]
    transform = crop_rotate_transform(generator, height, width, min_crop_scale, max_rotation_degrees)
    image = pixel_values[None].float()
    return render_views(image, torch.zeros(1, dtype=torch.long), transform[None], size)[0].to(pixel_values.dtype)


class ShotViews(torch.utils.data.Dataset):
    """`num_views` augmented, masked views of k shots: view `i` is shot `i % k`.

    Items hold what makes a view, not its pixels: `{"shot_index": (), "transform": (2, 3), "noise": (L,)}`. A batch
    of them becomes pixels with `render(batch)`, on the batch's device, in one `grid_sample` (one per chunk when cut
    from larger shots, see `render_views`; the shots are copied to that device once).

    Args:
        pixel_values (`torch.Tensor` of shape `(num_shots, num_channels, height, width)`): the processed shots.
        num_views (`int`): dataset length (steps x batch size covers one epoch).
        num_patches (`int`): L, length of each view's mask noise.
        seed (`int`): run seed.
        augment (`bool`): crop and rotate (else only the mask changes between copies, and views are `pixel_values`).
        source_pixel_values (`torch.Tensor` of shape `(num_shots, num_channels, source_height, source_width)`,
            *optional*): the same shots processed at a larger size, to cut the augmented views from (see
            `render_views`); by default `pixel_values`. The random crops and rotations do not depend on it.
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
        source_pixel_values: torch.Tensor | None = None,
    ):
        if pixel_values.ndim != 4 or pixel_values.shape[0] < 1:
            raise ValueError(f"pixel_values must be (num_shots >= 1, C, H, W), got shape {tuple(pixel_values.shape)}.")
        if source_pixel_values is not None and (
            source_pixel_values.shape[:2] != pixel_values.shape[:2]
            or any(source < size for source, size in zip(source_pixel_values.shape[2:], pixel_values.shape[2:]))
        ):
            raise ValueError(
                f"source_pixel_values must hold the same shots and channels as pixel_values "
                f"{tuple(pixel_values.shape)}, at least as large, got shape {tuple(source_pixel_values.shape)}."
            )
        self.pixel_values = pixel_values
        self.source_pixel_values = source_pixel_values
        self.num_views = num_views
        self.num_patches = num_patches
        self.seed = seed
        self.augment = augment
        self.min_crop_scale = min_crop_scale
        self.max_rotation_degrees = max_rotation_degrees
        self._shots_by_device: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_views

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = view_generator(self.seed, index)
        height, width = self.pixel_values.shape[-2:]
        if self.augment:
            transform = crop_rotate_transform(generator, height, width, self.min_crop_scale, self.max_rotation_degrees)
        else:
            transform = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        # "small is keep, large is remove": a fresh random mask for every copy (ranks of uniform draws: no ties, so
        # every device keeps the same patches, see `masking.random_mask_noise`).
        noise = random_mask_noise(1, self.num_patches, generator)[0]
        shot_index = torch.tensor(index % self.pixel_values.shape[0])
        return {"shot_index": shot_index, "transform": transform, "noise": noise}

    def shots_on(self, device: torch.device) -> torch.Tensor:
        """The shots the views are cut from (`source_pixel_values` when augmenting and given, else `pixel_values`),
        float32, on `device` (copied there once)."""
        device = torch.device(device)
        if device not in self._shots_by_device:
            use_source = self.augment and self.source_pixel_values is not None
            shots = self.source_pixel_values if use_source else self.pixel_values
            self._shots_by_device[device] = shots.to(device, torch.float32)
        return self._shots_by_device[device]

    def render(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pixels of a batch of items (stacked, as a DataLoader collates them), on the device of `batch["noise"]`."""
        shots = self.shots_on(batch["noise"].device)
        if not self.augment:
            return shots[batch["shot_index"].to(shots.device)]
        return render_views(shots, batch["shot_index"], batch["transform"], size=tuple(self.pixel_values.shape[-2:]))

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Items `indices`, stacked as the DataLoader would."""
        items = [self[index] for index in indices]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
