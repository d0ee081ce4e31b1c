"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022): the paper's baseline.

    shots ─PatchFeatureExtractor→ patch embeddings (num_shots·h·w, D) ─greedy k-center coreset→ memory_bank (K, D)
    query ─PatchFeatureExtractor→ (h·w, D) ─nearest memory-bank neighbour→ patch_scores (h, w)
          → bilinear upsampling to the input size → Gaussian σ=4 → resize to the image → anomaly_map (H0, W0)
          → max patch score, reweighted by the neighbourhood of its nearest neighbour (PatchCore Eq. 7) → score

Randomness (the coreset's random projection and start point) comes only from `PatchCoreConfig.seed`, through a
`torch.Generator`: two PatchCores that differ only in the seed are the paper's "2×PatchCore" ensemble.

The memory bank lives on the model's device; nearest neighbours are exact, computed with `torch.cdist` in chunks of
bounded size, on the GPU when there is one.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .devices import as_torch_device
from .masking import validate_positive_int, validate_seed
from .feature_extraction import (
    DEFAULT_BACKBONE,
    DEFAULT_OUT_INDICES,
    ImageInput,
    PatchFeatureExtractor,
)
from .images import as_image_list
from .scoring import gaussian_filter

logger = logging.getLogger(__name__)

# cdist chunks hold at most this many distances (2**25 float32 = 128 MiB).
MAX_CHUNK_ELEMENTS = 2**25


@dataclass
class PatchCoreConfig:
    """PatchCore hyper-parameters; defaults follow the PatchCore paper.

    Args:
        backbone (`str`): Hub id or folder of the feature backbone (see `maeday_hf.feature_extraction`).
        out_indices (`tuple[int, ...]`): backbone stages to use; `(2, 3)` = ResNet layer2 + layer3.
        image_size (`int`, *optional*): side images are resized to; `None` = the checkpoint's (224 for ResNet-50).
        neighbourhood_size (`int`): local aggregation window.
        layer_embedding_dim (`int`, *optional*): channels kept per stage (reference code: 1024); `None` keeps all.
        coreset_ratio (`float`): fraction of the patch embeddings kept in the memory bank, in (0, 1].
        min_coreset_size (`int`): the bank keeps at least this many embeddings (all of them when there are fewer),
            so tiny banks are not subsampled. The default keeps 1-shot banks (784 patches at 224 px) stochastic.
        projection_dim (`int`, *optional*): dimension of the random (Johnson-Lindenstrauss) projection used to select
            the coreset; `None` selects in the full embedding space.
        num_reweight_neighbors (`int`): `b` in PatchCore Eq. 7; 1 disables the reweighting.
        sigma (`float`): standard deviation of the Gaussian applied to the pixel map, in input pixels.
        batch_size (`int`): images per backbone forward pass.
        seed (`int`): seeds the coreset selection.
    """

    backbone: str = DEFAULT_BACKBONE
    out_indices: tuple[int, ...] = DEFAULT_OUT_INDICES
    image_size: int | None = None
    neighbourhood_size: int = 3
    layer_embedding_dim: int | None = None
    coreset_ratio: float = 0.1
    min_coreset_size: int = 128
    projection_dim: int | None = 128
    num_reweight_neighbors: int = 9
    sigma: float = 4.0
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        self.backbone = os.fspath(self.backbone)
        self.out_indices = tuple(self.out_indices)
        if not self.out_indices or any(
            isinstance(index, bool) or not isinstance(index, numbers.Integral) for index in self.out_indices
        ):
            raise TypeError(f"Expected `out_indices` to be one or more stage indices, got {self.out_indices!r}.")
        for name in ("min_coreset_size", "num_reweight_neighbors", "batch_size", "neighbourhood_size"):
            validate_positive_int(getattr(self, name), name)
        for name in ("image_size", "projection_dim", "layer_embedding_dim"):
            if getattr(self, name) is not None:
                validate_positive_int(getattr(self, name), name)
        for name in ("coreset_ratio", "sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Expected `{name}` to be a number, got {value!r}.")
            if not math.isfinite(value):
                raise ValueError(f"Expected `{name}` to be a finite number, got {value!r}.")
        # (a seed of 2**32 or more would repeat a smaller one's coreset: "2xPatchCore" of two identical models)
        validate_seed(self.seed)
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"Expected `coreset_ratio` in (0, 1], got {self.coreset_ratio}.")
        if self.min_coreset_size < 1:
            raise ValueError(f"Expected `min_coreset_size` >= 1, got {self.min_coreset_size}.")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"Expected `projection_dim` >= 1 or None, got {self.projection_dim}.")
        if self.num_reweight_neighbors < 1:
            raise ValueError(
                f"Expected `num_reweight_neighbors` >= 1 (1 disables reweighting), got {self.num_reweight_neighbors}."
            )
        if self.sigma < 0:
            raise ValueError(f"Expected `sigma` >= 0 (0 disables smoothing), got {self.sigma}.")
        if self.batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, got {self.batch_size}.")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"Expected `image_size` >= 1 or None, got {self.image_size}.")
        smallest_side = _gaussian_kernel_size(self.sigma) // 2 + 1
        if self.sigma > 0 and self.image_size is not None and self.image_size < smallest_side:
            raise ValueError(
                f"Expected `image_size` >= {smallest_side} for the sigma={self.sigma} Gaussian on the pixel map, got "
                f"{self.image_size}; use a larger image_size or a smaller sigma."
            )


