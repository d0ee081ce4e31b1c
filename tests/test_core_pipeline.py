"""The `anomaly-detection` pipeline: outputs, determinism, batching, loading (path, repo id, remote code), bad input."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertForPreTraining, ViTImageProcessor, pipeline

import maeday_hf
from conftest import save_tiny_checkpoint
from maeday_hf import AnomalyDetectionPipeline
from maeday_hf.masking import make_mask_noise
from maeday_hf.modeling import load_detector
from maeday_hf.scoring import maeday_anomaly_maps


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (77, 23, 3), dtype=np.uint8)),
    ]


def test_task_is_registered_and_builds_our_pipeline(detector):
    from transformers.pipelines import PIPELINE_REGISTRY

    assert PIPELINE_REGISTRY.supported_tasks[maeday_hf.TASK]["impl"] is AnomalyDetectionPipeline
    assert isinstance(detector, AnomalyDetectionPipeline)


def test_no_images_give_no_results(detector):
    from datasets import Dataset
    from transformers.pipelines.pt_utils import KeyDataset

    assert detector([]) == [] and detector(()) == [] and detector(np.zeros((0, 8, 8, 3), dtype=np.uint8)) == []
    empty = Dataset.from_dict({"image": []})
    assert detector(empty["image"]) == [] and list(detector(KeyDataset(empty, "image"))) == []
    assert list(detector(iter([]))) == []
    # The call's settings are checked all the same, as they are with images.
    with pytest.raises(ValueError, match="num_masks must be >= 1, got 0"):
        detector([], num_masks=0)
    with pytest.raises(TypeError, match="bogus"):
        detector([], bogus=1)
    for name, value in (("num_workers", -1), ("num_workers", 1.5), ("batch_size", 0), ("batch_size", True)):
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= [01], got {value!r}"):
            detector([], **{name: value})
    with pytest.raises(ValueError, match="ensemble must be 'patchcore' or a fitted PatchCore, got 'nonsense'"):
        detector([], ensemble="nonsense")


def test_images_in_a_datasets_column_or_an_iterator_are_several_images(detector, images):
    # `dataset["image"]` is a datasets Column (a sequence, not a list); `map(...)` an iterator, not a generator: the
    # stock call took either for one image ("Expected an image path ... got Column").
    from datasets import Dataset

    import pandas

    from maeday_hf.pipeline import _as_several_images, _LazySequence

    direct = detector(images, num_masks=2)
    column = Dataset.from_dict({"image": images})["image"]
    # A column is read an image at a time (listing it would decode every image before the first forward), and its
    # results come back as a list, as a list's do.
    assert isinstance(_as_several_images(column), _LazySequence)
    from_column = detector(column, num_masks=2, batch_size=np.int64(2))  # (a NumPy integer batch size too)
    assert isinstance(from_column, list)
    lazily = detector(map(lambda image: image, images), num_masks=2)
    assert not isinstance(lazily, list)  # (read lazily, as a generator is)
    # Other iterables (a pandas Series, dict values) are read lazily too.
    series = pandas.Series(images, dtype=object)
    by_key = dict(enumerate(images)).values()
    for results in (from_column, list(lazily), list(detector(series, num_masks=2)), list(detector(by_key, num_masks=2))):
        assert [r["score"] for r in results] == pytest.approx([r["score"] for r in direct], rel=1e-6)


def test_a_model_in_training_mode_scores_as_in_inference_mode(tiny_checkpoint, images):
    from transformers import ViTMAEForPreTraining

    model = ViTMAEForPreTraining.from_pretrained(tiny_checkpoint, hidden_dropout_prob=0.5)
    expected = pipeline("anomaly-detection", model=model, image_processor=tiny_checkpoint)(images[0], num_masks=2,
                                                                                         bf16=False)
    model.train()  # e.g. handed over straight from a training loop
    detector = pipeline("anomaly-detection", model=model, image_processor=tiny_checkpoint)
    assert not model.training
    for _ in range(2):
        assert detector(images[0], num_masks=2, bf16=False)["score"] == expected["score"]


def test_outputs_keys_types_and_original_size(detector, images):
    result = detector(images[0], num_masks=4, return_uncertainty=True, threshold=0.5)
    assert set(result) == {"score", "anomaly_map", "uncertainty_map", "label", "mask"}
    assert isinstance(result["score"], float)
    assert result["anomaly_map"].dtype == np.float32 and result["anomaly_map"].shape == (40, 56)
    assert result["uncertainty_map"].shape == (40, 56)
    assert result["mask"].mode == "L" and result["mask"].size == (56, 40)
    assert result["label"] == ("anomalous" if result["score"] > 0.5 else "normal")
    np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, result["anomaly_map"] > 0.5)
    assert set(detector(images[0], num_masks=2)) == {"score", "anomaly_map"}


def test_matches_the_scoring_path_at_model_resolution(detector, images):
    # A 32x32 image needs no resize, so the pipeline must return exactly the scoring function's map.
    result = detector(images[1], num_masks=5, mask_ratio=0.5, seed=3, mask_schedule="balanced")
    pixel_values = detector.image_processor(images=images[1], return_tensors="pt")["pixel_values"]
    noise = make_mask_noise(5, 16, 0.5, "balanced", seed=3)
    expected = maeday_anomaly_maps(detector.model, pixel_values, noise, 0.5)
    np.testing.assert_allclose(result["anomaly_map"], expected["anomaly_map"][0].numpy(), rtol=1e-6)
    assert result["score"] == pytest.approx(expected["pred_score"].item(), rel=1e-6)


def test_same_seed_same_result_other_seed_other_result(detector, images):
    first = detector(images[0], num_masks=4, seed=1)
    again = detector(images[0], num_masks=4, seed=1)
    other = detector(images[0], num_masks=4, seed=2)
    np.testing.assert_array_equal(first["anomaly_map"], again["anomaly_map"])
    assert not np.allclose(first["anomaly_map"], other["anomaly_map"])


def test_batch_of_k_equals_k_singles_in_any_order(detector, images):
    singles = [detector(image, num_masks=4) for image in images]
    batched = detector(images, num_masks=4, batch_size=3, mask_batch_size=5)
    reversed_batch = detector(images[::-1], num_masks=4, batch_size=2)[::-1]
    assert isinstance(batched, list) and len(batched) == 3
    for single, together, reordered in zip(singles, batched, reversed_batch):
        assert together["score"] == pytest.approx(single["score"], rel=1e-5)
        np.testing.assert_allclose(together["anomaly_map"], single["anomaly_map"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(reordered["anomaly_map"], single["anomaly_map"], rtol=1e-5, atol=1e-6)


def test_defaults_are_the_paper_settings(detector, images):
    default = detector(images[1])
    explicit = detector(images[1], num_masks=32, mask_ratio=0.75, seed=0, mask_schedule="random")
    np.testing.assert_array_equal(default["anomaly_map"], explicit["anomaly_map"])


def test_checkpoint_mask_ratio_is_ignored_and_left_unchanged(tmp_path, images):
    folder = save_tiny_checkpoint(tmp_path / "ratio", mask_ratio=0.3)
    other = pipeline("anomaly-detection", model=folder)
    reference = pipeline("anomaly-detection", model=save_tiny_checkpoint(tmp_path / "ref", mask_ratio=0.75))
    a = other(images[1], num_masks=3)
    b = reference(images[1], num_masks=3)
    np.testing.assert_allclose(a["anomaly_map"], b["anomaly_map"], rtol=1e-6)
    assert other.model.config.mask_ratio == 0.3


def test_cpu_workers_that_would_not_be_forked_are_threads(detector, images):
    # DataLoader processes started by spawn or forkserver (macOS, Windows, Linux from Python 3.14) must pickle
    # transformers' collate function, a closure: num_workers > 0 failed there. They are threads instead.
    import multiprocessing

    direct = [result["score"] for result in detector(images, num_masks=2)]
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        threaded = [result["score"] for result in detector(images, num_masks=2, num_workers=2, batch_size=2)]
        # Only on the CPU: on another device (mps) the thread loop would hand its outputs back on that device.
        with mock.patch.object(detector, "device", torch.device("mps")):
            stock = detector.get_iterator(images, 2, 2, {}, {}, {})
    finally:
        multiprocessing.set_start_method(previous, force=True)
    assert threaded == pytest.approx(direct, rel=1e-6)
    assert not inspect.isgenerator(stock)  # (transformers' own iterator, not the thread loop's generator)


def test_the_thread_loop_fetches_datasets_items_in_its_threads(detector, images, monkeypatch):
    # Fetching an item of a datasets dataset decodes its image: in the thread that drives the GPU it would keep the
    # GPU waiting. The preprocessing threads fetch them (datasets' Arrow tables are read-only); a user's own Dataset
    # is still fetched by the calling thread. (The thread loop is the GPU's; here run on the CPU, through the path
    # that stands in for unforked DataLoader workers.)
    import multiprocessing
    import threading

    import datasets
    from transformers.pipelines.pt_utils import KeyDataset

    fetched_by = []
    real_getitem = datasets.Dataset.__getitem__

    def recorded(self, key):
        fetched_by.append(threading.current_thread().name)
        return real_getitem(self, key)

    class OwnDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, index):
            fetched_by.append(threading.current_thread().name)
            return images[index]

    dataset = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    direct = [result["score"] for result in detector(images, num_masks=2)]
    monkeypatch.setattr(datasets.Dataset, "__getitem__", recorded)
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        for inputs, in_threads in ((KeyDataset(dataset, "image"), True), (OwnDataset(), False)):
            fetched_by.clear()
            scores = [result["score"] for result in detector(inputs, num_masks=2, num_workers=2, batch_size=2)]
            assert scores == pytest.approx(direct, rel=1e-6)
            # (transformers' own call first peeks at a KeyDataset's item 0, in the calling thread)
            loop = fetched_by[-len(images):]
            assert all(name.startswith("maeday-preprocess") == in_threads for name in loop), fetched_by
    finally:
        multiprocessing.set_start_method(previous, force=True)
    from maeday_hf.pipeline import _fetched_safely_from_threads, _LazySequence  # (a column too; a plain one not)

    monkeypatch.undo()
    assert _fetched_safely_from_threads(_LazySequence(dataset["image"]))
    assert not _fetched_safely_from_threads(_LazySequence(list(images)))
    # A transform is user code, perhaps not thread-safe (a seeded random crop raced); nor is a class that only lives
    # in a module named like datasets.
    transformed = dataset.with_transform(lambda batch: batch)
    assert not _fetched_safely_from_threads(KeyDataset(transformed, "image"))
    assert not _fetched_safely_from_threads(_LazySequence(transformed["image"]))
    OwnDataset.__module__ = "datasets.mvtec"
    assert not _fetched_safely_from_threads(KeyDataset(OwnDataset(), "image"))


def test_works_with_key_dataset(detector, images):
    from datasets import Dataset
    from transformers.pipelines.pt_utils import KeyDataset

    dataset = Dataset.from_dict({"image": images})
    results = list(detector(KeyDataset(dataset, "image"), num_masks=2, batch_size=2))
    assert [r["anomaly_map"].shape for r in results] == [(40, 56), (32, 32), (77, 23)]
    for result, direct in zip(results, detector(images, num_masks=2)):  # the same results as a plain list gives
        assert result["score"] == pytest.approx(direct["score"], rel=1e-6)
        np.testing.assert_allclose(result["anomaly_map"], direct["anomaly_map"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "make_input",
    [
        lambda rng: Image.fromarray(rng.integers(0, 256, (30, 35), dtype=np.uint8), "L"),
        lambda rng: Image.fromarray(rng.integers(0, 256, (30, 35, 4), dtype=np.uint8), "RGBA"),
        lambda rng: Image.fromarray(rng.integers(0, 256, (30, 35), dtype=np.uint8), "L").convert("P"),
        lambda rng: rng.integers(0, 65536, (30, 35), dtype=np.uint16),
        lambda rng: rng.random((30, 35, 3), dtype=np.float32),
        lambda rng: rng.integers(0, 256, (30, 35, 4), dtype=np.uint8),
    ],
    ids=["L", "RGBA", "P", "uint16-array", "float-array", "rgba-array"],
)
def test_any_mode_any_size_comes_back_at_original_size(detector, make_input):
    result = detector(make_input(np.random.default_rng(1)), num_masks=2)
    assert result["anomaly_map"].shape == (30, 35)
    assert np.isfinite(result["anomaly_map"]).all()


def test_paths_including_16_bit_png(detector, tmp_path):
    values = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    from_path = detector(str(path), num_masks=2)
    from_array = detector(values, num_masks=2)
    np.testing.assert_allclose(from_path["anomaly_map"], from_array["anomaly_map"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(num_masks=0), ValueError, "num_masks"),
        (dict(num_masks=2.5), TypeError, "num_masks"),
        (dict(mask_ratio=1.0), ValueError, "mask_ratio"),
        (dict(mask_ratio=-0.5), ValueError, "mask_ratio"),
        (dict(mask_batch_size=0), ValueError, "mask_batch_size"),
        (dict(mask_batch_size=-3), ValueError, "mask_batch_size"),
        (dict(mask_schedule="grid"), ValueError, "mask_schedule"),
        (dict(seed="zero"), TypeError, "seed"),
        (dict(threshold="high"), ValueError, "threshold"),
        (dict(timeout=0), ValueError, "timeout"),  # refused even for a local image, where it is not used
        (dict(timeout="5"), ValueError, "timeout"),
    ],
)
def test_bad_parameters_raise_one_clear_error(detector, images, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        detector(images[0], **kwargs)


def test_a_broken_link_in_an_image_folder_is_an_error_not_a_missing_image(tmp_path):
    from maeday_hf.images import list_images

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "gone.txt")  # not an image: ignored as before
    assert [path.name for path in list_images(tmp_path)] == ["a.png", "b.png"]
    (tmp_path / "c.png").symlink_to(tmp_path / "synced-later.png")
    with pytest.raises(FileNotFoundError, match="c.png is a broken symbolic link"):
        list_images(tmp_path)


def test_thresholds_beyond_float32_label_without_a_warning(detector, images):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        high = detector(images[0], num_masks=2, threshold=1e308)
        low = detector(images[0], num_masks=2, threshold=-1e308)
    assert high["label"] == "normal" and not np.asarray(high["mask"]).any()
    assert low["label"] == "anomalous" and np.asarray(low["mask"]).all()


def test_bad_image_inputs(detector, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        detector(str(tmp_path / "missing.png"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="corrupt.png"):
        detector(str(corrupt))
    with pytest.raises(TypeError, match="int"):
        detector(12)
    with pytest.raises(ValueError, match="shape"):
        detector(np.zeros((4, 4, 2), dtype=np.uint8))


def test_more_image_inputs_read_as_expected(tmp_path, monkeypatch):
    from maeday_hf.images import load_rgb_image

    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
    # Big-endian 16-bit (NumPy's view of Pillow's "I;16B") reads as the same image as native 16-bit.
    assert np.array_equal(np.asarray(load_rgb_image(values.astype(">u2"))), np.asarray(load_rgb_image(values)))
    # Premultiplied grey + alpha ("La"), which Pillow cannot convert to RGB directly.
    grey = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    la = Image.merge("LA", [Image.fromarray(grey), Image.new("L", (7, 6), 255)]).convert("La")
    assert np.array_equal(np.asarray(load_rgb_image(la)), np.repeat(grey[..., None], 3, axis=-1))
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_rgb_image(np.full((4, 4, 3), np.nan, dtype=np.float32))
    # Floats are [0, 1]: 0..255 floats (np.asarray(image, dtype=np.float32)) are refused, not read as white; a
    # resize's overshoot is clipped.
    eight_bit = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got values from 0 to 25[0-9]; .* uint8"):
        load_rgb_image(eight_bit.astype(np.float32))
    for outside in (-1.5, 2.5):
        with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
            load_rgb_image(np.full((4, 4), outside, dtype=np.float32))
    overshoot = np.array([[-0.11, 0.5, 1.21]], dtype=np.float32)  # (a bicubic resize of a [0, 1] image)
    assert np.asarray(load_rgb_image(overshoot))[0, :, 0].tolist() == [0, 128, 255]
    # Mode F: [0, 1] floats (Image.fromarray of a float array, as `datasets` stores one) or Pillow's 0..255.
    grey_image = Image.fromarray(grey)
    assert np.array_equal(np.asarray(load_rgb_image(grey_image.convert("F"))), np.asarray(load_rgb_image(grey_image)))
    unit_floats = (grey / 255.0).astype(np.float32)
    assert np.array_equal(np.asarray(load_rgb_image(Image.fromarray(unit_floats))),
                          np.asarray(load_rgb_image(unit_floats)))
    with pytest.raises(ValueError, match=r"mode F .*\[0, 255\]"):
        load_rgb_image(Image.fromarray(np.full((4, 4), 600.0, dtype=np.float32)))
    # Mode I: 16-bit as `.convert("I")` of a 16-bit file holds it, 8-bit as `Image.fromarray` of int32 0..255 does.
    sixteen = rng.integers(256, 65536, (6, 7), dtype=np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(sixteen).save(path)
    from_mode_i = np.asarray(load_rgb_image(Image.open(path).convert("I")))
    assert np.array_equal(from_mode_i, np.asarray(load_rgb_image(sixteen)))
    assert np.array_equal(np.asarray(load_rgb_image(grey_image.convert("I"))), np.asarray(load_rgb_image(grey_image)))
    with pytest.raises(ValueError, match=r"mode I .*\[0, 65535\]"):
        load_rgb_image(Image.fromarray(np.full((4, 4), 200_000, dtype=np.int32)))
    # An image over Pillow's decompression-bomb limit: one ValueError naming the file and the setting.
    path = tmp_path / "huge.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="huge.png.*MAX_IMAGE_PIXELS"):
        load_rgb_image(path)


def test_urls_are_decoded_as_files_are_and_http_errors_are_named(tmp_path):
    import functools
    import http.server
    import socket
    import threading

    from maeday_hf.images import load_rgb_image

    deep = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)  # 16-bit: not to be clipped
    Image.fromarray(deep).save(tmp_path / "deep.png")
    (tmp_path / "page.html").write_text("<html>not an image</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        from_url = np.asarray(load_rgb_image(f"{base}/deep.png", timeout=10))
        assert np.array_equal(from_url, np.asarray(load_rgb_image(tmp_path / "deep.png")))
        assert from_url.max() > 200 and len(np.unique(from_url)) > 100  # rescaled from 16 bits, not clipped to white
        from maeday_hf.shot_views import load_shot_images

        shots, names = load_shot_images([f"{base}/deep.png"])  # a fine-tune's shot may be a URL too
        assert names == [f"{base}/deep.png"] and np.array_equal(np.asarray(shots[0]), from_url)
        # A signed URL's token is not recorded with the shot.
        assert load_shot_images([f"{base}/deep.png?token=secret#x"])[1] == [f"{base}/deep.png"]
        shouted = base.replace("http://", "HTTP://")  # URL schemes are case-insensitive
        assert np.array_equal(np.asarray(load_shot_images([f"{shouted}/deep.png"])[0][0]), from_url)
        with pytest.raises(ValueError, match=r"missing.png.*HTTP 404"):
            load_rgb_image(f"{base}/missing.png", timeout=10)
        with pytest.raises(ValueError, match=r"page.html.* as an image"):
            load_rgb_image(f"{base}/page.html", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(OSError, match=f"Cannot fetch image URL 'http://127.0.0.1:{closed}/x.png'"):
        load_rgb_image(f"http://127.0.0.1:{closed}/x.png", timeout=10)


def test_a_url_timeout_bounds_the_whole_download():
    import http.server
    import threading
    import time

    from maeday_hf.images import load_rgb_image

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a byte every 20 ms: each wait is short, the whole would take 20 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:  # the client gave up
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(OSError, match="not downloaded within timeout=0.5 s"):
            load_rgb_image(f"http://127.0.0.1:{server.server_address[1]}/slow.png", timeout=0.5)
        assert time.monotonic() - started < 5
    finally:
        server.shutdown()
        server.server_close()


def test_a_center_cropping_processor_is_refused(tiny_checkpoint):
    # The map of a crop, resized to the whole image, would put every anomaly in the wrong place.
    from transformers import BeitImageProcessorPil

    cropping = BeitImageProcessorPil(do_center_crop=True, crop_size={"height": 32, "width": 32},
                                     size={"height": 36, "width": 36})
    with pytest.raises(ValueError, match="center-crops"):
        pipeline("anomaly-detection", model=tiny_checkpoint, image_processor=cropping, device="cpu")
    cropping.do_center_crop, cropping.size = False, {"height": 32, "width": 32}
    whole = pipeline("anomaly-detection", model=tiny_checkpoint, image_processor=cropping, device="cpu")
    assert whole(np.zeros((20, 30, 3), dtype=np.uint8), num_masks=1)["anomaly_map"].shape == (20, 30)
    # ConvNeXt's processor crops through crop_pct after a shortest-edge resize, with no do_center_crop flag.
    from transformers import ConvNextImageProcessorPil

    with pytest.raises(ValueError, match="not to a height and width"):
        pipeline("anomaly-detection", model=tiny_checkpoint, device="cpu",
                 image_processor=ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.5))


def test_a_checkpoint_that_is_not_vit_mae_is_refused(tmp_path):
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=9)
    BertForPreTraining(config).save_pretrained(tmp_path)
    ViTImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="bert"):
        pipeline("anomaly-detection", model=str(tmp_path))
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_detector(str(tmp_path), device="cpu")


def test_load_detector_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Model folder not found: '.*nope'"):
        load_detector(str(tmp_path / "nope"))
    (tmp_path / "query.png").write_bytes(b"")  # (an image given as --model by mistake: a file, not a missing folder)
    with pytest.raises(FileNotFoundError, match="Model '.*query.png' is a file; expected a checkpoint folder"):
        load_detector(str(tmp_path / "query.png"))
    with pytest.raises(OSError, match="org/not-cached"):
        load_detector("org/not-cached")


def _run_python(code: str, env: dict[str, str]) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.strip().splitlines()[-1]


def test_remote_code_pipeline_runs_without_the_package(detector, images, tmp_path):
    saved = tmp_path / "remote"
    detector.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    assert config["custom_pipelines"]["anomaly-detection"]["impl"] == "pipeline.AnomalyDetectionPipeline"
    # The bundle is the pipeline and what it imports (as the README lists it), not the loading or training code.
    assert {path.name for path in saved.glob("*.py")} == {
        "pipeline.py", "masking.py", "reconstruction.py", "scoring.py", "images.py", "overlap.py", "preprocessing.py",
        "ensemble.py", "patchcore.py", "feature_extraction.py", "devices.py", "detector_card.py",
    }
    images[0].save(tmp_path / "query.png")
    expected = detector(str(tmp_path / "query.png"), num_masks=3)["score"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    score = _run_python(
        f"""
        import sys
        sys.modules["maeday_hf"] = None  # `import maeday_hf` fails from here on
        from transformers import pipeline
        detector = pipeline(model={str(saved)!r}, trust_remote_code=True)
        assert type(detector).__name__ == "AnomalyDetectionPipeline", type(detector)
        assert "maeday_hf" not in type(detector).__module__
        # Saved again from the remote copy: the code travels on, and the folder loads the same way.
        detector.save_pretrained({str(tmp_path / "again")!r})
        again = pipeline(model={str(tmp_path / "again")!r}, trust_remote_code=True)
        assert again({str(tmp_path / 'query.png')!r}, num_masks=3)["score"] == detector({str(tmp_path / 'query.png')!r}, num_masks=3)["score"]
        print(detector({str(tmp_path / 'query.png')!r}, num_masks=3)["score"])
        """,
        env,
    )
    assert float(score) == pytest.approx(expected, rel=1e-6)
    # With the package installed, the same folder loads through the installed class.
    assert isinstance(load_detector(str(saved), device="cpu"), AnomalyDetectionPipeline)


def test_load_by_repo_id_from_the_hub_cache(tiny_checkpoint, images, tmp_path):
    # Lay the checkpoint out as the Hub cache does; with HF_HUB_OFFLINE=1 the repo id resolves to it.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--maeday-test--tiny-vit-mae"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(tiny_checkpoint):
        (snapshot / name).write_bytes(open(os.path.join(tiny_checkpoint, name), "rb").read())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    images[1].save(tmp_path / "query.png")
    expected = load_detector(tiny_checkpoint, device="cpu")(str(tmp_path / "query.png"), num_masks=3)["score"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    score = _run_python(
        f"""
        import maeday_hf
        from transformers import pipeline
        detector = pipeline("anomaly-detection", model="maeday-test/tiny-vit-mae")
        print(detector({str(tmp_path / 'query.png')!r}, num_masks=3)["score"])
        """,
        env,
    )
    assert float(score) == pytest.approx(expected, rel=1e-6)


def test_float64_model_gives_float32_maps(tiny_checkpoint, images):
    detector64 = pipeline("anomaly-detection", model=tiny_checkpoint, dtype=torch.float64)
    result = detector64(images[0], num_masks=2)
    assert result["anomaly_map"].dtype == np.float32


def _push_with_mocked_hub(detector, remote_card: str | None = None, tmp_path=None, branches=("main",),
                          **push_kwargs) -> tuple[mock.MagicMock, dict]:
    """`detector.push_to_hub` against a mocked `HfApi` (a repo whose README.md is `remote_card` on every branch of
    `branches`, or none); returns the mock and the committed files by name."""
    import tempfile

    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    api = mock.MagicMock()
    api.create_repo.return_value.repo_id = "maeday-test/detector"
    uploaded = {}

    def create_commit(**kwargs):
        for operation in kwargs["operations"]:
            with open(operation.path_or_fileobj, "rb") as handle:
                uploaded[operation.path_in_repo] = handle.read()
        return "commit-info"

    def hf_hub_download(repo_id, filename, revision=None, force_download=False):
        assert (repo_id, filename) == ("maeday-test/detector", "README.md")
        assert force_download  # (a copy cached earlier must not stand in for the repo's card)
        if (revision or "main") not in branches:
            raise RevisionNotFoundError(f"no branch {revision}", response=mock.MagicMock())
        if remote_card is None:
            raise EntryNotFoundError("no README.md")
        path = os.path.join(tempfile.mkdtemp(dir=tmp_path), "README.md")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(remote_card)
        return path

    api.create_commit.side_effect = create_commit
    api.hf_hub_download.side_effect = hf_hub_download
    with mock.patch("huggingface_hub.HfApi", return_value=api) as api_class:
        assert detector.push_to_hub("detector", **push_kwargs) == "commit-info"
    api_class.assert_called_once_with(token=push_kwargs.get("token"))
    return api, uploaded


def test_push_to_hub_uploads_the_remote_code_bundle_and_a_card(detector):
    api, uploaded = _push_with_mocked_hub(detector, private=True, tags=["carpets"], token="hf_x")
    api.create_repo.assert_called_once_with("detector", private=True, exist_ok=True)
    api.create_commit.assert_called_once()
    commit = api.create_commit.call_args.kwargs
    assert commit["repo_id"] == "maeday-test/detector" and commit["revision"] is None and commit["create_pr"] is False
    api.create_branch.assert_not_called()
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "pipeline.py", "masking.py",
            "reconstruction.py", "scoring.py", "images.py", "overlap.py", "preprocessing.py", "detector_card.py",
            "README.md"} <= set(uploaded)
    config = json.loads(uploaded["config.json"])
    assert config["custom_pipelines"]["anomaly-detection"]["impl"] == "pipeline.AnomalyDetectionPipeline"
    for name, content in uploaded.items():
        if name.endswith(".py"):
            assert not re.search(rb"^\s*(from|import)\s+maeday_hf", content, re.MULTILINE), f"{name} imports maeday_hf"
    from huggingface_hub import ModelCard

    card = ModelCard(uploaded["README.md"].decode())
    assert "This model card has been automatically generated" not in card.content  # not transformers' placeholder
    assert card.data.library_name == "transformers"
    assert {"anomaly-detection", "maeday", "zero-shot", "carpets"} <= set(card.data.tags)
    assert card.data.base_model is None  # loaded from a local folder: nothing on the Hub to name
    assert "load_detector('maeday-test/detector')" in card.content
    assert "trust_remote_code=True" in card.content
    assert "32 times" in card.content and "kernel 7, sigma 1.4" in card.content


def test_push_to_hub_keeps_the_repos_own_card_and_replaces_a_generated_one(detector, tmp_path):
    from huggingface_hub import ModelCard

    own = "---\nlicense: mit\ntags:\n- mine\n---\n\n# My detector\n\nHand-written.\n"
    _, uploaded = _push_with_mocked_hub(detector, remote_card=own, tmp_path=tmp_path, tags=["carpets"])
    card = ModelCard(uploaded["README.md"].decode())
    assert "Hand-written." in card.content and card.data.license == "mit"
    assert card.data.tags == ["mine", "carpets"]
    # Without tags the repo's own card is not uploaded at all: it stays exactly as it is (no `tags: []` added).
    _, uploaded = _push_with_mocked_hub(detector, remote_card=own, tmp_path=tmp_path)
    assert "README.md" not in uploaded and "config.json" in uploaded
    # Nor is one whose metadata cannot be read, tags or not.
    _, uploaded = _push_with_mocked_hub(detector, remote_card="---\n[unclosed\n---\n# x\n", tmp_path=tmp_path,
                                        tags=["carpets"])
    assert "README.md" not in uploaded
    # A card maeday_hf wrote is rewritten; once someone edited it, it is theirs.
    _, first = _push_with_mocked_hub(detector, tmp_path=tmp_path)
    generated = first["README.md"].decode()
    _, again = _push_with_mocked_hub(detector, remote_card=generated, tmp_path=tmp_path, tags=["new"])
    assert "new" in ModelCard(again["README.md"].decode()).data.tags and "maeday_hf (" in again["README.md"].decode()
    edited = generated.replace("## Intended use and limits", "Line 3 only.\n\n## Intended use and limits")
    _, kept = _push_with_mocked_hub(detector, remote_card=edited, tmp_path=tmp_path)
    assert "README.md" not in kept


def test_push_to_hub_to_a_branch_or_a_pull_request(detector, tmp_path):
    from huggingface_hub import ModelCard

    own = "---\nlicense: mit\n---\n\n# On dev\n"
    # A new branch: made (from main, whose card it then holds), then committed to.
    api, uploaded = _push_with_mocked_hub(detector, remote_card=own, tmp_path=tmp_path, revision="dev",
                                          commit_message="m", commit_description="d", tags=["x"])
    api.create_branch.assert_called_once_with(repo_id="maeday-test/detector", branch="dev", exist_ok=True)
    commit = api.create_commit.call_args.kwargs
    assert (commit["revision"], commit["create_pr"], commit["commit_message"], commit["commit_description"]) == (
        "dev", False, "m", "d")
    assert "# On dev" in ModelCard(uploaded["README.md"].decode()).content
    api, _ = _push_with_mocked_hub(detector, tmp_path=tmp_path, revision="dev", create_pr=True,
                                   branches=("main", "dev"))
    assert api.create_commit.call_args.kwargs["create_pr"] is True
    api, _ = _push_with_mocked_hub(detector, tmp_path=tmp_path, revision="refs/pr/3", branches=("main", "refs/pr/3"))
    api.create_branch.assert_not_called()  # a pull request's ref is no branch to make


def test_save_pretrained_writes_a_card_keeps_the_owners_and_rewrites_its_own(tiny_checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard
    from transformers import ViTMAEForPreTraining

    from maeday_hf.detector_card import is_generated_card

    detector = load_detector(tiny_checkpoint, device="cpu")
    detector.save_pretrained(tmp_path / "saved")
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert is_generated_card(tmp_path / "saved" / "README.md") and "zero-shot" in card.data.tags
    assert "load_detector('saved')" in card.content  # the folder's name, not the local path
    assert str(tmp_path) not in card.content
    snippet = card.content.split("```python\n", 1)[1].split("```", 1)[0]
    Image.new("RGB", (20, 30), "gray").save(tmp_path / "query.png")
    monkeypatch.chdir(tmp_path)  # where the folder would be cloned
    namespace = {}
    exec(snippet, namespace)
    assert namespace["result"]["anomaly_map"].shape == (30, 20)
    # The same folder saved again with a calibrated (fine-tuned) model: its own card is rewritten for it.
    model = ViTMAEForPreTraining.from_pretrained(tiny_checkpoint)
    model.config.anomaly_threshold = 0.125
    model.config.anomaly_threshold_settings = {"num_masks": 32, "mask_ratio": 0.75, "mask_schedule": "random"}
    calibrated = AnomalyDetectionPipeline(model=model, image_processor=detector.image_processor)
    calibrated.save_pretrained(tmp_path / "saved")
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert "few-shot" in card.data.tags and "`0.125`" in card.content and "num_masks 32" in card.content
    # A generated card someone edited is theirs from then on.
    edited = (tmp_path / "saved" / "README.md").read_text().replace("## Citation", "Checked on line 3.\n\n## Citation")
    (tmp_path / "saved" / "README.md").write_text(edited)
    detector.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "README.md").read_text() == edited
    # An owner's README.md is never overwritten.
    (tmp_path / "saved" / "README.md").write_text("# Notes on our line-3 detector\n")
    detector.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "README.md").read_text() == "# Notes on our line-3 detector\n"
    assert [name for name in os.listdir(tmp_path / "saved") if name.endswith(".tmp")] == []
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="a-file.*is a file; expected a folder"):
        detector.save_pretrained(tmp_path / "a-file")


def test_the_example_card_in_model_cards_is_what_the_code_writes():
    """model_cards/maeday-zero-shot.md shows the card a detector of facebook/vit-mae-base gets; it must not drift."""
    from transformers import ViTMAEConfig

    from maeday_hf.detector_card import render_detector_card

    example = os.path.join(os.path.dirname(__file__), os.pardir, "model_cards", "maeday-zero-shot.md")
    with open(example, encoding="utf-8") as handle:
        shipped = handle.read()
    # As a pushed detector of facebook/vit-mae-base gets it: `_model_card` with its defaults (no license).
    rendered = render_detector_card("ORG/maeday-vit-mae-base", ViTMAEConfig(), source="facebook/vit-mae-base")
    assert shipped == rendered, "model_cards/maeday-zero-shot.md is stale: render it again with render_detector_card"


def test_detector_card_names_a_hub_base_and_its_geometry(tiny_checkpoint):
    from huggingface_hub import ModelCard
    from transformers import ViTMAEConfig

    from maeday_hf.detector_card import render_detector_card

    config = ViTMAEConfig(norm_pix_loss=True)
    card = ModelCard(render_detector_card("org/detector", config, source="facebook/vit-mae-base", mask_ratio=0.5))
    assert card.data.base_model == "facebook/vit-mae-base"
    assert "[`facebook/vit-mae-base`](https://huggingface.co/facebook/vit-mae-base)" in card.content
    assert "random\n50 % of its patches (mask ratio 0.5;" in card.content
    assert "| image size | 224 px |" in card.content and "| encoder | 12 layers, width 768, 12 heads |" in card.content
    assert "norm_pix_loss" in card.content
    # A card naming itself as its base (saved again under its own repo id) has no base_model.
    assert ModelCard(render_detector_card("org/detector", config, source="org/detector")).data.base_model is None


def test_bf16_autocast_stays_close_to_float32(detector, images):
    exact = detector(images[1], num_masks=4, bf16=False)
    fast = detector(images[1], num_masks=4, bf16=True)
    assert not np.array_equal(exact["anomaly_map"], fast["anomaly_map"])  # bf16 really ran
    scale = np.abs(exact["anomaly_map"]).max()
    assert np.abs(fast["anomaly_map"] - exact["anomaly_map"]).max() < 0.05 * scale
    assert fast["score"] == pytest.approx(exact["score"], rel=0.05)
    with pytest.raises(TypeError, match="bf16"):
        detector(images[1], bf16="yes")


def test_a_device_is_checked_to_exist_here():
    from maeday_hf.modeling import resolve_device

    assert resolve_device("cpu") == "cpu" and resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(-1) == -1  # transformers' "CPU"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for missing in (gpus, f"cuda:{gpus}", -3, "gpu", True):
        with pytest.raises(ValueError, match=re.escape(f"device={missing!r}")):
            resolve_device(missing)


def test_a_device_map_places_the_model_and_an_offloaded_one_runs_without_a_bf16_copy(tiny_checkpoint, images,
                                                                                      tmp_path):
    reference = load_detector(tiny_checkpoint, device="cpu")(images[0], num_masks=3, bf16=False)
    # accelerate places it: load_detector passes no device of its own (transformers refused both together).
    placed = load_detector(tiny_checkpoint, device_map="cpu")
    assert placed(images[0], num_masks=3, bf16=False)["score"] == pytest.approx(reference["score"], rel=1e-6)
    with pytest.raises(ValueError, match=r"device='cpu' and device_map='cpu' both place the model: give one"):
        load_detector(tiny_checkpoint, device="cpu", device_map="cpu")
    # Part of it offloaded to disk: its modules fetch their weights at each forward, so there is no bf16 copy to make
    # (by default it runs in its own float32; asked for, bf16 is refused, naming why).
    offloaded = pipeline("anomaly-detection", model=tiny_checkpoint, device_map={"vit": "cpu", "decoder": "disk"},
                         model_kwargs={"offload_folder": str(tmp_path / "offload")})
    assert offloaded(images[0], num_masks=3)["score"] == pytest.approx(reference["score"], rel=1e-6)
    with pytest.raises(ValueError, match=r"spread over devices or offloaded .* pass bf16=False"):
        offloaded(images[0], num_masks=3, bf16=True)


def test_an_adapter_is_placed_by_device_not_device_map(tmp_path):
    config = save_tiny_checkpoint(tmp_path / "adapter-like")
    # (a config marked as an adapter is enough: device_map is refused before its adapter files are looked for)
    from maeday_hf.adapter_model import ADAPTER_CONFIG_KEY

    path = Path(config) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), ADAPTER_CONFIG_KEY: {"subfolder": "adapter"}}))
    with pytest.raises(ValueError, match=r"is an adapter, merged into its base before it is placed: pass device="):
        load_detector(config, device_map="cpu")


def test_a_float16_model_on_the_cpu_is_warned_about(tiny_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="maeday_hf.pipeline"):
        pipeline("anomaly-detection", model=tiny_checkpoint, dtype=torch.float16, device="cpu")
    assert "float16 on the CPU" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="maeday_hf.pipeline"):
        pipeline("anomaly-detection", model=tiny_checkpoint, dtype=torch.bfloat16, device="cpu")
    assert "float16 on the CPU" not in caplog.text


def test_folder_listing_leaves_out_hidden_files(tmp_path):
    from maeday_hf.images import list_images

    for name in ("b.png", "a.JPG", "._a.JPG", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [path.name for path in list_images(tmp_path)] == ["a.JPG", "b.png"]


def test_a_card_of_the_first_generated_kind_is_rewritten(tiny_checkpoint, tmp_path):
    from maeday_hf.detector_card import is_generated_card

    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "README.md").write_text(
        "---\ntags:\n- maeday\n---\n\n<!-- written by maeday_hf: saving the detector again rewrites this card -->\n\n"
        "# MAEDAY anomaly detector: saved\n")
    load_detector(tiny_checkpoint, device="cpu").save_pretrained(tmp_path / "saved")
    assert is_generated_card(tmp_path / "saved" / "README.md")
    assert "| image size |" in (tmp_path / "saved" / "README.md").read_text()


def test_an_anomalous_label_never_comes_with_an_empty_mask(detector):
    # A score just above the threshold: the map's bilinear resize to 45 x 45 lowered its interior peak below it.
    image = np.full((45, 45, 3), 128, np.uint8)
    image[18:27, 18:27] = np.random.RandomState(0).randint(0, 255, (9, 9, 3))
    plain = detector(image, num_masks=4)
    peak = float(plain["anomaly_map"].max())
    assert peak < plain["score"]
    threshold = (peak + plain["score"]) / 2
    result = detector(image, num_masks=4, threshold=threshold)
    mask = np.asarray(result["mask"])
    assert result["label"] == "anomalous"
    assert np.array_equal(mask > 0, plain["anomaly_map"] == plain["anomaly_map"].max())  # the peak, where it lies
    # Elsewhere the mask is the map above the threshold, as before.
    lower = detector(image, num_masks=4, threshold=peak * 0.9)
    assert np.array_equal(np.asarray(lower["mask"]) > 0, plain["anomaly_map"] > peak * 0.9)
    assert detector(image, num_masks=4, threshold=plain["score"] * 1.01)["label"] == "normal"
    assert not np.asarray(detector(image, num_masks=4, threshold=plain["score"] * 1.01)["mask"]).any()
