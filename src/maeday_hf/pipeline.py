"""`AnomalyDetectionPipeline`: zero-shot MAEDAY as a `transformers` pipeline.

This module and the ones it imports relatively (`masking`, `reconstruction`, `scoring`, `images`, `overlap`,
`preprocessing`, `detector_card`, ...) depend only on torch, numpy, PIL and transformers (with its huggingface_hub),
so `pipeline.save_pretrained(folder)` / `push_to_hub` can ship them as remote code and the pipeline loads with `trust_remote_code=True` where `maeday_hf` is
not installed.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import numbers
import os
import stat
import sys
import tempfile
import threading
import types
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForPreTraining, Pipeline

from .detector_card import (
    card_for_push,
    commit_folder,
    is_generated_card,
    read_remote_card,
    render_detector_card,
    write_card,
)
from .images import as_image_list, is_single_image, load_rgb_image
from .masking import (
    make_mask_noise,
    validate_mask_ratio,
    validate_mask_schedule,
    validate_positive_int,
    validate_seed,
)
from .overlap import batched, copy_to_host_async, default_num_threads, prefetch
from .preprocessing import DeviceNormalization, ProcessorShortcuts
from .reconstruction import count_patches, is_vit_mae_for_pretraining, require_decoder_in_model_folder
from .scoring import GAUSSIAN_KERNEL_SIZE, GAUSSIAN_SIGMA, maeday_anomaly_maps

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "facebook/vit-mae-base"
TASK = "anomaly-detection"


@functools.lru_cache(maxsize=16)
def _cached_mask_noise(
    num_masks: int, num_patches: int, mask_ratio: float, schedule: str, seed: int, device: torch.device
) -> torch.Tensor:
    # Kept on the device: a host-to-device copy per batch would stall the GPU queue.
    return make_mask_noise(num_masks, num_patches, mask_ratio, schedule, seed).to(device)


MAP_KEYS = ("anomaly_map", "uncertainty_map")


def _at_original_size(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(batch_size, h, w)` maps -> `(batch_size, height, width)`, bilinear (unchanged if already that size)."""
    if maps.shape[-2:] == (height, width):
        return maps.float()
    return F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]


GPU_PAIRS_PER_FORWARD = 1024
"""(image, mask) pairs a GPU forward is filled with by default: 32 images x 32 masks for ViT-B run at the same speed
as 512 or 2,048 pairs (measured on an H200), and fewer leave it idle."""


