"""Metrics against scikit-learn and a slow, obviously-correct AUPRO; histogram within its bound; evaluate modules."""

from __future__ import annotations

from collections import deque

import evaluate
import numpy as np
import pytest
import sklearn.metrics as sklearn_metrics  # (a test dependency: a broken install fails, never skips)
import torch

from maeday_hf.metrics import (
    METRIC_PATHS,
    aupro,
    compute_pixel_metrics,
    image_f1_max,
    image_roc_auc,
    label_components,
    pixel_f1_max,
    pixel_roc_auc,
)


def reference_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = sklearn_metrics.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * precision * recall / (precision + recall)))


def reference_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions by breadth-first search, one pixel at a time."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y in range(height):
        for x in range(width):
            if not mask[y, x] or seen[y, x]:
                continue
            region, queue = [], deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                region.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            regions.append(region)
    return regions


def reference_aupro(masks: list[np.ndarray], maps: list[np.ndarray], max_fpr: float = 0.3) -> float:
    """Loop over every distinct score as a threshold; PRO = mean region overlap; trapezoid to max_fpr; normalise."""
    regions = [(index, region) for index, mask in enumerate(masks) for region in reference_regions(mask)]
    normal_scores = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fprs.append(float(np.mean(normal_scores >= threshold)))
        overlaps = [np.mean([maps[i][y, x] >= threshold for y, x in region]) for i, region in regions]
        pros.append(float(np.mean(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fprs, pros), zip(fprs[1:], pros[1:])):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # cut the last segment at max_fpr
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def random_category(seed: int, num_images: int = 6, size: int = 12, levels: int | None = None):
    """Random blobs on half the masks; maps correlated with the masks; `levels` rounds scores (ties)."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for index in range(num_images):
        mask = np.zeros((size, size), dtype=bool)
        if index % 2:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, size - 3, 2)
                mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
        scores = rng.random((size, size)) + 0.6 * mask
        if levels is not None:
            scores = np.round(scores * levels) / levels
        masks.append(mask)
        maps.append(scores.astype(np.float32))
    return masks, maps


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_equal_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    scores = rng.random(50) + 0.3 * labels
    if ties:
        scores = np.round(scores, 1)
    assert image_roc_auc(labels, scores) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert image_f1_max(labels, scores) == pytest.approx(reference_f1_max(labels, scores), abs=1e-12)


def test_image_metrics_accept_tensors_and_reject_bad_input():
    assert image_roc_auc(torch.tensor([0, 1]), torch.tensor([0.2, 0.8])) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        image_roc_auc([1, 1], [0.2, 0.8])
    with pytest.raises(ValueError, match="one score per image"):
        image_roc_auc([0, 1, 1], [0.2, 0.8])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_roc_auc([0, 2], [0.2, 0.8])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 8])
def test_exact_pixel_metrics_equal_sklearn(seed, levels):
    masks, maps = random_category(seed, levels=levels)
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    assert pixel_roc_auc(masks, maps, num_bins=None) == pytest.approx(
        sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12
    )
    assert pixel_f1_max(masks, maps, num_bins=None) == pytest.approx(reference_f1_max(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("levels", [None, 8])
def test_exact_aupro_equals_reference(seed, levels):
    masks, maps = random_category(seed, levels=levels)
    assert aupro(masks, maps, num_bins=None) == pytest.approx(reference_aupro(masks, maps), abs=1e-9)


def test_aupro_other_limit_and_perfect_maps():
    masks, maps = random_category(7)
    assert aupro(masks, maps, max_fpr=0.1, num_bins=None) == pytest.approx(reference_aupro(masks, maps, 0.1), abs=1e-9)
    perfect = [m.astype(np.float32) for m in masks]
    assert aupro(masks, perfect, num_bins=None) == pytest.approx(1.0)


@pytest.mark.parametrize("num_bins", [16, 256, 4096])
def test_histogram_within_stated_bound(num_bins):
    masks, maps = random_category(11, num_images=10, size=24)
    exact = compute_pixel_metrics(masks, maps, num_bins=None)
    binned = compute_pixel_metrics(masks, maps, num_bins=num_bins)
    assert abs(binned.pixel_roc_auc - exact.pixel_roc_auc) <= binned.pixel_roc_auc_error_bound + 1e-12
    assert abs(binned.aupro - exact.aupro) <= binned.aupro_error_bound + 1e-12
    assert binned.pixel_f1_max <= exact.pixel_f1_max + 1e-12
    assert exact.pixel_f1_max - binned.pixel_f1_max <= binned.pixel_f1_max_error_bound + 1e-12
    if num_bins == 4096:  # the bound is useful, not vacuous
        assert binned.pixel_roc_auc_error_bound < 1e-3 and binned.aupro_error_bound < 2e-4


def test_streaming_with_known_range_reads_a_generator_once():
    masks, maps = random_category(3)
    streamed = compute_pixel_metrics(
        iter(masks), (m for m in maps), score_range=(min(m.min() for m in maps), max(m.max() for m in maps))
    )
    assert streamed == compute_pixel_metrics(masks, maps)


def test_a_generator_of_maps_without_score_range_is_refused_clearly():
    masks, maps = random_category(3)
    with pytest.raises(TypeError, match=r"anomaly_maps is a one-pass generator.*pass score_range=\(min, max\)"):
        compute_pixel_metrics(masks, (m for m in maps))
    exact = compute_pixel_metrics(iter(masks), (m for m in maps), num_bins=None)  # read once: generators are fine
    assert exact == compute_pixel_metrics(masks, maps, num_bins=None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_are_read_as_their_values(dtype):
    masks, maps = random_category(4)
    half_maps = [torch.from_numpy(m).to(dtype).requires_grad_() for m in maps]
    as_float = [m.detach().float().numpy() for m in half_maps]
    assert compute_pixel_metrics(masks, half_maps) == compute_pixel_metrics(masks, as_float)
    labels = [int(m.any()) for m in masks]
    scores = torch.tensor([m.mean() for m in maps], dtype=dtype, requires_grad=True)
    assert image_roc_auc(torch.tensor(labels, dtype=dtype), scores) == image_roc_auc(labels, scores.detach().float())


def test_float64_maps_keep_their_precision():
    mask = np.zeros((1, 4, 4))
    mask[0, 0, 0] = 1
    for anomalous, normal in ((1e8 + 1, 1e8), (1e-46, 0.0), (1e39, 0.0)):  # float32 would tie, flush or overflow
        scores = np.full((1, 4, 4), normal)
        scores[0, 0, 0] = anomalous
        for num_bins in (None, 1024):
            assert compute_pixel_metrics(mask, scores, num_bins=num_bins).pixel_roc_auc == 1.0
    # A range given in float64 holds float64 maps exactly (0.1 in float32 is above 0.1).
    assert compute_pixel_metrics([np.array([[0, 1.0]])], [np.array([[0, 0.1]])], score_range=(0, 0.1),
                                 include_aupro=False).pixel_roc_auc == 1.0


def test_any_non_zero_mask_value_is_anomalous():
    scores = np.zeros((1, 4, 4))
    scores[0, 0, 0] = 1.0
    for value in (-1.0, 1e-50, 255.0):
        mask = np.zeros((1, 4, 4))
        mask[0, 0, 0] = value
        assert compute_pixel_metrics(mask, scores, num_bins=None, include_aupro=False).pixel_roc_auc == 1.0


def test_pixel_inputs_stacked_tensor_and_none_masks():
    masks, maps = random_category(5)
    stacked = compute_pixel_metrics(torch.from_numpy(np.stack(masks)), torch.from_numpy(np.stack(maps)))
    with_none = compute_pixel_metrics([m if m.any() else None for m in masks], maps)
    assert stacked == with_none == compute_pixel_metrics(masks, maps)


def test_pixel_metrics_reject_mismatched_shapes_and_lengths():
    with pytest.raises(ValueError, match=r"Image 1: .*map \(4, 4\) and mask \(5, 5\)"):
        pixel_roc_auc([np.zeros((4, 4)), np.ones((5, 5))], [np.zeros((4, 4)), np.zeros((4, 4))])
    with pytest.raises(ValueError, match="differ in length"):
        pixel_roc_auc([np.zeros((4, 4))], [np.zeros((4, 4)), np.zeros((4, 4))])
    with pytest.raises(ValueError, match="0 anomalous and 16 normal"):
        pixel_f1_max([np.zeros((4, 4))], [np.random.default_rng(0).random((4, 4))])


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_matches_bfs_partition(connectivity):
    rng = np.random.default_rng(connectivity)
    mask = rng.random((30, 40)) < 0.45
    labels, num_regions = label_components(mask, connectivity)
    if connectivity == 8:
        regions = reference_regions(mask)
        assert num_regions == len(regions)
        for region in regions:
            assert len({labels[y, x] for y, x in region}) == 1
    assert set(np.unique(labels[mask])) == set(range(1, num_regions + 1))
    assert (labels[~mask] == 0).all()
    # A diagonal pair is one region under 8-connectivity, two under 4.
    assert label_components(np.eye(2), connectivity)[1] == (1 if connectivity == 8 else 2)


def test_evaluate_modules_load_by_path_and_equal_functions():
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 30), rng.random(30)
    image_metric = evaluate.load(METRIC_PATHS["image_anomaly"], keep_in_memory=True)
    assert image_metric.compute(predictions=scores, references=labels) == {
        "image_roc_auc": image_roc_auc(labels, scores),
        "image_f1_max": image_f1_max(labels, scores),
    }

    masks, maps = random_category(2)
    pixel_metric = evaluate.load(METRIC_PATHS["pixel_anomaly"], keep_in_memory=True)
    for mask, scores_map in zip(masks, maps):
        pixel_metric.add(prediction=scores_map, reference=mask.astype(np.uint8))
    result = pixel_metric.compute(num_bins=None)
    expected = compute_pixel_metrics(masks, maps, num_bins=None)
    assert result["pixel_roc_auc"] == pytest.approx(expected.pixel_roc_auc, abs=1e-12)
    assert result["pixel_f1_max"] == pytest.approx(expected.pixel_f1_max, abs=1e-12)
    assert result["aupro"] == pytest.approx(expected.aupro, abs=1e-12)


def test_evaluate_modules_keep_float64_maps_and_refuse_labels_they_would_have_truncated():
    # A float64 map's close values stay apart (float32 merged them: num_bins=None was no longer exact), and a label
    # of 0.7 reaches the metric's own check (an int32 feature truncated it to 0).
    coordinates = np.stack(np.meshgrid(np.arange(64), np.arange(64)), axis=-1)
    distance = np.linalg.norm(coordinates - 20.0, axis=-1)
    maps = [np.exp(-60.0 * distance), np.exp(-60.0 * np.linalg.norm(coordinates - 40.0, axis=-1))]
    masks = [(distance < 6).astype(np.uint8), np.zeros((64, 64), dtype=np.uint8)]
    expected = compute_pixel_metrics(masks, maps, num_bins=None)
    assert len(np.unique(np.concatenate(maps, axis=None).astype(np.float32))) < len(np.unique(np.concatenate(
        maps, axis=None)))  # (the case float32 merges)
    pixel_metric = evaluate.load(METRIC_PATHS["pixel_anomaly"], keep_in_memory=True)
    assert pixel_metric.compute(predictions=maps, references=masks, num_bins=None) == pytest.approx(
        dict(vars(expected)), abs=1e-12)
    image_metric = evaluate.load(METRIC_PATHS["image_anomaly"], keep_in_memory=True)
    with pytest.raises(ValueError, match="0 \\(good\\) or 1 \\(anomaly\\)"):
        image_metric.compute(predictions=[0.1, 0.2, 0.3], references=[0, 0.7, 1])


def test_a_score_range_the_histogram_cannot_divide_is_one_clear_error():
    masks = [np.array([[0, 1]], dtype=np.uint8), np.array([[1, 0]], dtype=np.uint8)]
    for maps in ([np.array([[-1e308, 1e308]]), np.array([[0.0, 1.0]])],  # (the range overflows)
                 [np.array([[0.0, 1e-310]]), np.array([[1e-310, 0.0]])]):  # (bins narrower than float64 can hold)
        with pytest.raises(ValueError, match="span a range the histogram cannot divide .* num_bins=None"):
            compute_pixel_metrics(masks, maps)
        scores, labels = np.concatenate(maps, axis=None), np.concatenate(masks, axis=None).astype(bool)
        pairwise = ((scores[labels][:, None] > scores[~labels][None, :]).mean()
                    + 0.5 * (scores[labels][:, None] == scores[~labels][None, :]).mean())
        assert compute_pixel_metrics(masks, maps, num_bins=None).pixel_roc_auc == pairwise


def test_pixel_evaluate_module_reads_sixteen_bit_masks():
    masks, maps = random_category(3)
    expected = compute_pixel_metrics(masks, maps, num_bins=None)
    for anomalous_value in (1, 256, 65535):  # a 16-bit PNG mask's white is 65535; 256 would wrap to 0 in uint8
        pixel_metric = evaluate.load(METRIC_PATHS["pixel_anomaly"], keep_in_memory=True)
        references = [mask.astype(np.uint16) * anomalous_value for mask in masks]
        assert pixel_metric.compute(predictions=maps, references=references, num_bins=None) == pytest.approx(
            dict(vars(expected)), abs=1e-12
        )


# --- pinned by a mutation review: bounds on coarse histograms, MVTec's connectivity, float64 image scores ---------


def test_histogram_error_bounds_hold_on_coarse_bins():
    # The bounds are the promise of the streamed metrics; a halved crossing-step term, or AUPRO's bound taken over the
    # whole FPR range instead of up to max_fpr, understated them by 1.4x / 3.3x only with very few bins.
    rng = np.random.default_rng(0)
    for _ in range(300):
        masks, maps = [], []
        for index in range(4):
            mask = np.zeros((16, 16), bool)
            if index % 2:
                y, x = rng.integers(0, 12, 2)
                mask[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
            maps.append(rng.random((16, 16)) ** rng.uniform(0.3, 3) + rng.uniform(0, 1.0) * mask)
            masks.append(mask)
        num_bins = int(rng.choice([2, 3, 4, 8]))
        exact = compute_pixel_metrics(masks, maps, num_bins=None)
        binned = compute_pixel_metrics(masks, maps, num_bins=num_bins)
        assert abs(binned.aupro - exact.aupro) <= binned.aupro_error_bound + 1e-12
        assert abs(binned.pixel_roc_auc - exact.pixel_roc_auc) <= binned.pixel_roc_auc_error_bound + 1e-12


def _regions_touching_at_a_corner():
    mask = np.zeros((8, 8), bool)
    mask[1, 1] = True  # one pixel ...
    mask[2:5, 2:5] = True  # ... touching a 3x3 block only at a corner: one region under 8-connectivity, two under 4
    scores = np.zeros((8, 8))
    scores[1, 1] = 1.0
    scores[2:5, 2:5] = np.linspace(0.1, 0.9, 9).reshape(3, 3)[::-1]
    scores[6:, :] = np.linspace(0.0, 0.95, 16).reshape(2, 8)
    return [mask, np.zeros((8, 8), bool)], [scores, np.random.default_rng(0).random((8, 8)) * 0.5]


def test_aupro_regions_are_8_connected_by_default_as_in_mvtec():
    masks, maps = _regions_touching_at_a_corner()
    expected = reference_aupro(masks, maps)  # (breadth-first over 8 neighbours)
    assert aupro(masks, maps, num_bins=None) == pytest.approx(expected, abs=1e-12)
    assert compute_pixel_metrics(masks, maps, num_bins=None).aupro == pytest.approx(expected, abs=1e-12)
    assert aupro(masks, maps, num_bins=None, connectivity=4) != pytest.approx(expected)  # (the case tells them apart)
    metric = evaluate.load(METRIC_PATHS["pixel_anomaly"], keep_in_memory=True)
    result = metric.compute(predictions=maps, references=[mask.astype(np.uint8) for mask in masks], num_bins=None)
    assert result["aupro"] == pytest.approx(expected, abs=1e-12)


def test_image_metrics_keep_close_scores_apart():
    # In float32, 1e8 and 1e8 + 1 are one value: a tie, ROC-AUC 0.5.
    assert image_roc_auc([0, 1], [1e8, 1e8 + 1]) == 1.0
    assert image_f1_max([0, 1], [1e8, 1e8 + 1]) == 1.0
