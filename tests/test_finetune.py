"""Few-shot fine-tuning: the recipe's pieces, the trained adapter, and the folder it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTImageProcessor, ViTMAEForPreTraining

from maeday_hf.adapter_model import load_merged_model
from maeday_hf.finetune import (
    FinetuneConfig,
    all_patch_loss,
    build_trainer,
    finetune,
)
from maeday_hf.lora import add_lora, find_lora_target_modules, make_lora_config
from maeday_hf.masking import make_mask_noise
from maeday_hf.model_card import render_model_card
from maeday_hf.modeling import load_detector
from maeday_hf.reconstruction import mask_ratio_set_to, reconstruction_targets
from maeday_hf.scoring import maeday_anomaly_maps
from maeday_hf.shot_views import (
    CALIBRATION_VIEWS,
    ShotViews,
    crop_rotate_transform,
    random_crop_rotate,
    render_views,
    view_generator,
    view_source_scale,
)
from maeday_hf.synthetic import make_normal_image

from conftest import TINY_IMAGE_SIZE, make_tiny_model

# Few steps, small batches, a large learning rate: the tiny random model moves visibly in a second.
FAST = dict(num_steps=12, batch_size=8, learning_rate=0.2, disable_tqdm=True, use_cpu=True,
            calibration_views_per_shot=2, calibration_num_masks=4)


def _smooth_image(size: int = 40, phase: float = 0.0) -> Image.Image:
    x = np.linspace(0, 4 * np.pi, size)
    pattern = np.sin(x + phase)[None, :] * np.cos(x)[:, None]
    rgb = np.stack([pattern, pattern * 0.8, -pattern], axis=-1) * 0.4 + 0.5
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def shot_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shots") / "good_000.png"
    _smooth_image().save(path)
    return path


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, shot_path, tmp_path_factory):
    """One LoRA run (training mask ratio 0.5, so the saved config's 0.75 shows it is left unchanged)."""
    output_dir = tmp_path_factory.mktemp("runs") / "adapter"
    result = finetune(tiny_checkpoint, [shot_path], output_dir, FinetuneConfig(mask_ratio=0.5, **FAST))
    return result


def _pixel_values(checkpoint: str, image: Image.Image) -> torch.Tensor:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(checkpoint)(images=image, return_tensors="pt")["pixel_values"]


# --- the recipe's pieces ------------------------------------------------------------------------------------------


def test_lora_targets_every_weight_matrix_including_patch_embedding():
    model = make_tiny_model()
    targets = find_lora_target_modules(model)
    assert "vit.embeddings.patch_embeddings.projection" in targets
    assert "decoder.decoder_embed" in targets and "decoder.decoder_pred" in targets
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(linears) <= set(targets) and len(targets) == len(linears) + 1
    config = make_lora_config(model)
    assert (config.r, config.lora_alpha) == (32, 32)


def test_all_patch_loss_includes_visible_patches():
    model = make_tiny_model()
    pixel_values = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    noise = make_mask_noise(2, 16, seed=0)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, noise=noise)
    target = reconstruction_targets(model, pixel_values)
    loss = all_patch_loss(outputs.logits, target)
    visible = (outputs.mask[0] == 0).nonzero()[0, 0]
    logits = outputs.logits.clone()
    logits[0, visible] += 1.0
    assert all_patch_loss(logits, target) > loss + 1e-3
    # Not MAE's own loss, which only sees masked patches.
    assert not torch.isclose(loss, outputs.loss)


def test_one_process_on_several_gpus_keeps_the_effective_batch(tiny_checkpoint, monkeypatch):
    # Plain `python` on a 2-GPU machine: the Trainer's DataParallel multiplies the per-device batch by n_gpu.
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    model = ViTMAEForPreTraining.from_pretrained(tiny_checkpoint)
    views = ShotViews(torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), num_views=4, num_patches=16)
    trainer = build_trainer(model, model, views, FinetuneConfig(num_steps=1, batch_size=4, use_cpu=True), "unused")
    assert trainer.args.train_batch_size == 4
    with pytest.raises(ValueError, match="batch_size=3 does not split evenly over 2 devices"):
        build_trainer(model, model, views, FinetuneConfig(num_steps=1, batch_size=3, use_cpu=True), "unused")
    # The CUDA graph replays (the default on a GPU) take the whole batch on one GPU: nothing to split.
    import maeday_hf.finetune as finetune_module

    monkeypatch.setattr(finetune_module, "_runs_as_graph_replays", lambda args, config: True)
    trainer = build_trainer(model, model, views, FinetuneConfig(num_steps=1, batch_size=3, use_cpu=True), "unused")
    assert trainer.args.per_device_train_batch_size == 3


@pytest.mark.parametrize("norm_pix", [False, True])
def test_trainer_loss_is_the_all_patch_loss_in_the_scoring_space(norm_pix, tiny_checkpoint, tiny_norm_pix_checkpoint):
    model = ViTMAEForPreTraining.from_pretrained(tiny_norm_pix_checkpoint if norm_pix else tiny_checkpoint)
    views = ShotViews(torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), num_views=4, num_patches=16)
    trainer = build_trainer(model, model, views, FinetuneConfig(num_steps=1, batch_size=4, **{"use_cpu": True}),
                            "unused")
    batch = views.batch(range(4))
    pixel_values = views.render(batch)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        logits = model(pixel_values=pixel_values, noise=batch["noise"]).logits
    assert torch.allclose(loss, all_patch_loss(logits, reconstruction_targets(model, pixel_values)))


