"""Few-shot MAEDAY (paper Sec. 3 "For FSAD", Table 5): fine-tune a ViTMAE on k normal shots with LoRA.

The method, in the order it runs:

1. `load_shot_images` / `shots_from_split`: the k shots, decoded up front (bad input fails before any training).
2. `ShotViews`: batches of 32 views filled by repeating the shots, each view with its own crop, rotation and mask.
3. `add_lora`: rank-32 LoRA on every weight matrix (or, with `full_finetune=True`, all weights at lr 1e-4).
4. `MaedayTrainer`: a `transformers.Trainer` whose loss is `all_patch_loss` — MSE over *all* patches, masked and
   visible, in the space the scorer compares in (`reconstruction_targets`), because MAEDAY scores every patch of the
   full reconstruction. SGD (lr 1e-2, momentum 0.9, weight decay 0.05), 50 steps, constant learning rate.
5. `calibrate_threshold`: a threshold from the normal shots only.
6. The adapter folder (see `adapter_model.py` for its layout) is written to a temporary sibling of `output_dir` and
   renamed into place at the end: an interrupted run leaves no output folder, and neither does a diverged one (a loss
   or threshold that is not finite raises `TrainingDivergedError` before anything is written).

Runs under `accelerate launch` unchanged: the per-process batch is `batch_size / num_processes`, so the effective
batch (and the views it holds) is the same on 1 CPU process and on 8 GPUs.

Example:

```python
>>> from maeday_hf.finetune import FinetuneConfig, finetune
>>> result = finetune("facebook/vit-mae-base", ["bottle/train/good/000.png"], "bottle-1shot")
>>> import maeday_hf.modeling
>>> detector = maeday_hf.modeling.load_detector("bottle-1shot")
```
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HfHubHTTPError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoImageProcessor, Trainer, TrainingArguments, ViTMAEForPreTraining
from transformers.trainer_callback import PrinterCallback
from transformers.dynamic_module_utils import custom_object_save

from .adapter_model import (
    ADAPTER_CONFIG_KEY,
    ADAPTER_SUBFOLDER,
    MaedayAdapterForPreTraining,
    base_weights_fingerprint,
    looks_like_local_path,
)
from .atomic_io import let_go, make_held_partial_dir, make_partial_dir, remove_abandoned, replace_folder
from .calibration import Calibration, calibrate_threshold
from .lora import add_lora, make_lora_config
from .masking import require_visible_patches, validate_mask_ratio, validate_positive_int, validate_seed
from .detector_card import is_hub_id
from .model_card import render_model_card, shareable_shot_name
from .pipeline import (
    TASK,
    THRESHOLD_CONFIG_KEY,
    THRESHOLD_SETTINGS_CONFIG_KEY,
    AnomalyDetectionPipeline,
    give_weights_the_permissions_of,
    require_whole_image_processor,
)
from .reconstruction import (
    checkpoint_weight_names,
    count_patches,
    is_vit_mae_for_pretraining,
    mask_ratio_set_to,
    require_decoder_in_checkpoint,
    require_loaded_weights,
    require_vit_mae_config,
    runs_bfloat16_natively,
)
from .shot_views import ShotViews, load_shot_images, shots_from_rows, shots_from_split, view_source_scale
from .step_loop import DEFAULT_WARMUP_STEPS, run_steps, views_loss
from .training_loss import all_patch_loss  # noqa: F401 - the recipe's loss, importable from here too

logger = logging.getLogger(__name__)

LORA_LEARNING_RATE = 1e-2
FULL_FINETUNE_LEARNING_RATE = 1e-4
LORA_RANK = 32
MAX_VIEW_SUPERSAMPLING = 8
"""Bound of `FinetuneConfig.view_supersampling`: at 8 x 224 px a shot takes 39 MB on the device (float32), and each view
about 2.7 times as much while it is resampled (`shot_views.RENDER_CHUNK_BYTES` bounds how many at once)."""
CALIBRATION_FILE = "calibration.json"
TRAINING_LOG_FILE = "training_log.json"


@dataclasses.dataclass
class FinetuneConfig:
    """The paper's few-shot recipe; every field can be overridden.

    Args:
        num_steps (`int`, defaults to 50): optimisation steps.
        batch_size (`int`, defaults to 32): views per step, over all processes (the shots repeated to fill it).
        learning_rate (`float`, *optional*): defaults to 1e-2 with LoRA, 1e-4 with `full_finetune=True`.
        momentum (`float`, defaults to 0.9), weight_decay (`float`, defaults to 0.05): SGD's.
        full_finetune (`bool`, defaults to `False`): train all weights instead of LoRA (Table 5's ablation).
        lora_rank (`int`, *optional*): LoRA rank, defaults to 32; not allowed with `full_finetune`.
        lora_alpha (`float`, *optional*): defaults to `lora_rank` (update scale 1).
        lora_dropout (`float`, *optional*): defaults to 0.
            These four fields keep `None` when not given (so `dataclasses.replace` of `full_finetune` picks the other
            mode's defaults); the values a run uses are the `resolved_*` properties, and `recipe()` records those.
        mask_ratio (`float`, defaults to 0.75): share of patches masked in each training view.
        augment (`bool`, defaults to `True`): random crop + rotation of each view (`min_crop_scale`,
            `max_rotation_degrees`).
        view_supersampling (`float`, defaults to 3): the views are cut from the shots processed at up to this many
            times the model's input size (less where a shot is smaller), then downsampled with antialiasing, so a
            crop keeps more of the original's detail, closer to the queries; 1 cuts them from the shots resized to the
            model's input (each crop then upsampled: blurrier views, and on a CPU ~10 % faster steps).
        seed (`int`, defaults to 0): in [0, 2**32); seeds the views, their masks, the LoRA init and the Trainer.
            (The calibration scores with the masks the pipeline draws by default, whatever the seed.)
        calibration_views_per_shot, calibration_num_masks, calibration_num_std: see `calibration.py`.
        use_cpu (`bool`): train on the CPU even when a GPU is there.
        bf16 (`bool`, *optional*): bf16 mixed precision (autocast; the weights and the optimizer stay float32);
            `False` trains in float32. Either overrides `accelerate launch --mixed_precision`. By default: under
            `accelerate launch`, its `--mixed_precision` (which defaults to "no"); otherwise on where the training
            device multiplies bf16 in hardware (`runs_bfloat16_natively`: GPUs from Ampere on, x86 CPUs with
            AVX512-BF16 or AMX, where a ViT-B step runs 2.9x faster than in float32).
        cuda_graph (`bool`, defaults to `True`): in a single process on a GPU, run the steps as CUDA graph replays on
            that process's GPU (a capture that fails raises `step_loop.GraphCaptureError`; then use `False`) instead
            of the Trainer loop (`step_loop.py`: same optimizer, views and loss; 50 LoRA
            steps of ViT-B in 2.76 s instead of 7.15 s on an H200), also where more GPUs are visible. Under several
            processes or on the CPU the Trainer loop runs.
        graph_warmup_steps (`int`, defaults to 3): how many of the run's first steps run eagerly before the graph is
            captured (real steps, not extra ones; at least 1). Fewer hand over to the faster replays sooner.
        disable_tqdm (`bool`): no progress bar.
    """

    num_steps: int = 50
    batch_size: int = 32
    learning_rate: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    full_finetune: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    mask_ratio: float = 0.75
    augment: bool = True
    min_crop_scale: float = 0.75
    max_rotation_degrees: float = 15.0
    view_supersampling: float = 3.0
    seed: int = 0
    calibration_views_per_shot: int = 4
    calibration_num_masks: int = 32
    calibration_num_std: float = 3.0
    use_cpu: bool = False
    bf16: bool | None = None
    cuda_graph: bool = True
    graph_warmup_steps: int = DEFAULT_WARMUP_STEPS
    disable_tqdm: bool = False
    logging_steps: int = 1

    def __post_init__(self):
        # Defaults that depend on `full_finetune` stay None here and are resolved by the `resolved_*` properties, so
        # `dataclasses.replace(config, full_finetune=...)` gets the other mode's defaults instead of this one's.
        for name in ("num_steps", "batch_size", "calibration_views_per_shot", "calibration_num_masks", "logging_steps",
                     "graph_warmup_steps"):
            validate_positive_int(getattr(self, name), name)
        for name in ("full_finetune", "augment", "use_cpu", "cuda_graph", "disable_tqdm"):
            if not isinstance(getattr(self, name), bool):  # ("False" is truthy: it would train all weights)
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("min_crop_scale", "max_rotation_degrees", "view_supersampling"):  # (ranges checked below)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}.")
        if self.full_finetune:
            given = [name for name in ("lora_rank", "lora_alpha", "lora_dropout") if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} set together with full_finetune=True, which trains all weights without "
                    f"LoRA: drop {' and '.join(given)} or full_finetune."
                )
        else:
            rank = self.resolved_lora_rank
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"lora_rank must be an integer >= 1, got {rank!r}.")
            alpha = self.resolved_lora_alpha
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
                raise ValueError(f"lora_alpha must be a finite number > 0 (the update is scaled by alpha / rank), got "
                                 f"{alpha!r}.")
            dropout = self.resolved_lora_dropout
            if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
                raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}.")
        for name, value in (("learning_rate", self.resolved_learning_rate), ("momentum", self.momentum),
                            ("weight_decay", self.weight_decay), ("calibration_num_std", self.calibration_num_std)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be < 1 (at 1 or more SGD's velocity never decays), got {self.momentum}.")
        if self.resolved_learning_rate == 0:
            raise ValueError("learning_rate must be > 0 (0 would train nothing).")
        validate_seed(self.seed)
        self.mask_ratio = validate_mask_ratio(self.mask_ratio)
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise TypeError(f"bf16 must be True, False or None (the device decides), got {self.bf16!r}.")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale must be in (0, 1] (share of the image area kept), got {self.min_crop_scale}.")
        if not 0 <= self.max_rotation_degrees <= 180:
            raise ValueError(f"max_rotation_degrees must be in [0, 180], got {self.max_rotation_degrees}.")
        if not 1 <= self.view_supersampling <= MAX_VIEW_SUPERSAMPLING:
            raise ValueError(
                f"view_supersampling must be in [1, {MAX_VIEW_SUPERSAMPLING}] (times the model's input size the views "
                f"are cut at; 1 = at the model's size), got {self.view_supersampling}."
            )

    @property
    def resolved_learning_rate(self) -> float:
        """`learning_rate`, or the recipe's default for the mode (1e-2 with LoRA, 1e-4 with `full_finetune`)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return FULL_FINETUNE_LEARNING_RATE if self.full_finetune else LORA_LEARNING_RATE

    @property
    def resolved_lora_rank(self) -> int | None:
        """`lora_rank`, default 32; None with `full_finetune`."""
        if self.full_finetune:
            return None
        return LORA_RANK if self.lora_rank is None else self.lora_rank

    @property
    def resolved_lora_alpha(self) -> float | None:
        """`lora_alpha`, default the rank (update scale 1); None with `full_finetune`."""
        if self.full_finetune:
            return None
        return float(self.resolved_lora_rank) if self.lora_alpha is None else self.lora_alpha

    @property
    def resolved_lora_dropout(self) -> float | None:
        """`lora_dropout`, default 0; None with `full_finetune`."""
        if self.full_finetune:
            return None
        return 0.0 if self.lora_dropout is None else self.lora_dropout

    def recipe(self) -> dict[str, Any]:
        """The fields that define the run, defaults resolved, for the model card, `training_log.json` and the
        protocol's settings."""
        skip = {"use_cpu", "disable_tqdm", "logging_steps", "cuda_graph", "graph_warmup_steps"}
        recipe = {key: value for key, value in dataclasses.asdict(self).items() if key not in skip}
        recipe.update(
            learning_rate=self.resolved_learning_rate,
            lora_rank=self.resolved_lora_rank,
            lora_alpha=self.resolved_lora_alpha,
            lora_dropout=self.resolved_lora_dropout,
        )
        return recipe


@dataclasses.dataclass
class FinetuneResult:
    """What a run produced (only complete on the main process)."""

    output_dir: Path
    losses: list[tuple[int, float]]
    calibration: Calibration | None
    train_seconds: float


class MaedayTrainer(Trainer):
    """`Trainer` with MAEDAY's all-patch reconstruction loss and the shot views in order (view i is shot i % k).

    Args:
        reconstruction_model (`ViTMAEForPreTraining`): the unwrapped model, for `patchify` and `norm_pix_loss`.
    """

    def __init__(self, *args, reconstruction_model: torch.nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.reconstruction_model = reconstruction_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The batch's views, rendered on its device (accelerate's autocast, if any, wraps the model's forward).
        loss, outputs = views_loss(model, self.reconstruction_model, self.train_dataset, inputs)
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        # Views are already randomised per index; in order, each batch holds every shot 32/k times (up to one).
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return torch.utils.data.SequentialSampler(dataset)


def _training_arguments(
    config: FinetuneConfig, output_dir: str | os.PathLike, bf16: bool, use_cpu: bool
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=os.fspath(output_dir),
        max_steps=config.num_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.resolved_learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # a diverged step is logged as NaN, not hidden in a window mean (see finetune)
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        use_cpu=use_cpu,
        bf16=bf16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=config.disable_tqdm,
        ddp_find_unused_parameters=False,
        max_grad_norm=0.0,  # the paper's plain SGD: no gradient clipping
    )


_TRAINING_ARGUMENTS_LOGGER = "transformers.training_args"
_NOT_DISTRIBUTED_WARNING = "torch.distributed process group is initialized, but parallel_mode != "


@contextlib.contextmanager
def _without_warning(logger_name: str, start: str) -> Iterator[None]:
    """Inside, `logger_name` drops records whose message starts with `start`."""

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(start)

    target, drop = logging.getLogger(logger_name), Drop()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def _precision_resolved_arguments(config: FinetuneConfig, output_dir: str | os.PathLike) -> TrainingArguments:
    """The recipe's `TrainingArguments`, with the mixed precision decided in this order: `config.bf16` if given; else
    the launcher's (`accelerate launch --mixed_precision ...` sets ACCELERATE_MIXED_PRECISION, "no" by default);
    else bf16 where the training device multiplies it in hardware."""
    with _without_warning(_TRAINING_ARGUMENTS_LOGGER, _NOT_DISTRIBUTED_WARNING):  # (true of the probe alone)
        probe = _training_arguments(config, output_dir, bf16=False, use_cpu=config.use_cpu)
    # On a CPU the Trainer runs several processes as one distributed run (gloo), and accepts bf16, only with use_cpu,
    # also where there is no GPU to keep away from: without it each process would train alone on the whole batch.
    use_cpu = config.use_cpu or probe.device.type == "cpu"
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if config.bf16 is not None:
        bf16 = config.bf16
        if launcher_precision not in (None, "bf16" if bf16 else "no"):
            # "no" is also what `accelerate launch` sets when nothing was asked: worth a note, not a warning.
            log = logger.info if launcher_precision == "no" else logger.warning
            log("FinetuneConfig.bf16=%s overrides the launcher's mixed_precision=%r.", bf16, launcher_precision)
    elif launcher_precision is not None:
        bf16 = launcher_precision == "bf16"
    else:
        bf16 = runs_bfloat16_natively(probe.device)
    arguments = _training_arguments(config, output_dir, bf16=bf16, use_cpu=use_cpu) if bf16 or use_cpu else probe
    if not bf16:
        launcher_fp16 = launcher_precision == "fp16" and config.bf16 is None
        if launcher_fp16 and use_cpu:
            logger.warning("fp16 mixed precision does not run on the CPU (accelerate ignores it); training in float32.")
        # A launcher's fp16 on a GPU stays (the Trainer loop scales its loss); otherwise float32, also over a
        # launcher's bf16/fp16 that FinetuneConfig.bf16=False overrides.
        arguments.mixed_precision = "fp16" if launcher_fp16 and not use_cpu else "no"
    return arguments


def build_trainer(
    trained_model: torch.nn.Module,
    reconstruction_model: torch.nn.Module,
    views: torch.utils.data.Dataset,
    config: FinetuneConfig,
    output_dir: str | os.PathLike,
) -> MaedayTrainer:
    """A `MaedayTrainer` for the recipe: SGD with momentum, constant lr, no checkpoints, per-device batch
    `batch_size / num_devices`, so each step holds `batch_size` views however many devices share it.

    Args:
        trained_model: the `PeftModel` (LoRA) or the `ViTMAEForPreTraining` itself (full fine-tune).
        reconstruction_model (`ViTMAEForPreTraining`): the unwrapped model (for `patchify`, `norm_pix_loss`).
        views (`ShotViews`): `num_steps * batch_size` views.
        output_dir: the Trainer's working folder (nothing is saved there during training).

    Raises:
        ValueError: `batch_size` does not split over the devices (processes, or a process's GPUs in the Trainer
            loop).
    """
    args = _precision_resolved_arguments(config, output_dir)
    # One process per device under `accelerate launch`; one process driving several GPUs (plain `python` on a
    # multi-GPU machine) makes the Trainer loop's DataParallel multiply the per-device batch by n_gpu. (The graph
    # replays take the whole batch on one GPU.)
    replicas = args.world_size * (1 if _runs_as_graph_replays(args, config) else max(1, args.n_gpu))
    if config.batch_size % replicas:
        raise ValueError(
            f"batch_size={config.batch_size} does not split evenly over {replicas} devices; pick a batch size "
            f"(--batch-size) divisible by the number of processes (and GPUs per process) so the effective batch "
            f"stays {config.batch_size}."
        )
    args.per_device_train_batch_size = config.batch_size // replicas
    trainer = MaedayTrainer(
        model=trained_model,
        args=args,
        train_dataset=views,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": config.resolved_learning_rate, "momentum": config.momentum}),
        reconstruction_model=reconstruction_model,
    )
    if config.disable_tqdm:
        # Without a bar the Trainer prints every log dict; quiet means quiet (losses stay in `state.log_history`).
        trainer.remove_callback(PrinterCallback)
    return trainer


def trains_in_bf16(trainer: Trainer) -> bool:
    """Whether the trainer's steps run under bf16 autocast (`FinetuneConfig.bf16`, or accelerate's setting)."""
    return trainer.args.mixed_precision == "bf16"


def _runs_as_graph_replays(args: TrainingArguments, config: FinetuneConfig) -> bool:
    """Whether the steps run as CUDA graph replays (`step_loop`) on the process's one training GPU, not the Trainer
    loop. (fp16 mixed precision, which needs a loss scaler, stays with the Trainer loop.)"""
    return (
        config.cuda_graph
        and args.world_size == 1
        and args.device.type == "cuda"
        and args.mixed_precision in ("no", "bf16")
    )


def logged_losses(step_losses: list[float], logging_steps: int) -> list[tuple[int, float]]:
    """`(step, mean loss since the previous entry)` every `logging_steps` steps, as the Trainer logs them (it logs no
    final partial window either)."""
    return [
        (step, sum(step_losses[step - logging_steps : step]) / logging_steps)
        for step in range(logging_steps, len(step_losses) + 1, logging_steps)
    ]


def _validate_output(output_dir: Path, overwrite: bool, base_model: str, shots: Any = None) -> None:
    """Refuse an `output_dir` that exists (without `overwrite`), is a file, or would take a local input with it: the
    base folder, or a shot image or folder."""
    inputs = [("the base model folder", base_model)] if os.path.isdir(base_model) else []
    for shot in shots if isinstance(shots, (list, tuple)) else [shots]:
        if isinstance(shot, (str, os.PathLike)) and os.path.exists(shot):
            inputs.append(("the shot", os.fspath(shot)))
    target = Path(os.path.realpath(output_dir))
    for name, path in inputs:
        kept = Path(os.path.realpath(path))
        if target == kept or target in kept.parents:
            # Writing the run replaces output_dir, and what is in it: the base (an adapter then has no base to load)
            # or the user's shots.
            what = "is" if target == kept else "contains"
            raise ValueError(
                f"Output folder {os.fspath(output_dir)!r} {what} {name} {os.fspath(path)!r}, which writing the run "
                f"would delete; choose an output folder outside it."
            )
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"Output path {os.fspath(output_dir)!r} is a file, not a folder; choose a folder path.")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"Output folder {os.fspath(output_dir)!r} already exists; pass overwrite=True "
                              f"(--overwrite) or choose another folder.")
    foreign = _foreign_entry(output_dir)
    if foreign is not None:
        # `overwrite` replaces the folder whole: only one an earlier run wrote (or an empty one), never, say, the
        # working directory with someone's work in it.
        raise FileExistsError(
            f"Output folder {os.fspath(output_dir)!r} holds files that no fine-tune wrote ({foreign}); overwrite "
            f"replaces only an earlier run's folder as it wrote it. Choose another folder."
        )


def _push_failed(output_dir: Path, hub_model_id: str, error: BaseException) -> OSError:
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    return OSError(
        f"The fine-tune is written to {os.fspath(output_dir)!r}, but pushing it to {hub_model_id!r} failed ({cause}); "
        f"push the folder later with `python -c \"from maeday_hf.finetune import push_folder_to_hub; "
        f"push_folder_to_hub({os.fspath(output_dir)!r}, {hub_model_id!r})\"` (which names the shots as the card does)."
    )


_RUN_FILES = frozenset({
    "config.json", "preprocessor_config.json", CALIBRATION_FILE, TRAINING_LOG_FILE, "README.md", "model.safetensors",
    "model.safetensors.index.json",
})
"""What a run writes at the top of its folder, besides the shipped modules and sharded full weights."""
_ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md"})
_WEIGHT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@functools.cache
def _shipped_modules() -> frozenset[str]:
    """The `.py` files a run writes: the pipeline's and the adapter loader's modules, and what they import
    (as `custom_object_save` copies them)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from . import adapter_model, pipeline

    files = [module.__file__ for module in (pipeline, adapter_model)]
    return frozenset(os.path.basename(path) for file in files for path in [file, *get_relative_import_files(file)])


def _foreign_entry(folder: Path) -> str | None:
    """What in `folder` a fine-tune did not write, named (None if nothing: it is missing, empty, or an earlier run's
    folder as it wrote it). A run's folder has a training log of this package (its `recipe` and `losses`), the files
    `_write_folder` writes (of `.py` files, only the modules a run ships), and `adapter/` with PEFT's files; hidden
    entries (`.DS_Store`, a Hub snapshot's `.gitattributes`, `hf download`'s `.cache/`) do not count."""
    if os.path.lexists(folder) and not folder.is_dir():
        return "it is a file"  # (or a dangling link): nobody's run folder
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    try:
        log = json.loads((folder / TRAINING_LOG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log = None
    if not (isinstance(log, dict) and {"recipe", "losses"} <= set(log)):
        return f"no {TRAINING_LOG_FILE} of a fine-tune"
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name == ADAPTER_SUBFOLDER and entry.is_dir():
            inner = next((f for f in sorted(entry.iterdir())
                          if not f.name.startswith(".") and (f.name not in _ADAPTER_FILES or not f.is_file())), None)
            if inner is not None:
                return f"{ADAPTER_SUBFOLDER}/{inner.name}"
            continue
        ours = entry.is_file() and (
            entry.name in _RUN_FILES or _WEIGHT_SHARD.fullmatch(entry.name) or entry.name in _shipped_modules()
        )
        if not ours:
            return entry.name
    return None


def _move_into_place(partial: Path, output_dir: Path) -> None:
    """Rename the finished `partial` to `output_dir`, which must not have appeared meanwhile (without `overwrite`,
    what someone put there during training is theirs): then the run is kept next to it, under a new name."""
    try:
        os.rename(partial, output_dir)  # replaces nothing but an empty folder
    except OSError:
        if not output_dir.exists():
            raise
        kept = make_partial_dir(output_dir.parent, f"{output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-")
        os.rename(partial, kept)  # (onto the fresh, empty folder: a name nobody else has)
        raise FileExistsError(
            f"Output folder {os.fspath(output_dir)!r} appeared while training (left as it is); the run was written "
            f"to {os.fspath(kept)!r} instead."
        ) from None


class TrainingDivergedError(ValueError):
    """The training loss or the calibrated threshold is not finite (a ValueError: the learning rate is too high for
    these shots). Raised before anything is written to the output folder."""


def _check_finite_losses(losses: list[tuple[int, float]], config: FinetuneConfig) -> None:
    """Raise `TrainingDivergedError` naming the first `(step, loss)` that is NaN or infinite."""
    for step, loss in losses:
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"Training diverged: the loss logged at step {step} of {config.num_steps} is {loss}. Try a lower "
                f"learning_rate (--learning-rate) than {config.resolved_learning_rate:g}; nothing was written."
            )


def _validate_hub_flags(push_to_hub: bool, hub_model_id: str | None, hub_private: bool = False) -> None:
    if hub_private and not push_to_hub:
        raise ValueError("hub_private given without push_to_hub: add --push-to-hub or drop --hub-private.")
    if push_to_hub and not hub_model_id:
        raise ValueError("push_to_hub needs hub_model_id (e.g. --hub-model-id my-org/bottle-1shot).")
    if hub_model_id and not push_to_hub:
        raise ValueError(f"hub_model_id={hub_model_id!r} given without push_to_hub: add --push-to-hub or drop it.")
    if hub_model_id is not None and hub_model_id.count("/") != 1:
        raise ValueError(f"hub_model_id must look like 'org/name', got {hub_model_id!r}.")
    if hub_model_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(hub_model_id)  # now, not when the push fails after training
        except HFValidationError as error:
            raise ValueError(f"hub_model_id={hub_model_id!r} is not a valid Hub repo id: {error}") from None


def _check_hub_login(hub_model_id: str) -> None:
    """Fail before training, not after it, where the push could not happen (offline, or not logged in)."""
    from huggingface_hub import HfApi

    try:
        HfApi().whoami()
    except Exception as error:  # noqa: BLE001 - offline mode, no token, a bad token, no network: all mean "cannot"
        reason = (str(error).splitlines()[0] if str(error) else type(error).__name__).rstrip(".")
        raise ValueError(
            f"Cannot push to {hub_model_id!r}: {reason}. Log in (`hf auth login`) on a connected machine, or drop "
            f"--push-to-hub; nothing was trained."
        ) from error


def _warn_if_cached_id_holds_other_weights(base_model_id: str, base_fingerprint: str, base_folder: str) -> None:
    """Where `base_model_id` is in the local Hugging Face cache, compare its weights with the folder's now: an adapter
    named after another checkpoint than the one it was trained on fails only when it is loaded (nothing is
    downloaded here; without a cached copy there is nothing to compare)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # (a cached copy that does not load is no concern of this run)
    try:
        cached = ViTMAEForPreTraining.from_pretrained(base_model_id, dtype=torch.float32, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or not loadable here: nothing to compare with
        return
    finally:
        transformers_logging.set_verbosity(verbosity)
    found = base_weights_fingerprint(cached)
    if found != base_fingerprint:
        logger.warning(
            "base_model_id=%r names the checkpoint the adapter will load on, but its copy in the local Hugging Face "
            "cache holds other weights than %s (weights fingerprint %s there, %s here): the adapter will load only "
            "where that id resolves to the weights it is trained on now, else with base_model= (maeday detect "
            "--base-model). Check the id (ignore this if the cached copy is an older revision).",
            base_model_id, base_folder, found, base_fingerprint,
        )


def _recorded_base_name(base_model: str, base_model_id: str | None = None) -> str:
    """What adapter_config.json records as the base: `base_model_id` if given (`base_model` is a local copy of it),
    an absolute path for local folders, else the Hub id."""
    if base_model_id is None:
        return os.path.abspath(base_model) if os.path.isdir(base_model) else base_model
    if not isinstance(base_model_id, str) or not is_hub_id(base_model_id):
        raise ValueError(f"base_model_id must be a Hub model id such as 'facebook/vit-mae-base', got {base_model_id!r}.")
    if not os.path.isdir(base_model) and not looks_like_local_path(base_model) and base_model != base_model_id:
        raise ValueError(
            f"base_model_id={base_model_id!r} names the Hub checkpoint a local base folder is a copy of, but the base "
            f"{base_model!r} is a Hub id itself: drop base_model_id, or pass the folder."
        )
    return base_model_id


def load_base_config(base_model: str) -> Any:
    """The base's config, checked to be a plain ViTMAE (not another model, not an adapter folder)."""
    if looks_like_local_path(base_model) and not os.path.isdir(os.path.expanduser(base_model)):
        raise FileNotFoundError(
            f"Base model folder not found: {base_model!r} (expected a folder with config.json, or a Hub id)."
        )
    try:
        config = AutoConfig.from_pretrained(base_model)
    except OSError as error:
        if os.path.isdir(os.path.expanduser(base_model)):
            raise
        raise OSError(
            f"Cannot load the base model {base_model!r}: it is not a local folder and not in the Hugging Face cache, "
            f"and the Hub did not provide it ({str(error).splitlines()[0] if str(error) else type(error).__name__}). "
            f"Download it on a connected machine (`hf download {base_model}`) or pass a local ViTMAE checkpoint folder."
        ) from error
    require_vit_mae_config(config, base_model)
    if getattr(config, ADAPTER_CONFIG_KEY, None) is not None:
        raise ValueError(
            f"{base_model!r} is already a MAEDAY adapter; fine-tune its base checkpoint (named in "
            f"{ADAPTER_SUBFOLDER}/adapter_config.json) instead."
        )
    return config


def _is_datasets_split(shots: Any) -> bool:
    try:
        import datasets
    except ImportError:  # `datasets` is only needed for splits
        return False
    return isinstance(shots, datasets.Dataset)


def _refuse_split_collections(shots: Any) -> None:
    """A whole `DatasetDict` (or a streamed dataset) is not a split of shots: iterated, it would give its split names
    as file names."""
    try:
        import datasets
    except ImportError:
        return
    if isinstance(shots, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(
            f"shots is a {type(shots).__name__} (splits {list(shots)}); pass its split of normal images, e.g. "
            f"shots=dataset[{'train'!r}]."
        )
    if isinstance(shots, datasets.IterableDataset):
        raise TypeError(
            "shots is an IterableDataset (a streamed dataset), which select_shots cannot index; load the split without "
            "streaming=True, or take its first images into a list."
        )


def _view_sources(image_processor, images: list, pixel_values: torch.Tensor, config: FinetuneConfig):
    """The shots processed at `view_source_scale` times the model's input size, to cut the augmented views from; None
    where that is the model's own size (or the views are not augmented, or the processor does not resize)."""
    if not config.augment or not getattr(image_processor, "do_resize", True):
        return None
    height, width = pixel_values.shape[-2:]
    scale = view_source_scale(
        [(image.height, image.width) for image in images], (height, width), config.view_supersampling
    )
    source_height, source_width = round(scale * height), round(scale * width)
    if (source_height, source_width) == (height, width):
        return None
    logger.info("Cutting the views from the shots at %d x %d (the model's input: %d x %d)", source_width,
                source_height, width, height)
    size = {"height": source_height, "width": source_width}
    return image_processor(images=images, size=size, return_tensors="pt")["pixel_values"]


def _load_shots(shots: Any, num_shots: int | None, shot_seed: int):
    _refuse_split_collections(shots)
    if _is_datasets_split(shots):
        if num_shots is None:  # (e.g. what `select_shots` returned): every row is a shot
            return shots_from_rows(shots)
        return shots_from_split(shots, num_shots, shot_seed)
    if num_shots is not None:
        raise ValueError(
            f"num_shots={num_shots} only applies to a datasets split; with image files every given shot is used."
        )
    if shots is None:
        raise ValueError("No shots given: few-shot fine-tuning needs at least one normal image (k >= 1).")
    return load_shot_images(shots)


def _custom_pipelines_entry() -> dict[str, Any]:
    """`config.custom_pipelines` as `Pipeline.save_pretrained` writes it, pointing at the shipped `pipeline.py`."""
    return {
        TASK: {
            "impl": f"{AnomalyDetectionPipeline.__module__.split('.')[-1]}.{AnomalyDetectionPipeline.__name__}",
            "pt": ["AutoModelForPreTraining"],
            "type": "image",
        }
    }


def _write_folder(
    folder: Path,
    model: torch.nn.Module,
    image_processor,
    recorded_base: str,
    config: FinetuneConfig,
    calibration: Calibration,
    shot_names: list[str],
    losses: list[tuple[int, float]],
    train_seconds: float,
    name: str,
    mixed_precision: str,
    num_processes: int = 1,
    base_fingerprint: str | None = None,
    step_loop: str = "trainer",
    base_folder: str | None = None,
    view_source_size: tuple[int, int] | None = None,
) -> None:
    """Everything but the weights/adapter (written before merging): config, processor, remote code, card, logs.
    `recorded_base`: the base the folder names (a Hub id, or a folder's absolute path); `base_folder`: the local
    folder trained from, where that is not `recorded_base` (the copy of a Hub checkpoint named by `base_model_id`).
    `base_fingerprint`: `base_weights_fingerprint` of the base, recorded for an adapter (checked when it is loaded).
    `step_loop`: what ran the steps, "cuda_graph" (`step_loop` replays) or "trainer" (recorded in the log).
    `view_source_size`: `(height, width)` the augmented views were cut at, where not the model's input."""
    if config.full_finetune:
        folder_config = model.config
    else:
        folder_config = AutoConfig.from_pretrained(base_folder or recorded_base)
        # The dtype the adapter was trained and calibrated with (a base saved in fp16 is still merged in float32).
        folder_config.dtype = model.dtype
        setattr(folder_config, ADAPTER_CONFIG_KEY, {
            "subfolder": ADAPTER_SUBFOLDER, "base_fingerprint": base_fingerprint,
        })
        folder_config.auto_map = {
            "AutoModelForPreTraining": f"{MaedayAdapterForPreTraining.__module__.split('.')[-1]}."
            f"{MaedayAdapterForPreTraining.__name__}"
        }
    folder_config.custom_pipelines = _custom_pipelines_entry()
    setattr(folder_config, THRESHOLD_CONFIG_KEY, calibration.threshold)
    setattr(folder_config, THRESHOLD_SETTINGS_CONFIG_KEY, {"num_masks": calibration.num_masks,
                                                           "mask_ratio": calibration.mask_ratio,
                                                           "mask_schedule": "random"})
    if config.full_finetune:
        model.save_pretrained(folder)
    else:
        folder_config.save_pretrained(folder)
        custom_object_save(MaedayAdapterForPreTraining, folder)
    custom_object_save(AnomalyDetectionPipeline, folder)
    image_processor.save_pretrained(folder)
    (folder / CALIBRATION_FILE).write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
    log = {
        "base_model": recorded_base,
        **({"base_model_folder": os.path.abspath(base_folder)} if base_folder else {}),
        "shots": shot_names,
        "recipe": config.recipe(),
        "mixed_precision": mixed_precision,
        "num_processes": num_processes,
        "step_loop": step_loop,
        "view_source_size": None if view_source_size is None else list(view_source_size),
        "losses": [{"step": step, "loss": loss} for step, loss in losses],
        "train_seconds": train_seconds,
    }
    (folder / TRAINING_LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")
    card = render_model_card(
        name=name,
        base_model=recorded_base,
        shot_names=shot_names,
        recipe=config.recipe(),
        losses=losses,
        calibration=calibration.to_dict(),
        full_finetune=config.full_finetune,
    )
    (folder / "README.md").write_text(card)
    # (the run's own folder, all of it written here: not owner-only, as safetensors writes them)
    give_weights_the_permissions_of(folder.rglob("*.safetensors"), folder / TRAINING_LOG_FILE)


def push_folder_to_hub(
    folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None
) -> str:
    """Create `repo_id` (if needed) and make it hold `folder`'s run, in one commit; returns the commit URL.

    Files a run writes that `folder` lacks (say `model.safetensors` of an earlier full fine-tune, under a LoRA adapter
    now) are deleted in the same commit: left there, they would be loaded instead of, or next to, the new run. Other
    files of the repo stay, and so does its README.md where it is not a card maeday_hf wrote (or was edited since).

    Args:
        private (`bool`, *optional*): visibility of a repo created now; None leaves it to the owner's default (an
            organisation's repos may be private by default).

    Raises:
        ValueError: `private`, but `repo_id` already exists as a public repository (`create_repo` leaves an existing
            repository's visibility as it is, so the upload would be public); nothing is uploaded.
    """
    from huggingface_hub import HfApi

    from .detector_card import is_generated_finetune_card, read_remote_card

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if private and not api.repo_info(repo_id).private:
        raise ValueError(
            f"{repo_id!r} already exists as a public repository, and a private push was asked for; nothing was "
            f"uploaded. Make it private on the Hub (or push without --hub-private); the run is in {os.fspath(folder)!r}."
        )
    remote_card = read_remote_card(api, repo_id)
    keep_card = remote_card is not None and not is_generated_finetune_card(remote_card)
    if keep_card:
        logger.info("The README.md of %s is kept: it is not a card maeday_hf wrote, or it was edited.", repo_id)
    run_files = [*sorted(_RUN_FILES - ({"README.md"} if keep_card else set())), "model-*-of-*.safetensors",
                 *(f"{ADAPTER_SUBFOLDER}/{name}" for name in sorted(_ADAPTER_FILES - {"README.md"})),
                 *sorted(_shipped_modules())]
    with _shareable_copy(Path(folder)) as shared:
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=os.fspath(shared),
            ignore_patterns=["README.md"] if keep_card else None,
            delete_patterns=run_files,  # what a run writes, where `folder` lacks it
            commit_message="MAEDAY few-shot fine-tune (maeday_hf)",
        )
    return str(getattr(commit, "commit_url", commit))


@contextlib.contextmanager
def _shareable_copy(folder: Path) -> Iterator[Path]:
    """`folder` as it is pushed: its `training_log.json` names the shots as the card does (`shareable_shot_name`: a
    file's name for a path that leads out of its folder), and a `base_model_folder` (the local copy of the Hub base
    it names) by the folder's name, so a push does not publish where the images and the base lie here.

    Yields `folder` itself if there is nothing to change; else a copy beside it (the files hard-linked where the
    file system allows, so no weights are copied), removed afterwards.
    """
    log_path = folder / TRAINING_LOG_FILE
    try:
        log = json.loads(log_path.read_text(encoding="utf-8"))
        shots = list(log["shots"])
    except (OSError, ValueError, KeyError, TypeError):  # (no log, or not this package's: pushed as it is)
        yield folder
        return
    shared = {"shots": [shareable_shot_name(shot) if isinstance(shot, str) else shot for shot in shots]}
    if isinstance(log.get("base_model_folder"), str):
        shared["base_model_folder"] = os.path.basename(os.path.normpath(log["base_model_folder"]))
    if all(log.get(key) == value for key, value in shared.items()):
        yield folder
        return
    # Held while it lives, under a name a later push removes if this process is killed (`remove_abandoned`).
    prefix = f".{folder.name}.push-"
    remove_abandoned(folder.parent, prefix)
    try:
        staging, held = make_held_partial_dir(folder.parent, prefix)
    except OSError:  # (a folder one may not write beside: a copy in the temporary folder, the weights copied)
        staging, held = Path(tempfile.mkdtemp(prefix=prefix)), None
    try:
        copy = staging / folder.name

        def link_or_copy(source, destination):
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)

        shutil.copytree(folder, copy, copy_function=link_or_copy)
        (copy / TRAINING_LOG_FILE).unlink()  # (a link to the local log: written anew, not through it)
        (copy / TRAINING_LOG_FILE).write_text(json.dumps({**log, **shared}, indent=2) + "\n")
        yield copy
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        let_go(held)


def finetune(
    base_model: str | os.PathLike,
    shots: Any,
    output_dir: str | os.PathLike,
    config: FinetuneConfig | None = None,
    num_shots: int | None = None,
    shot_seed: int = 0,
    overwrite: bool = False,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_private: bool = False,
    base_model_id: str | None = None,
) -> FinetuneResult:
    """Fine-tune `base_model` on normal shots and write an adapter folder (or full checkpoint) to `output_dir`.

    Args:
        base_model (`str`): Hub id or folder of a `ViTMAEForPreTraining` checkpoint with its image processor.
        shots: image paths, folders of images, PIL images / arrays, or a `datasets.Dataset` split: with
            `num_shots`, the shots are `maeday_hf.data.select_shots(split, num_shots, shot_seed)`; without, every row
            (say a split `select_shots` returned). At most `num_steps * batch_size` of them: every shot is trained on.
        output_dir (`str`): the folder to write; it appears only when the run has finished. Never the base model's
            folder or one that contains it (writing the run replaces `output_dir`).
        config (`FinetuneConfig`, *optional*): the recipe (defaults: the paper's).
        overwrite (`bool`): replace an existing `output_dir` (at the end of the run) that an earlier run wrote (it
            has a `training_log.json`) or that is empty; a folder holding other files is refused, at the start and
            again at the end.
        push_to_hub, hub_model_id, hub_private: upload the finished folder to `hub_model_id`.
        base_model_id (`str`, *optional*): where `base_model` is a local copy of a Hub checkpoint, its Hub id
            (`"facebook/vit-mae-base"`): the adapter names it as its base instead of the folder's path, so that it
            loads wherever that id can be had (a pushed adapter too). The adapter also records the base's weights
            fingerprint, so a base that holds other weights than the copy trained on is refused when it loads.

    Returns:
        `FinetuneResult`.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: bad input, before any training.
        TrainingDivergedError (a `ValueError`): a loss or the threshold is not finite; nothing is written.
    """
    config = config if config is not None else FinetuneConfig()
    base_model = os.fspath(base_model)
    if base_model.startswith("~"):  # a Hub id never starts with "~"; from_pretrained does not expand it
        base_model = os.path.expanduser(base_model)
    output_dir = Path(output_dir).expanduser().absolute()
    if isinstance(shots, (set, frozenset, collections.abc.Iterator)):
        shots = list(shots)  # read once, and seen by the output check below
    _validate_output(output_dir, overwrite, base_model, shots)
    _validate_hub_flags(push_to_hub, hub_model_id, hub_private)
    recorded_base = _recorded_base_name(base_model, base_model_id)
    if push_to_hub and os.path.isabs(recorded_base):
        logger.warning("The base %s is a local folder: the pushed adapter loads only where that path exists (if it "
                       "is a copy of a Hub checkpoint, name it with --base-model-id).", recorded_base)
    if push_to_hub:
        _check_hub_login(hub_model_id)
    base_config = load_base_config(base_model)
    images, shot_names = _load_shots(shots, num_shots, shot_seed)
    num_views = config.num_steps * config.batch_size
    if len(images) > num_views:
        raise ValueError(
            f"{len(images)} shots but only num_steps * batch_size = {config.num_steps} * {config.batch_size} = "
            f"{num_views} training views (view i shows shot i % k): {len(images) - num_views} shot(s) would never be "
            f"trained on. Raise num_steps or batch_size (--steps, --batch-size) to at least {len(images)} views, or "
            f"pass fewer shots."
        )

    image_processor = AutoImageProcessor.from_pretrained(base_model)
    require_whole_image_processor(image_processor)  # before training, not when the result fails to load
    # float32 whatever dtype the base was saved in: the optimizer, the rendered views and the calibration are float32.
    try:
        # Checked before loading too: transformers reports a missing decoder in ~30 lines before the one-line error.
        require_decoder_in_checkpoint(checkpoint_weight_names(base_model), base_model)
        model, loading_info = ViTMAEForPreTraining.from_pretrained(
            base_model, config=base_config, dtype=torch.float32, output_loading_info=True
        )
    except SafetensorError as error:
        raise OSError(
            f"Cannot load the base {base_model!r}: a weights file in it is damaged or incomplete ({error})."
        ) from error
    require_loaded_weights(model, loading_info, base_model)  # (a random decoder would train, and never load back)
    if not is_vit_mae_for_pretraining(model):
        raise ValueError(f"{base_model!r} did not load as a ViTMAEForPreTraining with its decoder.")
    base_fingerprint = base_weights_fingerprint(model)  # (before LoRA wraps its layers)
    if base_model_id is not None and os.path.isdir(base_model):
        _warn_if_cached_id_holds_other_weights(base_model_id, base_fingerprint, base_model)
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    source_pixel_values = _view_sources(image_processor, images, pixel_values, config)
    num_patches = count_patches(model, pixel_values)
    require_visible_patches(num_patches, config.mask_ratio)

    if config.full_finetune:
        # Every weight MAE trains is trained; its fixed sin-cos position embeddings stay frozen, as in MAE (loading
        # a checkpoint can hand them back as trainable parameters, so freeze them explicitly).
        trained = model
        trained.requires_grad_(True)
        for fixed in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
            fixed.requires_grad_(False)
    else:
        lora_config = make_lora_config(
            model, config.resolved_lora_rank, config.resolved_lora_alpha, config.resolved_lora_dropout
        )
        # PEFT draws lora_A from the global RNG: seed it inside a fork, so the init is the run seed's on every process
        # and the caller's RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            trained = add_lora(model, lora_config)
        trained.peft_config["default"].base_model_name_or_path = recorded_base
    views = ShotViews(
        pixel_values,
        num_views=num_views,
        num_patches=num_patches,
        seed=config.seed,
        augment=config.augment,
        min_crop_scale=config.min_crop_scale,
        max_rotation_degrees=config.max_rotation_degrees,
        source_pixel_values=source_pixel_values,
    )
    # The Trainer saves nothing during training, but creates its output_dir: each process gets a throwaway one.
    trainer_dir = tempfile.TemporaryDirectory(prefix="maeday-trainer-")
    trainer = build_trainer(trained, model, views, config, trainer_dir.name)
    is_main = trainer.is_world_process_zero()
    # The run is written into a hidden folder of its own beside the output (a concurrent run into the same output,
    # or a killed one's leftovers, cannot meet it) and renamed into place when complete.
    partial, held = None, None
    try:
        if is_main:
            for abandoned in remove_abandoned(output_dir.parent, f".{output_dir.name}.partial-"):
                logger.info("Removed %s, left by a run that was killed", abandoned)
            # (held while this run writes it: no later run takes it for abandoned)
            partial, held = make_held_partial_dir(output_dir.parent, f".{output_dir.name}.partial-")
        start = time.perf_counter()
        with mask_ratio_set_to(model, config.mask_ratio):
            if _runs_as_graph_replays(trainer.args, config):
                step_losses = run_steps(
                    trainer.model, model, views, trainer.create_optimizer(), config.num_steps, config.batch_size,
                    bf16=trains_in_bf16(trainer), warmup_steps=config.graph_warmup_steps,
                )
                _check_finite_losses(list(enumerate(step_losses, start=1)), config)
                losses = logged_losses(step_losses, config.logging_steps)
            else:
                trainer.train()
                losses = [
                    (int(entry["step"]), float(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry
                ]
                # (Steps after the last logged window are not logged; if one diverged, the threshold check below sees
                # the NaN weights.)
                _check_finite_losses(losses, config)
        train_seconds = time.perf_counter() - start
        calibration = None
        if is_main:
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            if config.full_finetune:
                merged = unwrapped
            else:
                # (no token embeddings here: PEFT's "auto" would look the base's config up, and warn where it is
                # a Hub id and the Hub cannot be reached)
                unwrapped.save_pretrained(partial / ADAPTER_SUBFOLDER, save_embedding_layers=False)
                # PEFT's generic card; the folder's README.md describes the run.
                (partial / ADAPTER_SUBFOLDER / "README.md").unlink(missing_ok=True)
                merged = unwrapped.merge_and_unload()
            merged.eval()
            calibration = calibrate_threshold(
                merged,
                pixel_values,
                num_views_per_shot=config.calibration_views_per_shot,
                num_masks=config.calibration_num_masks,
                mask_ratio=config.mask_ratio,
                num_std=config.calibration_num_std,
                seed=config.seed,
                min_crop_scale=config.min_crop_scale,
                max_rotation_degrees=config.max_rotation_degrees,
                augment=config.augment,
                source_pixel_values=source_pixel_values,
            )
            if not math.isfinite(calibration.threshold):
                raise TrainingDivergedError(
                    f"Training diverged: the calibrated threshold is {calibration.threshold} (the fine-tuned model's "
                    f"scores of the normal shots are not finite). Try a lower learning_rate (--learning-rate) "
                    f"than {config.resolved_learning_rate:g}; nothing was written."
                )
            recorded_config = dataclasses.replace(config, bf16=trains_in_bf16(trainer))  # what actually ran
            _write_folder(
                partial, merged, image_processor, recorded_base, recorded_config, calibration, shot_names, losses,
                train_seconds, name=hub_model_id or output_dir.name, mixed_precision=trainer.args.mixed_precision,
                num_processes=trainer.args.world_size, base_fingerprint=base_fingerprint,
                step_loop="cuda_graph" if _runs_as_graph_replays(trainer.args, config) else "trainer",
                base_folder=base_model if base_model_id is not None and os.path.isdir(base_model) else None,
                view_source_size=None if source_pixel_values is None else tuple(source_pixel_values.shape[-2:]),
            )
            if overwrite and _foreign_entry(output_dir) is None:  # (checked again: it may be new since the start)
                replace_folder(partial, output_dir)
            else:
                _move_into_place(partial, output_dir)
            logger.info("Wrote %s", output_dir)
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        let_go(held)
        trainer_dir.cleanup()
    trainer.accelerator.wait_for_everyone()
    if is_main and push_to_hub:
        try:
            url = push_folder_to_hub(output_dir, hub_model_id, private=hub_private or None)
        except HfHubHTTPError as error:  # (some of them are ValueErrors too)
            raise _push_failed(output_dir, hub_model_id, error) from error
        except ValueError:
            raise  # this package's own checks of the repo (e.g. a private push into a public repo): already precise
        except Exception as error:  # noqa: BLE001 - whatever the Hub raised, the run itself is safe on disk
            raise _push_failed(output_dir, hub_model_id, error) from error
        logger.info("Pushed %s to %s", output_dir, url)
    return FinetuneResult(output_dir=output_dir, losses=losses, calibration=calibration, train_seconds=train_seconds)
