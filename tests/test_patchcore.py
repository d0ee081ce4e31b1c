"""PatchCore: coreset, nearest neighbours, scores and maps, backbone loading — offline, on a tiny random ResNet."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import ResNetBackbone, ResNetConfig, ViTImageProcessor

from conftest import RecordedOps
from maeday_hf.ensemble import ensemble_predictions
from maeday_hf.feature_extraction import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchFeatureExtractor,
    aggregate_patch_features,
    load_backbone,
    load_preprocessing,
)
from maeday_hf.patchcore import (
    PatchCore,
    PatchCoreConfig,
    coreset_size,
    fit_patchcores,
    greedy_coreset_indices,
    nearest_neighbors,
    reweighted_image_scores,
)

IMAGE_SIZE = 64
HIDDEN_SIZES = [8, 16, 24, 32]  # stage 2 + stage 3 → embedding dim 40, grid IMAGE_SIZE / 8


def _save_tiny_resnet(folder, with_processor: bool = False) -> str:
    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=HIDDEN_SIZES, depths=[1, 1, 1, 1], layer_type="basic", out_indices=[4]
    )
    ResNetBackbone(config).eval().save_pretrained(folder)
    if with_processor:
        ViTImageProcessor(size={"height": 48, "width": 40}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
            folder
        )
    return str(folder)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    return _save_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"))


@pytest.fixture(scope="module")
def feature_extractor(tiny_backbone) -> PatchFeatureExtractor:
    return PatchFeatureExtractor.from_pretrained(tiny_backbone, image_size=IMAGE_SIZE)


def _config(**overrides) -> PatchCoreConfig:
    kwargs = dict(backbone="unused", image_size=IMAGE_SIZE, sigma=1.0)
    kwargs.update(overrides)
    return PatchCoreConfig(**kwargs)


def _texture(seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """A smooth random colour texture, uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 8, size // 8, 3))
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.array(image)


def _brute_force_k_center(features: torch.Tensor, num_samples: int, start: int) -> list[int]:
    selected = [start]
    while len(selected) < num_samples:
        best, best_distance = -1, -1.0
        for candidate in range(features.shape[0]):
            distance = min(float(torch.dist(features[candidate], features[s])) for s in selected)
            if distance > best_distance:
                best, best_distance = candidate, distance
        selected.append(best)
    return selected


