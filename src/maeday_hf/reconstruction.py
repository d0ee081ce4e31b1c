"""Masked reconstructions with a stock `ViTMAEForPreTraining`, compared with the input in the model's own space.

MAEDAY compares every *full* reconstruction (masked and visible patches alike) with the query. The comparison space is
the one the checkpoint was trained to predict in:

- `norm_pix_loss=False`: the model's normalised input (`pixel_values` as the image processor made them);
- `norm_pix_loss=True`: each target patch normalised by its own mean and variance, exactly as the MAE loss does. That
  space ignores a patch's overall brightness and contrast (its structure is compared, not its level); de-normalising
  the prediction with the query patch's statistics would not bring them back (it copies the query's level into the
  reconstruction) and would weight each patch's error by its variance, so the prediction is compared as it is.

Nothing here changes the model: the mask ratio is set for the duration of a call and restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import threading
import weakref
from collections.abc import Iterator
from copy import deepcopy

import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Errors are accumulated in float32 (bf16/fp16 inputs and outputs are upcast); float64 stays float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def is_vit_mae_for_pretraining(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) == "vit_mae"
        and hasattr(model, "patchify")
        and hasattr(model, "unpatchify")
        and hasattr(model, "decoder")
    )


def require_vit_mae_config(config, name: str) -> None:
    """Raise a `ValueError` naming `name` unless `config` is a ViTMAE config (model_type 'vit_mae')."""
    model_type = getattr(config, "model_type", None)
    if model_type != "vit_mae":
        raise ValueError(
            f"{name!r} is a {type(config).__name__} (model_type {model_type!r}); MAEDAY needs a ViTMAEForPreTraining "
            f"checkpoint (model_type 'vit_mae', e.g. facebook/vit-mae-base)."
        )


_NEEDS_THE_DECODER = (
    "MAEDAY scores an image by the MAE decoder's reconstructions, so it needs a ViTMAEForPreTraining checkpoint with "
    "its decoder (e.g. facebook/vit-mae-base)."
)


def require_loaded_weights(model: torch.nn.Module, loading_info: dict, name: str) -> None:
    """Raise a `ValueError` naming `name` if loading it as `model` left weights randomly initialised.

    Args:
        model (`ViTMAEForPreTraining`): the model `from_pretrained(name, ..., output_loading_info=True)` returned,
        loading_info (`dict`): with what it returned with it.
        name (`str`): the checkpoint, for the message.

    An encoder-only checkpoint (what `ViTMAEModel.save_pretrained` writes, also model_type 'vit_mae') loads as a
    ViTMAEForPreTraining with a random decoder, and transformers only logs it: its maps, or a fine-tune of it, would be
    noise.
    """
    missing = sorted(loading_info.get("missing_keys") or ())
    if not missing:
        return
    decoder_keys = {key for key in model.state_dict() if key.startswith("decoder.")}
    if decoder_keys and decoder_keys <= set(missing) and all(key.startswith("decoder.") for key in missing):
        what = "has no decoder weights (an encoder-only checkpoint, such as ViTMAEModel saves)"
    else:
        what = f"lacks {len(missing)} of the model's weights"
    raise ValueError(
        f"{name!r} {what}: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} would be random. "
        f"{_NEEDS_THE_DECODER}"
    )


def checkpoint_weight_names(name_or_path: str, revision: str | None = None, **hub_kwargs) -> set[str] | None:
    """Names of the tensors in a checkpoint's safetensors weights, from the index or the file's header (no tensor is
    read), found as `from_pretrained` finds them (a folder, or a Hub id at `revision` with `hub_kwargs` such as
    `cache_dir`, `token`, `local_files_only`); None if it has none (e.g. only a pytorch_model.bin) or they cannot be
    had now (the load that follows then says why)."""
    found = {
        file: cached_file(name_or_path, file, revision=revision, _raise_exceptions_for_missing_entries=False,
                          _raise_exceptions_for_connection_errors=False, **hub_kwargs)
        for file in (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME)
    }
    if found[SAFE_WEIGHTS_INDEX_NAME]:
        with open(found[SAFE_WEIGHTS_INDEX_NAME], encoding="utf-8") as index:
            return set(json.load(index)["weight_map"])
    if found[SAFE_WEIGHTS_NAME]:
        with safe_open(found[SAFE_WEIGHTS_NAME], framework="pt") as weights:
            return set(weights.keys())
    return None


def require_decoder_in_checkpoint(weight_names: set[str] | None, name: str) -> None:
    """Raise a `ValueError` naming `name` if a checkpoint's tensor names (`checkpoint_weight_names`; None: unknown)
    hold no decoder weights: transformers would load it with a random decoder, and only log it (see
    `require_loaded_weights`)."""
    if weight_names is not None and not any(key.startswith("decoder.") for key in weight_names):
        raise ValueError(
            f"{name!r} has no decoder weights (an encoder-only checkpoint, such as ViTMAEModel saves). "
            f"{_NEEDS_THE_DECODER}"
        )


def require_decoder_in_model_folder(model: torch.nn.Module) -> None:
    """`require_decoder_in_checkpoint` for the local folder `model` was loaded from (`model.name_or_path`), if it
    was. A Hub id is not looked up here: its revision and cache are not known to the model (`load_detector` checks
    those before loading)."""
    name = getattr(model, "name_or_path", "") or ""
    if not name or not os.path.isdir(name):
        return
    try:
        weight_names = checkpoint_weight_names(name)
    except (OSError, ValueError):  # (a folder that changed since it was loaded)
        return
    require_decoder_in_checkpoint(weight_names, name)


def count_patches(model: torch.nn.Module, pixel_values: torch.Tensor) -> int:
    """L, the number of patches the model cuts `(..., height, width)` pixel values into (the length of `noise`)."""
    patch_size = model.config.patch_size
    return (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)


_CONFIG_LOCKS: dict[int, threading.RLock] = {}
_CONFIG_LOCKS_GUARD = threading.Lock()


def _config_lock(config) -> threading.RLock:
    """One re-entrant lock per config object (configs are unhashable, so keyed by id, dropped with the config).

    Separate from `_patch_embedding_lock` on purpose: a caller holding the mask ratio may fan the forwards out to
    threads (each taking the patch-embedding lock); one lock for both would deadlock there.
    """
    with _CONFIG_LOCKS_GUARD:
        lock = _CONFIG_LOCKS.get(id(config))
        if lock is None:
            lock = _CONFIG_LOCKS[id(config)] = threading.RLock()
            weakref.finalize(config, _CONFIG_LOCKS.pop, id(config), None)
    return lock


@contextlib.contextmanager
def mask_ratio_set_to(model: torch.nn.Module, mask_ratio: float) -> Iterator[None]:
    """Temporarily set `model.config.mask_ratio` (read by `random_masking` at each forward), then restore it.

    The config is shared (by the model's bf16 copy, and by every thread holding the model), so the block holds a lock
    on it: another thread's block, with its own ratio, waits until this one ends instead of changing the ratio under
    this one's forwards.
    """
    with _config_lock(model.config):
        original_mask_ratio = model.config.mask_ratio
        model.config.mask_ratio = mask_ratio
        try:
            yield
        finally:
            model.config.mask_ratio = original_mask_ratio


def reconstruction_targets(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the model's predictions are compared with, per patch.

    Args:
        pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`): the model input.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_patches, patch_size**2 * num_channels)`, at least float32.
    """
    target = model.patchify(_at_least_float32(pixel_values))
    if model.config.norm_pix_loss:
        # Same normalisation (and epsilon) as ViTMAEForPreTraining's loss.
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


@functools.lru_cache(maxsize=None)
def _runs_bfloat16_natively(device_type: str, device_index: int | None) -> bool:
    if device_type == "cuda":
        properties = torch.cuda.get_device_properties(device_index)
        if torch.version.hip:  # AMD: the CDNA (MI100 to MI300) and RDNA 3/4 matrix units take bf16
            arch = getattr(properties, "gcnArchName", "")
            return arch.startswith(("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12"))
        # NVIDIA: Ampere and later; older GPUs emulate bf16, slower than float32.
        return properties.major >= 8
    if device_type == "cpu":
        if not torch.backends.mkldnn.is_available():  # bf16 matmuls go through oneDNN
            return False
        get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # public from torch 2.13
        if get_capabilities is not None:
            capabilities = get_capabilities()
            return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def runs_bfloat16_natively(device: torch.device | str) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware, so that a bf16 forward is faster than float32.

    True for CUDA GPUs of compute capability 8.0 or more (A100, H100, RTX 30xx on), AMD MI100 to MI300 and RDNA 3 on,
    and x86 CPUs with AVX512-BF16 or AMX-BF16 (Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and later),
    where ViT-B's masked forwards run about 3x faster in bf16 (README, Speed). False elsewhere (there bf16 is
    emulated, slower than float32). A bare "cuda" is the current CUDA device.
    """
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _runs_bfloat16_natively(device.type, index)


_BFLOAT16_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return list(itertools.chain(model.parameters(), model.buffers()))


def _layout(model: torch.nn.Module, tensors: list[torch.Tensor]) -> tuple:
    """What the copy must be rebuilt for: which tensors the model has (their shapes, dtypes and devices, not their
    values), and the switches that change what a module computes without touching a tensor (PEFT's merged, disabled
    and active adapters, read by name so that this module needs no PEFT import)."""
    tensor_layout = tuple((id(tensor), tuple(tensor.shape), tensor.dtype, tensor.device) for tensor in tensors)
    switches = tuple(
        (id(module), repr(module.merged_adapters), repr(getattr(module, "disable_adapters", None)),
         repr(module.active_adapters))
        for module in model.modules()
        if hasattr(module, "merged_adapters") and hasattr(module, "active_adapters")
    )
    return tensor_layout, switches


@torch.no_grad()
def bfloat16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with bfloat16 weights, for inference, holding `model`'s current weights.

    Running bf16 weights directly, instead of the float32 model under autocast, keeps the residual stream and the
    LayerNorms in bf16 and spares autocast's per-op casts: 2.66 -> 2.10 ms per image for ViT-B's 32 masked forwards
    on an H200, with the same accuracy as autocast (see the README's Speed section).

    The module is deep-copied once per model and kept (it shares `model.config`, so `mask_ratio_set_to(model, ...)`
    applies to it too); at every call the current weights are cast into it, a few hundred device-side copies (0.7 GB
    of traffic for ViT-B, about 0.2 ms on an H200) and no host sync. So it is never stale, however the weights were
    changed (optimizer steps, `load_state_dict`, in-place writes through `.data`). It is rebuilt if tensors are added,
    replaced or moved, or PEFT adapters are merged, disabled or switched. A model already in bf16 is returned as is.
    """
    if next(model.parameters()).dtype == torch.bfloat16:
        return model
    if is_dispatched(model):
        raise ValueError(
            f"bf16=True runs a bfloat16 copy of the model, but it is spread over devices or offloaded (device_map "
            f"{getattr(model, 'hf_device_map', None)}), which cannot be copied: pass bf16=False, or load it with "
            f"dtype=torch.bfloat16."
        )
    sources = _tensors(model)
    layout = _layout(model, sources)
    cached = _BFLOAT16_COPIES.get(model)
    if cached is None or cached[0] != layout:
        # Built outside inference mode, so its tensors can be refreshed, and used, in and out of it; and not while
        # another thread has its patch-embedding hooks on `model` (the copy would inherit them).
        with torch.inference_mode(False), _patch_embedding_lock(model):
            # Its floating-point tensors made empty in bf16 rather than cloned in float32 and cast (so the copy is
            # bf16 as made): the loop below fills them (ViT-B on 2 CPU cores: 0.03-0.07 s instead of 0.07-0.23 s,
            # and no float32 clone of the weights, 0.45 GB).
            memo = {id(model.config): model.config}
            for tensor in sources:
                if tensor.is_floating_point():
                    empty = torch.empty(tensor.shape, dtype=torch.bfloat16, device=tensor.device)
                    memo[id(tensor)] = torch.nn.Parameter(empty, tensor.requires_grad) if isinstance(
                        tensor, torch.nn.Parameter) else empty
            copy = deepcopy(model, memo=memo)
        copy.eval().requires_grad_(False)
        cached = (layout, copy, _tensors(copy))
        _BFLOAT16_COPIES[model] = cached
    _, copy, targets = cached
    for target, source in zip(targets, sources):
        target.copy_(source)
    return copy


