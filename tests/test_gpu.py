"""CUDA paths (deselected by default; run with `pytest -m gpu tests/test_gpu.py` on a machine with a GPU).

Each compares the GPU path with a path the CPU suite already checks against the paper's reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor, pipeline

from conftest import TINY_IMAGE_SIZE, make_tiny_model
from maeday_hf.finetune import FinetuneConfig, build_trainer
from maeday_hf.lora import add_lora, make_lora_config
from maeday_hf.masking import make_mask_noise
from maeday_hf.pipeline import DeviceNormalization
from maeday_hf.reconstruction import mask_ratio_set_to
from maeday_hf.scoring import maeday_anomaly_maps
from maeday_hf.shot_views import ShotViews
from maeday_hf.step_loop import run_steps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(2)
    sizes = [(40, 56), (32, 32), (77, 23), (64, 64), (33, 90), (48, 48), (31, 60)]
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in sizes]


def _max_relative_difference(ours, theirs):
    return max(np.abs(a["anomaly_map"] - b["anomaly_map"]).max() / np.abs(b["anomaly_map"]).max()
               for a, b in zip(ours, theirs))


def test_gpu_float32_maps_match_the_cpu(tiny_checkpoint, images):
    cpu = pipeline("anomaly-detection", model=tiny_checkpoint, device="cpu")(images, num_masks=6, bf16=False)
    gpu = pipeline("anomaly-detection", model=tiny_checkpoint, device="cuda")(images, num_masks=6, bf16=False)
    assert _max_relative_difference(gpu, cpu) < 5e-3  # cuDNN may run the patch embedding in TF32
    for a, b in zip(gpu, cpu):
        assert a["score"] == pytest.approx(b["score"], rel=5e-3)


def test_gpu_overlapped_batches_equal_single_images_and_bf16_stays_close(tiny_checkpoint, images):
    detector = pipeline("anomaly-detection", model=tiny_checkpoint, device="cuda")
    batched = detector(images, num_masks=6, batch_size=3, threshold=0.5, return_uncertainty=True)
    singles = [detector(image, num_masks=6, threshold=0.5, return_uncertainty=True) for image in images]
    assert [r["anomaly_map"].shape for r in batched] == [(image.height, image.width) for image in images]
    # Copied out of the pinned transfer buffers: a kept result holds no page-locked memory.
    assert all(r[key].flags.owndata for r in batched for key in ("anomaly_map", "uncertainty_map"))
    assert _max_relative_difference(batched, singles) < 1e-2  # bf16 kernels may differ with the batch shape
    exact = detector(images, num_masks=6, bf16=False)
    assert _max_relative_difference(batched, exact) < 2e-2


def test_device_normalisation_on_the_gpu_equals_the_processor(images):
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    normalise = DeviceNormalization.from_processor(processor)
    for image in images:
        expected = processor(images=image, return_tensors="pt")["pixel_values"]
        pixels = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(normalise(pixels.cuda()).cpu(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("warmup_steps", [1, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graph_steps_equal_eager_steps(bf16, warmup_steps, tmp_path):
    config = FinetuneConfig(num_steps=4, batch_size=4, disable_tqdm=True, bf16=bf16)
    shots = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    source = torch.nn.functional.interpolate(shots, scale_factor=3, mode="bilinear")  # (views cut at 3x, downsampled)
    results = []
    for cuda_graph in (False, True):
        model = make_tiny_model()
        torch.manual_seed(0)
        peft_model = add_lora(model, make_lora_config(model)).cuda()
        views = ShotViews(shots, num_views=16, num_patches=16, seed=1, source_pixel_values=source)
        trainer = build_trainer(peft_model, model, views, config, tmp_path / str(cuda_graph))
        with mask_ratio_set_to(model, config.mask_ratio):
            losses = run_steps(peft_model, model, views, trainer.create_optimizer(), 4, 4, bf16=bf16,
                               cuda_graph=cuda_graph, warmup_steps=warmup_steps)
        weights = {name: p.detach().float().cpu() for name, p in peft_model.named_parameters() if p.requires_grad}
        results.append((losses, weights))
    (eager_losses, eager_weights), (graph_losses, graph_weights) = results
    tolerance = 2e-2 if bf16 else 1e-4
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=tolerance)
    for name in eager_weights:
        torch.testing.assert_close(graph_weights[name], eager_weights[name], rtol=tolerance, atol=tolerance * 1e-2)


def test_gpu_bf16_detection_agrees_with_torch():
    from maeday_hf.reconstruction import runs_bfloat16_natively

    if torch.version.hip:  # torch says True for every AMD architecture; the package names the ones with bf16 units
        pytest.skip("torch.cuda.is_bf16_supported does not tell AMD architectures apart")

    for index in range(torch.cuda.device_count()):
        with torch.cuda.device(index):
            assert runs_bfloat16_natively(f"cuda:{index}") is torch.cuda.is_bf16_supported(including_emulation=False)


def test_gpu_graph_steps_with_timing_logged_equal_eager_steps(tmp_path, caplog):
    # The graph loop's INFO timing adds a host sync; the steps must not change with it.
    caplog.set_level("INFO", logger="maeday_hf.step_loop")
    test_cuda_graph_steps_equal_eager_steps(False, 3, tmp_path)
    assert "eager steps and the capture took" in caplog.text


@pytest.mark.parametrize("mask_batch_size", [100, 7])  # 24 masks: chunks with parts of images next to others
def test_gpu_maps_and_spread_repeat_bit_for_bit(mask_batch_size):
    model = make_tiny_model(seed=5).cuda()
    pixel_values = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(2)).cuda()
    noise = make_mask_noise(24, 16, 0.75, seed=1)
    runs = [
        maeday_anomaly_maps(model, pixel_values, noise, 0.75, mask_batch_size=mask_batch_size, return_uncertainty=True)
        for _ in range(3)
    ]
    for run in runs[1:]:
        for key in ("anomaly_map", "uncertainty_map", "pred_score"):
            assert torch.equal(run[key], runs[0][key]), key