# --- coreset ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [1, 2, 7, 20])
@pytest.mark.parametrize("projection_dim", [None, 64])  # 64 >= dim: no projection either
def test_greedy_coreset_matches_brute_force(num_samples, projection_dim):
    features = torch.randn(40, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    indices = greedy_coreset_indices(features, num_samples, projection_dim, torch.Generator().manual_seed(0))
    assert indices.tolist() == _brute_force_k_center(features, num_samples, start=int(indices[0]))


def test_greedy_coreset_with_projection_is_seeded_and_distinct():
    features = torch.randn(200, 32, generator=torch.Generator().manual_seed(0))
    first = greedy_coreset_indices(features, 30, 8, torch.Generator().manual_seed(1))
    again = greedy_coreset_indices(features, 30, 8, torch.Generator().manual_seed(1))
    other = greedy_coreset_indices(features, 30, 8, torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len(set(first.tolist())) == 30


def test_greedy_coreset_never_picks_a_point_twice_among_near_duplicates():
    # ReLU-like features with a large common offset and near-duplicate pairs: the distances between the pairs are
    # below the rounding of the uncentred expansion, and exact duplicates have distance 0.
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 256, generator=generator) * 0.5 + 10
    features = torch.cat([features, features + 1e-3 * torch.randn(300, 256, generator=generator), features[:50]])
    indices = greedy_coreset_indices(features, len(features), None, torch.Generator().manual_seed(0))
    assert sorted(indices.tolist()) == list(range(len(features)))
    # The first 300 picks are one of each pair: a near-duplicate is the farthest point only once its twin is taken.
    first = indices[:300] % 300
    assert len(set(first.tolist())) == 300


@pytest.mark.parametrize("projection_dim", [None, 3])
def test_greedy_coreset_reads_nothing_back_to_the_host(projection_dim):
    # On a GPU every `.item()` (also the hidden one of indexing with a 0-d tensor) waits for the device: a sync per
    # selected point would serialise the loop. The recorder sees the same aten ops on the CPU.
    features = torch.randn(60, 5, generator=torch.Generator().manual_seed(3))
    recorded = RecordedOps()
    with recorded:
        indices = greedy_coreset_indices(features, 12, projection_dim, torch.Generator().manual_seed(0))
    assert "addmv" in recorded.names  # (the recorder sees the loop's ops)
    assert "_local_scalar_dense" not in recorded.names
    assert len(set(indices.tolist())) == 12


def test_greedy_coreset_rejects_bad_size():
    with pytest.raises(ValueError, match="num_samples <= 5"):
        greedy_coreset_indices(torch.zeros(5, 2), 6)


@pytest.mark.parametrize(
    "num_embeddings, ratio, minimum, expected", [(784, 0.1, 128, 128), (15680, 0.1, 128, 1568), (40, 0.1, 128, 40)]
)
def test_coreset_size(num_embeddings, ratio, minimum, expected):
    assert coreset_size(num_embeddings, ratio, minimum) == expected


# --- nearest neighbours and scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbors_match_brute_force(k):
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(37, 6, generator=generator), torch.randn(23, 6, generator=generator)
    # A tiny chunk bound forces several chunks.
    distances, indices = nearest_neighbors(queries, bank, k=k, max_chunk_elements=50)
    reference = torch.linalg.vector_norm(queries.double()[:, None] - bank.double()[None], dim=-1)
    expected_distances, expected_indices = reference.sort(dim=1)
    assert torch.equal(indices, expected_indices[:, :k])
    torch.testing.assert_close(distances.double(), expected_distances[:, :k])


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                self.elements = max(self.elements, tensor.numel())
        return output


@pytest.mark.parametrize("bank_size", [4, 16, 300])
def test_nearest_neighbors_hold_at_most_max_chunk_elements(bank_size):
    # A 1-shot bank is small and its features wide: each chunk's differences to its k + margin candidates, not its
    # distances to the bank, are then the largest tensor (a 32-image batch once took 1.4 GB against a 128-entry bank).
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(500, 64, generator=generator), torch.randn(bank_size, 64, generator=generator)
    largest = _LargestTensor()
    with largest:
        distances, indices = nearest_neighbors(queries, bank, k=3, max_chunk_elements=20_000)
    assert largest.elements <= 20_000
    reference = torch.linalg.vector_norm(queries.double()[:, None] - bank.double()[None], dim=-1)
    assert torch.equal(indices, reference.sort(dim=1).indices[:, :3])


def test_nearest_neighbors_stay_exact_when_the_features_share_a_large_offset():
    # ReLU features sit far from the origin, with small differences between patches: the matrix-product distance
    # form alone loses those differences in float32.
    generator = torch.Generator().manual_seed(0)
    offset = torch.randn(1, 64, generator=generator) * 100
    bank = offset + torch.randn(500, 64, generator=generator) * 0.01
    queries = offset + torch.randn(300, 64, generator=generator) * 0.01
    distances, indices = nearest_neighbors(queries, bank, k=2)
    reference = torch.linalg.vector_norm(queries.double()[:, None] - bank.double()[None], dim=-1)
    expected_distances, expected_indices = reference.sort(dim=1)
    assert (indices == expected_indices[:, :2]).float().mean() > 0.99  # (float32 features: a few exact near-ties)
    torch.testing.assert_close(distances.double(), expected_distances[:, :2], rtol=1e-3, atol=1e-6)


def test_half_precision_features_are_ranked_in_float32_and_float64_embeddings_score():
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(200, 32, generator=generator), torch.randn(100, 32, generator=generator)
    expected = nearest_neighbors(queries, bank)
    for dtype in (torch.bfloat16, torch.float16):
        low_bank, low_queries = bank.to(dtype), queries.to(dtype)
        reference = nearest_neighbors(low_queries.float(), low_bank.float())
        distances, indices = nearest_neighbors(low_queries, low_bank)
        assert torch.equal(indices, reference[1]) and distances.dtype == torch.float32
    assert expected[0].dtype == torch.float32
    mixed = nearest_neighbors(queries.double(), bank)  # float64 queries, a float32 bank (as PatchCore builds it)
    assert torch.equal(mixed[1], expected[1]) and mixed[0].dtype == torch.float64


def test_nearest_neighbors_of_bank_entries_are_exactly_zero():
    bank = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * 100
    distances, indices = nearest_neighbors(bank, bank)
    assert torch.equal(distances, torch.zeros_like(distances))
    assert torch.equal(indices[:, 0], torch.arange(50))


def test_reweighted_image_scores_follow_patchcore_eq7():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(30, 4, generator=generator)
    embeddings = torch.randn(2, 10, 4, generator=generator)
    distances, indices = nearest_neighbors(embeddings.reshape(-1, 4), bank)
    patch_scores, nearest = distances[:, 0].reshape(2, 10), indices[:, 0].reshape(2, 10)
    scores = reweighted_image_scores(embeddings, patch_scores, nearest, bank, num_reweight_neighbors=5)
    for image in range(2):
        worst = int(patch_scores[image].argmax())
        test_patch, s_star = embeddings[image, worst], float(patch_scores[image, worst])
        m_star = bank[int(nearest[image, worst])]
        neighbourhood = torch.linalg.vector_norm(bank - m_star, dim=1).argsort()[:5]
        denominator = sum(float(torch.exp(torch.dist(test_patch, bank[j]))) for j in neighbourhood)
        expected = (1 - float(torch.exp(torch.dist(test_patch, m_star))) / denominator) * s_star
        assert scores[image].item() == pytest.approx(expected, rel=1e-5)
    unweighted = reweighted_image_scores(embeddings, patch_scores, nearest, bank, num_reweight_neighbors=1)
    torch.testing.assert_close(unweighted, patch_scores.max(dim=1).values)


# --- features and preprocessing ---------------------------------------------------------------------------------------


def test_patch_features_have_reference_geometry(feature_extractor):
    pixel_values, sizes = feature_extractor.preprocess([_texture(0), _texture(1)])
    embeddings = feature_extractor(pixel_values)
    assert pixel_values.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert sizes == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
    assert embeddings.shape == (2, IMAGE_SIZE // 8, IMAGE_SIZE // 8, HIDDEN_SIZES[1] + HIDDEN_SIZES[2])


def test_aggregation_pools_neighbourhoods_and_upsamples():
    fine, coarse = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 2)
    embeddings = aggregate_patch_features([fine, coarse], neighbourhood_size=3)
    assert embeddings.shape == (1, 4, 4, 5)
    # Interior patch (1, 1) of the fine map: the mean of its 3x3 neighbourhood.
    torch.testing.assert_close(embeddings[0, 1, 1, :2], fine[0, :, 0:3, 0:3].mean(dim=(1, 2)))
    projected = aggregate_patch_features([fine, coarse], neighbourhood_size=1, layer_embedding_dim=1)
    torch.testing.assert_close(projected[0, :, :, 0], fine[0].mean(dim=0))


def test_preprocessing_comes_from_the_checkpoint(tmp_path, tiny_backbone):
    with_processor = _save_tiny_resnet(tmp_path / "with-processor", with_processor=True)
    expected = {"image_size": (48, 40), "image_mean": (0.5,) * 3, "image_std": (0.25,) * 3}
    assert load_preprocessing(with_processor) == expected
    expected = {"image_size": None, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
    assert load_preprocessing(tiny_backbone) == expected
    extractor = PatchFeatureExtractor.from_pretrained(with_processor)
    assert extractor.image_size == (48, 40)


def test_load_backbone_returns_requested_stages(tiny_backbone):
    backbone = load_backbone(tiny_backbone, out_indices=(2, 3))
    assert list(backbone.out_features) == ["stage2", "stage3"]
    assert not backbone.training


@pytest.mark.parametrize("kind", ["missing", "not-a-backbone", "bad-stage"])
def test_unloadable_backbone_raises_one_clear_error(tmp_path, tiny_backbone, kind):
    if kind == "missing":
        backbone_id, out_indices = str(tmp_path / "nowhere"), (2, 3)
    elif kind == "not-a-backbone":
        backbone_id, out_indices = str(tmp_path), (2, 3)
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    else:
        backbone_id, out_indices = tiny_backbone, (2, 9)
    with pytest.raises(ValueError, match="Cannot load .* as a PatchCore backbone: expected a transformers checkpoint"):
        load_backbone(backbone_id, out_indices)


def test_timm_checkpoint_without_timm_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr("maeday_hf.feature_extraction.is_timm_available", lambda: False)
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "wide_resnet50_2", "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    )
    with pytest.raises(ImportError, match=r"maeday-hf\[timm\]"):
        load_backbone(tmp_path)


# --- PatchCore end to end ---------------------------------------------------------------------------------------------


def test_query_identical_to_a_shot_scores_zero_everywhere(feature_extractor):
    shots = [_texture(0), _texture(1)]
    patchcore = PatchCore(_config(), feature_extractor=feature_extractor, device="cpu").fit(shots)
    (prediction,) = patchcore.predict([shots[1]])
    altered = shots[1].copy()
    altered[20:40, 20:40] = (255, 0, 255)
    (altered_prediction,) = patchcore.predict([altered])
    assert prediction["score"] < 1e-3 * altered_prediction["score"]
    assert prediction["anomaly_map"].max() < 1e-3 * altered_prediction["anomaly_map"].max()


def test_painted_square_scores_higher_where_altered(feature_extractor):
    shot = _texture(0)
    patchcore = PatchCore(_config(), feature_extractor=feature_extractor, device="cpu").fit([shot])
    query = _texture(0)
    query[24:40, 24:40] = (255, 0, 255)
    normal, altered = patchcore.predict([_texture(0), query])
    inside = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    inside[24:40, 24:40] = True
    assert altered["score"] > normal["score"]
    assert altered["anomaly_map"][inside].mean() > 2 * altered["anomaly_map"][~inside].mean()
    assert np.unravel_index(altered["anomaly_map"].argmax(), inside.shape) in set(zip(*np.nonzero(inside)))


def test_shots_and_queries_of_any_size_mode_and_type(feature_extractor, tmp_path):
    path = tmp_path / "shot.png"
    Image.fromarray(_texture(2, size=80)).convert("L").save(path)
    rgba = Image.fromarray(_texture(3, size=48)).convert("RGBA")
    patchcore = PatchCore(_config(), feature_extractor=feature_extractor, device="cpu").fit([path, rgba, _texture(4)])
    queries = [Image.fromarray(_texture(5, size=96)).resize((96, 50)), _texture(6)[..., 0], str(path)]
    predictions = patchcore.predict(queries)
    assert [p["anomaly_map"].shape for p in predictions] == [(50, 96), (IMAGE_SIZE, IMAGE_SIZE), (80, 80)]
    assert all(p["anomaly_map"].dtype == np.float32 and isinstance(p["score"], float) for p in predictions)


def test_a_single_image_is_one_image_not_a_sequence(feature_extractor, tmp_path):
    path = tmp_path / "shot.png"
    Image.fromarray(_texture(2)).save(path)
    patchcore = PatchCore(_config(), feature_extractor=feature_extractor, device="cpu")
    for shot in (str(path), path, Image.open(path), _texture(2)):
        bank = patchcore.fit(shot).memory_bank
        torch.testing.assert_close(bank, patchcore.fit([shot]).memory_bank)
    for query in (str(path), Image.open(path), _texture(5)):
        predictions = patchcore.predict(query)
        assert len(predictions) == 1 and predictions[0]["anomaly_map"].shape == (IMAGE_SIZE, IMAGE_SIZE)
    stacked = np.stack([_texture(5), _texture(6)])  # (N, H, W, C): N images
    assert [p["score"] for p in patchcore.predict(stacked)] == [
        p["score"] for p in patchcore.predict([_texture(5), _texture(6)])
    ]


def test_embeddings_of_any_float_dtype_build_a_bank_queries_can_use(feature_extractor):
    patchcore = PatchCore(_config(), feature_extractor=feature_extractor, device="cpu")
    embeddings, _ = patchcore.embed([_texture(0)])
    patchcore.fit_embeddings(embeddings.reshape(-1, embeddings.shape[-1]))
    queries, _ = patchcore.embed([_texture(5)])
    torch.testing.assert_close(patchcore.score_embeddings(queries.double())[1], patchcore.score_embeddings(queries)[1])
    expected = patchcore.fit_embeddings(embeddings.reshape(-1, embeddings.shape[-1])).predict([_texture(5)])
    for dtype in (torch.float64, torch.bfloat16):
        patchcore.fit_embeddings(embeddings.reshape(-1, embeddings.shape[-1]).to(dtype))
        assert patchcore.memory_bank.dtype == torch.float32
        score = patchcore.predict([_texture(5)])[0]["score"]
        assert score == pytest.approx(expected[0]["score"], rel=1e-2)


@pytest.mark.parametrize("field, value", [("image_size", 96), ("neighbourhood_size", 5), ("layer_embedding_dim", 8)])
def test_a_config_that_contradicts_the_given_extractor_is_refused(feature_extractor, field, value):
    with pytest.raises(ValueError, match=f"PatchCoreConfig.{field}={value}.*feature_extractor"):
        PatchCore(_config(**{field: value}), feature_extractor=feature_extractor, device="cpu")


def test_batch_equals_singles(feature_extractor):
    config = _config(batch_size=2)
    patchcore = PatchCore(config, feature_extractor=feature_extractor, device="cpu").fit([_texture(0)])
    queries = [_texture(7), _texture(8), _texture(9)]
    batched = patchcore.predict(queries)
    singles = [patchcore.predict([query])[0] for query in queries]
    for batch_prediction, single in zip(batched, singles):
        assert batch_prediction["score"] == pytest.approx(single["score"], rel=1e-4)
        np.testing.assert_allclose(batch_prediction["anomaly_map"], single["anomaly_map"], rtol=1e-4, atol=1e-5)


def test_coreset_is_reproducible_per_seed(feature_extractor):
    shots = [_texture(0), _texture(1), _texture(2)]  # 3 x 8 x 8 = 192 patches
    config = _config(coreset_ratio=0.25, min_coreset_size=1, projection_dim=8)
    first = PatchCore(config, feature_extractor=feature_extractor, device="cpu").fit(shots)
    again = PatchCore(config, feature_extractor=feature_extractor, device="cpu").fit(shots)
    assert first.memory_bank.shape == (48, 40)
    torch.testing.assert_close(first.memory_bank, again.memory_bank)


def test_two_patchcores_differ_and_ensemble(feature_extractor):
    shots = [_texture(0), _texture(1)]
    config = _config(coreset_ratio=0.2, min_coreset_size=1)
    models = fit_patchcores(shots, seeds=(0, 1), config=config, feature_extractor=feature_extractor, device="cpu")
    assert not torch.equal(models[0].memory_bank, models[1].memory_bank)
    queries = [_texture(5), _texture(6), _texture(0)]
    predictions = ensemble_predictions([model.predict(queries) for model in models])
    assert [p["anomaly_map"].shape for p in predictions] == [(IMAGE_SIZE, IMAGE_SIZE)] * 3


def test_two_patchcores_warn_when_the_coreset_keeps_everything(feature_extractor, caplog):
    with caplog.at_level(logging.WARNING, logger="maeday_hf.patchcore"):
        models = fit_patchcores([_texture(0)], config=_config(), feature_extractor=feature_extractor, device="cpu")
    assert torch.equal(models[0].memory_bank, models[1].memory_bank)
    assert "identical" in caplog.text


def test_no_shots_raises(feature_extractor):
    patchcore = PatchCore(_config(), feature_extractor=feature_extractor, device="cpu")
    with pytest.raises(ValueError, match="at least one normal shot"):
        patchcore.fit([])
    with pytest.raises(ValueError, match="at least one normal shot"):
        fit_patchcores([], config=_config(), feature_extractor=feature_extractor)
    with pytest.raises(ValueError, match="call `fit"):
        patchcore.predict([_texture(0)])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"coreset_ratio": 0.0}, "coreset_ratio"),
        ({"coreset_ratio": 1.5}, "coreset_ratio"),
        ({"min_coreset_size": 0}, "min_coreset_size"),
        ({"num_reweight_neighbors": 0}, "num_reweight_neighbors"),
        ({"sigma": -1.0}, "sigma"),
        ({"batch_size": 0}, "batch_size"),
        # Refused here rather than as a bare error at `fit` (or, for the seed, silently the same coreset as seed 0).
        ({"seed": 2**32}, r"seed must be in \[0, 2\*\*32\)"),
        ({"seed": -1}, "seed must be in"),
        ({"image_size": 0}, "image_size must be >= 1"),
        ({"projection_dim": 0}, "projection_dim must be >= 1"),
        ({"coreset_ratio": float("nan")}, "`coreset_ratio` to be a finite number"),
        ({"sigma": float("inf")}, "`sigma` to be a finite number"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"seed": 1.5}, "seed must be an integer"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
        ({"num_reweight_neighbors": 2.5}, "num_reweight_neighbors must be a positive integer"),
        ({"image_size": 64.0}, "image_size must be a positive integer"),
        ({"sigma": "4"}, "`sigma` to be a number"),
        ({"coreset_ratio": "0.1"}, "`coreset_ratio` to be a number"),
        ({"out_indices": ()}, "`out_indices` to be one or more stage indices"),
        ({"out_indices": ("2",)}, "`out_indices`"),
    ],
)
def test_config_rejects_values_of_the_wrong_type(overrides, message):
    with pytest.raises(TypeError, match=message):
        _config(**overrides)


