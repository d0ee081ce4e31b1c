"""Load a MAEDAY few-shot adapter folder (or Hub repo) as one merged `ViTMAEForPreTraining`.

An adapter folder written by `maeday_hf.finetune` looks like:

```
config.json               the base's ViTMAEConfig + `maeday_adapter` + `custom_pipelines` + `auto_map` (+ threshold)
preprocessor_config.json  the base's image processor
adapter/                  a PEFT LoRA adapter: adapter_config.json (naming the base) + adapter_model.safetensors
pipeline.py, masking.py, reconstruction.py, scoring.py, images.py, adapter_model.py   remote code
calibration.json, README.md
```

The PEFT adapter sits in a subfolder on purpose: `transformers.pipeline()` and `AutoModel*.from_pretrained` treat a
*root* `adapter_config.json` as "load the base instead" — for a Hub id they then read the base's config (losing the
`custom_pipelines` entry, so the remote pipeline cannot be found) and call `load_adapter`, which needs a newer PEFT.
With the subfolder, `AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True)` reaches
`MaedayAdapterForPreTraining.from_pretrained` (via `auto_map`), which loads the base, applies the LoRA weights with
PEFT and merges them, so inference costs the same as the base model.

This module is shipped as remote code: it imports only torch and transformers at module level; `peft` is imported
inside `load_merged_model` (an adapter folder cannot be merged without it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, ViTMAEForPreTraining
from transformers.utils import cached_file

from .pipeline import THRESHOLD_CONFIG_KEY, THRESHOLD_SETTINGS_CONFIG_KEY
from .reconstruction import require_loaded_weights

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_KEY = "maeday_adapter"
"""`config.json` key marking an adapter folder: `{"subfolder": "adapter", "base_fingerprint": "..."}` (the
fingerprint, `base_weights_fingerprint` of the base it was trained on, is absent in folders written before
2026-11-29)."""
ADAPTER_SUBFOLDER = "adapter"

# Config fields that fix the shapes and meaning of the weights: an adapter only fits a base that agrees on all of them.
GEOMETRY_KEYS: tuple[str, ...] = (
    "model_type",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
    "norm_pix_loss",
)

# from_pretrained keywords that make sense for the base model; the others (revision, subfolder, ...) belong to the
# adapter repository.
_BASE_LOAD_KWARGS = ("dtype", "torch_dtype", "device_map", "cache_dir", "token", "local_files_only", "force_download")


def silence_peft_deprecation_warning() -> None:
    """Silence the FutureWarning transformers >= 5.2x gives when PEFT (< 0.22) reads the deprecated
    `model.is_gradient_checkpointing` while wrapping a model: a library detail users cannot act on, printed as two
    lines by every fine-tune and every adapter load. A filter for that one message, added once for the process
    (`warnings.catch_warnings` around the wrapping would not be thread-safe)."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def looks_like_local_path(name: str) -> bool:
    """Whether a model name can only be a local folder: a Hub id is "name" or "org/name"; anything with more path
    parts, rooted, starting with "." or "~", a file, or with backslashes (Windows) is a path."""
    return (
        name.startswith((".", "/", "~"))
        or os.path.isabs(name)
        or os.path.isfile(name)
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
    )


class BaseModelNotFoundError(OSError):
    """An adapter's base checkpoint cannot be loaded (the adapter itself could); the message names the base."""


def adapter_subfolder(config: PretrainedConfig) -> str | None:
    """The adapter subfolder named by `config.maeday_adapter`, or None when `config` is a plain checkpoint's."""
    entry = getattr(config, ADAPTER_CONFIG_KEY, None)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("subfolder"), str):
        raise ValueError(f"config.{ADAPTER_CONFIG_KEY} must be a dict with a 'subfolder' string, got {entry!r}.")
    return entry["subfolder"]


def check_base_matches(base_config: PretrainedConfig, adapter_folder_config: PretrainedConfig, base_name: str) -> None:
    """Raise `ValueError` naming every geometry field where the base differs from the one the adapter was trained on."""
    mismatches = [
        f"{key}: adapter {getattr(adapter_folder_config, key, None)!r} vs base {getattr(base_config, key, None)!r}"
        for key in GEOMETRY_KEYS
        if getattr(adapter_folder_config, key, None) != getattr(base_config, key, None)
    ]
    if mismatches:
        raise ValueError(
            f"The adapter does not fit the base model {base_name!r} ({'; '.join(mismatches)}). Pass the base "
            f"checkpoint the adapter was trained on (its adapter_config.json names it)."
        )


_FINGERPRINT_SAMPLES_PER_TENSOR = 4096
_FINGERPRINT_STRIDE = 2_654_435_761
"""A prime larger than any tensor's size: sample i of a tensor of n values is value (i * stride) mod n, so 4,096
distinct values spread over every row and column (an even spacing that divides a row's length reads few columns)."""


