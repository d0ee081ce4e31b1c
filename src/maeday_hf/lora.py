"""LoRA on every weight matrix of a `ViTMAEForPreTraining` (paper Sec. 3: "rank 32 for all tensors in the model").

Targets, found by type rather than by name (module names change between transformers versions):

- every `nn.Linear`: encoder and decoder attention (q/k/v/o) and MLP (fc1/fc2), `decoder_embed`, `decoder_pred`;
- the patch-embedding `nn.Conv2d` (`vit.embeddings.patch_embeddings.projection`); PEFT wraps Conv2d with a rank-r
  convolution of the same kernel followed by a 1x1 convolution.

Left out, because they are not weight matrices: `cls_token` and the decoder's `mask_token` (single vectors), the
fixed sin-cos position embeddings (frozen buffers-as-parameters, never trained by MAE), LayerNorm scales/shifts and
biases (vectors). They stay frozen with everything else.

`lora_alpha` defaults to the rank (32), so the LoRA update `B @ A` is scaled by `lora_alpha / r = 1`. The paper gives
no alpha: this is the package's choice, under which the learning rate alone sets the step size. It is not neutral:
under SGD the change of the merged weights grows about as the square of the scale (50 steps at lr 1e-2 on a tiny model
moved them 16x less at alpha 8, peft's default, and ~1,000x less at alpha 1, the original LoRA code's), so another
alpha needs another learning rate. `B` starts at zero, so the adapted model starts exactly at the base model.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from .adapter_model import silence_peft_deprecation_warning

LORA_MODULE_TYPES: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear, torch.nn.Conv2d)


def find_lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Full names of every `nn.Linear` and `nn.Conv2d` in `model`, sorted.

    Raises:
        ValueError: `model` has none (not a ViTMAE, or already wrapped).
    """
    names = sorted(name for name, module in model.named_modules() if type(module) in LORA_MODULE_TYPES)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d module to put LoRA on.")
    return names


def make_lora_config(
    model: torch.nn.Module, rank: int = 32, alpha: float | None = None, dropout: float = 0.0
) -> LoraConfig:
    """`peft.LoraConfig` targeting every weight matrix of `model` (see the module docstring).

    Args:
        rank (`int`): r of every LoRA pair.
        alpha (`float`, *optional*): `lora_alpha`; defaults to `rank` (scale 1).
        dropout (`float`): dropout on the LoRA branch input.
    """
    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=find_lora_target_modules(model),
        bias="none",
    )


def add_lora(model: torch.nn.Module, lora_config: LoraConfig) -> PeftModel:
    """Wrap `model` with LoRA: only the `lora_A`/`lora_B` weights require gradients afterwards."""
    silence_peft_deprecation_warning()
    return get_peft_model(model, lora_config)