def test_backbone_loaded_from_config(tiny_backbone):
    patchcore = PatchCore(PatchCoreConfig(backbone=tiny_backbone, image_size=IMAGE_SIZE), device="cpu")
    assert patchcore.feature_extractor.image_size == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.gpu
def test_gpu_matches_cpu(tiny_backbone):
    shots, queries = [_texture(0), _texture(1)], [_texture(2), _texture(3)]
    config = PatchCoreConfig(backbone=tiny_backbone, image_size=IMAGE_SIZE, coreset_ratio=0.5, min_coreset_size=1)
    cpu = PatchCore(config, device="cpu").fit(shots).predict(queries)
    gpu = PatchCore(config, device="cuda").fit(shots).predict(queries)
    for on_cpu, on_gpu in zip(cpu, gpu):
        assert on_gpu["score"] == pytest.approx(on_cpu["score"], rel=1e-3)
        np.testing.assert_allclose(on_gpu["anomaly_map"], on_cpu["anomaly_map"], rtol=1e-3, atol=1e-4)


def test_the_device_is_checked_before_the_backbone_loads(feature_extractor):
    assert PatchCore(_config(), feature_extractor=feature_extractor, device=-1).device == torch.device("cpu")
    assert PatchCore(_config(), feature_extractor=feature_extractor, device="auto").device.type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for missing in (f"cuda:{gpus}", "gpu"):
        with pytest.raises(ValueError, match=f"device='{missing}'"):
            PatchCore(_config(backbone="no/such-backbone"), device=missing)  # would fail to load, later