def coreset_size(num_embeddings: int, coreset_ratio: float, min_coreset_size: int) -> int:
    """Memory-bank size: `ceil(ratio · N)`, at least `min_coreset_size`, at most `N`."""
    return min(num_embeddings, max(math.ceil(coreset_ratio * num_embeddings), min_coreset_size))


def greedy_coreset_indices(
    features: torch.Tensor,
    num_samples: int,
    projection_dim: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy k-center selection (PatchCore Alg. 1): repeatedly add the point farthest from the points selected so far.

    Args:
        features (`torch.Tensor` of shape `(num_points, dim)`).
        num_samples (`int`): points to select, `1 <= num_samples <= num_points`.
        projection_dim (`int`, *optional*): select in a random Gaussian projection to this many dimensions (distances
            are approximately preserved, selection is much cheaper); `None`, or >= `dim`, selects in `features`.
        generator (`torch.Generator`, *optional*): CPU generator for the projection and the random first point.

    Returns:
        `torch.LongTensor` of shape `(num_samples,)`: indices into `features`, in selection order.
    """
    num_points, dim = features.shape
    if not 1 <= num_samples <= num_points:
        raise ValueError(f"Expected 1 <= num_samples <= {num_points} (the number of points), got {num_samples}.")
    if projection_dim is not None and projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator, dtype=features.dtype)
        features = features @ projection.to(features.device)
    # Indices stay 1-element tensors on the device: a 0-d index (or `int(...)`) would be read back to the host, a
    # CUDA sync per selected point.
    index = torch.randint(num_points, (1,), generator=generator).to(features.device)
    selected = torch.empty(num_samples, dtype=torch.long, device=features.device)
    selected[:1] = index
    # Squared distance of every point to its nearest selected point. One matrix-vector product per step,
    # ‖x‖² + ‖c‖² − 2x·c, is ~4x faster than materialising x − c. Centred first: the expansion's rounding grows with
    # the norms, and ReLU features share a large offset that would otherwise drown the distances of near-duplicates.
    features = features - features.mean(dim=0)
    squared_norms = features.pow(2).sum(dim=1)

    def squared_distances_to(index: torch.Tensor) -> torch.Tensor:
        centre = features.index_select(0, index)[0]
        return torch.addmv(squared_norms + squared_norms.index_select(0, index), features, centre, alpha=-2).clamp_min_(0)

    min_distances = squared_distances_to(index)
    min_distances.index_fill_(0, index, -1.0)  # selected points stay below every distance, so none is picked twice
    for step in range(1, num_samples):
        index = torch.argmax(min_distances).view(1)
        selected[step : step + 1] = index
        torch.minimum(min_distances, squared_distances_to(index), out=min_distances)
        min_distances.index_fill_(0, index, -1.0)
    return selected


NEIGHBOR_CANDIDATE_MARGIN = 8
"""Candidates beyond k whose distances `nearest_neighbors` recomputes exactly before choosing the k nearest."""


def nearest_neighbors(
    queries: torch.Tensor, memory_bank: torch.Tensor, k: int = 1, max_chunk_elements: int = MAX_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours (Euclidean) of each query in the memory bank, chunked over the queries.

    Candidates come from `torch.cdist` (fast matrix-product form) on features centred on the bank's mean (the form
    `‖q‖² + ‖m‖² − 2 q·m` loses precision with the features' common offset, which centring removes); the
    `k + NEIGHBOR_CANDIDATE_MARGIN` best candidates get their distances recomputed exactly and the k nearest of them
    are returned, so a near-tie is decided exactly and a query equal to a bank entry gets distance 0.

    Args:
        queries (`torch.Tensor` of shape `(num_queries, dim)`).
        memory_bank (`torch.Tensor` of shape `(bank_size, dim)`), on the same device.
        k (`int`): neighbours per query, `1 <= k <= bank_size`.
        max_chunk_elements (`int`): bound on the elements of each chunk's largest tensors: its distances to the bank
            (`chunk_rows · bank_size`) and its differences to the candidates (`chunk_rows · (k + margin) · dim`,
            the larger one for a small bank, as a 1-shot PatchCore's).

    Returns:
        `distances` `(num_queries, k)` ascending and `indices` `(num_queries, k)` into `memory_bank`.
    """
    num_queries, dim = queries.shape
    bank_size, bank_dim = memory_bank.shape
    if dim != bank_dim:
        raise ValueError(f"Queries have dimension {dim} but the memory bank has dimension {bank_dim}.")
    if not 1 <= k <= bank_size:
        raise ValueError(f"Expected 1 <= k <= {bank_size} (the memory bank size), got {k}.")
    dtype = torch.promote_types(queries.dtype, memory_bank.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32  # distances in bf16/fp16 are too coarse to rank
    queries, memory_bank = queries.to(dtype), memory_bank.to(dtype)
    num_candidates = min(bank_size, k + NEIGHBOR_CANDIDATE_MARGIN)
    rows = max(1, max_chunk_elements // max(bank_size, num_candidates * dim))
    center = memory_bank.mean(dim=0)
    centred_bank = memory_bank - center
    all_distances, all_indices = [], []
    for start in range(0, num_queries, rows):
        chunk = queries[start : start + rows] - center
        _, candidates = torch.cdist(chunk, centred_bank).topk(num_candidates, dim=1, largest=False)
        distances = torch.linalg.vector_norm(chunk.unsqueeze(1) - centred_bank[candidates], dim=-1)
        distances, order = distances.topk(k, dim=1, largest=False)  # ascending
        all_distances.append(distances)
        all_indices.append(candidates.gather(1, order))
    if not all_distances:
        return queries.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=queries.device)
    return torch.cat(all_distances), torch.cat(all_indices)


def reweighted_image_scores(
    embeddings: torch.Tensor,
    patch_scores: torch.Tensor,
    nearest_indices: torch.Tensor,
    memory_bank: torch.Tensor,
    num_reweight_neighbors: int = 9,
) -> torch.Tensor:
    """PatchCore Eq. 7: `s = (1 - exp‖m* − m_test‖ / Σ_{m ∈ N_b(m*)} exp‖m − m_test‖) · s*`.

    `m_test` is the query's highest-scoring patch, `s*` its distance to its nearest bank entry `m*`, and `N_b(m*)` the
    `b` nearest bank entries of `m*` (including `m*` itself). The weight is small when `m*` sits among neighbours that
    are about as far from `m_test` (a dense, well-covered region of normal features), close to 1 when it is isolated.

    Args:
        embeddings (`torch.Tensor` of shape `(batch_size, num_patches, dim)`).
        patch_scores (`torch.Tensor` of shape `(batch_size, num_patches)`): nearest-neighbour distances.
        nearest_indices (`torch.LongTensor` of shape `(batch_size, num_patches)`): index of each patch's neighbour.
        memory_bank (`torch.Tensor` of shape `(bank_size, dim)`).
        num_reweight_neighbors (`int`): `b`; clipped to the bank size; below 2 the max is returned unweighted.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`.
    """
    max_scores, argmax = patch_scores.max(dim=1)
    num_neighbors = min(num_reweight_neighbors, memory_bank.shape[0])
    if num_neighbors < 2:
        return max_scores
    batch = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    worst_patches = embeddings[batch, argmax]  # (batch_size, dim)
    _, support = nearest_neighbors(memory_bank[nearest_indices[batch, argmax]], memory_bank, k=num_neighbors)
    support_distances = torch.linalg.vector_norm(worst_patches.unsqueeze(1) - memory_bank[support], dim=-1)
    weights = 1.0 - torch.exp(max_scores - torch.logsumexp(support_distances, dim=1))
    return weights * max_scores


def _check_extractor_matches(config: PatchCoreConfig, feature_extractor: PatchFeatureExtractor) -> None:
    """A given extractor decides the features; a config that says otherwise would describe a model that is not run."""
    # (image_size None is "the checkpoint's", which the extractor has; layer_embedding_dim None is "all channels".)
    image_size = feature_extractor.image_size if config.image_size is None else (config.image_size, config.image_size)
    for name, configured, extracted in (
        ("image_size", image_size, feature_extractor.image_size),
        ("neighbourhood_size", config.neighbourhood_size, feature_extractor.neighbourhood_size),
        ("layer_embedding_dim", config.layer_embedding_dim, feature_extractor.layer_embedding_dim),
    ):
        if configured != extracted:
            raise ValueError(
                f"PatchCoreConfig.{name}={getattr(config, name)!r}, but the given feature_extractor has {name}="
                f"{extracted!r}; set the config to match it (or leave feature_extractor out to load one from the config)."
            )


def _gaussian_kernel_size(sigma: float) -> int:
    # scipy.ndimage's default truncation (4σ), which the reference implementation uses.
    return 2 * int(4.0 * sigma + 0.5) + 1


class PatchCore:
    """PatchCore anomaly detector: fit on normal shots, then score queries.

    Args:
        config (`PatchCoreConfig`, *optional*): hyper-parameters; defaults to `PatchCoreConfig()`.
        feature_extractor (`PatchFeatureExtractor`, *optional*): an already loaded extractor (share one between
            several PatchCores); loaded from `config` when omitted.
        device (`str`, `int` or `torch.device`, *optional*): where the backbone and memory bank live; by default (or
            `"auto"`) CUDA when available. An int is a CUDA index, -1 the CPU, as for `transformers.pipeline`.
        show_progress (`bool`): show a progress bar over batches.

    Example:

    ```python
    >>> from maeday_hf.patchcore import PatchCore, PatchCoreConfig
    >>> patchcore = PatchCore(PatchCoreConfig(backbone="microsoft/resnet-50")).fit(["good_000.png"])
    >>> prediction = patchcore.predict(["query.png"])[0]
    >>> prediction["score"], prediction["anomaly_map"].shape  # float, (H0, W0) of query.png
    ```
    """

    def __init__(
        self,
        config: PatchCoreConfig | None = None,
        feature_extractor: PatchFeatureExtractor | None = None,
        device: str | torch.device | None = None,
        show_progress: bool = False,
    ) -> None:
        self.config = config if config is not None else PatchCoreConfig()
        self.device = as_torch_device(device)  # one that is not here is a ValueError naming it, before anything loads
        if feature_extractor is None:
            feature_extractor = PatchFeatureExtractor.from_pretrained(
                self.config.backbone,
                out_indices=self.config.out_indices,
                image_size=self.config.image_size,
                neighbourhood_size=self.config.neighbourhood_size,
                layer_embedding_dim=self.config.layer_embedding_dim,
            )
        else:
            _check_extractor_matches(self.config, feature_extractor)
        self.feature_extractor = feature_extractor.to(self.device)
        self.show_progress = show_progress
        self.memory_bank: torch.Tensor | None = None

    def embed(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Patch embeddings of images, in batches of `config.batch_size`.

        Returns:
            `embeddings` of shape `(num_images, h, w, dim)` on `self.device` and each image's original `(H0, W0)`.
        """
        images = as_image_list(images)
        batches, original_sizes = [], []
        starts = range(0, len(images), self.config.batch_size)
        for start in tqdm(starts, desc="PatchCore features", disable=not self.show_progress):
            pixel_values, sizes = self.feature_extractor.preprocess(images[start : start + self.config.batch_size])
            batches.append(self.feature_extractor(pixel_values))
            original_sizes.extend(sizes)
        return torch.cat(batches), original_sizes

    def fit(self, shots: Sequence[ImageInput]) -> PatchCore:
        """Build the memory bank from normal images (paths, PIL images or arrays, any size and mode).

        Raises:
            ValueError: no shots.
        """
        shots = as_image_list(shots)
        if not shots:
            raise ValueError("PatchCore needs at least one normal shot to build its memory bank, got none.")
        embeddings, _ = self.embed(shots)
        return self.fit_embeddings(embeddings.reshape(-1, embeddings.shape[-1]))

    def fit_embeddings(self, embeddings: torch.Tensor) -> PatchCore:
        """Build the memory bank from patch embeddings `(num_patches, dim)` (e.g. shared between seeds)."""
        num_patches = embeddings.shape[0]
        if embeddings.ndim != 2 or num_patches == 0:
            raise ValueError(
                f"Expected patch embeddings of shape (num_patches > 0, dim), got {tuple(embeddings.shape)}."
            )
        embeddings = embeddings.to(self.device, torch.float32)  # the backbone's features are float32, so are queries
        num_samples = coreset_size(num_patches, self.config.coreset_ratio, self.config.min_coreset_size)
        if num_samples == num_patches:
            self.memory_bank = embeddings.clone()
        else:
            generator = torch.Generator().manual_seed(self.config.seed)
            indices = greedy_coreset_indices(embeddings, num_samples, self.config.projection_dim, generator)
            self.memory_bank = embeddings[indices].clone()
        logger.info("PatchCore memory bank: %d of %d patch embeddings.", self.memory_bank.shape[0], num_patches)
        return self

    def score_embeddings(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch distances and image scores of embedded queries.

        Args:
            embeddings (`torch.Tensor` of shape `(batch_size, h, w, dim)`).

        Returns:
            `patch_scores` `(batch_size, h, w)` and `pred_score` `(batch_size,)`, on `self.device`.
        """
        if self.memory_bank is None:
            raise ValueError("PatchCore has no memory bank: call `fit(shots)` before scoring.")
        batch_size, height, width, dim = embeddings.shape
        flat = embeddings.to(self.device, torch.float32).reshape(batch_size, height * width, dim)  # as the bank
        distances, indices = nearest_neighbors(flat.reshape(-1, dim), self.memory_bank, k=1)
        patch_scores = distances[:, 0].reshape(batch_size, height * width)
        nearest_indices = indices[:, 0].reshape(batch_size, height * width)
        pred_score = reweighted_image_scores(
            flat, patch_scores, nearest_indices, self.memory_bank, self.config.num_reweight_neighbors
        )
        return patch_scores.reshape(batch_size, height, width), pred_score

    def anomaly_maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Patch scores `(batch_size, h, w)` → maps at the input size `(batch_size, H, W)`, bilinear then Gaussian."""
        maps = F.interpolate(
            patch_scores.unsqueeze(1), size=self.feature_extractor.image_size, mode="bilinear", align_corners=False
        ).squeeze(1)
        if self.config.sigma > 0:
            maps = gaussian_filter(maps, _gaussian_kernel_size(self.config.sigma), self.config.sigma)
        return maps

    def predict(self, images: Sequence[ImageInput]) -> list[dict]:
        """Score query images.

        Returns:
            One `dict` per image:
            - `"score"` (`float`): the image anomaly score (reweighted max patch distance).
            - `"anomaly_map"` (`np.ndarray` of shape `(H0, W0)`, float32): pixel scores at the image's original size.
        """
        if self.memory_bank is None:
            raise ValueError("PatchCore has no memory bank: call `fit(shots)` before `predict`.")
        images = as_image_list(images)
        predictions = []
        starts = range(0, len(images), self.config.batch_size)
        for start in tqdm(starts, desc="PatchCore", disable=not self.show_progress):
            batch = images[start : start + self.config.batch_size]
            pixel_values, original_sizes = self.feature_extractor.preprocess(batch)
            patch_scores, pred_score = self.score_embeddings(self.feature_extractor(pixel_values))
            maps = self.anomaly_maps(patch_scores)
            for anomaly_map, score, size in zip(maps, pred_score.tolist(), original_sizes):
                if tuple(anomaly_map.shape) != size:
                    anomaly_map = F.interpolate(
                        anomaly_map[None, None], size=size, mode="bilinear", align_corners=False
                    )[0, 0]
                predictions.append({"score": float(score), "anomaly_map": anomaly_map.float().cpu().numpy()})
        return predictions


def fit_patchcores(
    shots: Sequence[ImageInput],
    seeds: Sequence[int] = (0, 1),
    config: PatchCoreConfig | None = None,
    feature_extractor: PatchFeatureExtractor | None = None,
    device: str | torch.device | None = None,
) -> list[PatchCore]:
    """PatchCores that differ only in the coreset seed, sharing one backbone and one pass over the shots.

    `fit_patchcores(shots, seeds=(0, 1))` is the paper's "2×PatchCore" baseline (sum their normalised outputs with
    `maeday_hf.ensemble`). When the coreset keeps every embedding (tiny banks) the models are identical; a warning
    says so.

    Raises:
        ValueError: no shots, or no seeds.
    """
    if not seeds:
        raise ValueError("Expected at least one coreset seed, got none.")
    shots = as_image_list(shots)
    if not shots:
        raise ValueError("PatchCore needs at least one normal shot to build its memory bank, got none.")
    config = config if config is not None else PatchCoreConfig()
    first = PatchCore(replace(config, seed=seeds[0]), feature_extractor=feature_extractor, device=device)
    embeddings, _ = first.embed(shots)
    embeddings = embeddings.reshape(-1, embeddings.shape[-1])
    models = [first.fit_embeddings(embeddings)]
    for seed in seeds[1:]:
        model = PatchCore(replace(config, seed=seed), feature_extractor=first.feature_extractor, device=first.device)
        models.append(model.fit_embeddings(embeddings))
    if len(models) > 1 and models[0].memory_bank.shape[0] == embeddings.shape[0]:
        logger.warning(
            "The coreset keeps all %d patch embeddings (min_coreset_size=%d), so PatchCores with different seeds are "
            "identical; lower `min_coreset_size` or `coreset_ratio` for a stochastic ensemble.",
            embeddings.shape[0],
            config.min_coreset_size,
        )
    return models
