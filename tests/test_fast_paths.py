"""The speed paths change no result: device-side normalisation, the overlapped GPU loop (run here on the CPU), the bf16
weight copy, batched view rendering and the Trainer-free step loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from transformers import ViTImageProcessor, pipeline
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from conftest import TINY_IMAGE_SIZE, make_tiny_model
from maeday_hf.finetune import FinetuneConfig, build_trainer, logged_losses, trains_in_bf16
from maeday_hf.lora import add_lora, make_lora_config
from maeday_hf.masking import make_mask_noise
from maeday_hf.overlap import batched, prefetch
from maeday_hf.images import load_rgb_image
from maeday_hf.pipeline import default_gpu_batch_size
from maeday_hf.preprocessing import DeviceNormalization, ProcessorResize
from maeday_hf import reconstruction
from maeday_hf.reconstruction import bfloat16_copy, mask_ratio_set_to, predict_patches, runs_bfloat16_natively
from maeday_hf.shot_views import ShotViews, crop_rotate_transform, render_views, view_generator
from maeday_hf.step_loop import run_steps


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    sizes = [(40, 56), (32, 32), (77, 23), (64, 64), (33, 90)]
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in sizes]


# --- preprocessing ------------------------------------------------------------------------------------------------


def test_device_normalisation_equals_the_image_processor(images):
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    normalise = DeviceNormalization.from_processor(processor)
    assert normalise is not None
    for image in images:
        expected = processor(images=image, return_tensors="pt")["pixel_values"]
        pixels = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        assert pixels.dtype == torch.uint8
        torch.testing.assert_close(normalise(pixels), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resample", list(Image.Resampling))
def test_direct_resize_gives_the_processors_exact_pixels(resample):
    processor = ViTImageProcessorPil(size={"height": 32, "width": 48}, resample=resample)
    resize = ProcessorResize.from_processor(processor)
    assert resize is not None
    rng = np.random.default_rng(int(resample))
    for height, width in ((1, 1), (32, 48), (31, 200), (300, 17), (1024, 1024), (5, 7)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        assert torch.equal(resize(image), expected), (height, width)


def test_direct_resize_only_where_the_processor_does_nothing_else():
    assert ProcessorResize.from_processor(ViTImageProcessorPil(do_resize=False)) is None
    assert ProcessorResize.from_processor(ViTImageProcessorPil(size={"shortest_edge": 32})) is None

    class CroppingProcessor(ViTImageProcessorPil):  # a processor that crops after the resize
        do_center_crop = True
        crop_size = {"height": 16, "width": 16}

    cropping = CroppingProcessor()
    assert cropping(images=Image.new("RGB", (40, 40)), return_tensors="pt")["pixel_values"].shape[-1] == 16  # it runs
    assert ProcessorResize.from_processor(cropping) is None

    class OtherResampling(ViTImageProcessorPil):  # e.g. another backend: probed, found different, not used
        def __call__(self, *args, **kwargs):
            outputs = super().__call__(*args, **kwargs)
            outputs["pixel_values"] = outputs["pixel_values"] // 2
            return outputs

    assert ProcessorResize.from_processor(OtherResampling()) is None


def test_pipeline_preprocessing_gives_the_processors_pixels_also_after_the_processor_changes(tiny_checkpoint, images):
    # The PIL processor named (with torchvision installed, AutoImageProcessor gives the torchvision one, whose resize
    # has no shortcut: it runs whole).
    processor = ViTImageProcessorPil.from_pretrained(tiny_checkpoint)
    detector = pipeline("anomaly-detection", model=tiny_checkpoint, image_processor=processor, device="cpu")

    def check():
        normalization, resize = detector._shortcuts(processor)
        assert normalization is not None and resize is not None
        for image in images:
            expected = processor(images=image, return_tensors="pt")["pixel_values"]
            pixels = detector.preprocess(image)["pixels"]
            assert pixels.dtype == torch.uint8
            torch.testing.assert_close(normalization(pixels), expected, rtol=0, atol=1e-6)

    check()
    processor.size = {"height": 48, "width": 48}  # edited after the pipeline was made: followed
    processor.resample = Image.Resampling.BICUBIC
    processor.image_mean = [0.1, 0.2, 0.3]
    check()
    assert detector.preprocess(images[0])["pixels"].shape[-2:] == (48, 48)


def test_items_preprocessed_before_and_after_a_processor_edit_are_each_finished_as_started(tiny_checkpoint, images):
    # On a GPU, threads preprocess ahead of the model: an edit can fall between two items of one batch.
    detector = pipeline("anomaly-detection", model=tiny_checkpoint, device="cpu")
    processor = detector.image_processor
    before = detector.preprocess(images[0])
    expected_before = processor(images=images[0], return_tensors="pt")["pixel_values"]
    processor.image_mean, processor.image_std = [0.9, 0.1, 0.4], [0.3, 0.6, 0.2]
    after = detector.preprocess(images[1])
    expected_after = processor(images=images[1], return_tensors="pt")["pixel_values"]
    batch = {key: torch.cat([before[key], after[key]]) for key in before}
    reference = {"pixel_values": torch.cat([expected_before, expected_after]), "original_size": batch["original_size"]}
    ours, theirs = detector._forward(batch, num_masks=2), detector._forward(reference, num_masks=2)
    torch.testing.assert_close(ours["anomaly_map"], theirs["anomaly_map"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours["anomaly_map"][0], ours["anomaly_map"][1])


def test_upright_rgb_images_are_not_copied_and_exif_orientation_is_applied(tmp_path, images):
    assert load_rgb_image(images[0]) is images[0]
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored rotated: shown turned 90 degrees clockwise
    images[0].save(path, exif=exif)
    loaded = load_rgb_image(path)
    assert loaded.size == images[0].size[::-1]
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(images[0].transpose(Image.Transpose.ROTATE_270)))
    with Image.open(path) as lazy:
        assert load_rgb_image(lazy) is not lazy and load_rgb_image(lazy).size == images[0].size[::-1]
    gray = images[0].convert("L")
    assert load_rgb_image(gray).mode == "RGB" and gray.mode == "L"


def test_unknown_processors_run_whole_on_the_cpu_with_the_same_result(tiny_checkpoint, images):
    class PlainProcessor(ViTImageProcessorPil):  # steps this package does not know: no device normalisation
        pass

    processor = PlainProcessor.from_pretrained(tiny_checkpoint)
    assert DeviceNormalization.from_processor(processor) is None
    plain = pipeline("anomaly-detection", model=tiny_checkpoint, image_processor=processor, device="cpu")
    detector = pipeline("anomaly-detection", model=tiny_checkpoint, device="cpu",
                        image_processor=ViTImageProcessorPil.from_pretrained(tiny_checkpoint))  # same resampling
    assert "pixel_values" in plain.preprocess(images[0]) and "pixels" in detector.preprocess(images[0])
    for ours, theirs in zip(detector(images, num_masks=3), plain(images, num_masks=3)):
        np.testing.assert_allclose(ours["anomaly_map"], theirs["anomaly_map"], rtol=1e-5, atol=1e-7)


def test_gpu_default_batch_fills_about_1024_pairs_whatever_the_number_of_masks():
    assert [default_gpu_batch_size(n) for n in (32, 4, 1, 2048, 3)] == [32, 256, 1024, 1, 341]
    assert default_gpu_batch_size("many") == 32 == default_gpu_batch_size(0)  # reported later, by the checks


# --- the overlapped loop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_threads", [0, 2, 3])
def test_prefetch_keeps_order_and_raises_at_the_failing_item(num_threads):
    assert list(prefetch(range(20), lambda x: x * x, num_threads, lookahead=4)) == [x * x for x in range(20)]
    assert [len(batch) for batch in batched(range(7), 3)] == [3, 3, 1]

    def fails_at_five(x):
        if x == 5:
            raise ValueError("item 5")
        return x

    seen = []
    with pytest.raises(ValueError, match="item 5"):
        for value in prefetch(range(10), fails_at_five, num_threads, lookahead=3):
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_threads", [0, 2])
@pytest.mark.parametrize("lookahead", [1, 4, 8])
def test_prefetch_raises_a_failing_source_after_the_items_before_it(num_threads, lookahead):
    def source():
        yield from range(5)
        raise OSError("cannot decode item 5")

    seen = []
    with pytest.raises(OSError, match="item 5"):
        for value in prefetch(source(), lambda x: -x, num_threads, lookahead=lookahead):
            seen.append(value)
    assert seen == [0, -1, -2, -3, -4]


@pytest.mark.parametrize("batch_size", [0, -2, 1.5])
def test_batched_refuses_a_batch_size_that_is_not_positive(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(batched(range(3), batch_size))


def test_gpu_call_defaults_and_an_explicit_zero_workers(detector, images, monkeypatch):
    # What the pipeline hands the stock `Pipeline.__call__` on a GPU (faked: the stock call is replaced).
    from transformers import Pipeline

    from maeday_hf.overlap import default_num_threads

    handed = []
    monkeypatch.setattr(Pipeline, "__call__", lambda self, inputs, **kwargs: handed.append(kwargs))
    monkeypatch.setattr(detector, "device", torch.device("cuda"))
    detector(images, num_masks=32)
    detector(images, num_masks=4, num_workers=0, batch_size=3)
    assert handed[0]["num_workers"] == default_num_threads() and handed[0]["batch_size"] == 32
    assert handed[1]["num_workers"] == 0 and handed[1]["batch_size"] == 3


@pytest.mark.parametrize("batch_size, num_threads", [(1, 2), (2, 0), (5, 2)])
def test_overlapped_loop_returns_what_the_stock_loop_returns(detector, images, batch_size, num_threads):
    call = dict(num_masks=3, seed=2, threshold=0.5, return_uncertainty=True)
    stock = detector(images, batch_size=batch_size, **call)
    preprocess, forward, postprocess = detector._sanitize_parameters(**call)
    overlapped = list(detector._overlapped_results(images, num_threads, batch_size, preprocess, forward, postprocess))
    assert len(overlapped) == len(stock)
    for ours, theirs in zip(overlapped, stock):
        assert ours["score"] == theirs["score"] and ours["label"] == theirs["label"]
        for key in ("anomaly_map", "uncertainty_map"):
            np.testing.assert_array_equal(ours[key], theirs[key])


def test_overlapped_loop_reads_datasets_by_index_and_generators_in_order(detector, images):
    from datasets import Dataset
    from transformers.pipelines.pt_utils import KeyDataset

    preprocess, forward, postprocess = detector._sanitize_parameters(num_masks=2)
    stock = detector(images, num_masks=2)
    for inputs in (KeyDataset(Dataset.from_dict({"image": images}), "image"), (image for image in images)):
        results = list(detector._overlapped_results(inputs, 2, 2, preprocess, forward, postprocess))
        assert [r["score"] for r in results] == pytest.approx([r["score"] for r in stock], rel=1e-5)


def test_overlapped_loop_hands_out_finished_results_before_a_bad_item_raises(detector, images, tmp_path):
    preprocess, forward, postprocess = detector._sanitize_parameters(num_masks=2)
    inputs = (item for item in [images[0], images[1], images[2], str(tmp_path / "missing.png")])
    results = []
    with pytest.raises(FileNotFoundError):
        for result in detector._overlapped_results(inputs, 2, 2, preprocess, forward, postprocess):
            results.append(result)
    assert len(results) == 2  # the first batch was computed; the stock loop hands it out too


def test_overlapped_loop_decodes_a_repeated_lazily_opened_image_safely(detector, images, tmp_path):
    path = tmp_path / "lazy.png"
    images[3].save(path)
    preprocess, forward, postprocess = detector._sanitize_parameters(num_masks=2)
    with Image.open(path) as lazy:
        results = list(detector._overlapped_results([lazy] * 16, 8, 8, preprocess, forward, postprocess))
    assert len({r["score"] for r in results}) == 1 and results[0]["anomaly_map"].shape == (64, 64)


def test_overlapped_loop_reads_a_repeated_image_s_exif_orientation_in_every_copy(detector, monkeypatch):
    # Pillow marks an image's EXIF loaded before parsing it: a second thread read no orientation and scored its copy
    # sideways. A slow parse (as a large EXIF block, or a busy machine, gives) opens that window every time.
    import io
    import time

    from PIL.Image import Exif

    upright = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    exif = upright.getexif()
    exif[0x0112] = 6  # rotated a quarter turn: shown 40 wide, 60 high
    encoded = io.BytesIO()
    upright.save(encoded, "PNG", exif=exif.tobytes())
    real_load = Exif.load

    def slow_load(self, data):
        time.sleep(0.05)
        return real_load(self, data)

    monkeypatch.setattr(Exif, "load", slow_load)
    preprocess, forward, postprocess = detector._sanitize_parameters(num_masks=1)
    for _ in range(2):
        lazy = Image.open(io.BytesIO(encoded.getvalue()))
        results = list(detector._overlapped_results([lazy] * 4, 4, 4, preprocess, forward, postprocess))
        assert [result["anomaly_map"].shape for result in results] == [(60, 40)] * 4


def test_device_normalisation_takes_one_number_for_every_channel(images):
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=0.5, image_std=0.25)
    pixels = processor(images=images[0], do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    expected = processor(images=images[0], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(DeviceNormalization.from_processor(processor)(pixels), expected, rtol=0, atol=1e-6)


# --- patch embeddings once per image ------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
def test_patches_embedded_once_per_image_give_the_per_pair_reconstructions(bf16):
    model = make_tiny_model(norm_pix_loss=True)
    images = torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    image_index = torch.tensor([2, 0, 0, 1, 2, 2, 1])
    noise = make_mask_noise(7, 16, 0.75, seed=4)
    seen = []
    conv = model.vit.embeddings.patch_embeddings.projection
    handle = conv.register_forward_hook(lambda _module, args, _output: seen.append(args[0].shape[0]))
    with mask_ratio_set_to(model, 0.75):
        per_pair = predict_patches(model, images[image_index], noise, bf16=bf16)
        once = predict_patches(model, images, noise, bf16=bf16, image_index=image_index)
    handle.remove()
    if not bf16:  # (the bf16 copy has its own convolution)
        assert seen == [7, 3]  # one embedding per pair, then one per image
    torch.testing.assert_close(once, per_pair, rtol=1e-5, atol=1e-6)
    patch_embeddings = model.vit.embeddings.patch_embeddings
    assert not patch_embeddings._forward_hooks and not patch_embeddings._forward_pre_hooks  # hooks removed


@pytest.mark.parametrize("bf16", [False, True])
def test_threads_sharing_a_model_get_their_own_reconstructions(bf16):
    import concurrent.futures

    model = make_tiny_model()
    torch.manual_seed(1)
    jobs = []
    for job in range(8):
        images = torch.randn(2 + job % 3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
        image_index = torch.arange(len(images)).repeat_interleave(3)
        noise = make_mask_noise(len(image_index), 16, 0.75, seed=job)
        jobs.append((images, image_index, noise))
    with mask_ratio_set_to(model, 0.75):
        expected = [predict_patches(model, images[index], noise, bf16=bf16) for images, index, noise in jobs]

        def run(job):
            images, index, noise = jobs[job % len(jobs)]
            return job % len(jobs), predict_patches(model, images, noise, bf16=bf16, image_index=index)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for job, result in pool.map(run, range(64)):
                torch.testing.assert_close(result, expected[job], rtol=1e-5, atol=1e-6)


def test_threads_sharing_a_model_with_different_mask_ratios_each_get_their_own():
    # The mask ratio lives in the shared config: one thread's ratio must not leak into another's forwards.
    import concurrent.futures

    from maeday_hf.scoring import maeday_anomaly_maps

    model = make_tiny_model()
    torch.manual_seed(2)
    images = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    ratios = (0.75, 0.25, 0.5)
    noise = make_mask_noise(3, 16, 0.75, seed=0)
    expected = {ratio: maeday_anomaly_maps(model, images, noise, ratio, bf16=False)["pred_score"] for ratio in ratios}
    assert len({tuple(scores.tolist()) for scores in expected.values()}) == len(ratios)  # the ratio matters here

    def run(job):
        ratio = ratios[job % len(ratios)]
        return ratio, maeday_anomaly_maps(model, images, noise, ratio, mask_batch_size=2, bf16=False)["pred_score"]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for ratio, scores in pool.map(run, range(60)):
            torch.testing.assert_close(scores, expected[ratio], rtol=1e-5, atol=1e-6)
    assert model.config.mask_ratio == make_tiny_model().config.mask_ratio


# --- bf16 weights -------------------------------------------------------------------------------------------------


def test_bfloat16_copy_always_holds_the_current_weights_and_shares_the_config():
    model = make_tiny_model()
    with torch.inference_mode():  # as inside the pipeline
        copy = bfloat16_copy(model)
    assert next(copy.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    assert copy.config is model.config and not next(copy.parameters()).is_inference()
    # Every tensor is the model's, rounded to bf16 (the copy is built from empty bf16 tensors, then filled).
    pairs = list(zip([*model.parameters(), *model.buffers()], [*copy.parameters(), *copy.buffers()], strict=True))
    for source, target in pairs:
        assert target.dtype == (torch.bfloat16 if source.is_floating_point() else source.dtype)
        assert torch.equal(target, source.to(target.dtype)) and target.data_ptr() != source.data_ptr()
    assert not any(parameter.requires_grad for parameter in copy.parameters())
    weight = model.decoder.decoder_pred.weight
    for change in (lambda: weight.data.add_(1.0),  # in place behind autograd's back, as PEFT's merge does
                   lambda: model.load_state_dict(make_tiny_model(seed=5).state_dict())):
        change()
        assert bfloat16_copy(model) is copy  # same module, current values
        torch.testing.assert_close(copy.decoder.decoder_pred.weight.float(), weight, rtol=1e-2, atol=1e-2)
    model.decoder.decoder_pred.weight = torch.nn.Parameter(torch.zeros_like(weight))  # a new tensor: rebuilt
    fresh = bfloat16_copy(model)
    assert fresh is not copy and torch.all(fresh.decoder.decoder_pred.weight == 0)
    assert bfloat16_copy(fresh) is fresh  # already bf16


def test_bfloat16_copy_follows_peft_adapter_switches():
    model = make_tiny_model()
    torch.manual_seed(0)
    peft_model = add_lora(model, make_lora_config(model))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    pixel_values = torch.randn(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    noise = make_mask_noise(4, 16, 0.75, seed=0)

    def relative_error():
        with torch.no_grad(), mask_ratio_set_to(model, 0.75):
            exact = predict_patches(peft_model.base_model.model, pixel_values, noise, bf16=False)
            fast = predict_patches(peft_model.base_model.model, pixel_values, noise, bf16=True)
        return float((fast - exact).norm() / exact.norm())

    errors = {"adapter on": relative_error()}
    with peft_model.disable_adapter():
        errors["adapter disabled"] = relative_error()
    peft_model.merge_adapter()
    errors["adapter merged"] = relative_error()
    assert max(errors.values()) < 1e-2, errors


def test_bf16_follows_the_call_mask_ratio_and_stays_close_to_float32():
    model = make_tiny_model()
    pixel_values = torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    for mask_ratio in (0.25, 0.75):
        noise = make_mask_noise(3, 16, mask_ratio, seed=0)
        with mask_ratio_set_to(model, mask_ratio):
            exact = predict_patches(model, pixel_values, noise, bf16=False)
            fast = predict_patches(model, pixel_values, noise, bf16=True)
        assert fast.dtype == torch.float32
        assert ((fast - exact).norm() / exact.norm()) < 2e-2



@pytest.mark.parametrize(
    "capabilities, expected",
    [({"avx512_bf16": True}, True), ({"amx_bf16": True, "avx512_bf16": False}, True),
     ({"avx512_bf16": False, "avx2": True}, False), ({}, False)],
)
def test_bf16_by_default_only_on_cpus_that_multiply_bf16_in_hardware(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    reconstruction._runs_bfloat16_natively.cache_clear()
    try:
        assert runs_bfloat16_natively("cpu") is expected
        assert runs_bfloat16_natively(torch.device("meta")) is False
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        reconstruction._runs_bfloat16_natively.cache_clear()
        assert runs_bfloat16_natively("cpu") is False  # a torch build without oneDNN
    finally:
        reconstruction._runs_bfloat16_natively.cache_clear()


@pytest.mark.parametrize(
    "hip, properties, expected",
    [(None, dict(major=8), True), (None, dict(major=9), True), (None, dict(major=7), False),
     ("6.2", dict(major=9, gcnArchName="gfx942:sramecc+:xnack-"), True), ("6.2", dict(major=9, gcnArchName="gfx906"), False)],
)
def test_bf16_by_default_only_on_gpus_that_multiply_bf16_in_hardware(monkeypatch, hip, properties, expected):
    from types import SimpleNamespace

    asked = []
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: asked.append(index) or SimpleNamespace(**properties))
    reconstruction._runs_bfloat16_natively.cache_clear()
    try:
        assert runs_bfloat16_natively("cuda:1") is expected
        assert runs_bfloat16_natively("cuda") is expected
        assert asked == [1, 3]  # a bare "cuda" is the current device
    finally:
        reconstruction._runs_bfloat16_natively.cache_clear()


@pytest.mark.parametrize("native", [False, True])
def test_default_precision_is_bf16_for_float32_models_where_native(monkeypatch, native):
    monkeypatch.setattr(reconstruction, "runs_bfloat16_natively", lambda device: native)
    model = make_tiny_model()
    pixel_values = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    noise = make_mask_noise(2, 16, 0.75, seed=0)
    with torch.no_grad(), mask_ratio_set_to(model, 0.75):
        default = predict_patches(model, pixel_values, noise)
        assert torch.equal(default, predict_patches(model, pixel_values, noise, bf16=native))
        assert not torch.equal(default, predict_patches(model, pixel_values, noise, bf16=not native))
        # A float64 model keeps its precision unless bf16 is asked for.
        double = model.double()
        default = predict_patches(double, pixel_values.double(), noise)
        assert default.dtype == torch.float64
        assert torch.equal(default, predict_patches(double, pixel_values.double(), noise, bf16=False))

# --- views --------------------------------------------------------------------------------------------------------


def test_render_views_crops_exactly_where_the_transform_says():
    # Bilinear sampling reproduces a linear ramp exactly, so every output pixel is checked against the map itself.
    height, width = 8, 12
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    image = (0.3 * xs + 0.7 * ys + 1.0).expand(1, 3, height, width).contiguous()
    side, centre_x, centre_y = 0.5, 0.2, -0.1
    transform = torch.tensor([[[side, 0.0, centre_x], [0.0, side, centre_y]]])
    out = render_views(image, torch.tensor([0]), transform)
    output_x = (2 * torch.arange(width) + 1) / width - 1  # pixel centres, normalised
    output_y = (2 * torch.arange(height) + 1) / height - 1
    source_x = ((centre_x + side * output_x) + 1) * width / 2 - 0.5
    source_y = ((centre_y + side * output_y) + 1) * height / 2 - 0.5
    expected = 0.3 * source_x[None, :] + 0.7 * source_y[:, None] + 1.0
    torch.testing.assert_close(out[0, 1], expected, rtol=0, atol=1e-5)


def test_render_views_rotates_a_quarter_turn_exactly():
    image = torch.randn(2, 3, 8, 8)
    quarter = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]] * 2)
    out = render_views(image, torch.tensor([1, 0]), quarter)
    rotated = [torch.rot90(image[[1, 0]], k, dims=(2, 3)) for k in (1, 3)]
    assert any(torch.allclose(out, candidate, atol=1e-5) for candidate in rotated)


def test_drawn_transforms_stay_in_their_ranges():
    for index in range(200):
        transform = crop_rotate_transform(view_generator(3, index), 16, 16, min_crop_scale=0.6, max_rotation_degrees=20)
        side = math.hypot(transform[0, 0], transform[1, 0])
        angle = math.degrees(math.atan2(transform[1, 0], transform[0, 0]))
        assert math.sqrt(0.6) - 1e-6 <= side <= 1 + 1e-6 and abs(angle) <= 20 + 1e-4
        assert abs(transform[0, 2]) <= 1 - side + 1e-6 and abs(transform[1, 2]) <= 1 - side + 1e-6


# --- the step loop ------------------------------------------------------------------------------------------------


def _lora_model(seed: int = 0):
    model = make_tiny_model()
    torch.manual_seed(seed)
    return model, add_lora(model, make_lora_config(model))


@pytest.mark.parametrize("bf16", [False, True])
def test_step_loop_trains_exactly_like_the_trainer(tmp_path, bf16):
    config = FinetuneConfig(num_steps=3, batch_size=4, use_cpu=True, disable_tqdm=True, weight_decay=0.05, bf16=bf16)
    shots = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    results = []
    for use_trainer in (True, False):
        model, peft_model = _lora_model()
        views = ShotViews(shots, num_views=12, num_patches=16, seed=4)
        trainer = build_trainer(peft_model, model, views, config, tmp_path / str(use_trainer))
        with mask_ratio_set_to(model, config.mask_ratio):
            if use_trainer:
                trainer.train()
                losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            else:
                assert trains_in_bf16(trainer) is bf16
                losses = run_steps(peft_model, model, views, trainer.create_optimizer(), 3, 4, bf16=bf16,
                                   cuda_graph=False)
        weights = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
        results.append((losses, weights))
    (trainer_losses, trainer_weights), (loop_losses, loop_weights) = results
    np.testing.assert_allclose(loop_losses, trainer_losses, rtol=1e-5)
    assert trainer_weights.keys() == loop_weights.keys()
    for name in trainer_weights:
        torch.testing.assert_close(loop_weights[name], trainer_weights[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.all(w == 0) for name, w in loop_weights.items() if "lora_B" in name)


def test_logged_losses_average_each_window_like_the_trainer(tmp_path):
    assert logged_losses([1.0, 3.0, 5.0, 7.0, 9.0], 2) == [(2, 2.0), (4, 6.0)]
    assert logged_losses([4.0], 1) == [(1, 4.0)]
    # The Trainer's own log for 3 steps, logging every 2: one entry, the mean of steps 1-2.
    model, peft_model = _lora_model()
    views = ShotViews(torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), num_views=12, num_patches=16)
    config = FinetuneConfig(num_steps=3, batch_size=4, use_cpu=True, disable_tqdm=True, logging_steps=2)
    trainer = build_trainer(peft_model, model, views, config, tmp_path)
    trainer.train()
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [2]