# --- pinned by a mutation review ----------------------------------------------------------------------------------


class _RecordingBackbone(torch.nn.Module):
    """Keeps the pixels it is given; its one feature map is every 8th pixel."""

    def forward(self, pixel_values):
        from types import SimpleNamespace

        self.seen = pixel_values.clone()
        return SimpleNamespace(feature_maps=(pixel_values[:, :, ::8, ::8],))


def test_pixels_reach_the_backbone_normalised_with_the_checkpoints_mean_and_std():
    backbone = _RecordingBackbone()
    extractor = PatchFeatureExtractor(backbone, image_size=(16, 16), image_mean=(0.5, 0.4, 0.3),
                                      image_std=(0.25, 0.5, 2.0), neighbourhood_size=1)
    pixel_values = torch.rand(2, 3, 16, 16)
    extractor(pixel_values)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.5, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(backbone.seen, (pixel_values - mean) / std)


def test_a_non_square_image_size_is_height_by_width():
    extractor = PatchFeatureExtractor(_RecordingBackbone(), image_size=(48, 40))
    pixel_values, sizes = extractor.preprocess([Image.new("RGB", (30, 20))])
    assert tuple(pixel_values.shape) == (1, 3, 48, 40) and sizes == [(20, 30)]


def test_the_map_gaussian_is_truncated_at_4_sigma_as_scipys():
    from maeday_hf.patchcore import _gaussian_kernel_size

    assert [_gaussian_kernel_size(sigma) for sigma in (1.0, 4.0)] == [9, 33]


