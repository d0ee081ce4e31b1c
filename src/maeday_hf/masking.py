"""Mask noise for MAEDAY's repeated masked reconstructions.

`ViTMAEForPreTraining` draws its mask by arg-sorting a per-patch `noise` tensor: the `len_keep` patches with the
*smallest* noise are kept (visible), the rest are masked. Passing our own noise is the only randomness MAEDAY needs, so
every mask here comes from a seeded `torch.Generator` on the CPU: the same seed gives the same masks on any device, for
every image of a call, whatever the batching.

Two schedules:

- `"random"` (the paper): each of the N masks keeps a uniformly random subset of patches.
- `"balanced"`: the N masks are drawn so that every patch is kept (and hence masked) the same number of times, up to one.
  With a 75 % mask ratio and N >= 2 every patch is then reconstructed from context at least once, which the random
  schedule only guarantees with high probability for large N.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch

MaskSchedule = Literal["random", "balanced"]
MASK_SCHEDULES: tuple[str, ...] = ("random", "balanced")


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches per mask, computed exactly as `ViTMAEEmbeddings.random_masking` does."""
    return int(num_patches * (1 - mask_ratio))


def validate_mask_ratio(mask_ratio: float) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real):
        raise TypeError(f"mask_ratio must be a float in [0, 1), got {mask_ratio!r} ({type(mask_ratio).__name__}).")
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1) (0 keeps every patch visible), got {mask_ratio}.")
    return float(mask_ratio)


def largest_mask_ratio(num_patches: int) -> float:
    """The largest mask ratio that keeps a patch of `num_patches` visible, as the model counts them
    (`int(num_patches * (1 - mask_ratio)) >= 1`; `1 - 1 / num_patches` itself rounds below 1 for many sizes)."""
    ratio = 1 - 1 / num_patches
    while num_kept_patches(num_patches, ratio) < 1:
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def require_visible_patches(num_patches: int, mask_ratio: float) -> None:
    """Refuse a mask ratio that leaves no patch of `num_patches` visible (the model would see only its CLS token)."""
    if num_kept_patches(num_patches, mask_ratio) < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps int({num_patches} * (1 - {mask_ratio})) = 0 of the model's {num_patches} "
            f"patches visible, so every reconstruction would ignore the image; use a mask ratio of at most "
            f"{largest_mask_ratio(num_patches)!r}."
        )


def validate_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}).")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


def validate_mask_schedule(schedule: str) -> str:
    if schedule not in MASK_SCHEDULES:
        raise ValueError(f"mask_schedule must be one of {MASK_SCHEDULES}, got {schedule!r}.")
    return schedule


def validate_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r} ({type(seed).__name__}).")
    if not 0 <= seed < 2**32:
        # torch's CPU generator keeps a seed's lower 32 bits (numpy's legacy seeding, which the Trainer also sets,
        # takes no more): a larger seed would silently repeat a smaller one's draws.
        raise ValueError(f"seed must be in [0, 2**32) (random generators keep 32 bits of a seed), got {seed}.")
    return int(seed)


def random_mask_noise(num_masks: int, num_patches: int, generator: torch.Generator) -> torch.Tensor:
    """The paper's masks: each keeps a uniformly random subset of patches, shape `(num_masks, num_patches)`.

    Drawn as i.i.d. uniform noise, handed to the model as each patch's rank in it divided by `num_patches`: the same
    masks, but every value distinct. float32 draws tie now and then (two of 196 patches, in about one seed in 1,500 at
    N = 32), and a tie at the keep boundary would be broken by each device's own sort.
    """
    uniform = torch.rand(num_masks, num_patches, generator=generator)
    return _ranks(uniform) / num_patches


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within its row (0 = smallest), ties in index order, as float32."""
    order = torch.argsort(values, dim=-1, stable=True)
    ranks = torch.empty_like(values, dtype=torch.float32)
    return ranks.scatter_(-1, order, torch.arange(values.shape[-1], dtype=torch.float32).expand_as(values).contiguous())


def balanced_mask_noise(
    num_masks: int, num_patches: int, mask_ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """Noise whose masks keep every patch the same number of times (up to one) across the `num_masks` masks.

    Mask i keeps the patches kept least often by masks 0..i-1, ties broken at random: its priority is
    `times_kept_before + u` with `u ~ U[0, 1)`, and the model keeps the `num_kept_patches` smallest noise values, which
    are exactly those patches. By induction the keep counts never differ by more than one. The noise handed to the model
    is each patch's rank in that priority, divided by `num_patches`: the same order, but every value distinct, so no
    device's sort can break a tie at the keep boundary differently (in float32, `times_kept + u` would tie often once
    counts reach the hundreds).

    Returns:
        `torch.Tensor` of shape `(num_masks, num_patches)`.
    """
    num_kept = num_kept_patches(num_patches, mask_ratio)
    times_kept = torch.zeros(num_patches, dtype=torch.float64)  # + a float32 u: exact, so priorities never tie
    noise = torch.empty(num_masks, num_patches)
    for mask_index in range(num_masks):
        priority = times_kept + torch.rand(num_patches, generator=generator).double()
        order = torch.argsort(priority, stable=True)  # (equal float32 draws tie: index order, on every version)
        noise[mask_index, order] = torch.arange(num_patches, dtype=torch.float32) / num_patches
        times_kept[order[:num_kept]] += 1
    return noise


def make_mask_noise(
    num_masks: int,
    num_patches: int,
    mask_ratio: float = 0.75,
    schedule: MaskSchedule = "random",
    seed: int = 0,
) -> torch.Tensor:
    """Seeded mask noise for `ViTMAEForPreTraining(..., noise=...)`.

    Args:
        num_masks (`int`): N, the number of masked reconstructions per image.
        num_patches (`int`): L, patches per image (`(image_size // patch_size) ** 2`).
        mask_ratio (`float`): fraction of patches masked, in [0, 1), keeping at least one patch visible.
        schedule (`"random"` or `"balanced"`): see the module docstring.
        seed (`int`): seeds a private CPU generator; global RNG state is untouched.

    Returns:
        `torch.Tensor` of shape `(num_masks, num_patches)`, float32 on the CPU.
    """
    validate_positive_int(num_masks, "num_masks")
    validate_positive_int(num_patches, "num_patches")
    mask_ratio = validate_mask_ratio(mask_ratio)
    validate_mask_schedule(schedule)
    validate_seed(seed)
    require_visible_patches(num_patches, mask_ratio)
    generator = torch.Generator().manual_seed(seed)
    if schedule == "random":
        return random_mask_noise(num_masks, num_patches, generator)
    return balanced_mask_noise(num_masks, num_patches, mask_ratio, generator)


def kept_patch_mask(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Boolean `(num_masks, num_patches)` tensor, True where the model will keep (see) the patch for this noise."""
    num_kept = num_kept_patches(noise.shape[-1], mask_ratio)
    ids_keep = torch.argsort(noise, dim=-1)[..., :num_kept]
    kept = torch.zeros_like(noise, dtype=torch.bool)
    return kept.scatter_(-1, ids_keep, True)
