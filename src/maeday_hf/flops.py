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
    flops = 2 * num_patches * patch_dim * config.hidden_size  # patch embedding (all patches, before masking)
    flops += config.num_hidden_layers * _transformer_layer_flops(
        encoder_tokens, config.hidden_size, config.intermediate_size
    )
    flops += 2 * encoder_tokens * config.hidden_size * config.decoder_hidden_size  # decoder_embed
    flops += config.decoder_num_hidden_layers * _transformer_layer_flops(
        decoder_tokens, config.decoder_hidden_size, config.decoder_intermediate_size
    )
    flops += 2 * decoder_tokens * config.decoder_hidden_size * patch_dim  # decoder_pred
    return flops