_PATCH_EMBEDDING_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _patch_embedding_lock(model: torch.nn.Module):
    """One lock per patch-embedding module: its hooks hold for one call, so two threads sharing a model take turns."""
    module = getattr(getattr(getattr(model, "vit", None), "embeddings", None), "patch_embeddings", None)
    if module is None:
        return contextlib.nullcontext()
    return _PATCH_EMBEDDING_LOCKS.setdefault(module, threading.RLock())


@contextlib.contextmanager
def patches_embedded_once_per_image(
    model: torch.nn.Module, images: torch.Tensor, image_index: torch.Tensor
) -> Iterator[None]:
    """Inside, `model.vit` embeds the patches of each of `images` once, and row i of its batch gets those of
    `images[image_index[i]]`.

    The N masked copies of an image share its patch embedding (it comes before masking), so computing it per (image,
    mask) pair repeats the same convolution N times: 9 % of ViT-B's GPU time at N = 32, measured. Two hooks on the
    model's own patch-embedding module do the rest: the input it sees becomes `images`, its output is indexed by
    `image_index`. Everything else, masking included, runs as usual on the batch of pairs. Other threads calling the
    same model wait until the block ends.
    """
    module = model.vit.embeddings.patch_embeddings
    with _patch_embedding_lock(model):
        swap_input = module.register_forward_pre_hook(lambda _module, _args: (images,))
        spread_output = module.register_forward_hook(lambda _module, _args, output: output[image_index])
        try:
            yield
        finally:
            swap_input.remove()
            spread_output.remove()