def test_reweighting_with_two_neighbours_changes_the_score():
    generator = torch.Generator().manual_seed(0)
    bank, embeddings = torch.randn(30, 4, generator=generator), torch.randn(1, 10, 4, generator=generator)
    distances, indices = nearest_neighbors(embeddings.reshape(-1, 4), bank)
    patch_scores, nearest = distances[:, 0].reshape(1, 10), indices[:, 0].reshape(1, 10)
    score = reweighted_image_scores(embeddings, patch_scores, nearest, bank, num_reweight_neighbors=2)
    assert score.item() < patch_scores.max().item()  # (b = 2 reweights: the weight is below 1)


def test_the_coreset_size_rounds_up():
    assert coreset_size(15681, 0.1, 1) == 1569  # ceil(1568.1): never a bank one entry short of its ratio


def test_a_float32_coreset_picks_as_float64_under_a_shared_offset():
    # Features far from the origin (a shared offset of 30 against a spread of 0.05): distances computed without
    # centring lose their digits in float32, and picked other patches than float64 in 49 of 50 picks.
    features = torch.rand(500, 64, generator=torch.Generator().manual_seed(0)) * 0.05 + 30
    exact = greedy_coreset_indices(features.double(), 50, None, torch.Generator().manual_seed(0))
    assert torch.equal(greedy_coreset_indices(features, 50, None, torch.Generator().manual_seed(0)), exact)


def test_the_defaults_are_patchcores():
    config = PatchCoreConfig()
    assert (config.out_indices, config.neighbourhood_size, config.coreset_ratio, config.num_reweight_neighbors,
            config.sigma) == ((2, 3), 3, 0.1, 9, 4.0)
