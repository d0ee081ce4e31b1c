"""Locally aware patch features from a pretrained CNN, as PatchCore (Roth et al., CVPR 2022, Sec. 3.1) builds them.

    image ─resize, normalise→ pixel_values (B, 3, H, W) ─backbone→ feature maps of the chosen stages (layer 2 and 3)
          ─3×3 average pool (stride 1, pad 1)→ each map aggregates its local neighbourhood
          ─bilinear upsampling to the first stage's grid→ concatenation → embeddings (B, h, w, D)

Backbone, the Hugging Face way: the checkpoint's `AutoBackbone` class with `out_indices=...` (see [`load_backbone`]).

* Default `microsoft/resnet-50`: a native transformers backbone, so PatchCore runs with the package's core dependencies
  only. Its stages 2 and 3 have the same strides (8, 16) and widths (512, 1024 → D = 1536) as the WideResNet-50 layers
  2 and 3 that PatchCore uses, so the memory bank, the coreset and the maps keep the reference geometry.
* The paper's backbone, `timm/wide_resnet50_2.tv_in1k` (or any other timm checkpoint on the Hub), loads through
  transformers' timm integration (`TimmBackbone`) when `timm` is installed: `pip install "maeday-hf[timm]"`. timm is
  optional on purpose: it pulls torchvision, which pins a torch build.
* Any other id works if it resolves to a backbone: a transformers checkpoint with an `AutoBackbone` class (ResNet,
  ConvNeXt, DINOv2, ...) or a timm checkpoint. `out_indices` count stages as the checkpoint does (index 0 is the stem
  for both transformers ResNets and timm `features_only` models, so `(2, 3)` is "layer2, layer3" for both).

Preprocessing: the whole image is resized (no crop, so the anomaly map covers the image) to `image_size`, taken from
the checkpoint's image processor config when not given (224 for ResNet-50), and normalised with the processor's
`image_mean`/`image_std` (ImageNet statistics when the checkpoint has no processor config).

Projection: by default the embedding keeps every channel (D = sum of the stages' widths), as the paper describes. The
reference implementation also average-pools each stage's channels to a common size (1024) before concatenating, which
gives each stage equal weight and saves memory; set `layer_embedding_dim` for that (D = 2 × layer_embedding_dim; the
reference then pools the concatenation once more, to 1024, which is not done here).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig, ImageProcessingMixin, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING
from transformers.utils import is_timm_available

from .images import load_rgb_image

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "microsoft/resnet-50"
PAPER_BACKBONE = "timm/wide_resnet50_2.tv_in1k"
DEFAULT_OUT_INDICES = (2, 3)
DEFAULT_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_EXTRA = "timm"

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def _cannot_load_message(backbone_id: str, cause: BaseException | str) -> str:
    return (
        f"Cannot load {backbone_id!r} as a PatchCore backbone: expected a transformers checkpoint with an AutoBackbone "
        f"class (e.g. {DEFAULT_BACKBONE!r}) or a timm checkpoint (e.g. {PAPER_BACKBONE!r}, needs "
        f'`pip install "maeday-hf[{TIMM_EXTRA}]"`), as a Hub id or a local folder. Cause: {cause}'
    )


def _is_timm_checkpoint(config_dict: dict) -> bool:
    # timm's Hub configs have no `model_type`; transformers tags them "timm_wrapper" when it reads them.
    return config_dict.get("model_type") in ("timm_wrapper", "timm_backbone") or "pretrained_cfg" in config_dict


def load_backbone(backbone_id: str | os.PathLike, out_indices: Sequence[int] = DEFAULT_OUT_INDICES) -> nn.Module:
    """Load a pretrained backbone that returns the feature maps of the stages `out_indices`, in eval mode.

    Args:
        backbone_id (`str` or `os.PathLike`): Hub id or local folder of a transformers backbone or a timm checkpoint.
        out_indices (`Sequence[int]`): stages whose feature maps PatchCore uses; `(2, 3)` = ResNet layer2, layer3.

    Returns:
        `torch.nn.Module` whose output has `feature_maps`, a tuple of `(batch_size, channels, height, width)` tensors.

    Raises:
        ValueError: the id cannot be resolved to a backbone (not found, offline without a cached copy, not a backbone
            architecture, `out_indices` out of range).
        ImportError: a timm checkpoint while `timm` is not installed.
    """
    backbone_id = os.fspath(backbone_id)
    out_indices = [int(index) for index in out_indices]
    if not out_indices:
        raise ValueError("Expected at least one stage in `out_indices`, got an empty sequence.")
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(backbone_id)
    except (OSError, ValueError) as error:
        raise ValueError(_cannot_load_message(backbone_id, error)) from error

    if _is_timm_checkpoint(config_dict):
        if not is_timm_available():
            raise ImportError(
                f"{backbone_id!r} is a timm checkpoint; loading it needs timm: "
                f'`pip install "maeday-hf[{TIMM_EXTRA}]"` (or use the native {DEFAULT_BACKBONE!r}).'
            )
        from transformers import TimmBackbone

        # timm resolves "hf-hub:<repo>" on the Hub and "local-dir:<folder>" on disk.
        timm_name = f"local-dir:{backbone_id}" if os.path.isdir(backbone_id) else f"hf-hub:{backbone_id}"
        try:
            backbone = TimmBackbone.from_pretrained(timm_name, out_indices=tuple(out_indices))
        except Exception as error:  # timm raises a variety of types (RuntimeError, KeyError, ...) for bad ids
            raise ValueError(_cannot_load_message(backbone_id, error)) from error
    else:
        # Resolve the class as `AutoBackbone.from_pretrained` does, without its Hub `repo_exists` probe, which fails
        # for local folders and offline (transformers 5.x).
        try:
            config = AutoConfig.from_pretrained(backbone_id, out_indices=out_indices)
        except (OSError, ValueError, KeyError, IndexError) as error:
            raise ValueError(_cannot_load_message(backbone_id, error)) from error
        backbone_class = MODEL_FOR_BACKBONE_MAPPING.get(type(config), None)
        if backbone_class is None:
            cause = f"its architecture {config.model_type!r} has no AutoBackbone class"
            raise ValueError(_cannot_load_message(backbone_id, cause))
        try:
            backbone = backbone_class.from_pretrained(backbone_id, config=config)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(_cannot_load_message(backbone_id, error)) from error
    logger.info("Loaded PatchCore backbone %r (stages %s).", backbone_id, out_indices)
    return backbone.eval()


def _size_from_processor(size: object) -> tuple[int, int] | None:
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return (int(size["height"]), int(size["width"]))
        if "shortest_edge" in size:
            return (int(size["shortest_edge"]), int(size["shortest_edge"]))
    return None


def load_preprocessing(backbone_id: str | os.PathLike, backbone: nn.Module | None = None) -> dict:
    """Image size and normalisation the checkpoint was trained with.

    Returns:
        `dict` with `image_size` (`tuple[int, int]` or `None` when the checkpoint does not say), `image_mean` and
        `image_std` (3 floats each; ImageNet statistics when the checkpoint does not say).
    """
    timm_cfg = getattr(getattr(backbone, "_backbone", None), "pretrained_cfg", None)
    if isinstance(timm_cfg, dict) and "mean" in timm_cfg:
        input_size = timm_cfg.get("input_size")
        return {
            "image_size": tuple(input_size[-2:]) if input_size else None,
            "image_mean": tuple(timm_cfg["mean"]),
            "image_std": tuple(timm_cfg["std"]),
        }
    try:
        processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(os.fspath(backbone_id))
    except (OSError, ValueError):
        logger.info("%r has no image processor config; using ImageNet normalisation.", os.fspath(backbone_id))
        processor_dict = {}
    return {
        "image_size": _size_from_processor(processor_dict.get("size")),
        "image_mean": tuple(processor_dict.get("image_mean") or IMAGENET_MEAN),
        "image_std": tuple(processor_dict.get("image_std") or IMAGENET_STD),
    }


def aggregate_patch_features(
    feature_maps: Sequence[torch.Tensor], neighbourhood_size: int = 3, layer_embedding_dim: int | None = None
) -> torch.Tensor:
    """PatchCore's locally aware patch features from a backbone's feature maps.

    Each map is average-pooled over its `neighbourhood_size`² neighbourhood (stride 1, zero padding, so the grid keeps
    its size), optionally average-pooled along channels to `layer_embedding_dim`, upsampled (bilinear) to the grid of
    the finest map (layer 2's in PatchCore), and concatenated along channels in the given order.

    Args:
        feature_maps (`Sequence[torch.Tensor]`): tensors of shape `(batch_size, channels_i, height_i, width_i)`, the
            in any order.
        neighbourhood_size (`int`): odd side of the aggregation window; 1 disables aggregation.
        layer_embedding_dim (`int`, *optional*): channels kept per map (adaptive average pooling along channels).

    Returns:
        `torch.Tensor` of shape `(batch_size, height, width, embedding_dim)` on the finest grid, channels last.
    """
    grid = max((feature_map.shape[-2:] for feature_map in feature_maps), key=lambda size: size[0] * size[1])
    aggregated = []
    for feature_map in feature_maps:
        if neighbourhood_size > 1:
            feature_map = F.avg_pool2d(feature_map, neighbourhood_size, stride=1, padding=neighbourhood_size // 2)
        if layer_embedding_dim is not None:
            batch_size, channels, height, width = feature_map.shape
            per_patch = feature_map.permute(0, 2, 3, 1).reshape(-1, 1, channels)
            pooled = F.adaptive_avg_pool1d(per_patch, layer_embedding_dim)
            feature_map = pooled.reshape(batch_size, height, width, layer_embedding_dim).permute(0, 3, 1, 2)
        if feature_map.shape[-2:] != grid:
            feature_map = F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False)
        aggregated.append(feature_map)
    return torch.cat(aggregated, dim=1).permute(0, 2, 3, 1).contiguous()


class PatchFeatureExtractor(nn.Module):
    """Images → PatchCore patch embeddings `(batch_size, grid_height, grid_width, embedding_dim)`.

    Args:
        backbone (`torch.nn.Module`): returns `feature_maps` (see [`load_backbone`]).
        image_size (`tuple[int, int]`): `(height, width)` every image is resized to.
        image_mean, image_std (`Sequence[float]`): per-channel normalisation.
        neighbourhood_size (`int`): local aggregation window (3 in the paper).
        layer_embedding_dim (`int`, *optional*): channels kept per stage (reference implementation: 1024); `None`
            keeps all.
    """

    def __init__(
        self,
        backbone: nn.Module,
        image_size: tuple[int, int] = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE),
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        neighbourhood_size: int = 3,
        layer_embedding_dim: int | None = None,
    ) -> None:
        super().__init__()
        if neighbourhood_size < 1 or neighbourhood_size % 2 == 0:
            raise ValueError(f"Expected an odd `neighbourhood_size` >= 1, got {neighbourhood_size}.")
        if layer_embedding_dim is not None and layer_embedding_dim < 1:
            raise ValueError(f"Expected `layer_embedding_dim` >= 1 or None, got {layer_embedding_dim}.")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"Expected `image_size` as (height, width) of positive ints, got {image_size}.")
        self.backbone = backbone.eval()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.neighbourhood_size = neighbourhood_size
        self.layer_embedding_dim = layer_embedding_dim
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    @classmethod
    def from_pretrained(
        cls,
        backbone_id: str | os.PathLike = DEFAULT_BACKBONE,
        out_indices: Sequence[int] = DEFAULT_OUT_INDICES,
        image_size: int | tuple[int, int] | None = None,
        neighbourhood_size: int = 3,
        layer_embedding_dim: int | None = None,
    ) -> PatchFeatureExtractor:
        """Load the backbone and its preprocessing; `image_size` overrides the checkpoint's (default 224)."""
        backbone = load_backbone(backbone_id, out_indices)
        preprocessing = load_preprocessing(backbone_id, backbone)
        if image_size is None:
            image_size = preprocessing["image_size"] or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        elif isinstance(image_size, int):
            image_size = (image_size, image_size)
        return cls(
            backbone,
            image_size=image_size,
            image_mean=preprocessing["image_mean"],
            image_std=preprocessing["image_std"],
            neighbourhood_size=neighbourhood_size,
            layer_embedding_dim=layer_embedding_dim,
        )

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    def preprocess(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Load, convert to RGB, resize (bilinear) and stack.

        Returns:
            `pixel_values` of shape `(batch_size, 3, height, width)` in [0, 1] (normalised in `forward`), and the
            original `(height, width)` of each image.
        """
        height, width = self.image_size
        arrays, original_sizes = [], []
        for image in images:
            image = load_rgb_image(image)
            original_sizes.append((image.height, image.width))
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(image, dtype=np.uint8))
        pixel_values = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return pixel_values, original_sizes

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` `(batch_size, 3, height, width)` in [0, 1] → embeddings `(batch_size, h, w, dim)`."""
        pixel_values = (pixel_values.to(self.device) - self.image_mean) / self.image_std
        feature_maps = self.backbone(pixel_values=pixel_values).feature_maps
        return aggregate_patch_features(feature_maps, self.neighbourhood_size, self.layer_embedding_dim)
