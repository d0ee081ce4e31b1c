"""The README.md (model card) of a fine-tuned MAEDAY adapter, generated from the run."""

from __future__ import annotations

import json
import os
from typing import Any

from huggingface_hub import ModelCardData

from .calibration import TOP_SCORE_MARGIN
from .detector_card import is_hub_id, marked_as_generated
from .images import is_url
from .pipeline import DEFAULT_MASK_RATIO, DEFAULT_NUM_MASKS

def shareable_shot_name(shot: str) -> str:
    """A shot's name as a card or a push shows it: a local path that leads outside the folder it was given from (an
    absolute one, or one through `..`) becomes the file's name (it says nothing to readers elsewhere, and can tell them
    a user name or a customer's); anything else (a relative path inside, a URL as `shot_views` records it, without
    credentials or query) stays as it was given. The local training_log.json keeps the shots as they were given."""
    if is_url(shot):
        return shot
    leaves = os.path.isabs(shot) or ".." in shot.replace("\\", "/").split("/")
    return os.path.basename(shot) if leaves else shot


CARD_TEMPLATE = """---
{metadata}
---

# MAEDAY few-shot {kind}: {name}

{summary}

Fine-tuned from {base_reference} on **{num_shots} normal shot(s)** with MAEDAY's few-shot recipe
(paper: *MAEDAY: MAE for few and zero shot AnomalY-Detection*, Sec. 3). Anomaly maps come from {num_masks_hint}
masked reconstructions of the query compared with the query itself; the image score is the map's maximum at the
model's resolution (the map returned at the image's size peaks a little lower).

## Use

```python
{usage}
```

Without `maeday_hf` installed, `transformers.pipeline(model="{name}", trust_remote_code=True)` runs the pipeline code
shipped here (`pipeline.py` and the modules it imports{remote_note}).

## Shots

{shots}

## Recipe

| setting | value |
|---|---|
{recipe}

## Training loss (MSE over all patches, masked and visible)

| step | loss |
|---|---|
{losses}

## Threshold (from the normal shots only)

`{threshold:.6g}` = max(mean + {num_std} x std, {top_factor:g} x max) of the image scores of {num_calibration_views}
normal views ({calibration_views}), scored with {calibration_masks} masks at mask ratio {calibration_mask_ratio} in
{calibration_precision}. The pipeline uses it as the default `threshold` (adds `label` and `mask`); pass `threshold=` to
override. All scores are in `calibration.json`.
"""


def render_model_card(
    name: str,
    base_model: str,
    shot_names: list[str],
    recipe: dict[str, Any],
    losses: list[tuple[int, float]],
    calibration: dict[str, Any],
    full_finetune: bool,
) -> str:
    """Markdown model card with Hub metadata (library, base model, tags: `lora` and `peft` for an adapter) for an
    adapter or full checkpoint folder.

    `base_model` is a Hub id (named in the metadata and linked) or a local folder (named only: the Hub rejects a
    path as `base_model` metadata, and there is nothing to link to).
    """
    on_hub = is_hub_id(base_model)
    metadata = ModelCardData(
        # transformers either way: an adapter folder keeps PEFT's files in adapter/ and loads from its root through
        # AutoModelForPreTraining (auto_map, trust_remote_code), which PEFT's own loader would not find there.
        library_name="transformers",
        base_model=base_model if on_hub else None,
        # custom_code: the folder ships the pipeline (and the adapter loader) as remote code.
        tags=["anomaly-detection", "maeday", "vit_mae", "few-shot", "custom_code"]
        + ([] if full_finetune else ["lora", "peft"]),
        pipeline_tag=None,
    ).to_yaml()
    base_reference = (
        f"[`{base_model}`](https://huggingface.co/{base_model})" if on_hub else f"the local checkpoint `{base_model}`"
    )
    # The calibrated threshold labels calls at the settings it was calibrated with; spell out any that differ from
    # the pipeline's defaults, so the snippet's call gets labels.
    calibrated_call = "".join(
        f", {key}={calibration[key]!r}"
        for key, default in (("num_masks", DEFAULT_NUM_MASKS), ("mask_ratio", DEFAULT_MASK_RATIO))
        if calibration.get(key, default) != default
    )
    usage = (
        "import maeday_hf\n"
        f"detector = maeday_hf.load_detector({name!r})\n"
        f"result = detector(\"query.png\"{calibrated_call})  # score, anomaly_map, label, mask"
    )
    return marked_as_generated(CARD_TEMPLATE.format(
        metadata=metadata,
        kind="full fine-tune" if full_finetune else "LoRA adapter",
        name=name,
        summary=(
            "All weights fine-tuned (the paper's Table 5 ablation)."
            if full_finetune
            else f"A LoRA adapter (rank {recipe.get('lora_rank')}) on every weight matrix, merged into the base at load."
        ),
        base_reference=base_reference,
        num_shots=len(shot_names),
        num_masks_hint=calibration.get("num_masks", 32),
        usage=usage,
        remote_note="" if full_finetune else ", plus `adapter_model.py`, which merges the adapter with `peft`",
        shots="\n".join(f"- `{shareable_shot_name(shot)}`" for shot in shot_names),
        recipe="\n".join(f"| {key} | `{json.dumps(value)}` |" for key, value in recipe.items()),
        losses="\n".join(f"| {step} | {loss:.6g} |" for step, loss in losses) or "| - | - |",
        threshold=calibration["threshold"],
        num_std=calibration["num_std"],
        num_calibration_views=len(calibration["scores"]),
        calibration_views=(
            "each shot as is: the fine-tune used no augmentation" if not calibration.get("augmented", True)
            else "each shot as is and augmented" if calibration.get("num_views_per_shot", 2) > 1
            else "each shot as is"
        ),
        calibration_masks=calibration["num_masks"],
        calibration_mask_ratio=calibration["mask_ratio"],
        top_factor=1 + TOP_SCORE_MARGIN,
        calibration_precision=calibration.get("precision", "float32"),
    ))
