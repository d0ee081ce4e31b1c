"""The few-shot recipe and the maps' post-processing against plain references written here: the optimizer that runs,
the all-patch loss, the training mask ratio, the view augmentation, the resize back to the input size, and PatchCore's
map smoothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import pipeline

from conftest import TINY_IMAGE_SIZE, make_tiny_model
from maeday_hf.finetune import FinetuneConfig, build_trainer, finetune
from maeday_hf.lora import add_lora, make_lora_config
from maeday_hf.masking import make_mask_noise
from maeday_hf.reconstruction import mask_ratio_set_to
from maeday_hf.scoring import maeday_anomaly_maps
from maeday_hf.shot_views import ShotViews
from maeday_hf.step_loop import run_steps, step_loss
from maeday_hf.training_loss import all_patch_loss
from test_core_scoring import reference_gaussian_filter


def _numpy_patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
    """(B, C, H, W) -> (B, L, p*p*C), patches row by row, pixels row by row, channels last (MAE's order)."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size).transpose(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_all_patch_loss_is_the_mse_over_every_patch(norm_pix_loss):
    model = make_tiny_model(norm_pix_loss=norm_pix_loss)
    pixels = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    noise = make_mask_noise(2, 16, 0.75, seed=1)
    with torch.no_grad(), mask_ratio_set_to(model, 0.75):
        outputs = model(pixel_values=pixels, noise=noise)
    targets = _numpy_patchify(pixels.double().numpy(), model.config.patch_size)
    if norm_pix_loss:  # MAE's per-patch normalisation: unbiased variance, epsilon 1e-6
        targets = (targets - targets.mean(-1, keepdims=True)) / np.sqrt(targets.var(-1, ddof=1, keepdims=True) + 1e-6)
    squared = (outputs.logits.double().numpy() - targets) ** 2
    from maeday_hf.reconstruction import reconstruction_targets

    loss = float(all_patch_loss(outputs.logits, reconstruction_targets(model, pixels)))
    assert loss == pytest.approx(squared.mean(), rel=1e-5)
    # Not the MAE pre-training loss (masked patches only): an error on the masked patches alone is diluted by the
    # error-free visible ones, an error on the visible ones alone counts.
    target_tensor = torch.from_numpy(targets).float()
    masked = outputs.mask.bool()[..., None]
    assert float(all_patch_loss(target_tensor + 2.0 * masked, target_tensor)) == pytest.approx(4.0 * 0.75)
    assert float(all_patch_loss(target_tensor + 2.0 * ~masked, target_tensor)) == pytest.approx(4.0 * 0.25)


def test_the_optimizer_that_runs_is_the_papers_sgd():
    model = make_tiny_model()
    torch.manual_seed(0)
    peft_model = add_lora(model, make_lora_config(model))
    views = ShotViews(torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), num_views=8, num_patches=16, seed=2)
    config = FinetuneConfig(num_steps=2, batch_size=4, use_cpu=True, bf16=False, disable_tqdm=True)
    optimizer = build_trainer(peft_model, model, views, config, "unused").create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.05 for p in group["params"]}
    assert {id(p) for p in trained} == decayed  # every LoRA matrix decays (no bias or LayerNorm is trained)
    assert all(group["lr"] == 1e-2 and group["momentum"] == 0.9 and not group["nesterov"] and group["dampening"] == 0
               for group in optimizer.param_groups)

    # Two steps against SGD written out: v <- 0.9 v + (g + 0.05 w); w <- w - 1e-2 v.
    expected = [p.detach().clone() for p in trained]
    velocity = [torch.zeros_like(p) for p in trained]
    reference_model = make_tiny_model()
    torch.manual_seed(0)
    reference = add_lora(reference_model, make_lora_config(reference_model))
    reference_params = [p for p in reference.parameters() if p.requires_grad]
    with mask_ratio_set_to(reference_model, config.mask_ratio):
        for step in range(2):
            batch = views.batch(range(step * 4, step * 4 + 4))
            loss = step_loss(reference, reference_model, views, batch, bf16=False)
            gradients = torch.autograd.grad(loss, reference_params)
            with torch.no_grad():
                for weight, own, gradient, v in zip(expected, reference_params, gradients, velocity):
                    v.mul_(0.9).add_(gradient + 0.05 * weight)
                    weight.sub_(1e-2 * v)
                    own.copy_(weight)
    with mask_ratio_set_to(model, config.mask_ratio):
        run_steps(peft_model, model, views, optimizer, 2, 4, cuda_graph=False)
    for weight, reference_weight in zip(trained, expected):
        torch.testing.assert_close(weight.detach(), reference_weight, rtol=1e-5, atol=1e-7)


