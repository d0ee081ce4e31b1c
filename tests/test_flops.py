"""The analytic FLOP count agrees with torch's own counter on real forwards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_tiny_model
from maeday_hf.flops import image_flops, patch_embedding_flops, reconstruction_flops
from maeday_hf.masking import make_mask_noise
from maeday_hf.reconstruction import mask_ratio_set_to


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75])
def test_flops_match_torch_flop_counter(mask_ratio):
    model = make_tiny_model(attn_implementation="eager")  # attention as plain matmuls, which the counter sees
    noise = make_mask_noise(3, 16, mask_ratio)
    with torch.no_grad(), mask_ratio_set_to(model, mask_ratio), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.randn(3, 3, 32, 32), noise=noise)
    assert counter.get_total_flops() == 3 * reconstruction_flops(model.config, mask_ratio)


def test_vit_b_cost_matches_the_published_figure():
    from transformers import ViTMAEConfig

    # ~619 GFLOP for one image x 32 masks at 75 % masking (issue "Speed"), with the image's patches embedded once;
    # each of the 31 other masks embedding them again adds one patch embedding.
    config = ViTMAEConfig()
    assert image_flops(config, 32, 0.75, embed_once=True) / 1e9 == pytest.approx(619, abs=0.5)
    assert image_flops(config, 32, 0.75) == 32 * reconstruction_flops(config, 0.75)
    assert image_flops(config, 32, 0.75) - image_flops(config, 32, 0.75, embed_once=True) == (
        31 * patch_embedding_flops(config)
    )
    assert patch_embedding_flops(config) == 2 * 196 * (16 * 16 * 3) * 768


def test_image_flops_match_the_counter_on_the_scoring_path_that_embeds_once():
    from maeday_hf.scoring import maeday_anomaly_maps

    model = make_tiny_model(attn_implementation="eager")
    noise = make_mask_noise(8, 16, 0.75)
    images = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        maeday_anomaly_maps(model, images, noise, 0.75, bf16=False)
    counted = counter.get_total_flops()
    expected = 2 * image_flops(model.config, 8, 0.75, embed_once=True)
    # Nothing else is counted: the counter counts matrix products and convolutions, and the Gaussian is element-wise
    # sums of shifted slices (about 2 * 7 * 2 multiply-adds per pixel: noise next to the model's work).
    assert counted == expected
    assert image_flops(model.config, 8, 0.75) == 8 * reconstruction_flops(model.config, 0.75)