def runs_in_bfloat16_by_default(model: torch.nn.Module, device: torch.device | str) -> bool:
    """Whether `model` runs in bfloat16 on `device` when no precision is asked for: a bf16 model always does, a
    float32 one where the device multiplies bf16 in hardware (`runs_bfloat16_natively`) unless it is spread over
    devices (`is_dispatched`: it cannot be copied), any other in its own dtype."""
    dtype = next(model.parameters()).dtype
    return dtype == torch.bfloat16 or (
        dtype == torch.float32 and runs_bfloat16_natively(device) and not is_dispatched(model)
    )


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate spread `model` over several devices or offloaded part of it (`device_map`): its modules then
    move their weights at each forward, and a copy of it would not."""
    device_map = getattr(model, "hf_device_map", None) or {}
    places = {str(place) for place in device_map.values()}
    return len(places) > 1 or "disk" in places or "meta" in places


def predict_patches(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    noise: torch.Tensor,
    bf16: bool | None = None,
    image_index: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """One masked reconstruction per row of `noise`.

    Args:
        pixel_values (`torch.Tensor` of shape `(num_images, num_channels, height, width)`).
        noise (`torch.Tensor` of shape `(batch_size, num_patches)`): the model keeps the smallest-noise patches.
        bf16 (`bool`, *optional*): run the model in bfloat16 (see `bfloat16_copy`); by default a float32 model
            does where the device multiplies bf16 in hardware (`runs_bfloat16_natively`), a float64 or float16 model
            runs in its own dtype. A bf16 model always runs in bf16.
        image_index (`torch.Tensor` of shape `(batch_size,)`, *optional*): row i of `noise` masks image
            `image_index[i]` (each image's patches are then embedded once, see `patches_embedded_once_per_image`);
            by default row i masks image i.
        upcast (`bool`, defaults to `True`): return float32 (float64 for a float64 model); `False` returns the
            dtype the model ran in (`squared_error_per_patch_pixel` upcasts on the fly, without a float32 copy).

    Returns:
        `torch.Tensor` of shape `(batch_size, num_patches, patch_size**2 * num_channels)`: the decoder's predictions
        for *all* patches.
    """
    if bf16 is None:
        bf16 = runs_in_bfloat16_by_default(model, pixel_values.device)
    forward_model = bfloat16_copy(model) if bf16 else model
    images = pixel_values.to(next(forward_model.parameters()).dtype)
    if image_index is None:
        embedding = contextlib.nullcontext()
        batch = images
    else:
        embedding = patches_embedded_once_per_image(forward_model, images, image_index)
        batch = images[:1].expand(len(image_index), -1, -1, -1)  # only its shape is read
    with embedding:
        # Encoder and decoder of the stock model, without the training loss its forward also computes.
        encoded = forward_model.vit(pixel_values=batch, noise=noise)
    logits = forward_model.decoder(encoded.last_hidden_state, encoded.ids_restore).logits
    return _at_least_float32(logits) if upcast else logits


def squared_error_per_patch_pixel(
    model: torch.nn.Module, predicted_patches: torch.Tensor, target_patches: torch.Tensor
) -> torch.Tensor:
    """Squared error of a full reconstruction, summed over the colour channels, per pixel, still in patch layout.

    The paper filters each channel's squared error and then sums the channels; the filter is linear, so summing first
    gives the same map (see `scoring.py`). Staying in patch layout until the errors of all masks are summed leaves a
    single one-channel map per image to rearrange (`patches_to_image`), instead of every reconstruction.

    Args:
        predicted_patches (`torch.Tensor` of shape `(..., num_patches, patch_size**2 * num_channels)`): any float
            dtype (bf16 is upcast element by element).
        target_patches (`torch.Tensor`): broadcastable to `predicted_patches`, float32 or float64.

    Returns:
        `torch.Tensor` of shape `(..., num_patches, patch_size**2)`, in the wider of the two dtypes.
    """
    difference = predicted_patches - target_patches
    return difference.square_().unflatten(-1, (-1, model.config.num_channels)).sum(dim=-1)


def patches_to_image(model: torch.nn.Module, patch_maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(batch_size, num_patches, patch_size**2)` one-channel maps in patch layout (`model.patchify`'s order: patches
    row by row, pixels row by row within a patch) -> `(batch_size, height, width)` images."""
    patch_size = model.config.patch_size
    grid = (height // patch_size, width // patch_size)
    maps = patch_maps.reshape(patch_maps.shape[0], *grid, patch_size, patch_size)
    return maps.permute(0, 1, 3, 2, 4).reshape(patch_maps.shape[0], height, width)
