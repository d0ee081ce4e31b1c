"""Label-free normalisation and summation of anomaly detectors' outputs."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from maeday_hf.ensemble import (
    NormalizationStats,
    compute_normalization_stats,
    ensemble_predictions,
    ensemble_scores,
    normalize_scores,
)


def _outputs(seed: int, num_images: int = 6, size: tuple[int, int] = (9, 11), offset: float = 0.0, gain: float = 1.0):
    """Scores and maps of a fake method: maps (num_images, H, W), score = max of map, as MAEDAY gives them."""
    rng = np.random.default_rng(seed)
    maps = (offset + gain * rng.gamma(2.0, size=(num_images, *size))).astype(np.float32)
    return maps.reshape(num_images, -1).max(axis=1).astype(np.float64), maps


@pytest.mark.parametrize(
    "function", [compute_normalization_stats, normalize_scores, ensemble_scores, ensemble_predictions]
)
def test_no_labels_in_the_signature(function):
    names = set(inspect.signature(function).parameters)
    assert not names & {"labels", "label", "gt_label", "gt_mask", "gt_masks", "targets", "y_true"}


@pytest.mark.parametrize("method", ["zscore", "robust"])
@pytest.mark.parametrize("shift, gain", [(5.0, 1.0), (-3.0, 1.0), (0.0, 40.0), (1000.0, 0.01)])
def test_ensemble_is_invariant_to_shifting_and_scaling_one_method(method, shift, gain):
    maeday_scores, maeday_maps = _outputs(0)
    patchcore_scores, patchcore_maps = _outputs(1)
    scores, maps = ensemble_scores([maeday_scores, patchcore_scores], [maeday_maps, patchcore_maps], method=method)
    shifted_scores, shifted_maps = ensemble_scores(
        [maeday_scores, gain * patchcore_scores + shift],
        [maeday_maps, (gain * patchcore_maps.astype(np.float64) + shift).astype(np.float64)],
        method=method,
    )
    np.testing.assert_allclose(shifted_scores, scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(shifted_maps, maps, rtol=1e-4, atol=1e-4)


def test_zscore_normalisation_and_sum_match_a_plain_reference():
    first_scores, first_maps = _outputs(0)
    second_scores, second_maps = _outputs(1, offset=7.0, gain=3.0)
    scores, maps = ensemble_scores([first_scores, second_scores], [first_maps, second_maps])

    def z(values, pool):
        return (values - pool.mean()) / pool.std()

    expected_scores = z(first_scores, first_scores) + z(second_scores, second_scores)
    expected_maps = z(first_maps.astype(np.float64), first_maps.astype(np.float64)) + z(
        second_maps.astype(np.float64), second_maps.astype(np.float64)
    )
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-9)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-5)
    assert maps.dtype == np.float32 and maps.shape == first_maps.shape


def test_the_plain_sum_adds_the_raw_outputs_and_takes_a_single_image():
    first_scores, first_maps = _outputs(0)
    second_scores, second_maps = _outputs(1, offset=7.0, gain=3.0)
    scores, maps = ensemble_scores([first_scores, second_scores], [first_maps, second_maps], method="none")
    np.testing.assert_array_equal(scores, first_scores + second_scores)
    np.testing.assert_allclose(maps, first_maps.astype(np.float64) + second_maps, rtol=1e-6)
    single, _ = ensemble_scores([first_scores[:1], second_scores[:1]], [first_maps[:1], second_maps[:1]], method="none")
    assert single[0] == scores[0]  # no statistics of the other images, and no warning about their spread
    with pytest.raises(ValueError, match="'minmax'"):
        ensemble_scores([first_scores], [first_maps], stats=[None], method="minmax")


@pytest.mark.parametrize("method", ["zscore", "robust"])
def test_stats_pool_every_pixel_of_every_map(method):
    scores, maps = _outputs(2)
    stats = compute_normalization_stats(scores, list(maps), method=method)
    pixels = maps.astype(np.float64).ravel()
    if method == "zscore":
        expected = (scores.mean(), scores.std(), pixels.mean(), pixels.std())
    else:
        (s25, s50, s75), (p25, p50, p75) = np.percentile(scores, [25, 50, 75]), np.percentile(pixels, [25, 50, 75])
        expected = (s50, s75 - s25, p50, p75 - p25)
    actual = (stats.score_center, stats.score_scale, stats.map_center, stats.map_scale)
    assert actual == pytest.approx(expected, rel=1e-9)


def test_robust_pixel_quantiles_on_a_bounded_subsample(monkeypatch):
    monkeypatch.setattr("maeday_hf.ensemble._MAX_QUANTILE_VALUES", 500)
    scores, maps = _outputs(4, num_images=8, size=(40, 40))
    stats = compute_normalization_stats(scores, maps, method="robust")
    p25, p50, p75 = np.percentile(maps.astype(np.float64), [25, 50, 75])
    assert stats.map_center == pytest.approx(p50, rel=0.1)
    assert stats.map_scale == pytest.approx(p75 - p25, rel=0.2)


def test_given_stats_are_used_as_is():
    scores, maps = _outputs(3)
    stats = NormalizationStats(score_center=1.0, score_scale=2.0, map_center=-1.0, map_scale=4.0)
    normalized_scores, normalized_maps = normalize_scores(scores, maps, stats)
    np.testing.assert_allclose(normalized_scores, (scores - 1.0) / 2.0)
    np.testing.assert_allclose(normalized_maps, (maps + 1.0) / 4.0, rtol=1e-6)


def test_maps_of_different_sizes_per_image_as_lists():
    rng = np.random.default_rng(0)
    sizes = [(5, 7), (8, 4), (6, 6)]
    maps_a = [rng.random(size).astype(np.float32) for size in sizes]
    maps_b = [rng.random(size).astype(np.float32) * 10 for size in sizes]
    scores, maps = ensemble_scores(
        [[m.max() for m in maps_a], [m.max() for m in maps_b]], [maps_a, maps_b], method="robust"
    )
    assert isinstance(maps, list) and [m.shape for m in maps] == sizes
    assert scores.shape == (3,)


def test_ensemble_predictions_takes_pipeline_style_dicts():
    maeday_scores, maeday_maps = _outputs(0, num_images=3)
    patchcore_scores, patchcore_maps = _outputs(1, num_images=3)
    as_dicts = [
        [{"score": float(s), "anomaly_map": m} for s, m in zip(scores, maps)]
        for scores, maps in [(maeday_scores, maeday_maps), (patchcore_scores, patchcore_maps)]
    ]
    predictions = ensemble_predictions(as_dicts)
    scores, maps = ensemble_scores([maeday_scores, patchcore_scores], [maeday_maps, patchcore_maps])
    assert [p["score"] for p in predictions] == pytest.approx(scores.tolist())
    for prediction, anomaly_map in zip(predictions, maps):
        np.testing.assert_allclose(prediction["anomaly_map"], anomaly_map, rtol=1e-6)


def test_constant_scores_fall_back_to_unit_scale(caplog):
    maps = np.full((1, 4, 4), 3.0, dtype=np.float32)
    normalized_scores, normalized_maps = normalize_scores(np.array([3.0]), maps)
    assert normalized_scores.tolist() == [0.0]
    assert np.all(normalized_maps == 0.0)
    assert "spread" in caplog.text


def test_float32_rounding_is_not_taken_for_a_spread(caplog):
    # Three identical queries scored in two batches: float32 scores one step apart carry no ranking information,
    # so they must not be blown up to unit variance and decide the ensemble's order.
    rounded = np.array([1.1287628, 1.1287628, 1.1287627], dtype=np.float32).astype(np.float64)
    other = np.array([0.0, 1.0, 2.0])
    maps = [np.full((3, 4, 4), value, dtype=np.float32) for value in (1.0, 2.0)]
    scores, _ = ensemble_scores([other, rounded], [np.stack([m[0] for m in maps] + [maps[0][0]]), maps[1]])
    assert np.argsort(scores).tolist() == [0, 1, 2]
    assert "spread" in caplog.text


def test_robust_scale_of_sparse_maps_follows_a_gain():
    # More than half of the pixels are exactly 0 (zero IQR), the rest vary: the map's scale must still follow a gain.
    rng = np.random.default_rng(0)
    sparse = np.zeros((4, 8, 8), dtype=np.float32)
    sparse[:, 0, :3] = rng.random((4, 3))
    dense = rng.random((4, 8, 8)).astype(np.float32)
    scores = [rng.random(4), rng.random(4)]
    _, maps = ensemble_scores(scores, [dense, sparse], method="robust")
    _, amplified = ensemble_scores(scores, [dense, sparse * 1000], method="robust")
    np.testing.assert_allclose(amplified, maps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "scores_per_method, maps_per_method, message",
    [
        ([], [], "at least one method"),
        ([np.ones(2)], [np.ones((2, 3, 3)), np.ones((2, 3, 3))], "for 1 methods but maps for 2"),
        ([np.arange(2.0), np.arange(3.0)], [np.ones((2, 3, 3)), np.ones((3, 3, 3))], "scored 2 images but method 1"),
        ([np.arange(2.0)], [np.ones((3, 3, 3))], "2 image scores but 3 anomaly maps"),
        (
            [np.arange(2.0), np.arange(2.0)],
            [np.ones((2, 3, 3)), np.ones((2, 4, 3))],
            r"Image 0: .* \(3, 3\) .* \(4, 3\)",
        ),
        ([np.array([0.0, np.nan])], [np.ones((2, 3, 3))], "NaN"),
        ([np.arange(2.0)], [np.ones((2, 3))], r"shape \(num_images, H, W\)"),
    ],
)
def test_bad_inputs_raise(scores_per_method, maps_per_method, message):
    with pytest.raises(ValueError, match=message):
        ensemble_scores(scores_per_method, maps_per_method)


def test_bad_method_and_stats_raise():
    scores, maps = _outputs(0)
    with pytest.raises(ValueError, match="method"):
        compute_normalization_stats(scores, maps, method="minmax")
    with pytest.raises(ValueError, match="score_scale"):
        NormalizationStats(score_center=0.0, score_scale=0.0, map_center=0.0, map_scale=1.0)
    with pytest.raises(ValueError, match="2 normalisation stats for 1 methods"):
        ensemble_scores([scores], [maps], stats=[None, None])


# --- pinned by a mutation review ----------------------------------------------------------------------------------


def test_robust_scale_of_a_map_mostly_at_one_value_is_the_scaled_mean_absolute_deviation():
    # Most pixels at one (non-zero) value: the IQR is 0, so the spread falls back to the mean absolute deviation from
    # the median, scaled to the normal's IQR; taken around the mean, inverted, or uncentred, it weighted such a
    # (sparse, saturated) method wrongly.
    rng = np.random.default_rng(0)
    maps = np.full((4, 8, 8), 5.0, dtype=np.float32)
    maps[:, :2, :] = rng.random((4, 2, 8)) * 10  # 25 % vary
    stats = compute_normalization_stats(rng.random(4), maps, method="robust")
    values = maps.astype(np.float64).ravel()
    median = np.median(values)
    normal_iqr, normal_mean_absolute_deviation = 1.3489795003921634, math.sqrt(2 / math.pi)
    assert stats.map_center == median
    assert stats.map_scale == pytest.approx(
        normal_iqr / normal_mean_absolute_deviation * np.abs(values - median).mean(), rel=1e-9
    )


@pytest.mark.parametrize("factor", [1000.0, -1.0])
def test_float32_rounding_is_not_a_spread_at_any_magnitude_or_sign(factor, caplog):
    # Scores one float32 step apart hold no information: relative to their magnitude (not an absolute epsilon), and
    # for negative scores too, they get scale 1 rather than being blown up to unit variance.
    base = np.float32(1.1287628 * factor)
    rounded = np.array([base, base, np.nextafter(base, np.float32(0))], dtype=np.float32).astype(np.float64)
    stats = compute_normalization_stats(rounded, np.ones((3, 4, 4), np.float32) * np.arange(3)[:, None, None])
    assert stats.score_scale == 1.0 and "spread" in caplog.text