def test_views_repeat_the_shots_with_their_own_masks_and_augmentations():
    shots = torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    views = ShotViews(shots, num_views=8, num_patches=16, seed=5)
    first, again, fourth = views[0], views[0], views[3]  # views 0 and 3 are both shot 0
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert int(first["shot_index"]) == int(fourth["shot_index"]) == 0 and int(views[4]["shot_index"]) == 1
    assert not torch.equal(first["noise"], fourth["noise"])
    pixels = views.render(views.batch([0, 0, 3]))
    assert torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[0], pixels[2])
    plain = ShotViews(shots, num_views=8, num_patches=16, seed=5, augment=False)
    assert torch.equal(plain.render(plain.batch([3, 4]))[0], shots[0])
    assert torch.equal(plain.render(plain.batch([3, 4]))[1], shots[1])


@pytest.mark.parametrize("other_seed", [1, 2**32 - 1])
def test_every_seed_draws_its_own_views_and_masks(other_seed):
    # torch's CPU generator keeps 32 bits of a seed: views seeded seed * 2**32 + index were the same for every seed.
    shots = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    first, other = (ShotViews(shots, num_views=6, num_patches=16, seed=seed) for seed in (0, other_seed))
    for index in range(6):
        assert not torch.equal(first[index]["transform"], other[index]["transform"])
        assert not torch.equal(first[index]["noise"], other[index]["noise"])
    # Within a run, every view its own draw.
    transforms = torch.stack([first[index]["transform"] for index in range(6)])
    assert len(torch.unique(transforms.flatten(1), dim=0)) == 6


def test_calibration_views_are_not_the_training_views(monkeypatch):
    # The threshold comes from views the model was not trained on: with one shot, calibration views 1..3 used to be
    # training views 1..3 exactly.
    import maeday_hf.calibration
    from conftest import make_tiny_model

    drawn = []
    real = maeday_hf.calibration.random_crop_rotate

    def recording(image, generator, *args, **kwargs):
        drawn.append(generator.initial_seed())
        return real(image, generator, *args, **kwargs)

    monkeypatch.setattr(maeday_hf.calibration, "random_crop_rotate", recording)
    for seed in (0, 3):
        drawn.clear()
        maeday_hf.calibration.calibrate_threshold(make_tiny_model(), torch.randn(1, 3, 32, 32), num_views_per_shot=4,
                                                  num_masks=2, seed=seed)
        trained = ShotViews(torch.randn(1, 3, 32, 32), num_views=4, num_patches=16, seed=seed)
        assert len(drawn) == 3
        for index, calibration_seed in zip(range(1, 4), drawn):
            assert calibration_seed != view_generator(seed, index).initial_seed()
            assert not torch.equal(trained[index]["transform"], crop_rotate_transform(
                torch.Generator().manual_seed(calibration_seed), 32, 32, 0.75, 15.0))


def test_crop_rotate_keeps_shape_and_is_identity_without_crop_or_rotation():
    image = torch.randn(3, 16, 16)
    out = random_crop_rotate(image, view_generator(0, 0))
    assert out.shape == image.shape and out.dtype == image.dtype
    same = random_crop_rotate(image, view_generator(0, 0), min_crop_scale=1.0, max_rotation_degrees=0.0)
    assert torch.allclose(same, image, atol=1e-6)


# --- views cut from the shots at a larger size ----------------------------------------------------------------------


def _views_of(source: torch.Tensor, transforms: torch.Tensor, size=None) -> torch.Tensor:
    return render_views(source, torch.zeros(len(transforms), dtype=torch.long), transforms, size=size)


def test_views_cut_from_a_larger_source_match_crops_of_the_original_image():
    # What a view should be: the crop and rotation of the original image, resized by the processor as a query is.
    # Cut from the shot already resized to the model's input, each crop was upsampled: blurrier.
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    original = make_normal_image("weave", size=256, seed=0)
    transforms = torch.stack([crop_rotate_transform(view_generator(0, index), 32, 32) for index in range(8)])
    pixels = torch.from_numpy(np.asarray(original, dtype=np.float32)).permute(2, 0, 1)[None].expand(8, -1, -1, -1)
    grid = F.affine_grid(transforms, [8, 3, 256, 256], align_corners=False)
    warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    reference = processor(
        images=[Image.fromarray(view.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()) for view in warped],
        return_tensors="pt",
    )["pixel_values"]

    pixel_values = processor(images=original, return_tensors="pt")["pixel_values"]
    source = processor(images=original, size={"height": 96, "width": 96}, return_tensors="pt")["pixel_values"]
    from_source = _views_of(source, transforms, size=(32, 32))
    from_model_size = _views_of(pixel_values, transforms)
    assert from_source.shape == from_model_size.shape == (8, 3, 32, 32)
    error_from_source = (from_source - reference).abs().mean()
    error_from_model_size = (from_model_size - reference).abs().mean()
    assert error_from_source < 0.6 * error_from_model_size, (error_from_source, error_from_model_size)
    # Uncropped and unrotated, the view is the processed shot itself, up to the two resizes' difference.
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    assert (_views_of(source, identity, size=(32, 32)) - pixel_values).abs().max() < 0.02


def test_views_rendered_in_chunks_are_the_same(monkeypatch):
    import maeday_hf.shot_views

    shots = torch.randn(2, 3, 48, 40)
    transforms = torch.stack([crop_rotate_transform(view_generator(1, index), 16, 16) for index in range(5)])
    shot_index = torch.tensor([0, 1, 1, 0, 1])
    whole = render_views(shots, shot_index, transforms, size=(24, 20))
    # Two views at a time: each holds its gathered and resampled pixels (3 channels each) and its (x, y) grid.
    monkeypatch.setattr(maeday_hf.shot_views, "RENDER_CHUNK_BYTES", 2 * (2 * 3 + 2) * 48 * 40 * 4)
    calls = []
    real_interpolate = maeday_hf.shot_views.F.interpolate
    monkeypatch.setattr(maeday_hf.shot_views.F, "interpolate",
                        lambda images, *args, **kwargs: calls.append(len(images)) or real_interpolate(images, *args,
                                                                                                     **kwargs))
    chunked = render_views(shots, shot_index, transforms, size=(24, 20))
    assert calls == [2, 2, 1]
    assert whole.shape == (5, 3, 24, 20)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert not torch.allclose(whole[1], whole[2])  # (each view its own transform)