def default_gpu_batch_size(num_masks: Any) -> int:
    """Images per forward on a GPU when the call names no `batch_size`: enough to fill `GPU_PAIRS_PER_FORWARD` pairs
    (32 for the paper's 32 masks, 256 for 4 balanced masks). An invalid `num_masks` gets the paper's; it is reported
    when the call's parameters are checked."""
    if isinstance(num_masks, bool) or not isinstance(num_masks, numbers.Integral) or num_masks < 1:
        num_masks = DEFAULT_NUM_MASKS
    return max(1, GPU_PAIRS_PER_FORWARD // int(num_masks))


def _validate_flag(value: bool, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def _validate_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number (an anomaly-map value), got {threshold!r}.")
    return float(threshold)


def require_whole_image_processor(image_processor) -> None:
    """Raise a `ValueError` if `image_processor` may crop: the map of a crop, resized to the whole image (or a
    model fine-tuned on crops), would put every anomaly in the wrong place.

    Refused: `do_center_crop`, and a `size` without both `height` and `width` (a resize by the shortest edge keeps
    the aspect ratio, and processors such as ConvNeXt's then crop, through `crop_pct`, without a `do_center_crop`)."""
    name = type(image_processor).__name__
    advice = "use one that resizes the whole image to the model's height and width, as ViTImageProcessor does"
    if getattr(image_processor, "do_center_crop", False):
        raise ValueError(
            f"The image processor ({name}) center-crops, so the anomaly map would cover only the crop, yet be "
            f"stretched over the whole image; {advice} (do_center_crop=False)."
        )
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_resize", True) and size is not None:
        height, width = (
            size.get(key) if isinstance(size, dict) else getattr(size, key, None) for key in ("height", "width")
        )
        if height is None or width is None:
            raise ValueError(
                f"The image processor ({name}) resizes to size={size!r}, not to a height and width: it keeps the "
                f"aspect ratio and may crop, so the anomaly map would not line up with the image; {advice}."
            )


def split_call_parameters(
    *,
    num_masks: int | None = None,
    mask_ratio: float | None = None,
    seed: int | None = None,
    mask_schedule: str | None = None,
    mask_batch_size: int | None = None,
    return_uncertainty: bool | None = None,
    bf16: bool | None = None,
    threshold: float | None = None,
    timeout: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Validate call options and route them to preprocess / _forward / postprocess (only those passed)."""
    preprocess_params, forward_params, postprocess_params = {}, {}, {}
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0 (or None for no limit), got {timeout!r}.")
        preprocess_params["timeout"] = timeout
    if num_masks is not None:
        forward_params["num_masks"] = validate_positive_int(num_masks, "num_masks")
    if mask_ratio is not None:
        forward_params["mask_ratio"] = validate_mask_ratio(mask_ratio)
    if seed is not None:
        forward_params["seed"] = validate_seed(seed)
    if mask_schedule is not None:
        forward_params["mask_schedule"] = validate_mask_schedule(mask_schedule)
    if mask_batch_size is not None:
        forward_params["mask_batch_size"] = validate_positive_int(mask_batch_size, "mask_batch_size")
    if return_uncertainty is not None:
        forward_params["return_uncertainty"] = _validate_flag(return_uncertainty, "return_uncertainty")
    if bf16 is not None:
        forward_params["bf16"] = _validate_flag(bf16, "bf16")
    if threshold is not None:
        postprocess_params["threshold"] = _validate_threshold(threshold)
    return preprocess_params, forward_params, postprocess_params


def _threshold_outputs(score: float, anomaly_map: np.ndarray, threshold: float) -> dict[str, Any]:
    # (compared in float64, as the score is: a threshold beyond float32's range is no overflow, and the mask agrees
    # with the label about a map value that only float64 tells from the threshold)
    above = anomaly_map > np.float64(threshold)
    anomalous = score > threshold
    if anomalous and not above.any():
        # The map's resize to the image's size lowers its peak a little (~0.5 %), so a score just above the threshold
        # can leave no pixel above it: the mask then marks the map's peak, where the score was taken, and an
        # anomalous label never comes with an empty mask.
        finite = np.where(np.isnan(anomaly_map), -np.inf, anomaly_map)
        above = finite >= finite.max()
    return {
        "label": "anomalous" if anomalous else "normal",
        "mask": Image.fromarray(np.where(above, 255, 0).astype(np.uint8)),
    }


def _of_class(value: Any, cls: type) -> bool:
    """Whether `value` is a `cls`, or an instance of another copy of it: maeday_hf's own class given to a detector
    loaded as remote code (whose `cls` is the shipped module's copy, another class), or the other way round."""
    other = type(value)
    return isinstance(value, cls) or (
        other.__qualname__ == cls.__qualname__
        and other.__module__.rpartition(".")[2] == cls.__module__.rpartition(".")[2]
        # (maeday_hf's, or a copy transformers loaded as remote code: not another library's class of that name)
        and other.__module__.partition(".")[0] in ("maeday_hf", "transformers_modules")
    )


DEFAULT_NUM_MASKS = 32
DEFAULT_MASK_RATIO = 0.75

THRESHOLD_CONFIG_KEY = "anomaly_threshold"
"""Config key of the threshold a few-shot fine-tune calibrated on its normal shots (`maeday_hf.calibration`)."""
THRESHOLD_SETTINGS_CONFIG_KEY = "anomaly_threshold_settings"
"""Config key of the scoring settings the threshold was calibrated with: `{"num_masks": N, "mask_ratio": r,
"mask_schedule": "random"}`."""


def give_weights_the_permissions_of(
    weights: collections.abc.Iterable[str | os.PathLike], like: str | os.PathLike
) -> None:
    """safetensors writes its files owner-only (0o600) whatever the umask: give the `weights` files just written the
    permissions of `like`, a file written beside them with `open()` (the umask's), so whoever may read the config may
    read the weights (a shared folder, a model server running as another user)."""
    mode = stat.S_IMODE(os.stat(like).st_mode)
    for path in weights:
        try:
            os.chmod(path, mode)
        except OSError as error:  # (some mounts refuse chmod: the weights stay owner-only)
            logger.warning("Could not give %s the permissions of %s: %s", os.fspath(path), os.fspath(like), error)


def saved_weight_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors files `save_pretrained` writes at the top of `folder`: `model.safetensors`, or the shards its
    index names (nothing else in the folder)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            names = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        names = [SAFE_WEIGHTS_NAME]
    return [os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))]


def calibrated_threshold(config: Any) -> float | None:
    """`config.anomaly_threshold` if the checkpoint has one (few-shot fine-tunes do), else None."""
    threshold = getattr(config, THRESHOLD_CONFIG_KEY, None)
    return None if threshold is None else _validate_threshold(threshold)


def _as_several_images(inputs):
    """Several images in a form the stock `__call__` would take for one image, made a form it batches: a tuple or an
    `(N, H, W, C)` array becomes a list; another sequence (a `datasets` column, `dataset["image"]`) a `_LazySequence`,
    read an image at a time (its results are listed by `__call__`); any other iterable (`map(...)`, a `set`, a pandas
    `Series`, a streamed column) a generator, read lazily. A string, bytes, a dict or a tensor stay as they are."""
    if is_single_image(inputs) or isinstance(
        inputs, (list, types.GeneratorType, torch.utils.data.Dataset, dict, bytes, bytearray, torch.Tensor)
    ):
        return inputs
    if isinstance(inputs, (tuple, np.ndarray)):
        return list(inputs)
    if isinstance(inputs, collections.abc.Sequence):
        return _LazySequence(inputs)
    if isinstance(inputs, collections.abc.Iterable):
        return (image for image in inputs)
    return inputs


class _LazySequence(torch.utils.data.Dataset):
    """A sequence of images read one at a time (a `datasets` column decodes an image when indexed: listing it first
    would hold every decoded image at once)."""

    def __init__(self, images: collections.abc.Sequence):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index]

    def __iter__(self):
        return iter(self.images)


def _check_ensemble_kind(ensemble) -> None:
    from .patchcore import PatchCore

    if isinstance(ensemble, str):
        if ensemble != "patchcore":
            raise ValueError(f"ensemble must be 'patchcore' or a fitted PatchCore, got {ensemble!r}.")
    elif not _of_class(ensemble, PatchCore):  # (the same code in another module: it is used as it is)
        raise TypeError(f"ensemble must be 'patchcore' or a fitted PatchCore, got {type(ensemble).__name__}.")


def _fetched_safely_from_threads(inputs) -> bool:
    """Whether the preprocessing threads may fetch `inputs`' items themselves: a `datasets` dataset or column, as
    `KeyDataset` or a column (`_LazySequence`) hands it over, without a user transform. Fetching an item decodes its
    image (datasets' `Image` feature loads it), which in the calling thread would keep the GPU waiting; their Arrow
    tables are read-only, so threads may read them at once. Other map-style inputs (a user's own `Dataset`), and a
    dataset with a transform (`with_transform`: user code, perhaps not thread-safe), are fetched in the calling
    thread."""
    from transformers.pipelines.pt_utils import KeyDataset

    datasets = sys.modules.get("datasets")  # (not imported here: the remote-code pipeline does not need it)
    if datasets is None:
        return False
    if isinstance(inputs, KeyDataset):
        source = inputs.dataset
    elif isinstance(inputs, _LazySequence):
        source = inputs.images
        while isinstance(source, datasets.arrow_dataset.Column):
            source = source.source  # (a column's source is its dataset, or the column it was taken from)
    else:
        return False
    return isinstance(source, datasets.Dataset) and source.format["type"] != "custom"


def _workers_are_forked() -> bool:
    """Whether DataLoader worker processes start by `fork` here (the start method set, else the platform's default,
    the first `get_all_start_methods` lists)."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return method == "fork"


def _is_empty_dataset(inputs) -> bool:
    return isinstance(inputs, torch.utils.data.Dataset) and hasattr(inputs, "__len__") and len(inputs) == 0


class AnomalyDetectionPipeline(Pipeline):
    """Pixel anomaly maps and image anomaly scores with MAEDAY (zero-shot, or few-shot with a fine-tuned checkpoint).

    Each image is reconstructed `num_masks` times by a `ViTMAEForPreTraining`, each time from a different random
    `1 - mask_ratio` share of its patches. The squared error of each full reconstruction, Gaussian-filtered and summed
    over channels, is averaged over the masks into the anomaly map; its maximum is the image score.

    The pipeline puts its model in inference mode (`model.eval()`, as `from_pretrained` returns it): a model handed
    over from a training loop needs `model.train()` again there.

    Example:

    ```python
    >>> import maeday_hf  # registers the task
    >>> from transformers import pipeline
    >>> detector = pipeline("anomaly-detection", model="facebook/vit-mae-base")
    >>> result = detector("carpet.png", num_masks=32, threshold=0.5)
    >>> result["score"], result["anomaly_map"].shape, result["label"]
    ```
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not is_vit_mae_for_pretraining(self.model):
            model_type = getattr(self.model.config, "model_type", None)
            raise ValueError(
                f"The anomaly-detection pipeline needs a ViTMAEForPreTraining checkpoint (model_type 'vit_mae' with its "
                f"decoder), got {type(self.model).__name__} (model_type {model_type!r})."
            )
        require_decoder_in_model_folder(self.model)
        if self.image_processor is None:
            raise ValueError(
                "No image processor was found with this checkpoint: save one next to it (e.g. ViTImageProcessor with "
                "the model's image size and normalisation) or pass `image_processor=` to `pipeline()`."
            )
        require_whole_image_processor(self.image_processor)
        if self.device.type == "cpu" and next(self.model.parameters()).dtype == torch.float16:
            logger.warning(
                "The model is in float16 on the CPU, which has no float16 matrix products: it runs several times "
                "slower than in float32 or bfloat16 (about 9x for a small ViT, measured). Load it with "
                "dtype=torch.float32 (bfloat16 where the CPU multiplies it in hardware) for CPU inference."
            )
        # Scores must not depend on dropout: a model handed over in training mode (e.g. straight from a training
        # loop) is switched to inference mode, as `from_pretrained` returns it (the bf16 copy always runs in it).
        self.model.eval()
        # A fine-tuned checkpoint's calibrated threshold is the default `threshold`; one passed at init or call wins.
        self._shortcuts = ProcessorShortcuts()
        default_threshold = calibrated_threshold(self.model.config)
        if default_threshold is not None and "threshold" not in self._postprocess_params:
            self._postprocess_params["threshold"] = default_threshold
            self._calibration_settings = dict(getattr(self.model.config, THRESHOLD_SETTINGS_CONFIG_KEY, None) or {})

    def _sanitize_parameters(self, **kwargs):
        preprocess_params, forward_params, postprocess_params = split_call_parameters(**kwargs)
        if "threshold" in kwargs and kwargs["threshold"] is None:
            postprocess_params["threshold"] = None  # passed as None: no labels, not even a calibrated threshold's
        calibration_settings = getattr(self, "_calibration_settings", None)
        if calibration_settings and "threshold" not in postprocess_params:
            # The calibrated threshold holds for the score distribution it was measured on: fewer masks, another
            # mask ratio or the balanced schedule (less spread between masks) shift that distribution, so its labels
            # would be wrong. Drop it rather than mislabel. (Folders from before the schedule was recorded were
            # calibrated with random masks too.)
            calibration_settings = {"mask_schedule": "random", **calibration_settings}
            effective = {"num_masks": DEFAULT_NUM_MASKS, "mask_ratio": DEFAULT_MASK_RATIO, "mask_schedule": "random"}
            effective.update({key: self._forward_params[key] for key in effective if key in self._forward_params})
            effective.update({key: forward_params[key] for key in effective if key in forward_params})
            differing = {key: value for key, value in effective.items() if calibration_settings.get(key, value) != value}
            if differing:
                logger.warning(
                    "Not applying the calibrated threshold: it was calibrated with %s, this call uses %s. Pass "
                    "threshold= (maeday detect: --threshold) to label anyway.", calibration_settings, effective,
                )
                postprocess_params["threshold"] = None
        return preprocess_params, forward_params, postprocess_params

    def __call__(
        self, inputs, ensemble=None, reference_images=None, ensemble_stats=None, ensemble_normalization=None,
        **kwargs: Any,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Score one image or a list of images.

        Args:
            inputs (`str`, `PIL.Image.Image`, `np.ndarray`, or a list, tuple, `(N, H, W, C)` array or other sequence
                (a `datasets` column such as `dataset["image"]`, read an image at a time) of them, which give a list
                of results; or a `KeyDataset`, generator or other iterable, read lazily into an iterator (an empty
                one gives `[]`)): paths,
                URLs, PIL images or arrays (`(H, W)`, `(H, W, 3|4)`; uint8, uint16 or float in [0, 1]). Any size and
                mode: images are converted to RGB and resized to the model's input; maps come back at the original
                size.
            num_masks (`int`, *optional*, defaults to 32): masked reconstructions per image (N).
            mask_ratio (`float`, *optional*, defaults to 0.75): share of patches masked in each, in [0, 1), leaving a patch visible; the
                checkpoint's own `config.mask_ratio` is ignored and left unchanged.
            seed (`int`, *optional*, defaults to 0): seeds the masks, in [0, 2**32); every image of a call gets the
                same N masks.
            mask_schedule (`"random"` or `"balanced"`, *optional*, defaults to `"random"`): the paper's i.i.d.
                masks, or masks that keep every patch equally often.
            mask_batch_size (`int`, *optional*): most (image, mask) pairs per forward pass (default 1024 on a GPU, 128
                on a CPU).
            return_uncertainty (`bool`, *optional*, defaults to `False`): add `uncertainty_map`.
            bf16 (`bool`, *optional*): run the model in bfloat16 (a bf16 copy of its weights, kept current); by default
                where the device multiplies bf16 in hardware (GPUs from Ampere on, CPUs with AVX512-BF16 or AMX),
                about 3x faster than float32 (maps within 0.23 % of the float32 ones' maximum on a CPU, 0.38 % on
                an H200, measured with ViT-B). Errors, filtering and averaging stay float32; `bf16=False` runs
                the model in its own dtype: float32 maps from a float32 model (a model loaded in bfloat16 or
                float16 runs in it either way).
            threshold (`float`, *optional*): add `label` (the score above it or not) and `mask` (the returned map
                above it). The map's bilinear resize to the image's size lowers its peak a little (about 0.5 %, a
                few % for images smaller than the model's input): where a score just above the threshold leaves no
                pixel above it, the mask marks the map's peak, so an anomalous label never comes with an empty mask.
                A fine-tune's calibrated threshold is the default; `threshold=None` turns labelling off.
            batch_size (`int`, *optional*): images per forward pass (their masked copies are batched too); default 1
                on a CPU; on a GPU, enough images for 1,024 (image, mask) pairs (32 at N = 32). Results do not depend
                on it, beyond float rounding (about 1e-6 of the map).
            timeout (`float`, *optional*): seconds an image URL may take to download, whole (default: no limit).
            num_workers (`int`, *optional*): on a CPU, DataLoader processes that preprocess (default 0; threads
                where processes would not be forked: macOS, Windows, Python >= 3.14 on Linux); on a GPU, threads
                that decode and resize ahead while the GPU computes (default up to 8; 0 preprocesses in the calling
                thread, between batches).
            ensemble (`"patchcore"` or a fitted `maeday_hf.PatchCore`, *optional*): sum MAEDAY's and PatchCore's
                normalised scores and maps (the paper's best configuration). Each method is standardised over the
                images of this call (no labels), so pass at least two images; `"patchcore"` fits a PatchCore with the
                default backbone on `reference_images` at each call — fit one yourself to reuse it.
            ensemble_normalization (`"zscore"`, `"robust"` or `"none"`, *optional*, defaults to `"zscore"`): how
                each method is standardised before the sum (`maeday_hf.ensemble`); `"none"` sums the raw outputs,
                the paper's words taken literally (then a single image may be scored).
            reference_images (list of images, *optional*): the normal shots for `ensemble="patchcore"`.
            ensemble_stats (two `maeday_hf.NormalizationStats`, *optional*): fixed normalisation of (MAEDAY,
                PatchCore), e.g. from `compute_normalization_stats` on an earlier unlabeled batch; then a single image
                may be scored and results no longer depend on the other images of the call. `threshold` is then in
                the ensemble's units (sums of standardised scores); a calibrated MAEDAY threshold does not apply.

        Return:
            A dict (or a list of dicts, one per input) with:

            - **score** (`float`) -- image anomaly score, the maximum of the anomaly map at the model's resolution.
            - **anomaly_map** (`np.ndarray`, float32, `(H, W)` of the original image) -- pixel anomaly scores.
            - **uncertainty_map** (`np.ndarray`, float32, `(H, W)`) -- per-pixel standard deviation of the N filtered
              error maps; only with `return_uncertainty=True` (with `ensemble=`, in the ensemble's units: PatchCore
              draws no masks, so the spread is MAEDAY's divided by its map normalisation scale).
            - **label** (`str`) -- `"anomalous"` if `score > threshold`, else `"normal"`; only with `threshold`.
            - **mask** (`PIL.Image.Image`, mode "L", `(H, W)`) -- 255 where `anomaly_map > threshold`; only with
              `threshold`.
        """
        for name, smallest in (("batch_size", 1), ("num_workers", 0)):  # (given here, or at construction)
            value = kwargs[name] if kwargs.get(name) is not None else getattr(self, f"_{name}", None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value < smallest):
                raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}.")
            if kwargs.get(name) is not None:
                kwargs[name] = int(value)  # (a NumPy integer too: transformers takes ints only)
        inputs = _as_several_images(inputs)
        if isinstance(inputs, list) and not inputs or _is_empty_dataset(inputs):
            # No images, no results (the stock call would fail on inputs[0]); the call's settings are checked anyway.
            if ensemble is not None:
                _check_ensemble_kind(ensemble)
            self._sanitize_parameters(**{k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")})
            return []
        if self.device.type == "cuda":
            # The GPU defaults, decided here: the stock `__call__` turns an unset num_workers into 0.
            if kwargs.get("batch_size") is None and self._batch_size is None:
                num_masks = kwargs.get("num_masks", self._forward_params.get("num_masks", DEFAULT_NUM_MASKS))
                kwargs["batch_size"] = default_gpu_batch_size(num_masks)
            if kwargs.get("num_workers") is None and self._num_workers is None:
                kwargs["num_workers"] = default_num_threads()
        if ensemble is None:
            if reference_images is not None or ensemble_stats is not None or ensemble_normalization is not None:
                raise ValueError("reference_images, ensemble_stats and ensemble_normalization are only used with "
                                 "ensemble=.")
            results = super().__call__(inputs, **kwargs)
            return list(results) if isinstance(inputs, _LazySequence) else results  # (a sequence in, a list out)
        return self._ensemble_call(
            inputs, ensemble, reference_images, ensemble_stats, ensemble_normalization or "zscore", **kwargs
        )

    def _ensemble_call(
        self, inputs, ensemble, reference_images, ensemble_stats, normalization: str, threshold: float | None = None,
        **kwargs: Any,
    ):
        from .ensemble import (
            IDENTITY,
            NormalizationStats,
            compute_normalization_stats,
            ensemble_predictions,
            validate_normalization_method,
        )
        from .patchcore import PatchCore

        validate_normalization_method(normalization)
        images = as_image_list(inputs)
        stats = [None, None] if ensemble_stats is None else [
            NormalizationStats(**dataclasses.asdict(entry)) if _of_class(entry, NormalizationStats) else entry
            for entry in ensemble_stats
        ]
        if len(stats) != 2 or not all(entry is None or isinstance(entry, NormalizationStats) for entry in stats):
            raise ValueError(
                f"ensemble_stats must hold 2 NormalizationStats or None (MAEDAY, PatchCore), got {ensemble_stats!r:.200}."
            )
        if normalization == "none":
            stats = [IDENTITY if entry is None else entry for entry in stats]
        if len(images) < 2 and None in stats:
            raise ValueError(
                f"ensemble needs at least 2 query images per call to normalise each method's scores without labels "
                f"(or both methods' fixed ensemble_stats), got {len(images)}."
            )
        _check_ensemble_kind(ensemble)
        if isinstance(ensemble, str):
            shots = as_image_list(reference_images) if reference_images is not None else []
            if not shots:
                raise ValueError("ensemble='patchcore' needs reference_images: a non-empty list of normal images.")
            patchcore = PatchCore(device=self.device).fit(shots)
        else:
            patchcore = ensemble
        # Decode once; both methods see the same RGB images. MAEDAY's own labels, if any, are dropped by the sum.
        images = [load_rgb_image(image) for image in images]
        # (threshold=None: MAEDAY's own labels, calibrated or not, would be dropped by the sum anyway.)
        maeday_outputs = super().__call__(images, threshold=None, **kwargs)
        if stats[0] is None:
            stats[0] = compute_normalization_stats(
                [output["score"] for output in maeday_outputs], [output["anomaly_map"] for output in maeday_outputs],
                normalization,
            )
        results = ensemble_predictions([maeday_outputs, patchcore.predict(images)], stats=stats, method=normalization)
        # PatchCore draws no masks: the spread over masks of the sum is that of MAEDAY's normalised map.
        for result, output in zip(results, maeday_outputs):
            if "uncertainty_map" in output:
                result["uncertainty_map"] = (output["uncertainty_map"] / stats[0].map_scale).astype(np.float32)
        if threshold is not None:
            threshold = _validate_threshold(threshold)
            for result in results:
                result.update(_threshold_outputs(result["score"], result["anomaly_map"], threshold))
        return results[0] if is_single_image(inputs) else results

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        threads_for_cpu_workers = self.device.type == "cpu" and num_workers > 0 and not _workers_are_forked()
        if self.device.type != "cuda" and not threads_for_cpu_workers:
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        # (Also on a CPU whose DataLoader workers would be spawned, not forked: macOS, Windows, Python >= 3.14's
        # forkserver on Linux. They must pickle transformers' collate function, a closure, and fail; threads do not.
        # Not on other devices, such as mps: the thread loop hands only CUDA outputs back to the host.)
        return self._overlapped_results(
            inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
        )

    def _overlapped_results(
        self, inputs, num_threads: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        """Results in input order, with batch k+1 queued on the GPU before batch k is postprocessed (see `overlap`).

        On a GPU (and on a CPU whose DataLoader processes would not be forked), `num_workers` counts preprocessing
        threads (default on a GPU `overlap.default_num_threads()`), not DataLoader processes: decoding and resizing
        release the GIL, and threads start at no cost per call.
        """
        items = inputs
        fetched_in_threads = _fetched_safely_from_threads(inputs)
        if fetched_in_threads:
            items = range(len(inputs))  # (each thread fetches, and so decodes, its own items)
        elif isinstance(inputs, collections.abc.Sized) and hasattr(inputs, "__getitem__"):
            # Lists and map-style datasets (`KeyDataset` included) are read by index, as the stock loop does.
            items = (inputs[index] for index in range(len(inputs)))
        load_locks: dict[int, threading.Lock] = {}

        def preprocess(item):
            if fetched_in_threads:
                item = inputs[item]
            if isinstance(item, Image.Image):
                # The same lazily opened image may come several times: let one thread decode it, and parse its EXIF,
                # at a time (Pillow marks the EXIF loaded before it has parsed it: another thread would read no
                # orientation, and score that copy on its side).
                with load_locks.setdefault(id(item), threading.Lock()):
                    item.load()
                    item.getexif()
            return self.preprocess(item, **preprocess_params)

        # (at least one item per thread in flight: with batches of 1, 2 items would keep 2 of 8 threads busy)
        lookahead = max(2 * batch_size, num_threads)
        batches = batched(prefetch(items, preprocess, num_threads, lookahead=lookahead), batch_size)
        in_flight = None
        while True:
            try:
                batch = next(batches, None)
                launched = None if batch is None else self._launch(batch, forward_params)
            except Exception:
                # A bad item (or a failed launch) ends the run, but not before the batch already computed is out.
                if in_flight is not None:
                    yield from self._postprocess_batch(in_flight, postprocess_params)
                raise
            if in_flight is not None:
                yield from self._postprocess_batch(in_flight, postprocess_params)
            if launched is None:
                return
            in_flight = launched

    def _launch(self, batch: list[dict[str, torch.Tensor]], forward_params):
        """Queue one batch on the GPU and the copy of its results to pinned host memory; returns without waiting."""
        model_inputs = {key: torch.cat([item[key] for item in batch]) for key in batch[0]}
        with self.device_placement(), self.get_inference_context()():
            for key in ("pixels", "pixel_normalization", "pixel_values"):
                if key in model_inputs:
                    tensor = model_inputs[key]
                    if self.device.type == "cuda":
                        tensor = tensor.pin_memory()
                    model_inputs[key] = tensor.to(self.device, non_blocking=True)
            outputs = self._forward(model_inputs, **forward_params)
            # Maps are brought to each image's original size where they are (cheap on a GPU), not by this thread.
            for key in MAP_KEYS:
                if key in outputs:
                    outputs[key] = [
                        _at_original_size(maps[None], int(height), int(width))
                        for maps, (height, width) in zip(outputs[key], outputs["original_size"])
                    ]
            return copy_to_host_async(outputs)

    def _postprocess_batch(self, launched, postprocess_params):
        outputs = launched.wait()
        for index in range(len(outputs["original_size"])):
            item = {
                key: value[index] if isinstance(value, list) else value[index : index + 1]
                for key, value in outputs.items()
            }
            yield self.postprocess(item, **postprocess_params)

    def preprocess(self, image, timeout: float | None = None) -> dict[str, torch.Tensor]:
        image = load_rgb_image(image, timeout=timeout)
        normalization, resize = self._shortcuts(self.image_processor)
        if normalization is not None:
            # Resized uint8 pixels; `_forward` rescales and normalises them on the model's device.
            if resize is not None:
                pixels = resize(image)
            else:
                pixels = self.image_processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")
                pixels = pixels["pixel_values"]
            model_inputs = {"pixels": pixels, "pixel_normalization": normalization.constants()}
        else:
            pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
            model_inputs = {"pixel_values": pixel_values.to(torch.float32)}
        model_inputs["original_size"] = torch.tensor([[image.height, image.width]])
        return model_inputs

    def _forward(
        self,
        model_inputs: dict[str, torch.Tensor],
        num_masks: int = DEFAULT_NUM_MASKS,
        mask_ratio: float = DEFAULT_MASK_RATIO,
        seed: int = 0,
        mask_schedule: str = "random",
        mask_batch_size: int | None = None,
        return_uncertainty: bool = False,
        bf16: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        if "pixels" in model_inputs:
            pixel_values = DeviceNormalization.apply(model_inputs["pixels"], model_inputs["pixel_normalization"])
        else:
            pixel_values = model_inputs["pixel_values"]
        # Errors are computed at float32 or better (a float64 model compares in float64).
        pixel_values = pixel_values.to(torch.promote_types(torch.float32, self.model.dtype))
        num_patches = count_patches(self.model, pixel_values)
        noise = _cached_mask_noise(num_masks, num_patches, mask_ratio, mask_schedule, seed, pixel_values.device)
        outputs = maeday_anomaly_maps(
            self.model,
            pixel_values,
            noise,
            mask_ratio=mask_ratio,
            mask_batch_size=mask_batch_size,
            return_uncertainty=return_uncertainty,
            bf16=bf16,
        )
        outputs["original_size"] = model_inputs["original_size"]
        return outputs

    def postprocess(self, model_outputs: dict[str, torch.Tensor], threshold: float | None = None) -> dict[str, Any]:
        height, width = (int(v) for v in model_outputs["original_size"][0])
        result: dict[str, Any] = {"score": float(model_outputs["pred_score"][0])}
        for key in MAP_KEYS:
            if key in model_outputs:
                resized = _at_original_size(model_outputs[key][:1], height, width)
                # A map in the GPU path's pinned copy buffer is copied out: results are kept, page-locked memory
                # is not for keeping (and would be held as long as any result is).
                copy = True if resized.is_pinned() else None
                result[key] = np.array(resized[0].numpy(), dtype=np.float32, copy=copy)
        if threshold is not None:
            result.update(_threshold_outputs(result["score"], result["anomaly_map"], threshold))
        return result

    def _model_card(self, name: str, tags: list[str] | None = None) -> str:
        return render_detector_card(
            name,
            self.model.config,
            source=getattr(self.model, "name_or_path", None),
            tags=tags,
            num_masks=DEFAULT_NUM_MASKS,
            mask_ratio=DEFAULT_MASK_RATIO,
            kernel_size=GAUSSIAN_KERNEL_SIZE,
            sigma=GAUSSIAN_SIGMA,
            threshold=calibrated_threshold(self.model.config),
            threshold_settings=getattr(self.model.config, THRESHOLD_SETTINGS_CONFIG_KEY, None),
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the model, its image processor and the pipeline code (`trust_remote_code=True` loads the folder
        without maeday-hf), and a model card (README.md) describing the detector. A README.md the folder already has
        is kept, unless this method wrote it (then it is rewritten for the model saved now)."""
        if os.path.isfile(save_directory):  # (transformers only logs this, and saves nothing)
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file; expected a folder to save into.")
        super().save_pretrained(save_directory, **kwargs)
        give_weights_the_permissions_of(saved_weight_files(save_directory), os.path.join(save_directory, "config.json"))
        card_path = os.path.join(save_directory, "README.md")
        if is_generated_card(card_path):
            write_card(card_path, self._model_card(os.path.basename(os.path.abspath(save_directory))))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """Upload what `save_pretrained` writes to `repo_id` (created if needed; `private` applies only then), in one
        commit to `revision` (a branch, created if needed) or a pull request; returns the commit info, as
        transformers' `push_to_hub` does. The card: the detector's, not transformers' placeholder, unless the repo
        has a README.md of its own (not written by maeday_hf, or edited since), which is kept, with `tags` added."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            card_path = os.path.join(folder, "README.md")
            remote = read_remote_card(api, repo_id, revision)
            card = card_for_push(remote, lambda: self._model_card(repo_id, tags), tags)
            if card is None:
                os.unlink(card_path)  # the repo's own README.md stays as it is
            else:
                write_card(card_path, card)
            return commit_folder(api, folder, repo_id, commit_message or "Upload anomaly-detection pipeline",
                                 commit_description, revision, create_pr)


# What `PIPELINE_REGISTRY.register_pipeline` records on the class (`maeday_hf.register_pipeline` registers the task
# with it). Set here too, so that a copy of this class loaded as remote code (`trust_remote_code=True`, without
# maeday-hf) still writes its code and `custom_pipelines` entry when it is saved or pushed again.
AnomalyDetectionPipeline._registered_impl = {
    TASK: {
        "impl": AnomalyDetectionPipeline,
        "pt": (AutoModelForPreTraining,),
        "default": {"model": (DEFAULT_CHECKPOINT, "main")},
        "type": "image",
    }
}