def test_training_forwards_use_the_configured_mask_ratio(tiny_checkpoint, tmp_path, monkeypatch):
    from transformers.models.vit_mae import modeling_vit_mae

    seen = []
    original = modeling_vit_mae.ViTMAEEmbeddings.random_masking

    def recording(self, sequence, noise=None):
        seen.append((torch.is_grad_enabled(), self.config.mask_ratio))
        return original(self, sequence, noise)

    monkeypatch.setattr(modeling_vit_mae.ViTMAEEmbeddings, "random_masking", recording)
    Image.fromarray(np.full((40, 40, 3), 120, dtype=np.uint8)).save(tmp_path / "shot.png")
    config = FinetuneConfig(num_steps=3, batch_size=2, mask_ratio=0.5, use_cpu=True, bf16=False, disable_tqdm=True,
                            calibration_views_per_shot=1, calibration_num_masks=2)
    finetune(tiny_checkpoint, [tmp_path / "shot.png"], tmp_path / "out", config)
    training = [ratio for grad, ratio in seen if grad]
    assert training == [0.5] * 3  # one forward per step, at the recipe's ratio, not the checkpoint's 0.75
    assert {ratio for grad, ratio in seen if not grad} == {0.5}  # calibrated at it too (and recorded with it)


def test_views_span_the_crop_and_rotation_ranges():
    views = ShotViews(torch.zeros(1, 3, 16, 16), num_views=400, num_patches=4, seed=0)  # defaults: 0.75 and 15 deg
    transforms = torch.stack([views[index]["transform"] for index in range(len(views))])
    angles = np.degrees(np.arctan2(transforms[:, 1, 0], transforms[:, 0, 0]).numpy())
    area_shares = (transforms[:, 0, 0] ** 2 + transforms[:, 1, 0] ** 2).numpy()  # side scale squared
    assert angles.min() < -13 and angles.max() > 13 and np.abs(angles).max() <= 15 + 1e-4
    assert area_shares.min() < 0.77 and area_shares.max() > 0.98 and area_shares.min() >= 0.75 - 1e-6


def test_maps_come_back_at_the_input_size_by_bilinear_interpolation(tiny_checkpoint):
    detector = pipeline("anomaly-detection", model=tiny_checkpoint, device="cpu")
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    result = detector(image, num_masks=3, bf16=False)
    pixels = detector.image_processor(images=image, return_tensors="pt")["pixel_values"]
    at_model = maeday_anomaly_maps(detector.model, pixels, make_mask_noise(3, 16, 0.75, seed=0), 0.75, bf16=False)
    small = at_model["anomaly_map"][0].double().numpy()
    # Bilinear with half-pixel centres, written out: output pixel (y, x) samples (y + 0.5) * h / H - 0.5, clamped.
    def sample_positions(out_size, in_size):
        position = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
        low = np.floor(position).astype(int)
        return low, np.minimum(low + 1, in_size - 1), position - low

    (y0, y1, wy), (x0, x1, wx) = sample_positions(40, small.shape[0]), sample_positions(56, small.shape[1])
    rows = small[y0] * (1 - wy)[:, None] + small[y1] * wy[:, None]
    expected = rows[:, x0] * (1 - wx) + rows[:, x1] * wx
    np.testing.assert_allclose(result["anomaly_map"], expected, rtol=1e-5, atol=1e-7)
    assert result["score"] == pytest.approx(small.max(), rel=1e-6)  # the score is taken at model resolution