@pytest.mark.parametrize(
    "image_sizes, expected",
    [
        ([(1024, 1024)], 3.0),  # capped
        ([(1024, 1024), (64, 80)], 2.0),  # the smallest shot decides: none is enlarged for it
        ([(96, 64)], 2.0),  # and its shorter side, relative to the model's
        ([(16, 100)], 1.0),  # never below the model's own size
        ([(48, 48)], 1.5),
    ],
)
def test_view_source_scale(image_sizes, expected):
    assert view_source_scale(image_sizes, (32, 32), 3.0) == expected


def test_view_source_scale_reads_heights_against_the_models_height():
    assert view_source_scale([(96, 64)], (32, 16), 8.0) == 3.0  # min(96 / 32, 64 / 16); swapped: min(6, 2)


def test_shot_views_cut_augmented_views_from_the_source():
    pixel_values = torch.randn(2, 3, 16, 16)
    source = F.interpolate(pixel_values, size=(40, 40), mode="bilinear")
    views = ShotViews(pixel_values, num_views=6, num_patches=4, seed=2, source_pixel_values=source)
    plain = ShotViews(pixel_values, num_views=6, num_patches=4, seed=2)
    for index in range(6):  # the same crops, rotations and masks: only the pixels they are cut from differ
        assert all(torch.equal(views[index][key], plain[index][key]) for key in ("transform", "noise", "shot_index"))
    batch = views.batch(range(6))
    expected = render_views(source, batch["shot_index"], batch["transform"], size=(16, 16))
    assert torch.equal(views.render(batch), expected)
    assert not torch.allclose(views.render(batch), plain.render(batch))
    unaugmented = ShotViews(pixel_values, num_views=6, num_patches=4, augment=False, source_pixel_values=source)
    assert torch.equal(unaugmented.render(unaugmented.batch([0, 1])), pixel_values)  # the processed shots, as they are
    with pytest.raises(ValueError, match="source_pixel_values must hold the same shots"):
        ShotViews(pixel_values, num_views=6, num_patches=4, source_pixel_values=source[:1])
    with pytest.raises(ValueError, match="at least as large"):
        ShotViews(pixel_values, num_views=6, num_patches=4, source_pixel_values=source[..., :8, :])


def test_calibration_cuts_its_augmented_views_from_the_source(monkeypatch):
    import maeday_hf.calibration

    scored = []
    real = maeday_hf.calibration.maeday_anomaly_maps
    monkeypatch.setattr(maeday_hf.calibration, "maeday_anomaly_maps",
                        lambda model, views, *args, **kwargs: scored.append(views) or real(model, views, *args, **kwargs))
    pixel_values = torch.randn(1, 3, 32, 32)
    source = F.interpolate(pixel_values, size=(64, 64), mode="bilinear")
    maeday_hf.calibration.calibrate_threshold(
        make_tiny_model(), pixel_values, num_views_per_shot=3, num_masks=2, seed=4, source_pixel_values=source
    )
    views = scored[0]
    assert views.shape == (3, 3, 32, 32) and torch.equal(views[0], pixel_values[0])  # the shot itself, as processed
    for view_index in (1, 2):
        generator = view_generator(4, view_index, CALIBRATION_VIEWS)
        transform = crop_rotate_transform(generator, 32, 32)
        torch.testing.assert_close(views[view_index], _views_of(source, transform[None], size=(32, 32))[0])


def test_only_lora_parameters_change(tiny_checkpoint, tmp_path):
    model = ViTMAEForPreTraining.from_pretrained(tiny_checkpoint)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    num_targets = len(find_lora_target_modules(model))
    peft_model = add_lora(model, make_lora_config(model))
    views = ShotViews(torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), num_views=8, num_patches=16)
    config = FinetuneConfig(num_steps=2, batch_size=4, learning_rate=0.1, use_cpu=True, disable_tqdm=True)
    build_trainer(peft_model, model, views, config, tmp_path).train()
    changed_lora = 0
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            changed_lora += not torch.equal(param, torch.zeros_like(param)) and "lora_B" in name
            continue
        original = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(param, before[original]), f"{name} changed"
    assert changed_lora == num_targets


# --- the trained adapter ------------------------------------------------------------------------------------------


