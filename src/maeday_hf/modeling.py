"""Load a MAEDAY detector: a ViTMAE checkpoint or a few-shot adapter (Hub id or local folder) in the pipeline.

A few-shot adapter folder (`maeday_hf.finetune`) is loaded as its base with the LoRA weights merged in (see
`adapter_model.py`), and the threshold calibrated on its normal shots becomes the pipeline's default `threshold`.
"""

from __future__ import annotations

import logging
import os
import re

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoImageProcessor, pipeline

from .adapter_model import BaseModelNotFoundError, adapter_subfolder, load_merged_model, looks_like_local_path
from .devices import resolve_device
from .pipeline import DEFAULT_CHECKPOINT, AnomalyDetectionPipeline
from .reconstruction import checkpoint_weight_names, require_decoder_in_checkpoint, require_vit_mae_config

logger = logging.getLogger(__name__)


def load_detector(
    model: str | os.PathLike = DEFAULT_CHECKPOINT,
    device: str | int | torch.device | None = "auto",
    base_model: str | os.PathLike | None = None,
    **pipeline_kwargs,
) -> AnomalyDetectionPipeline:
    """`pipeline("anomaly-detection", model=model)`, with a clear error when the checkpoint cannot be had.

    Args:
        model (`str`): Hub id or folder of a ViTMAE checkpoint, a full fine-tune, or a few-shot adapter.
        device: `"auto"` (GPU when there is one), `"cpu"`, `"cuda:1"`, ...; leave it at `"auto"` when passing
            `device_map=` (accelerate then places the full checkpoint; adapters take `device` only).
        base_model (`str`, *optional*): for an adapter, the base to merge into instead of the one its
            `adapter_config.json` names (e.g. a local copy); it must have the same geometry.
        pipeline_kwargs: passed to `pipeline()`; call defaults such as `threshold=` or `num_masks=` included, and
            `revision=`, `token=`, `model_kwargs={"cache_dir": ...}`, which also reach an adapter's own files. A
            checkpoint with a calibrated `anomaly_threshold` in its config gets it as default `threshold` (see
            `AnomalyDetectionPipeline`).

    Raises:
        FileNotFoundError: `model` looks like a local path (exists as a file, or starts with `.`, `/` or `~`) but is
            not a folder.
        OSError: the checkpoint is neither local nor in the Hub cache and the Hub cannot be reached
            (`adapter_model.BaseModelNotFoundError` when it is an adapter whose base cannot be loaded).
        ValueError: the checkpoint is not a ViTMAEForPreTraining.
    """
    model = os.fspath(model)
    device_map = pipeline_kwargs.get("device_map", (pipeline_kwargs.get("model_kwargs") or {}).get("device_map"))
    if device_map is not None:
        # accelerate places the model; transformers refuses a device beside it ("discard the device argument").
        if device not in (None, "auto"):
            raise ValueError(f"device={device!r} and device_map={device_map!r} both place the model: give one.")
        device = None
    else:
        device = resolve_device(device)  # a device that is not here fails before anything is loaded
    path = os.path.expanduser(model)  # what is loaded: `model` itself for a Hub id
    if looks_like_local_path(model) and not os.path.isdir(path):
        if os.path.exists(path):
            raise FileNotFoundError(f"Model {model!r} is a file; expected a checkpoint folder (with config.json) or a "
                                    f"Hub id.")
        raise FileNotFoundError(f"Model folder not found: {model!r} (expected a folder with config.json).")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"Model folder {model!r} has no config.json. {_DETECTOR_FOLDER} (A PEFT adapter's own folder is the "
            f"adapter/ inside a folder `maeday finetune` wrote; pass that outer folder.)"
        )
    # Where and which version to read, as pipeline() takes them: for the config read here and an adapter's files too.
    revision = pipeline_kwargs.get("revision")
    hub_kwargs = {key: value for key, value in (pipeline_kwargs.get("model_kwargs") or {}).items()
                  if key in ("cache_dir", "local_files_only")}
    if pipeline_kwargs.get("token") is not None:
        hub_kwargs["token"] = pipeline_kwargs["token"]
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, **hub_kwargs)
        if adapter_subfolder(config) is not None:
            if device_map is not None:
                raise ValueError(f"device_map={device_map!r} places full checkpoints; {model!r} is an adapter, merged "
                                 f"into its base before it is placed: pass device= instead.")
            return _load_adapter_detector(
                path, config, device, base_model, pipeline_kwargs, revision, hub_kwargs
            )
        require_vit_mae_config(config, model)
        if base_model is not None:
            raise ValueError(f"base_model={os.fspath(base_model)!r} applies only to adapter folders; {model!r} is a "
                             f"full checkpoint.")
        # transformers would load a checkpoint without its decoder with a random one, and only log it (a report of
        # some 30 lines): checked before loading, in the folder, or at the revision and in the cache the pipeline
        # loads from.
        require_decoder_in_checkpoint(checkpoint_weight_names(path, revision, **hub_kwargs), model)
        # pipeline_class: use this package's pipeline even when the folder also ships it as remote code.
        return pipeline(
            "anomaly-detection",
            model=path,
            device=device,
            pipeline_class=AnomalyDetectionPipeline,
            **pipeline_kwargs,
        )
    except BaseModelNotFoundError:
        raise  # the adapter loaded; its message names the base that did not
    except SafetensorError as error:
        raise OSError(f"Cannot load model {model!r}: a weights file in it is damaged or incomplete ({error}).") from error
    except ValueError as error:
        cause = _loading_cause(error)
        if cause is None:
            raise
        raise OSError(f"Cannot load model {model!r}: {cause} {_DETECTOR_FOLDER}") from error
    except OSError as error:
        if os.path.isdir(path):
            raise OSError(
                f"Cannot load model {model!r} from its folder: {str(error).splitlines()[0].rstrip('.')}. "
                f"{_DETECTOR_FOLDER}"
            ) from error
        raise OSError(
            f"Cannot load model {model!r}: it is not a local folder and not in the Hugging Face cache, and the Hub "
            f"could not be reached ({str(error).splitlines()[0]}). Download it on a connected machine "
            f"(`hf download {model}`) or pass a local ViTMAE checkpoint folder."
        ) from error