def base_weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights: every tensor's name and shape, and up to 4,096 of its values, as float32.

    Two checkpoints that differ wherever a fine-tune or another pretraining would change them differ here; loading the
    same checkpoint again, from any folder or the Hub, gives the same fingerprint. A sample rather than every value
    keeps it to milliseconds for ViT-H.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().flatten()
        if values.numel() > _FINGERPRINT_SAMPLES_PER_TENSOR:
            index = torch.arange(_FINGERPRINT_SAMPLES_PER_TENSOR, dtype=torch.int64) * _FINGERPRINT_STRIDE
            values = values[(index % values.numel()).to(values.device)]
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(values.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return digest.hexdigest()


def check_base_weights(base: torch.nn.Module, adapter_folder_config: PretrainedConfig, base_name: str, adapter: str,
                       chosen: bool) -> None:
    """Compare `base` (loaded in float32) with the fingerprint of the base the adapter folder was trained on, if it
    records one: its LoRA update and calibrated threshold belong to those weights.

    A base that holds other weights raises `ValueError` when it is the one the adapter names (it changed since, e.g.
    a new revision on the Hub, or the folder now holds another checkpoint), and logs a warning when the caller
    `chosen` it with `base_model=` (e.g. the same weights saved again in half precision, which round differently).
    """
    expected = getattr(adapter_folder_config, ADAPTER_CONFIG_KEY, {}).get("base_fingerprint")
    if expected is None:
        return
    if next(base.parameters()).dtype != torch.float32:
        # The fingerprint is of the float32 weights: a base loaded in half precision cannot be compared.
        logger.info("Base %s loaded in %s: its weights are not compared with the adapter's record.", base_name,
                    next(base.parameters()).dtype)
        return
    found = base_weights_fingerprint(base)
    if found == expected:
        return
    if chosen:
        logger.warning(
            "The base %s holds other weights than the one the adapter %s was trained on (weights fingerprint %s, the "
            "adapter records %s). The same weights in another precision score close to what the adapter was "
            "calibrated on; another checkpoint does not.", base_name, adapter, found, expected,
        )
        return
    raise ValueError(
        f"The base model {base_name!r} does not hold the weights the adapter {adapter!r} was trained on (weights "
        f"fingerprint {found}, the adapter records {expected}): it changed since (a new revision, another checkpoint "
        f"in its folder) or never held them (an adapter trained on a local copy named with another base_model_id), "
        f"so the adapter's LoRA update and threshold would not fit it. Pass base_model= (`maeday detect "
        f"--base-model`) a copy of the checkpoint it was trained on (a base given that way loads with a warning if "
        f"its weights still differ)."
    )


def local_adapter_folder(
    adapter: str | os.PathLike, subfolder: str = ADAPTER_SUBFOLDER, revision: str | None = None, **hub_kwargs: Any
) -> str:
    """A local folder holding the PEFT adapter files of an adapter folder or Hub repo (downloaded/cached if needed).

    PEFT is then given a plain local folder: its own Hub lookup of a `subfolder` (0.21) builds the file name with
    the subfolder twice when offline.
    """
    config_path = cached_file(
        os.fspath(adapter), "adapter_config.json", subfolder=subfolder, revision=revision, **hub_kwargs
    )
    cached_file(os.fspath(adapter), "adapter_model.safetensors", subfolder=subfolder, revision=revision, **hub_kwargs)
    return os.path.dirname(config_path)


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The PEFT `adapter_config.json` of a local adapter folder, as a dict."""
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
        return json.load(handle)


def load_merged_model(
    adapter: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    revision: str | None = None,
    merge: bool = True,
    config: PretrainedConfig | None = None,
    **base_kwargs: Any,
):
    """Load the base named by an adapter folder/repo, apply its LoRA weights and (by default) merge them.

    Args:
        adapter (`str` or `os.PathLike`): adapter folder or Hub repo id (as written by `maeday_hf.finetune`).
        base_model (`str`, *optional*): the base checkpoint to use instead of the one in `adapter_config.json` (e.g.
            a local copy); it must have the same geometry.
        revision (`str`, *optional*): revision of the adapter repository.
        merge (`bool`, *optional*, defaults to `True`): merge the LoRA weights into the base and return a plain
            `ViTMAEForPreTraining`; `False` returns the `peft.PeftModel` (for comparisons).
        config (`PretrainedConfig`, *optional*): the adapter folder's config, when already loaded.
        base_kwargs: passed to the base's `from_pretrained` (`dtype`, `cache_dir`, `token`, ...). Without `dtype`, or
            with `"auto"` (what `pipeline()` passes), the base loads in the adapter folder's dtype: float32, the one
            its LoRA weights were trained, merged and calibrated in, also where the base was saved in fp16/bf16 (a
            merge in half precision would round away much of the small LoRA update). Pass `dtype=` for another.

    Returns:
        `ViTMAEForPreTraining` in eval mode whose `config` carries the calibrated `anomaly_threshold` if the adapter
        has one (or a `peft.PeftModel` when `merge=False`).

    Raises:
        ValueError: the folder is not a MAEDAY adapter, or its base does not match (in geometry; or in the weights
            fingerprint the folder records, for the base it names: see `check_base_weights`).
    """
    from peft import PeftModel  # lazy: only adapter folders need PEFT

    adapter = os.fspath(adapter)
    hub_kwargs = {key: base_kwargs[key] for key in ("cache_dir", "token", "local_files_only") if key in base_kwargs}
    if config is None:
        config = AutoConfig.from_pretrained(adapter, revision=revision, **hub_kwargs)
    subfolder = adapter_subfolder(config)
    if subfolder is None:
        raise ValueError(
            f"{adapter!r} is not a MAEDAY adapter: its config.json has no {ADAPTER_CONFIG_KEY!r} entry. Load it as a "
            f"plain ViTMAE checkpoint instead."
        )
    peft_folder = local_adapter_folder(adapter, subfolder, revision=revision, **hub_kwargs)
    adapter_config = read_adapter_config(peft_folder)
    base_name = os.fspath(base_model) if base_model is not None else adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{adapter!r}: adapter_config.json names no base_model_name_or_path; pass base_model=.")
    try:
        base_config = AutoConfig.from_pretrained(base_name, **hub_kwargs)
    except OSError as error:
        local = looks_like_local_path(base_name)
        missing = local and not os.path.isdir(os.path.expanduser(base_name))
        reason = "there is no such folder." if missing else str(error).splitlines()[0]
        if base_model is not None:
            advice = "Check the base given as base_model= (`maeday detect --base-model`)."
        elif local:
            advice = ("That folder is not there (any more); pass base_model= (`maeday detect --base-model`) the "
                      "folder that holds the same checkpoint now.")
        else:
            advice = (f"Download the base (`hf download {base_name}`) or pass base_model= (`maeday detect "
                      f"--base-model`) a local copy of it.")
        raise BaseModelNotFoundError(
            f"Cannot load the base model {base_name!r} of the adapter {adapter!r}: {reason} {advice}"
        ) from error
    check_base_matches(base_config, config, base_name)
    logger.info("Loading base %s and applying the adapter %s", base_name, adapter)
    load_kwargs = {key: value for key, value in base_kwargs.items() if key in _BASE_LOAD_KWARGS}
    dtype = load_kwargs.pop("dtype", load_kwargs.pop("torch_dtype", "auto"))
    if dtype in (None, "auto"):
        # The adapter folder's own (float32 for every folder `finetune` writes), not the one the base was saved in.
        dtype = getattr(config, "dtype", None) or torch.float32
    try:
        base, loading_info = ViTMAEForPreTraining.from_pretrained(
            base_name, dtype=dtype, output_loading_info=True, **load_kwargs
        )
    except OSError as error:
        raise BaseModelNotFoundError(
            f"Cannot load the weights of the base model {base_name!r} of the adapter {adapter!r}: "
            f"{str(error).splitlines()[0]}"
        ) from error
    require_loaded_weights(base, loading_info, base_name)
    check_base_weights(base, config, base_name, adapter, chosen=base_model is not None)
    silence_peft_deprecation_warning()
    peft_model = PeftModel.from_pretrained(base, peft_folder)
    peft_model.eval()
    if not merge:
        return peft_model
    model = peft_model.merge_and_unload()
    for key in (THRESHOLD_CONFIG_KEY, THRESHOLD_SETTINGS_CONFIG_KEY):  # the pipeline's calibrated default threshold
        if getattr(config, key, None) is not None:
            setattr(model.config, key, getattr(config, key))
    return model.eval()


class MaedayAdapterForPreTraining(ViTMAEForPreTraining):
    """`auto_map` entry point of an adapter folder: `from_pretrained` returns the base with the adapter merged.

    Reached through `AutoModelForPreTraining.from_pretrained(folder_or_repo, trust_remote_code=True)`, hence through
    `pipeline("anomaly-detection", model=folder_or_repo, trust_remote_code=True)`.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        revision = kwargs.get("revision")
        base_kwargs = {key: value for key, value in kwargs.items() if key in _BASE_LOAD_KWARGS}
        if not isinstance(config, PretrainedConfig):
            config = None
        return load_merged_model(pretrained_model_name_or_path, revision=revision, config=config, **base_kwargs)
