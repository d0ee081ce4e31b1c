"""Load a MAEDAY detector: a ViTMAE checkpoint (Hub id or local folder) wrapped in the anomaly-detection pipeline."""

from __future__ import annotations

import logging
import os

import torch
from transformers import pipeline

from .pipeline import DEFAULT_CHECKPOINT, AnomalyDetectionPipeline

logger = logging.getLogger(__name__)


def resolve_device(device: str | int | torch.device | None) -> str | int | torch.device:
    """`"auto"`/None -> `"cuda"` when available, else `"cpu"`; anything else is passed through."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_detector(
    model: str | os.PathLike = DEFAULT_CHECKPOINT,
    device: str | int | torch.device | None = "auto",
    **pipeline_kwargs,
) -> AnomalyDetectionPipeline:
    """`pipeline("anomaly-detection", model=model)`, with a clear error when the checkpoint cannot be had.

    Raises:
        FileNotFoundError: `model` looks like a local path (exists as a file, or starts with `.`, `/` or `~`) but is
            not a folder.
        OSError: the checkpoint is neither local nor in the Hub cache and the Hub cannot be reached.
        ValueError: the checkpoint is not a ViTMAEForPreTraining.
    """
    model = os.fspath(model)
    looks_local = model.startswith((".", "/", "~")) or os.path.isfile(model)
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise FileNotFoundError(f"Model folder not found: {model!r} (expected a folder with config.json).")
    try:
        # pipeline_class: use this package's pipeline even when the folder also ships it as remote code.
        return pipeline(
            "anomaly-detection",
            model=os.path.expanduser(model),
            device=resolve_device(device),
            pipeline_class=AnomalyDetectionPipeline,
            **pipeline_kwargs,
        )
    except OSError as error:
        raise OSError(
            f"Cannot load model {model!r}: it is not a local folder and not in the Hugging Face cache, and the Hub "
            f"could not be reached ({str(error).splitlines()[0]}). Download it on a connected machine "
            f"(`hf download {model}`) or pass a local ViTMAE checkpoint folder."
        ) from error