_DETECTOR_FOLDER = (
    "A detector folder holds the model's config.json and weights and the image processor's preprocessor_config.json "
    "(what `save_pretrained` of the model and of its processor write)."
)


def _loading_cause(error: ValueError) -> str | None:
    """The original error inside transformers' "Could not load model ... See the original errors" (None for another
    ValueError): e.g. "OSError: Error no file named model.safetensors ... found in directory X."."""
    message = str(error)
    if not message.startswith("Could not load model"):
        return None
    causes = re.findall(r"^\w+(?:Error|Exception): (.+)$", message, flags=re.MULTILINE)
    return causes[0] if causes else message.splitlines()[0]


def _load_adapter_detector(
    adapter: str,
    config,
    device: str | int | torch.device | None,
    base_model: str | os.PathLike | None,
    pipeline_kwargs: dict,
    revision: str | None,
    hub_kwargs: dict,
) -> AnomalyDetectionPipeline:
    """The base with the adapter merged in, in our pipeline, with the adapter folder's image processor."""
    model_kwargs = pipeline_kwargs.pop("model_kwargs", None) or {}
    pipeline_kwargs.pop("revision", None)  # the adapter's revision: its base is loaded at its own default
    merged = load_merged_model(
        adapter, base_model=base_model, revision=revision, config=config, **{**hub_kwargs, **model_kwargs}
    )
    if pipeline_kwargs.get("image_processor") is None:
        pipeline_kwargs["image_processor"] = AutoImageProcessor.from_pretrained(adapter, revision=revision, **hub_kwargs)
    return pipeline(
        "anomaly-detection",
        model=merged,
        device=device,
        pipeline_class=AnomalyDetectionPipeline,
        **pipeline_kwargs,
    )