def test_patchcore_maps_are_bilinear_upsampling_then_a_sigma_4_gaussian():
    from maeday_hf.patchcore import PatchCore, PatchCoreConfig

    class GridOnly:  # anomaly_maps needs only the extractor's input size (and the config checks its settings)
        image_size, neighbourhood_size, layer_embedding_dim = (32, 32), 3, None

        def to(self, device):
            return self

    patchcore = PatchCore(PatchCoreConfig(backbone="unused", image_size=32, sigma=4.0), feature_extractor=GridOnly(),
                          device="cpu")
    patch_scores = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))
    maps = patchcore.anomaly_maps(patch_scores)[0].double().numpy()
    upsampled = F.interpolate(patch_scores[:, None].double(), size=(32, 32), mode="bilinear", align_corners=False)
    kernel_size = 2 * int(4 * 4.0 + 0.5) + 1  # scipy's truncation at 4 sigma, as the reference implementation
    expected = reference_gaussian_filter(upsampled[0, 0].numpy(), kernel_size=kernel_size, sigma=4.0)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)
    assert math.isclose(float(patchcore.anomaly_maps(torch.full((1, 4, 4), 2.0))[0].mean()), 2.0, rel_tol=1e-6)


@pytest.mark.parametrize("warmup_steps", [1, 2, 5])
def test_graph_loop_warm_up_steps_are_the_runs_own_first_steps(warmup_steps, monkeypatch):
    # The graph loop's bookkeeping, on the CPU: its first steps run eagerly, then each later step is one replay of the
    # captured step on its own batch, copied into the static inputs. A stand-in for the capture replays the step
    # eagerly, as the graph would run it; the run must equal the plain loop, no step repeated or skipped.
    from maeday_hf import step_loop

    replayed = []

    def capture_on_the_cpu(trained, reconstruction_model, views, optimizer, first_batch, bf16, device):
        static_batch = {key: value.clone() for key, value in first_batch.items()}
        static_loss = torch.zeros(())

        class Replay:
            def replay(self):
                optimizer.zero_grad(set_to_none=True)  # the graph's backward assigns its gradients
                loss = step_loss(trained, reconstruction_model, views, static_batch, bf16)
                loss.backward()
                optimizer.step()
                static_loss.copy_(loss.detach())
                replayed.append(static_batch["noise"].clone())

        return Replay(), static_batch, static_loss

    monkeypatch.setattr(step_loop, "_capture", capture_on_the_cpu)
    monkeypatch.setattr(step_loop, "_require_cuda", lambda device: None)
    views = ShotViews(torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), num_views=12, num_patches=16, seed=3)
    runs = []
    for cuda_graph in (False, True):
        model = make_tiny_model()
        torch.manual_seed(0)
        peft_model = add_lora(model, make_lora_config(model))
        optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9,
                                    weight_decay=0.05)
        with mask_ratio_set_to(model, 0.75):
            losses = run_steps(peft_model, model, views, optimizer, 3, 4, cuda_graph=cuda_graph,
                               warmup_steps=warmup_steps)
        runs.append((losses, [p.detach().clone() for p in peft_model.parameters() if p.requires_grad]))
    (eager_losses, eager_weights), (graph_losses, graph_weights) = runs
    assert graph_losses == eager_losses and len(set(eager_losses)) == 3
    for graph_weight, eager_weight in zip(graph_weights, eager_weights):
        torch.testing.assert_close(graph_weight, eager_weight, rtol=0, atol=0)
    # The replays took the batches of the steps after the eager ones, in order.
    expected = [views.batch(range(step * 4, step * 4 + 4))["noise"] for step in range(min(warmup_steps, 3), 3)]
    assert len(replayed) == len(expected) and all(torch.equal(a, b) for a, b in zip(replayed, expected))


def test_graph_replays_need_a_cuda_model():
    model = make_tiny_model()
    peft_model = add_lora(model, make_lora_config(model))
    views = ShotViews(torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), num_views=4, num_patches=16)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="cuda_graph=True replays CUDA graphs, but the model is on cpu"):
        run_steps(peft_model, model, views, optimizer, 1, 4, cuda_graph=True)
