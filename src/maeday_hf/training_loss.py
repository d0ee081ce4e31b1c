"""The few-shot fine-tuning loss (paper Sec. 3): "we apply the loss to all patches", not only the masked ones.

MAEDAY scores every patch of the full reconstruction, visible ones included, so the fine-tune teaches the model to
reconstruct all of them. The targets are `reconstruction_targets`, the space the scorer compares in.
"""

from __future__ import annotations

import torch


def all_patch_loss(logits: torch.Tensor, target_patches: torch.Tensor) -> torch.Tensor:
    """MSE over every patch, masked and visible alike (paper: "we apply the loss to all patches").

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_patches, patch_size**2 * num_channels)`): predictions.
        target_patches (`torch.Tensor` of the same shape): `reconstruction_targets(model, pixel_values)`.

    Returns:
        Scalar `torch.Tensor`, float32.
    """
    if logits.shape != target_patches.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target_patches.shape)} differ in shape.")
    return (logits.float() - target_patches.float()).square().mean()
