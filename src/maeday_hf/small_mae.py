"""A small ViTMAE pretrained here, on synthetic normal images: the stand-in for ImageNet weights in the studies.

No Hub checkpoint is reachable offline, and a random MAE predicts each masked patch from its position alone (every
mask then gives the same map). `pretrain_small_mae` trains one the way MAE is trained (its own masked-patch loss,
AdamW with warm-up and cosine decay, through `transformers.Trainer`) on `maeday_hf.synthetic` normal images of the
categories it is given, and saves it with its image processor, so the pipeline, `finetune` and `maeday-evaluate` load
it as they load `facebook/vit-mae-base`. Used by `scripts/study_mask_schedule.py` and `scripts/study_few_shot.py`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding
from transformers.trainer_callback import PrinterCallback

from .atomic_io import make_partial_dir, replace_folder
from .synthetic import CATEGORIES, make_normal_image

PATCH_SIZE = 8


def small_mae_config(image_size: int) -> ViTMAEConfig:
    """6 encoder layers of width 192 and 2 decoder layers of width 128, patches of 8 px."""
    if image_size < PATCH_SIZE or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of the patch size {PATCH_SIZE}, got {image_size}.")
    return ViTMAEConfig(
        image_size=image_size, patch_size=PATCH_SIZE, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
        intermediate_size=768, decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
        decoder_intermediate_size=512,
    )


def small_mae(image_size: int, seed: int = 0) -> ViTMAEForPreTraining:
    """A freshly initialised small ViTMAE (weights from `seed`), with MAE's fixed sin-cos position embeddings."""
    config = small_mae_config(image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTMAEForPreTraining(config)
    grid = image_size // config.patch_size
    with torch.no_grad():  # (a random init leaves them at zero)
        for parameter in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
            table = build_2d_sinusoidal_position_embedding(grid, grid, parameter.shape[-1], cls_token=True)
            parameter.copy_(table.reshape(parameter.shape))
    return model


def pretrain_small_mae(
    output_dir: str | os.PathLike,
    categories: Sequence[str] = CATEGORIES,
    image_size: int = 64,
    num_train: int = 200,
    steps: int = 1500,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Pretrain `small_mae` on `num_train` synthetic normal images of each of `categories`, and save it with a
    `ViTImageProcessor` of `image_size` into `output_dir` (written aside, then renamed into place).

    Returns:
        A record of the run: the categories, steps, seconds and the logged losses `[[step, loss], ...]`.
    """
    unknown = [category for category in categories if category not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"categories must be some of {CATEGORIES}, got {list(categories)!r}.")
    for name, value in (("num_train", num_train), ("steps", steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    model = small_mae(image_size, seed)
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    normals = [make_normal_image(category, image_size, index) for category in categories for index in range(num_train)]
    train_set = [{"pixel_values": pixel_values}
                 for pixel_values in processor(images=normals, return_tensors="pt")["pixel_values"]]
    with tempfile.TemporaryDirectory(prefix="maeday-pretrain-") as work:
        trainer = Trainer(model=model, train_dataset=train_set, args=TrainingArguments(
            output_dir=work, max_steps=steps, per_device_train_batch_size=32, learning_rate=learning_rate,
            weight_decay=0.05, warmup_steps=steps // 10, lr_scheduler_type="cosine", optim="adamw_torch",
            use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
            logging_steps=max(1, steps // 10), disable_tqdm=True, seed=seed,
        ))
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    output_dir = Path(output_dir)
    partial = make_partial_dir(output_dir.parent, prefix=f".{output_dir.name}.partial-")
    try:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        replace_folder(partial, output_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # (gone already once renamed into place)
    return {
        "pretrained": f"small ViTMAE (6+2 layers, {(image_size // PATCH_SIZE) ** 2} patches), masked-patch loss",
        "categories": list(categories),
        "images_per_category": num_train,
        "steps": steps,
        "seconds": round(seconds, 1),
        "losses": [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry],
    }
