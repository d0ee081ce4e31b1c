"""A fine-tune's calibrated threshold: applied only where it holds; the CLI reports its labels; frozen weights stay."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from conftest import save_tiny_checkpoint
from maeday_hf.cli import main
from maeday_hf.finetune import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def calibrated_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrated")
    save_tiny_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    config["anomaly_threshold"] = 0.0  # every score is above it
    config["anomaly_threshold_settings"] = {"num_masks": 4, "mask_ratio": 0.75}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_calibrated_threshold_applies_at_its_own_settings(calibrated_checkpoint, image):
    detector = pipeline("anomaly-detection", model=calibrated_checkpoint)
    result = detector(image, num_masks=4)
    assert result["label"] == "anomalous" and result["mask"].mode == "L"


def test_the_calls_own_settings_decide_whether_the_calibrated_threshold_holds(calibrated_checkpoint, caplog):
    """A setting given at the call overrides the one given at construction, for the calibrated threshold's check
    as for the scoring: a detector built with num_masks=2 and called with num_masks=4 (the calibration's) labels."""
    image = np.zeros((32, 32, 3), np.uint8)
    detector = pipeline("anomaly-detection", model=calibrated_checkpoint, num_masks=2)
    assert "label" not in detector(image)  # N = 2 from construction: not the calibration's settings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maeday_hf.pipeline"):
        result = detector(image, num_masks=4)
    assert result["label"] == "anomalous" and "calibrated threshold" not in caplog.text
    built_at_4 = pipeline("anomaly-detection", model=calibrated_checkpoint, num_masks=4)
    assert built_at_4(image)["label"] == "anomalous"
    assert "label" not in built_at_4(image, num_masks=2)


def test_a_folder_calibrated_before_the_schedule_was_recorded_holds_for_random_masks_only(calibrated_checkpoint, caplog):
    """A folder whose settings lack "mask_schedule" was calibrated with random masks; balanced masks (less spread
    between masks) shift the scores, so its threshold is dropped there, with the warning."""
    image = np.zeros((32, 32, 3), np.uint8)
    detector = pipeline("anomaly-detection", model=calibrated_checkpoint)
    assert detector(image, num_masks=4, mask_schedule="random")["label"] == "anomalous"
    with caplog.at_level(logging.WARNING, logger="maeday_hf.pipeline"):
        result = detector(image, num_masks=4, mask_schedule="balanced")
    assert "label" not in result and "mask" not in result
    assert "calibrated threshold" in caplog.text


@pytest.mark.parametrize("call", [dict(num_masks=2), dict(mask_ratio=0.5), dict()])  # dict(): the default N=32
def test_calibrated_threshold_is_dropped_with_a_warning_elsewhere(calibrated_checkpoint, image, call, caplog):
    detector = pipeline("anomaly-detection", model=calibrated_checkpoint)
    with caplog.at_level(logging.WARNING, logger="maeday_hf.pipeline"):
        result = detector(image, **call)
    assert "label" not in result and "mask" not in result
    assert "calibrated threshold" in caplog.text


def test_an_ensemble_call_does_not_warn_about_a_threshold_it_never_applies(calibrated_checkpoint, image, caplog,
                                                                           monkeypatch):
    from maeday_hf.ensemble import IDENTITY

    class FixedPatchCore:  # PatchCore's outputs, without a backbone
        def predict(self, images):
            return [{"score": 1.0, "anomaly_map": np.ones((32, 32), dtype=np.float32)} for _ in images]

    monkeypatch.setattr("maeday_hf.patchcore.PatchCore", FixedPatchCore)  # (the call checks isinstance(..., PatchCore))
    detector = pipeline("anomaly-detection", model=calibrated_checkpoint)
    with caplog.at_level(logging.WARNING, logger="maeday_hf.pipeline"):
        result = detector(image, ensemble=FixedPatchCore(), ensemble_stats=[IDENTITY, IDENTITY], num_masks=2)
    assert "calibrated threshold" not in caplog.text and "label" not in result
    assert result["score"] == pytest.approx(detector(image, num_masks=2)["score"] + 1.0, rel=1e-6)


def test_an_explicit_threshold_always_wins(calibrated_checkpoint, image):
    detector = pipeline("anomaly-detection", model=calibrated_checkpoint)
    assert detector(image, num_masks=2, threshold=1e9)["label"] == "normal"
    assert pipeline("anomaly-detection", model=calibrated_checkpoint, threshold=1e9)(image, num_masks=4)["label"] == (
        "normal"
    )


def test_cli_writes_the_calibrated_labels(calibrated_checkpoint, image, tmp_path):
    image.save(tmp_path / "query.png")
    out = tmp_path / "out"
    assert main(["detect", str(tmp_path / "query.png"), "--model", calibrated_checkpoint, "--out", str(out),
                 "--num-masks", "4", "--quiet"]) == 0
    with open(out / "scores.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["label"] == "anomalous"


def test_full_finetune_keeps_the_fixed_position_embeddings(tiny_checkpoint, tmp_path, image):
    image.save(tmp_path / "shot.png")
    config = FinetuneConfig(full_finetune=True, num_steps=2, batch_size=2, disable_tqdm=True, use_cpu=True,
                            calibration_views_per_shot=1, calibration_num_masks=2, learning_rate=0.5)
    result = finetune(tiny_checkpoint, [tmp_path / "shot.png"], tmp_path / "full", config)
    from transformers import ViTMAEForPreTraining

    before = ViTMAEForPreTraining.from_pretrained(tiny_checkpoint)
    after = ViTMAEForPreTraining.from_pretrained(result.output_dir)
    assert torch.equal(before.vit.embeddings.position_embeddings, after.vit.embeddings.position_embeddings)
    assert torch.equal(before.decoder.decoder_pos_embed, after.decoder.decoder_pos_embed)
    assert not torch.equal(before.decoder.decoder_pred.weight, after.decoder.decoder_pred.weight)


def test_calibration_threshold_is_mean_plus_k_sample_std_or_the_top_score():
    from conftest import make_tiny_model
    from maeday_hf.calibration import calibrate_threshold
    from maeday_hf.reconstruction import runs_bfloat16_natively

    model = make_tiny_model(seed=1)
    shots = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for num_std in (0.0, 1.0, 3.0):
        calibration = calibrate_threshold(model, shots, num_views_per_shot=3, num_masks=2, num_std=num_std)
        scores = np.array(calibration.scores)
        assert len(scores) == 6
        expected = max(scores.mean() + num_std * scores.std(ddof=1), scores.max() * 1.01)
        assert calibration.threshold == pytest.approx(expected, rel=1e-12)
    assert calibration.precision == ("bfloat16" if runs_bfloat16_natively(torch.device("cpu")) else "float32")
    calibration = calibrate_threshold(model.double(), shots.double(), num_views_per_shot=3, num_masks=2, num_std=0.0)
    assert calibration.precision == "float64"
    assert calibration.threshold == pytest.approx(max(calibration.scores) * 1.01, rel=1e-12)
    model.float()
    with pytest.raises(ValueError, match="num_views_per_shot"):
        calibrate_threshold(model, shots, num_views_per_shot=0, num_masks=2)
    with pytest.raises(ValueError, match="0 images"):
        calibrate_threshold(model, shots[:0], num_masks=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_shot_is_labelled_anomalous_in_either_precision(tiny_checkpoint, seed):
    # The pipeline scores a float32 model in bf16 where the hardware multiplies it and in float32 elsewhere, by its
    # own path: the threshold must hold in both, also when the top normal score sets it (num_std=0).
    from transformers import AutoImageProcessor, ViTMAEForPreTraining

    from maeday_hf.calibration import calibrate_threshold

    rng = np.random.default_rng(seed)
    shots = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    model = ViTMAEForPreTraining.from_pretrained(tiny_checkpoint).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_checkpoint)
    pixel_values = processor(images=shots, return_tensors="pt")["pixel_values"]
    calibration = calibrate_threshold(model, pixel_values, num_masks=4, num_std=0.0, augment=False)
    detector = pipeline("anomaly-detection", model=model, image_processor=processor)
    for bf16 in (False, True):
        results = detector(shots, num_masks=4, threshold=calibration.threshold, bf16=bf16)
        assert [result["label"] for result in results] == ["normal"] * 3
        same_precision = bf16 == (calibration.precision == "bfloat16")
        scores = [result["score"] for result in results]
        assert scores == pytest.approx(calibration.scores, rel=1e-5 if same_precision else 1e-2)


def test_a_score_that_is_not_finite_makes_the_threshold_nan(monkeypatch):
    # Python's max() skips a NaN that is not its first argument: the fine-tune's finiteness check must still see it.
    import math

    import maeday_hf.calibration
    from conftest import make_tiny_model

    model = make_tiny_model(seed=1)
    shots = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    real = maeday_hf.calibration.maeday_anomaly_maps
    for position in (0, 1, 2):
        def with_a_nan(*args, position=position, **kwargs):
            outputs = real(*args, **kwargs)
            outputs["pred_score"][position] = math.nan
            return outputs

        monkeypatch.setattr(maeday_hf.calibration, "maeday_anomaly_maps", with_a_nan)
        assert math.isnan(maeday_hf.calibration.calibrate_threshold(model, shots, num_masks=2, augment=False).threshold)
