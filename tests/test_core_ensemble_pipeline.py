"""The pipeline's `ensemble=` option: MAEDAY + PatchCore summed after label-free normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ResNetBackbone, ResNetConfig

from maeday_hf.ensemble import ensemble_predictions
from maeday_hf.patchcore import PatchCore, PatchCoreConfig
from maeday_hf.synthetic import make_sample


@pytest.fixture(scope="module")
def fitted_patchcore(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-resnet")
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic")
    ResNetBackbone(config).eval().save_pretrained(folder)
    shots = [make_sample("weave", None, 64, seed=seed)[0] for seed in range(2)]
    return PatchCore(PatchCoreConfig(backbone=str(folder), image_size=64, sigma=1.0), device="cpu").fit(shots)


@pytest.fixture(scope="module")
def queries():
    return [make_sample("weave", defect, 64, seed=10 + i)[0] for i, defect in enumerate([None, "hole", "stain"])]


def test_ensemble_equals_normalised_sum_of_both_methods(detector, fitted_patchcore, queries):
    results = detector(queries, ensemble=fitted_patchcore, num_masks=3, threshold=0.0)
    expected = ensemble_predictions([detector(queries, num_masks=3), fitted_patchcore.predict(queries)])
    assert len(results) == 3
    for result, reference in zip(results, expected):
        assert result["score"] == pytest.approx(reference["score"], rel=1e-6)
        np.testing.assert_allclose(result["anomaly_map"], reference["anomaly_map"], rtol=1e-6)
        assert result["anomaly_map"].shape == (64, 64)
        assert result["label"] == ("anomalous" if result["score"] > 0 else "normal")
        assert isinstance(result["mask"], Image.Image)
    # Standardised and summed over the query set: the scores of two methods centre on zero.
    assert abs(sum(r["score"] for r in results)) < 1e-6


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(ensemble="patchcore"), ValueError, "reference_images"),
        (dict(ensemble="patchcore", reference_images=[]), ValueError, "reference_images"),
        (dict(ensemble="knn", reference_images=["x.png"]), ValueError, "knn"),
        (dict(ensemble=3), TypeError, "int"),
        (dict(reference_images=["x.png"]), ValueError, "reference_images"),
        (dict(ensemble_normalization="none"), ValueError, "ensemble_normalization"),
        (dict(ensemble="patchcore", reference_images=["x.png"], ensemble_normalization="minmax"), ValueError,
         "'minmax'"),
    ],
)
def test_bad_ensemble_options(detector, queries, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        detector(queries, num_masks=1, **kwargs)


def test_ensemble_refuses_a_single_query(detector, fitted_patchcore, queries):
    with pytest.raises(ValueError, match="at least 2"):
        detector(queries[0], ensemble=fitted_patchcore)


def test_the_papers_plain_sum_adds_the_raw_outputs(detector, fitted_patchcore, queries):
    maeday, patchcore = detector(queries, num_masks=3), fitted_patchcore.predict(queries)
    results = detector(queries, ensemble=fitted_patchcore, ensemble_normalization="none", num_masks=3)
    for result, own, other in zip(results, maeday, patchcore):
        assert result["score"] == pytest.approx(own["score"] + other["score"], rel=1e-6)
        np.testing.assert_allclose(result["anomaly_map"], own["anomaly_map"] + other["anomaly_map"], rtol=1e-6)
    alone = detector(queries[2], ensemble=fitted_patchcore, ensemble_normalization="none", num_masks=3)
    assert alone["score"] == pytest.approx(results[2]["score"], rel=1e-6)  # nothing fitted on the other queries


def test_fixed_ensemble_stats_make_results_independent_of_the_other_queries(detector, fitted_patchcore, queries):
    from maeday_hf.ensemble import compute_normalization_stats

    maeday = detector(queries, num_masks=3)
    patchcore = fitted_patchcore.predict(queries)
    stats = [
        compute_normalization_stats([r["score"] for r in outputs], [r["anomaly_map"] for r in outputs])
        for outputs in (maeday, patchcore)
    ]
    together = detector(queries, ensemble=fitted_patchcore, ensemble_stats=stats, num_masks=3)
    alone = detector(queries[1], ensemble=fitted_patchcore, ensemble_stats=stats, num_masks=3)
    assert alone["score"] == pytest.approx(together[1]["score"], rel=1e-5)
    np.testing.assert_allclose(alone["anomaly_map"], together[1]["anomaly_map"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="2 NormalizationStats"):
        detector(queries, ensemble=fitted_patchcore, ensemble_stats=stats[:1])


def test_ensemble_inputs_in_any_container_and_one_stat_missing_with_one_image(detector, fitted_patchcore, queries):
    expected = detector(queries, ensemble=fitted_patchcore, num_masks=3)
    for container in (tuple(queries), (query for query in queries), np.stack([np.asarray(q) for q in queries])):
        results = detector(container, ensemble=fitted_patchcore, num_masks=3)
        assert [r["score"] for r in results] == pytest.approx([r["score"] for r in expected], rel=1e-6)
    from maeday_hf.ensemble import compute_normalization_stats

    maeday = detector(queries, num_masks=3)
    stats = compute_normalization_stats([r["score"] for r in maeday], [r["anomaly_map"] for r in maeday])
    for incomplete in ([None, None], [stats, None]):
        with pytest.raises(ValueError, match="at least 2"):
            detector(queries[0], ensemble=fitted_patchcore, ensemble_stats=incomplete)
    with pytest.raises(ValueError, match="2 NormalizationStats"):
        detector(queries, ensemble=fitted_patchcore, ensemble_stats=[stats, "unit"])
    # A single reference image is one shot, as for PatchCore.fit.
    with pytest.raises(ValueError, match="reference_images"):
        detector(queries, ensemble="patchcore", reference_images=np.zeros((0, 8, 8, 3), dtype=np.uint8))


def test_plain_calls_take_tuples_and_stacked_arrays_as_several_images(detector, queries):
    expected = [r["score"] for r in detector(queries, num_masks=2)]
    assert [r["score"] for r in detector(tuple(queries), num_masks=2)] == pytest.approx(expected, rel=1e-6)
    stacked = np.stack([np.asarray(q) for q in queries])
    assert [r["score"] for r in detector(stacked, num_masks=2)] == pytest.approx(expected, rel=1e-6)


def test_ensemble_uncertainty_is_the_spread_of_maedays_normalised_map(detector, fitted_patchcore, queries):
    from maeday_hf.ensemble import compute_normalization_stats

    results = detector(queries, ensemble=fitted_patchcore, num_masks=3, return_uncertainty=True)
    maeday = detector(queries, num_masks=3, return_uncertainty=True)
    stats = compute_normalization_stats([r["score"] for r in maeday], [r["anomaly_map"] for r in maeday])
    for result, own in zip(results, maeday):
        np.testing.assert_allclose(result["uncertainty_map"], own["uncertainty_map"] / stats.map_scale, rtol=1e-5)


def test_a_detector_loaded_as_remote_code_takes_the_packages_patchcore_and_stats(detector, fitted_patchcore, queries,
                                                                                tmp_path):
    # With maeday_hf installed, a detector loaded with trust_remote_code=True runs the shipped copy of the code, whose
    # PatchCore and NormalizationStats are other classes than the ones a user builds with maeday_hf.
    import json
    import os
    import subprocess
    import sys
    import textwrap

    from maeday_hf.ensemble import IDENTITY

    saved = tmp_path / "saved"
    detector.save_pretrained(saved)
    for index, query in enumerate(queries):
        query.save(tmp_path / f"query{index}.png")
    paths = [str(tmp_path / f"query{index}.png") for index in range(len(queries))]
    stats = [None, IDENTITY]
    expected = detector(paths, ensemble=fitted_patchcore, ensemble_stats=stats, num_masks=3)
    code = f"""
        import json
        import maeday_hf
        from maeday_hf.ensemble import IDENTITY
        from maeday_hf.synthetic import make_sample
        from transformers import pipeline
        remote = pipeline(model={str(saved)!r}, trust_remote_code=True, device="cpu")
        assert "maeday_hf" not in type(remote).__module__, type(remote).__module__
        shots = [make_sample("weave", None, 64, seed=seed)[0] for seed in range(2)]
        config = maeday_hf.PatchCoreConfig(backbone={fitted_patchcore.config.backbone!r}, image_size=64, sigma=1.0)
        patchcore = maeday_hf.PatchCore(config, device="cpu").fit(shots)
        results = remote({paths!r}, ensemble=patchcore, ensemble_stats=[None, IDENTITY], num_masks=3)
        print(json.dumps([result["score"] for result in results]))
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                               timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    scores = json.loads(completed.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(scores, [result["score"] for result in expected], rtol=1e-5)


def test_another_librarys_class_of_the_same_name_is_not_taken_for_patchcore(detector, queries):
    import types

    other_library = types.ModuleType("patchcore.patchcore")  # (patchcore-inspection's module and class names)
    exec("class PatchCore:\n    def predict(self, images):\n        return []\n", other_library.__dict__)
    with pytest.raises(TypeError, match="ensemble must be 'patchcore' or a fitted PatchCore, got PatchCore"):
        detector(queries, ensemble=other_library.PatchCore(), num_masks=2)
