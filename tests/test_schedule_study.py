"""The mask-schedule study: its deviation measure and its wiring (maps, reference, metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_IMAGE_SIZE, make_tiny_model
from maeday_hf.masking import make_mask_noise
from maeday_hf.metrics import image_roc_auc, pixel_roc_auc
from maeday_hf.schedule_study import REFERENCE_SEED, compare_mask_schedules, map_deviation, summarize
from maeday_hf.scoring import maeday_anomaly_maps


def test_map_deviation_is_the_mean_relative_frobenius_distance():
    rng = np.random.default_rng(0)
    maps, reference = rng.random((3, 5, 4)), rng.random((3, 5, 4)) + 0.5
    expected = np.mean([np.linalg.norm(m - r) / np.linalg.norm(r) for m, r in zip(maps, reference)])
    assert map_deviation(torch.tensor(maps), torch.tensor(reference)) == pytest.approx(expected, rel=1e-12)


def test_study_scores_each_schedule_against_the_converged_map_and_the_labels():
    model = make_tiny_model()
    torch.manual_seed(0)
    pixel_values = torch.randn(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    masks = [np.zeros((TINY_IMAGE_SIZE,) * 2, bool) for _ in range(4)]
    masks[1][4:12, 4:12] = masks[3][20:30, 2:9] = True
    labels = [0, 1, 0, 1]
    results = compare_mask_schedules(model, pixel_values, masks, labels, num_masks_grid=(8,), seeds=(REFERENCE_SEED, 3),
                                     reference_num_masks=8)
    assert [(r.schedule, r.num_masks, r.seed) for r in results] == [
        ("random", 8, REFERENCE_SEED), ("random", 8, 3), ("balanced", 8, REFERENCE_SEED), ("balanced", 8, 3)
    ]
    # The reference's own masks reproduce it; other masks do not.
    assert results[0].map_deviation == 0.0 and all(r.map_deviation > 0 for r in results[1:])
    outputs = maeday_anomaly_maps(model, pixel_values, make_mask_noise(8, 16, 0.75, "balanced", 3), 0.75)
    assert results[3].pixel_roc_auc == pixel_roc_auc(masks, list(outputs["anomaly_map"].numpy()), num_bins=None)
    assert results[3].image_roc_auc == image_roc_auc(labels, outputs["pred_score"].numpy())
    rows = summarize(results)
    assert [(row["schedule"], row["num_seeds"]) for row in rows] == [("random", 2), ("balanced", 2)]
    assert rows[1]["map_deviation_mean"] == pytest.approx(np.mean([r.map_deviation for r in results[2:]]))


@pytest.mark.parametrize("grid, seeds, name", [((4, 4), (0, 1), "num_masks_grid"), ((4,), (0, 0), "seeds")])
def test_a_repeated_n_or_seed_is_refused_not_counted_twice(grid, seeds, name):
    pixel_values = torch.zeros(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    masks = [np.zeros((TINY_IMAGE_SIZE,) * 2, bool)] * 2
    with pytest.raises(ValueError, match=f"{name} repeats \\[{grid[0] if name == 'num_masks_grid' else 0}\\]"):
        compare_mask_schedules(make_tiny_model(), pixel_values, masks, [0, 1], num_masks_grid=grid, seeds=seeds)


@pytest.mark.parametrize("arguments, fragment", [
    (["--num-masks", "0"], "--num-masks must be >= 1"), (["--reference-num-masks", "0"], "--reference-num-masks"),
    (["--seeds", "-1"], "--seeds must be in [0, 2**32)"), (["--seeds", "1", "1"], "--seeds repeats a value"),
    (["--num-test", "1"], "--num-test must be >= 2"), (["--image-size", "60"], "multiple of 8"),
    (["--num-train", "0"], "--num-train must be >= 1"), (["--steps", "0"], "--steps must be >= 1"),
])
def test_the_study_script_refuses_bad_arguments_before_pretraining(arguments, fragment, capsys, monkeypatch):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "study_mask_schedule.py")
    spec = importlib.util.spec_from_file_location("study_mask_schedule", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "pretrain_small_mae", lambda *args: pytest.fail("pretraining started"))
    with pytest.raises(SystemExit) as status:
        script.main(arguments)
    assert status.value.code == 2 and fragment in capsys.readouterr().err


def test_the_small_mae_pretrains_saves_and_loads_as_a_detector(tmp_path):
    from maeday_hf.modeling import load_detector
    from maeday_hf.small_mae import pretrain_small_mae, small_mae

    record = pretrain_small_mae(tmp_path / "small", ["stripes"], image_size=24, num_train=2, steps=2)
    assert record["categories"] == ["stripes"] and record["steps"] == 2 and record["losses"]
    assert "9 patches" in record["pretrained"]
    assert not [path for path in tmp_path.iterdir() if path.name != "small"]  # nothing left beside it
    detector = load_detector(str(tmp_path / "small"), device="cpu")
    result = detector(np.zeros((30, 20, 3), np.uint8), num_masks=2)
    assert result["anomaly_map"].shape == (30, 20)
    # Its fixed sin-cos position embeddings are set (a random init leaves them at zero) and stay as trained.
    assert detector.model.vit.embeddings.position_embeddings.abs().sum() > 0
    assert torch.equal(small_mae(24).vit.embeddings.position_embeddings,
                       detector.model.vit.embeddings.position_embeddings)
    with pytest.raises(ValueError, match=r"categories must be some of .*got \['carpet'\]"):
        pretrain_small_mae(tmp_path / "x", ["carpet"], steps=1)
    with pytest.raises(ValueError, match="multiple of the patch size 8, got 30"):
        pretrain_small_mae(tmp_path / "x", ["stripes"], image_size=30, steps=1)


@pytest.mark.parametrize("arguments, fragment", [
    (["--image-size", "60"], "multiple of 8"), (["--pretrain-steps", "0"], "--pretrain-steps must be >= 1"),
    (["--shots", "0", "9"], "--shots must be in [0, --num-train = 8]"), (["--shot-seeds", "0"], "--shot-seeds"),
])
def test_the_few_shot_study_refuses_bad_arguments_before_pretraining(arguments, fragment, capsys, monkeypatch,
                                                                      tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "study_few_shot.py")
    spec = importlib.util.spec_from_file_location("study_few_shot", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "pretrain_small_mae", lambda *args, **kwargs: pytest.fail("pretraining started"))
    with pytest.raises(SystemExit) as status:
        script.main(["--output-dir", str(tmp_path / "out"), *arguments])
    assert status.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
