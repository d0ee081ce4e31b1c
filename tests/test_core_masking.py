"""Mask noise: the schedules, their coverage, and agreement with the model's own masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from maeday_hf.masking import kept_patch_mask, make_mask_noise, num_kept_patches
from maeday_hf.reconstruction import mask_ratio_set_to


@pytest.mark.parametrize(
    "num_masks, num_patches, mask_ratio",
    [(2, 196, 0.75), (3, 196, 0.75), (32, 196, 0.75), (5, 16, 0.5), (7, 49, 0.9), (4, 16, 0.0)],
)
def test_balanced_schedule_keeps_every_patch_equally_often(num_masks, num_patches, mask_ratio):
    noise = make_mask_noise(num_masks, num_patches, mask_ratio, "balanced", seed=3)
    kept = kept_patch_mask(noise, mask_ratio)
    times_kept = kept.sum(dim=0)
    num_kept = num_kept_patches(num_patches, mask_ratio)
    assert (kept.sum(dim=1) == num_kept).all()
    assert times_kept.sum() == num_masks * num_kept
    assert times_kept.max() - times_kept.min() <= 1
    times_masked = num_masks - times_kept
    if num_masks * (num_patches - num_kept) >= num_patches:
        # Every patch is reconstructed from context at least once.
        assert times_masked.min() >= 1


def test_balanced_noise_values_are_distinct_even_at_thousands_of_masks():
    # In float32, times_kept + u ties often once counts reach the hundreds; a tie at the keep boundary could be broken
    # differently by another device's sort, and the counts drift apart there.
    noise = make_mask_noise(2048, 196, 0.75, "balanced", seed=0)
    assert all(len(set(row.tolist())) == 196 for row in noise)
    counts = kept_patch_mask(noise, 0.75).sum(dim=0)
    assert int(counts.max() - counts.min()) <= 1


def test_random_schedule_can_leave_patches_never_masked_where_balanced_does_not():
    # With 2 masks at 75 %, a random patch stays visible in both with probability 1/16: over 196 patches some do.
    random_kept = kept_patch_mask(make_mask_noise(2, 196, 0.75, "random", seed=0), 0.75)
    balanced_kept = kept_patch_mask(make_mask_noise(2, 196, 0.75, "balanced", seed=0), 0.75)
    assert (random_kept.all(dim=0)).any()
    assert not (balanced_kept.all(dim=0)).any()


@pytest.mark.parametrize("schedule", ["random", "balanced"])
def test_same_seed_same_noise_other_seed_other_noise(schedule):
    first = make_mask_noise(8, 49, 0.75, schedule, seed=11)
    again = make_mask_noise(8, 49, 0.75, schedule, seed=11)
    other = make_mask_noise(8, 49, 0.75, schedule, seed=12)
    assert torch.equal(first, again)
    assert not torch.equal(kept_patch_mask(first, 0.75), kept_patch_mask(other, 0.75))


def test_a_seed_beyond_32_bits_is_refused_not_aliased():
    # torch's CPU generator keeps a seed's lower 32 bits: 2**32 + 11 would draw seed 11's masks.
    make_mask_noise(2, 16, 0.75, seed=2**32 - 1)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        make_mask_noise(2, 16, 0.75, seed=2**32 + 11)


def test_noise_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_mask_noise(4, 16, 0.75, "balanced", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("schedule", ["random", "balanced"])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75])
def test_model_masks_exactly_the_patches_our_noise_says(schedule, mask_ratio):
    model = make_tiny_model(mask_ratio=0.3)  # the checkpoint's own ratio must not matter
    noise = make_mask_noise(6, 16, mask_ratio, schedule, seed=5)
    pixel_values = torch.randn(6, 3, 32, 32)
    with torch.no_grad(), mask_ratio_set_to(model, mask_ratio):
        model_mask = model(pixel_values=pixel_values, noise=noise).mask  # 1 = removed
    assert model.config.mask_ratio == 0.3
    assert torch.equal(model_mask.bool(), ~kept_patch_mask(noise, mask_ratio))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_masks=0), ValueError),
        (dict(num_masks=2.0), TypeError),
        (dict(num_masks=True), TypeError),
        (dict(mask_ratio=1.0), ValueError),
        (dict(mask_ratio=-0.1), ValueError),
        (dict(mask_ratio="0.5"), TypeError),
        (dict(schedule="grid"), ValueError),
        (dict(seed=1.5), TypeError),
        (dict(mask_ratio=0.95), ValueError),  # int(16 * 0.05) = 0 patches visible
        (dict(mask_ratio=0.9999999), ValueError),
    ],
)
def test_bad_arguments_name_the_value(kwargs, error):
    arguments = dict(num_masks=4, num_patches=16, mask_ratio=0.75, schedule="random", seed=0) | kwargs
    with pytest.raises(error) as raised:
        make_mask_noise(**arguments)
    bad_value = next(iter(kwargs.values()))
    assert repr(bad_value) in str(raised.value) or str(bad_value) in str(raised.value)


@pytest.mark.parametrize("num_patches", [16, 49, 196, 256, 1369])
def test_the_suggested_largest_mask_ratio_is_accepted(num_patches):
    import math
    import re

    from maeday_hf.masking import largest_mask_ratio, require_visible_patches

    with pytest.raises(ValueError) as raised:
        require_visible_patches(num_patches, 0.9999999)
    suggested = float(re.search(r"at most (\S+)\.$", str(raised.value)).group(1))
    assert suggested == largest_mask_ratio(num_patches)
    require_visible_patches(num_patches, suggested)  # what the message suggests works
    assert num_kept_patches(num_patches, math.nextafter(suggested, 1.0)) == 0  # and it is the largest that does


def test_the_highest_mask_ratio_that_keeps_a_patch_is_accepted(detector):
    noise = make_mask_noise(2, 16, 1 - 1 / 16)  # exactly one patch visible
    assert noise.shape == (2, 16)
    with pytest.raises(ValueError, match="0 of the model's 16 patches"):
        detector(np.zeros((32, 32, 3), dtype=np.uint8), num_masks=2, mask_ratio=0.95)


def test_random_masks_are_the_uniform_draws_masks_with_no_ties():
    # Seed 1155, mask 26: two of 196 float32 draws are equal at the keep boundary (ranks 48 and 49), where each
    # device's sort could keep either patch.
    generator = torch.Generator().manual_seed(1155)
    uniform = torch.rand(32, 196, generator=generator)
    ordered = uniform[26].sort().values
    assert ordered[48] == ordered[49]  # (the draw this test is about)
    noise = make_mask_noise(32, 196, 0.75, "random", seed=1155)
    assert all(len(set(row.tolist())) == 196 for row in noise)
    # Elsewhere exactly the masks of the uniform draws themselves.
    untied = [index for index in range(32) if len(set(uniform[index].tolist())) == 196]
    assert len(untied) >= 31
    assert torch.equal(kept_patch_mask(noise[untied], 0.75), kept_patch_mask(uniform[untied], 0.75))