def test_loss_on_the_shots_goes_down(trained, tiny_checkpoint, shot_path):
    losses = [loss for _, loss in trained.losses]
    assert len(losses) == FAST["num_steps"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # Same views, same masks, before and after: the loss the run minimises went down.
    pixel_values = _pixel_values(tiny_checkpoint, Image.open(shot_path))
    views = ShotViews(pixel_values, num_views=16, num_patches=16, seed=123)
    batch = views.batch(range(16))
    pixel_values = views.render(batch)

    def fixed_view_loss(model):
        with torch.no_grad(), mask_ratio_set_to(model, 0.5):
            logits = model(pixel_values=pixel_values, noise=batch["noise"]).logits
            return float(all_patch_loss(logits, reconstruction_targets(model, pixel_values)))

    base = ViTMAEForPreTraining.from_pretrained(tiny_checkpoint).eval()
    assert fixed_view_loss(load_merged_model(trained.output_dir)) < fixed_view_loss(base)


def test_reconstruction_error_of_the_shot_goes_down(trained, tiny_checkpoint, shot_path):
    pixel_values = _pixel_values(tiny_checkpoint, Image.open(shot_path))
    noise = make_mask_noise(8, 16, seed=0)
    base = ViTMAEForPreTraining.from_pretrained(tiny_checkpoint).eval()
    before = maeday_anomaly_maps(base, pixel_values, noise, 0.75)["anomaly_map"].mean()
    after = maeday_anomaly_maps(load_merged_model(trained.output_dir), pixel_values, noise, 0.75)["anomaly_map"].mean()
    assert after < before


def test_merged_equals_adapted(trained, shot_path, tiny_checkpoint):
    pixel_values = _pixel_values(tiny_checkpoint, _smooth_image(phase=1.0))
    noise = make_mask_noise(4, 16, seed=1)
    adapted = load_merged_model(trained.output_dir, merge=False)
    merged = load_merged_model(trained.output_dir)
    assert type(merged) is ViTMAEForPreTraining
    expected = maeday_anomaly_maps(adapted, pixel_values, noise, 0.75, bf16=False)["anomaly_map"]
    actual = maeday_anomaly_maps(merged, pixel_values, noise, 0.75, bf16=False)["anomaly_map"]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_adapter_folder_layout_card_and_unchanged_config(trained, tiny_checkpoint, shot_path):
    out = trained.output_dir
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {
        "config.json", "preprocessor_config.json", "README.md", "calibration.json", "training_log.json",
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter_model.py",
        "pipeline.py", "masking.py", "reconstruction.py", "scoring.py", "images.py", "overlap.py", "preprocessing.py",
    } <= names
    assert not any(name.endswith(("model.safetensors",)) and "/" not in name for name in names)  # no full weights
    assert not list(out.parent.glob(".adapter.partial*"))
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(tiny_checkpoint)
    assert adapter_config["r"] == 32
    config = json.loads((out / "config.json").read_text())
    assert config["mask_ratio"] == 0.75  # trained at 0.5, saved config untouched
    assert config["anomaly_threshold"] == trained.calibration.threshold
    calibration = json.loads((out / "calibration.json").read_text())
    scores = np.array(calibration["scores"])  # the threshold: mean + 3 sample standard deviations, at least 1.01 x max
    assert calibration["threshold"] == pytest.approx(max(scores.mean() + 3 * scores.std(ddof=1), scores.max() * 1.01))
    card = (out / "README.md").read_text()
    assert f"- `{shot_path.name}`" in card and str(shot_path) not in card  # named, not by its local path
    assert f"{trained.losses[-1][1]:.6g}" in card
    # A local base is named, but is no Hub metadata (the Hub rejects a path there) and no huggingface.co link.
    metadata = card.split("---")[1]
    assert "library_name: transformers" in metadata and "- peft" in metadata and "base_model:" not in metadata
    assert "- custom_code" in metadata  # the Hub's tag for a repo loaded with trust_remote_code=True
    assert os.path.abspath(tiny_checkpoint) in card and "huggingface.co//" not in card


def test_the_cards_usage_snippet_runs(trained, tmp_path, monkeypatch):
    query = tmp_path / "query.png"
    _smooth_image(phase=0.5).save(query)
    card = (trained.output_dir / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0].replace('"query.png"', repr(str(query)))
    monkeypatch.chdir(trained.output_dir.parent)  # the card names the folder as it would be cloned: by its name
    namespace = {}
    exec(snippet, namespace)
    assert set(namespace["result"]) >= {"score", "anomaly_map", "label", "mask"}


def test_card_of_a_hub_base_names_and_links_it():
    card = render_model_card(
        name="org/bottle-1shot", base_model="facebook/vit-mae-base", shot_names=["a.png"], recipe={"lora_rank": 32},
        losses=[(1, 0.5)], calibration={"threshold": 1.0, "scores": [0.5], "num_std": 3.0, "num_masks": 32,
                                         "mask_ratio": 0.75}, full_finetune=False,
    )
    assert "base_model: facebook/vit-mae-base" in card.split("---")[1]
    assert "(https://huggingface.co/facebook/vit-mae-base)" in card
    local = render_model_card(
        name="org/bottle-1shot", base_model="facebook/vit-mae-base", shot_names=["/home/me/data/a.png", "b/c.png"],
        recipe={}, losses=[], calibration={"threshold": 1.0, "scores": [0.5], "num_std": 3.0, "num_masks": 32,
                                           "mask_ratio": 0.75}, full_finetune=False,
    )
    assert "- `a.png`" in local and "- `b/c.png`" in local and "/home/me" not in local  # no local paths shared


def test_shots_are_named_without_credentials_and_shared_without_the_way_out_of_their_folder():
    from maeday_hf.model_card import shareable_shot_name
    from maeday_hf.shot_views import _shot_name

    assert _shot_name("https://alice:s3cret@host/a/b.png?token=x#y", 0) == "https://host/a/b.png"
    assert _shot_name("data/a.png", 0) == "data/a.png" and _shot_name(np.zeros((2, 2)), 3) == "<image 3>"
    for given, shared in (("/home/alice/acme/a.png", "a.png"), ("../../home/alice/acme/a.png", "a.png"),
                          ("data/../../acme/a.png", "a.png"), ("data/good/a.png", "data/good/a.png"),
                          ("https://host/a/b.png", "https://host/a/b.png"), ("train[3] (shot seed 1)", "train[3] (shot seed 1)")):
        assert shareable_shot_name(given) == shared, given


# --- loading back -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 3])
def test_calibration_scores_are_the_loaded_detectors_scores_of_the_shots(tiny_checkpoint, shot_path, tmp_path, seed):
    # The run seed picks the views; the calibration scores with the masks the detector draws by default, so each shot
    # scores as calibrated, whatever the seed (and none lies above the threshold).
    result, scores = _two_shot_run_and_detector_scores(tiny_checkpoint, shot_path, tmp_path, phase=2.0,
                                                       calibration_views_per_shot=1, seed=seed)
    assert scores[result.calibration.precision == "bfloat16"] == pytest.approx(result.calibration.scores, rel=1e-5)
    assert max(scores[False] + scores[True]) < result.calibration.threshold


def _two_shot_run_and_detector_scores(tiny_checkpoint, shot_path, tmp_path, phase: float, **config):
    """A 2-step run on `shot_path` and a second shot, and the loaded detector's scores of both at the calibration's N,
    in float32 (key False) and in bf16 (key True)."""
    second = tmp_path / "second.png"
    _smooth_image(phase=phase).save(second)
    result = finetune(tiny_checkpoint, [shot_path, second], tmp_path / "out",
                      FinetuneConfig(**{**FAST, "num_steps": 2, **config}))
    detector = load_detector(result.output_dir, device="cpu")
    scores = {
        bf16: [detector(str(shot), num_masks=FAST["calibration_num_masks"], bf16=bf16)["score"]
               for shot in (shot_path, second)]
        for bf16 in (False, True)
    }
    return result, scores


def _run_python(code: str, env: dict[str, str]) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.strip().splitlines()[-1]


def _lay_into_hub_cache(folder, cache, repo_id, commit, ref="main", edit=None):
    """`folder` as the Hub cache holds a snapshot of `repo_id` at `commit`, named by `ref`; `edit(snapshot)` after."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for path in folder.rglob("*"):
        if path.is_file():
            target = snapshot / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    if edit is not None:
        edit(snapshot)


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_revision_and_cache_dir_reach_the_adapters_own_files(trained, tmp_path):
    from maeday_hf.adapter_model import BaseModelNotFoundError

    cache = tmp_path / "cache"
    _lay_into_hub_cache(trained.output_dir, cache, "maeday-test/adapter", "a" * 40)
    _lay_into_hub_cache(trained.output_dir, cache, "maeday-test/adapter", "b" * 40, ref="v1",
                        edit=lambda snapshot: _edit_json(snapshot / "config.json", anomaly_threshold=123.0))
    hub = dict(device="cpu", model_kwargs={"cache_dir": str(cache)})
    calibrated = json.loads((trained.output_dir / "calibration.json").read_text())["threshold"]
    assert load_detector("maeday-test/adapter", **hub)._postprocess_params["threshold"] == pytest.approx(calibrated)
    assert load_detector("maeday-test/adapter", revision="v1", **hub)._postprocess_params["threshold"] == 123.0
    # An adapter whose base is not to be had: the error names the base, not the adapter that did load.
    _lay_into_hub_cache(trained.output_dir, cache, "maeday-test/orphan", "c" * 40, edit=lambda snapshot: _edit_json(
        snapshot / "adapter" / "adapter_config.json", base_model_name_or_path="maeday-test/missing-base"))
    with pytest.raises(BaseModelNotFoundError, match="base model 'maeday-test/missing-base' of the adapter"):
        load_detector("maeday-test/orphan", **hub)


def test_a_local_base_named_by_its_hub_id_loads_by_that_id_and_only_with_its_weights(
    tiny_checkpoint, shot_path, tmp_path
):
    # Fine-tuned from a local copy of a Hub checkpoint (an offline site): the adapter names the Hub id, so a pushed
    # adapter loads wherever that id can be had, not only where the copy's path exists.
    from huggingface_hub import ModelCard

    from conftest import save_tiny_checkpoint

    result = finetune(tiny_checkpoint, [shot_path], tmp_path / "run", FinetuneConfig(**{**FAST, "num_steps": 2}),
                      base_model_id="maeday-test/tiny-base")
    adapter_config = json.loads((result.output_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "maeday-test/tiny-base"
    log = json.loads((result.output_dir / "training_log.json").read_text())
    assert (log["base_model"], log["base_model_folder"]) == ("maeday-test/tiny-base", os.path.abspath(tiny_checkpoint))
    assert ModelCard.load(result.output_dir / "README.md").data.base_model == "maeday-test/tiny-base"
    cache = tmp_path / "cache"
    _lay_into_hub_cache(Path(tiny_checkpoint), cache, "maeday-test/tiny-base", "d" * 40)
    query = _smooth_image(phase=0.5)
    by_id = load_detector(result.output_dir, device="cpu", model_kwargs={"cache_dir": str(cache)})
    by_folder = load_detector(result.output_dir, device="cpu", base_model=tiny_checkpoint)
    assert by_id(query, num_masks=4)["score"] == by_folder(query, num_masks=4)["score"]
    # Under that id, other weights than the copy's: refused, as for any adapter whose base changed.
    other = tmp_path / "other-cache"
    _lay_into_hub_cache(Path(save_tiny_checkpoint(tmp_path / "seed-1", seed=1)), other, "maeday-test/tiny-base",
                        "e" * 40)
    with pytest.raises(ValueError, match="does not hold the weights the adapter"):
        load_detector(result.output_dir, device="cpu", model_kwargs={"cache_dir": str(other)})


def test_a_base_model_id_whose_cached_weights_differ_is_warned_about_before_training(
    tiny_checkpoint, shot_path, tmp_path, monkeypatch, caplog
):
    # The cached copy of the id is what a load would use here: other weights would fail the adapter only then.
    import huggingface_hub.constants

    from conftest import save_tiny_checkpoint

    cache = tmp_path / "cache"
    _lay_into_hub_cache(Path(tiny_checkpoint), cache, "maeday-test/same", "a" * 40)
    _lay_into_hub_cache(Path(save_tiny_checkpoint(tmp_path / "seed-1", seed=1)), cache, "maeday-test/other", "b" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    config = FinetuneConfig(**{**FAST, "num_steps": 1})

    def warnings_for(base_model_id):
        caplog.clear()
        finetune(tiny_checkpoint, [shot_path], tmp_path / base_model_id.replace("/", "-"), config,
                 base_model_id=base_model_id)
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "base_model_id=" in r.getMessage()]

    (warning,) = warnings_for("maeday-test/other")
    assert "holds other weights than" in warning and tiny_checkpoint in warning
    assert warnings_for("maeday-test/same") == []
    assert warnings_for("maeday-test/not-cached") == []  # nothing to compare with, and nothing downloaded


def test_save_load_by_path_repo_id_and_remote_code_give_identical_scores(trained, tmp_path):
    query = tmp_path / "query.png"
    _smooth_image(phase=0.5).save(query)
    detector = load_detector(trained.output_dir, device="cpu")
    calibrated_at = json.loads((trained.output_dir / "calibration.json").read_text())
    calibrated_call = dict(num_masks=calibrated_at["num_masks"], mask_ratio=calibrated_at["mask_ratio"])
    # The calibrated threshold is the default at the settings it was calibrated with, and only there.
    assert detector(str(query), **calibrated_call)["label"] in ("normal", "anomalous")
    result = detector(str(query), num_masks=3)
    assert "label" not in result
    assert detector(str(query), num_masks=3, threshold=-1.0)["label"] == "anomalous"
    assert "label" not in detector(str(query), threshold=None, **calibrated_call)  # labelling turned off
    assert "label" not in detector(str(query), mask_schedule="balanced", **calibrated_call)  # calibrated on random
    assert "label" not in load_detector(trained.output_dir, device="cpu", threshold=None)(str(query), **calibrated_call)

    # The folder as the Hub cache holds a pushed repo; offline, the repo id resolves to it.
    commit = "0123456789abcdef" * 2 + "0" * 8
    _lay_into_hub_cache(trained.output_dir, tmp_path / "hub", "maeday-test/tiny-adapter", commit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    scores = _run_python(
        f"""
        import json
        from maeday_hf.modeling import load_detector
        detector = load_detector("maeday-test/tiny-adapter", device="cpu")
        print(json.dumps([detector({str(query)!r}, num_masks=3)["score"]]))
        """,
        env,
    )
    remote = _run_python(
        f"""
        import json, sys
        sys.modules["maeday_hf"] = None  # `import maeday_hf` fails from here on
        from transformers import pipeline
        scores = []
        for model in ({str(trained.output_dir)!r}, "maeday-test/tiny-adapter"):
            detector = pipeline("anomaly-detection", model=model, trust_remote_code=True)
            assert "maeday_hf" not in type(detector).__module__
            assert type(detector.model).__name__ == "ViTMAEForPreTraining"
            calibrated = detector({str(query)!r}, **{calibrated_call!r})
            assert "label" in calibrated and "mask" in calibrated  # the calibrated threshold is the default
            scores.append(detector({str(query)!r}, num_masks=3)["score"])
        print(json.dumps(scores))
        """,
        env,
    )
    assert json.loads(scores) == [result["score"]]
    assert json.loads(remote) == pytest.approx([result["score"]] * 2, rel=1e-6)


def test_adapter_on_a_base_that_does_not_match_is_refused(trained, tmp_path):
    from conftest import save_tiny_checkpoint

    other = save_tiny_checkpoint(tmp_path / "other", hidden_size=32)
    with pytest.raises(ValueError, match="hidden_size"):
        load_detector(trained.output_dir, device="cpu", base_model=other)
    # The right base given explicitly works (e.g. a local copy).
    assert load_detector(trained.output_dir, device="cpu", base_model=json.loads(
        (trained.output_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"])


def test_an_adapter_whose_local_base_moved_is_loaded_with_base_model(trained, tiny_checkpoint, shot_path, tmp_path,
                                                                      capsys):
    import shutil

    from maeday_hf.cli import main

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    adapter = tmp_path / "adapter-copy"
    shutil.copytree(trained.output_dir, adapter)
    _edit_json(adapter / "adapter" / "adapter_config.json", base_model_name_or_path=str(tmp_path / "moved-away"))
    common = ["detect", str(shot_path), "--model", str(adapter), "--num-masks", "2", "--quiet", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "moved-away" in err and "--base-model" in err and "hf download" not in err, err  # a folder, not a Hub id
    assert "no such folder" in err and "Repo id" not in err, err
    assert main([*common, "--out", str(tmp_path / "c"), "--base-model", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert "typo" in err and "no such folder" in err and "Check the base given" in err and "Repo id" not in err, err
    assert main([*common, "--out", str(tmp_path / "b"), "--base-model", str(base)]) == 0
    expected = load_detector(trained.output_dir, device="cpu")(str(shot_path), num_masks=2)["score"]
    score = float((tmp_path / "b" / "scores.csv").read_text().splitlines()[1].split(",")[1])
    assert score == pytest.approx(expected, rel=1e-5)


def test_a_damaged_base_is_one_error_before_training(tiny_checkpoint, shot_path, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(OSError, match="damaged or incomplete"):
        finetune(base, [shot_path], tmp_path / "out", FinetuneConfig(**FAST))
    assert not (tmp_path / "out").exists()


def test_without_augmentation_the_calibration_scores_the_shots_as_they_are(tiny_checkpoint, shot_path, tmp_path):
    result, scores = _two_shot_run_and_detector_scores(tiny_checkpoint, shot_path, tmp_path, phase=1.0,
                                                       calibration_views_per_shot=4, augment=False)
    # One view per shot: no crop, no rotation.
    assert scores[result.calibration.precision == "bfloat16"] == pytest.approx(result.calibration.scores, rel=1e-5)
    recorded = json.loads((result.output_dir / "calibration.json").read_text())
    assert recorded["augmented"] is False and recorded["num_views_per_shot"] == 1
    assert "each shot as is: the fine-tune used no augmentation" in (result.output_dir / "README.md").read_text()


def test_an_adapter_whose_named_base_holds_other_weights_is_refused(trained, tmp_path, shot_path, capsys, caplog):
    # Same geometry, other weights: the LoRA update and the calibrated threshold belong to the base it was trained on.
    import logging
    import shutil

    from conftest import save_tiny_checkpoint
    from maeday_hf.cli import main

    other = save_tiny_checkpoint(tmp_path / "other", seed=7)
    moved = tmp_path / "adapter-on-other"  # the base it names now holds another checkpoint
    shutil.copytree(trained.output_dir, moved)
    _edit_json(moved / "adapter" / "adapter_config.json", base_model_name_or_path=other)
    with pytest.raises(ValueError, match=r"does not hold the weights .* trained on"):
        load_detector(moved, device="cpu")
    common = ["detect", str(shot_path), "--num-masks", "2", "--quiet", "--device", "cpu"]
    capsys.readouterr()  # (saving the other base drew a progress bar)
    assert main([*common, "--model", str(moved), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fingerprint" in err and "--base-model" in err
    assert not (tmp_path / "o").exists()
    # Chosen explicitly, another base loads, with a warning that names both fingerprints.
    with caplog.at_level(logging.WARNING, logger="maeday_hf"):
        assert load_detector(trained.output_dir, device="cpu", base_model=other)
    assert "holds other weights" in caplog.text
    # A folder written before the fingerprint was recorded loads as it did, warning about nothing.
    older = tmp_path / "older"
    shutil.copytree(moved, older)
    config = json.loads((older / "config.json").read_text())
    config["maeday_adapter"].pop("base_fingerprint")
    (older / "config.json").write_text(json.dumps(config))
    caplog.clear()
    assert load_detector(older, device="cpu")
    assert "holds other weights" not in caplog.text


def _encoder_only_checkpoint(folder, tiny_checkpoint, **save_kwargs):
    """What ViTMAEModel.save_pretrained writes (model_type 'vit_mae' too, no decoder), with the tiny processor."""
    from transformers import ViTMAEModel

    ViTMAEModel.from_pretrained(tiny_checkpoint).save_pretrained(folder, **save_kwargs)
    shutil.copy(os.path.join(tiny_checkpoint, "preprocessor_config.json"), folder)
    return str(folder)


def test_a_base_without_its_decoder_is_refused_before_training(tiny_checkpoint, shot_path, tmp_path):
    # It loaded with a random decoder (transformers only logs that), trained, and its adapter then never loaded.
    from safetensors.torch import load_file, save_file

    encoder_only = _encoder_only_checkpoint(tmp_path / "encoder-only", tiny_checkpoint)
    with pytest.raises(ValueError, match="has no decoder weights .* ViTMAEForPreTraining checkpoint with its decoder"):
        finetune(encoder_only, [shot_path], tmp_path / "out", FinetuneConfig(**{**FAST, "num_steps": 1}))
    # Part of the weights missing (a damaged conversion, a partial copy): named too.
    partial = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, partial)
    weights = load_file(partial / "model.safetensors")
    kept = {key: value for key, value in weights.items() if "decoder_pred" not in key}
    save_file(kept, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 2 of the model's weights: decoder\.decoder_pred\.bias"):
        finetune(str(partial), [shot_path], tmp_path / "out", FinetuneConfig(**{**FAST, "num_steps": 1}))
    assert not (tmp_path / "out").exists()


def test_an_adapter_on_a_base_without_its_decoder_is_refused(trained, tiny_checkpoint, tmp_path):
    encoder_only = _encoder_only_checkpoint(tmp_path / "encoder-only", tiny_checkpoint)
    with pytest.raises(ValueError, match="has no decoder weights"):
        load_detector(trained.output_dir, device="cpu", base_model=encoder_only)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_checkpoint_without_its_decoder_is_refused_by_the_pipeline_and_the_cli(tiny_checkpoint, shot_path, tmp_path,
                                                                                 capsys, sharded):
    from transformers import pipeline

    from maeday_hf.cli import main

    encoder_only = _encoder_only_checkpoint(tmp_path / "encoder-only", tiny_checkpoint,
                                            **({"max_shard_size": "10KB"} if sharded else {}))
    assert os.path.isfile(os.path.join(encoder_only, "model.safetensors.index.json")) == sharded
    with pytest.raises(ValueError, match="has no decoder weights"):
        pipeline("anomaly-detection", model=encoder_only)
    with pytest.raises(ValueError, match="has no decoder weights"):
        load_detector(encoder_only, device="cpu")
    capsys.readouterr()
    assert main(["detect", str(shot_path), "--model", encoder_only, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has no decoder weights" in err
    assert pipeline("anomaly-detection", model=tiny_checkpoint)  # (a whole checkpoint passes, of course)


def test_a_local_folder_without_its_decoder_is_refused_before_transformers_reports_its_load(tiny_checkpoint, shot_path,
                                                                                             tmp_path):
    # At transformers' default verbosity its load report lists every missing decoder weight (some 30 lines) before
    # the one-line error; the folder is checked before it is loaded, as a Hub checkpoint is. (A process of its own:
    # transformers' log handler writes past pytest's capture.)
    encoder_only = _encoder_only_checkpoint(tmp_path / "encoder-only", tiny_checkpoint)
    env = {key: value for key, value in os.environ.items() if key != "TRANSFORMERS_VERBOSITY"}
    completed = subprocess.run(
        [sys.executable, "-m", "maeday_hf", "detect", str(shot_path), "--model", encoder_only, "--out",
         str(tmp_path / "o"), "--quiet"], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=180,
    )
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1 and "has no decoder weights" in completed.stderr, (
        completed.stderr[-2000:])
    completed = subprocess.run(  # (maeday finetune too)
        [sys.executable, "-m", "maeday_hf", "finetune", "--model", encoder_only, "--shots", str(shot_path),
         "--output-dir", str(tmp_path / "adapter"), "--quiet"], env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1 and "has no decoder weights" in completed.stderr, (
        completed.stderr[-2000:])


def test_the_decoder_is_checked_at_the_revision_and_in_the_cache_that_are_loaded(tiny_checkpoint, shot_path, tmp_path):
    from pathlib import Path

    encoder_only = Path(_encoder_only_checkpoint(tmp_path / "encoder-only", tiny_checkpoint))
    cache = tmp_path / "cache"
    _lay_into_hub_cache(encoder_only, cache, "org/fixed-in-v1", "a" * 40)
    _lay_into_hub_cache(Path(tiny_checkpoint), cache, "org/fixed-in-v1", "b" * 40, ref="v1")
    _lay_into_hub_cache(Path(tiny_checkpoint), cache, "org/broken-in-v1", "c" * 40)
    _lay_into_hub_cache(encoder_only, cache, "org/broken-in-v1", "d" * 40, ref="v1")
    hub = dict(device="cpu", model_kwargs={"cache_dir": str(cache)})
    assert load_detector("org/fixed-in-v1", revision="v1", **hub)(str(shot_path), num_masks=2)["score"] > 0
    assert load_detector("org/broken-in-v1", **hub)(str(shot_path), num_masks=2)["score"] > 0
    for repo_id, revision in (("org/fixed-in-v1", None), ("org/broken-in-v1", "v1")):
        with pytest.raises(ValueError, match=f"'{repo_id}' has no decoder weights"):
            load_detector(repo_id, revision=revision, **hub)


def test_a_checkpoint_in_transformers_4_naming_loads_whole(tiny_checkpoint, shot_path, tmp_path):
    # facebook/vit-mae-base is stored with transformers 4's names (vit.encoder.layer.N.attention.attention.query ...),
    # which transformers 5 renames at load: the weight checks must see every weight loaded, not refuse the default.
    import re

    from safetensors.torch import load_file, save_file

    def old_name(name):
        name = name.replace("vit.layers.", "vit.encoder.layer.").replace("attention.o_proj", "attention.output.dense")
        name = re.sub(r"attention\.([qkv])_proj",
                      lambda found: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[found[1]], name)
        return name.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_checkpoint, legacy)
    weights = load_file(legacy / "model.safetensors")
    renamed = {old_name(name): tensor for name, tensor in weights.items()}
    assert "vit.encoder.layer.0.attention.attention.query.weight" in renamed and len(renamed) == len(weights)
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    image = Image.open(shot_path)
    assert load_detector(legacy, device="cpu")(image, num_masks=2)["score"] == (
        load_detector(tiny_checkpoint, device="cpu")(image, num_masks=2)["score"])
    finetune(str(legacy), [shot_path], tmp_path / "out", FinetuneConfig(**{**FAST, "num_steps": 1}))
    assert load_detector(tmp_path / "out", device="cpu")(image, num_masks=2)["score"] > 0


def test_a_half_precision_copy_of_the_base_given_explicitly_loads_with_a_warning(trained, tiny_checkpoint, shot_path,
                                                                                  tmp_path, caplog):
    import logging

    half = tmp_path / "half"
    ViTMAEForPreTraining.from_pretrained(tiny_checkpoint).to(torch.bfloat16).save_pretrained(half)
    with caplog.at_level(logging.WARNING, logger="maeday_hf"):
        detector = load_detector(trained.output_dir, device="cpu", base_model=str(half))
    assert "holds other weights" in caplog.text
    expected = load_detector(trained.output_dir, device="cpu")(str(shot_path), num_masks=2, seed=0)["score"]
    assert detector(str(shot_path), num_masks=2, seed=0)["score"] == pytest.approx(expected, rel=0.05)


def test_the_base_fingerprint_reads_the_weights_not_where_they_load_from(tmp_path):
    from maeday_hf.adapter_model import base_weights_fingerprint

    model = make_tiny_model(seed=0)
    copy = tmp_path / "copy"
    model.save_pretrained(copy)
    reloaded = ViTMAEForPreTraining.from_pretrained(copy)
    assert base_weights_fingerprint(reloaded) == base_weights_fingerprint(model)
    with torch.no_grad():
        model.vit.layers[0].attention.q_proj.weight[0, 0] += 1e-3  # sample 0 is value 0
    assert base_weights_fingerprint(reloaded) != base_weights_fingerprint(model)
    # The sample reads every column of a matrix whose size is a multiple of the sample count (an even spacing would
    # read one column of this one).
    wide = torch.nn.Linear(64, 4096 * 2, bias=False)
    before = base_weights_fingerprint(wide)
    with torch.no_grad():
        wide.weight[:, 1:] += 1.0  # every column but the first
    assert base_weights_fingerprint(wide) != before


def test_wrapping_with_peft_prints_no_library_deprecation(trained, tiny_checkpoint):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ViTMAEForPreTraining.from_pretrained(tiny_checkpoint)
        add_lora(model, make_lora_config(model, 4))
        load_merged_model(trained.output_dir)
    assert not [warning for warning in caught if "is_gradient_checkpointing" in str(warning.message)]


def test_the_weights_are_as_readable_as_the_rest_of_the_run(trained):
    import stat

    expected = stat.S_IMODE(os.stat(trained.output_dir / "config.json").st_mode)  # open()'s: the umask's
    weights = trained.output_dir / "adapter" / "adapter_model.safetensors"
    assert stat.S_IMODE(os.stat(weights).st_mode) == expected
