"""Arithmetic cost of one masked MAE reconstruction, for achieved-throughput figures in benchmarks.

Counts multiply-adds of every matrix product as 2 FLOPs (the convention of `torch.utils.flop_counter`), and ignores
normalisation, activations, softmax and the error/filter arithmetic, which are a fraction of a percent for ViT sizes.
"""

from __future__ import annotations

from transformers import ViTMAEConfig

from .masking import num_kept_patches


def _transformer_layer_flops(num_tokens: int, hidden_size: int, intermediate_size: int) -> int:
    projections = 4 * num_tokens * hidden_size * hidden_size  # q, k, v, output
    attention = 2 * num_tokens * num_tokens * hidden_size  # scores and weighted sum
    mlp = 2 * num_tokens * hidden_size * intermediate_size
    return 2 * (projections + attention + mlp)


def reconstruction_flops(config: ViTMAEConfig, mask_ratio: float = 0.75) -> int:
    """FLOPs of one `ViTMAEForPreTraining` forward of one image under one mask."""
    num_patches = (config.image_size // config.patch_size) ** 2
    patch_dim = config.patch_size**2 * config.num_channels
    encoder_tokens = 1 + num_kept_patches(num_patches, mask_ratio)
    decoder_tokens = 1 + num_patches
    flops = patch_embedding_flops(config)  # all patches, before masking
    flops += config.num_hidden_layers * _transformer_layer_flops(
        encoder_tokens, config.hidden_size, config.intermediate_size
    )
    flops += 2 * encoder_tokens * config.hidden_size * config.decoder_hidden_size  # decoder_embed
    flops += config.decoder_num_hidden_layers * _transformer_layer_flops(
        decoder_tokens, config.decoder_hidden_size, config.decoder_intermediate_size
    )
    flops += 2 * decoder_tokens * config.decoder_hidden_size * patch_dim  # decoder_pred
    return flops


def patch_embedding_flops(config: ViTMAEConfig) -> int:
    """FLOPs of embedding every patch of one image (the convolution before masking)."""
    num_patches = (config.image_size // config.patch_size) ** 2
    return 2 * num_patches * config.patch_size**2 * config.num_channels * config.hidden_size


def image_flops(config: ViTMAEConfig, num_masks: int, mask_ratio: float = 0.75, embed_once: bool = False) -> int:
    """FLOPs of scoring one image with `num_masks` masked reconstructions: `num_masks` forwards, less the patch
    embeddings this package shares between an image's masks (`embed_once`, see
    `reconstruction.patches_embedded_once_per_image`); the paper's procedure embeds per forward."""
    shared = (num_masks - 1) * patch_embedding_flops(config) if embed_once else 0
    return num_masks * reconstruction_flops(config, mask_ratio) - shared
