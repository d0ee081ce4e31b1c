"""The paper's evaluation protocol (Sec. 4) as resumable, distributable units: Tables 1/2/3 and Figs. 2/3 in one run.

The work, in the order it runs:

1. [`prepare_protocol`] validates everything before any work: the dataset (see [`resolve_dataset`]), every requested
   category (unknown names are listed with the valid ones), masks when pixel metrics are asked, enough training images
   for the largest k, the model, matplotlib when figures are asked, and that `RESULTS` was not written with other
   settings. It plans the *units*: one `(category, shots, shot seed, method)` result each (plus, for Fig. 3, one
   zero-shot MAEDAY unit per repetition count N and mask schedule).
2. [`execute_protocol`] skips every unit whose file exists, fine-tunes the missing adapters (all processes together:
   `finetune` is data-parallel under `accelerate launch`), scores the remaining *tasks* (units that share shots,
   e.g. MAEDAY, PatchCore and their ensemble for one seed) split round-robin across processes, writes each finished
   unit atomically, waits for every process, and the main process gathers the units into `results.json`,
   `tables.md` and the PNG figures.

For k > 0, the shots are `maeday_hf.data.select_shots(train, k, seed)` for seeds `0 .. num_shot_seeds - 1`, the same for
every method. The fine-tuned adapter of `(category, k, seed)` is kept in `RESULTS/adapters/<category>/k<k>-seed<seed>/`
(loadable with `maeday_hf.modeling.load_detector`), so a resumed run never fine-tunes twice. Zero-shot uses no shots and
has a single "seed". PatchCore, its 2×PatchCore ensemble (coreset seeds 0 and 1) and the MAEDAY+PatchCore ensemble
(label-free normalisation over the category's test images, `maeday_hf.ensemble`, or the paper's plain sum with
`ensemble_normalization="none"`) run only for k > 0.

Layout of `RESULTS`:

```
settings.json                         what the unit values depend on, the model's weights digest and each
                                      category's data digest included (a rerun with other settings, after the
                                      model's checkpoint changed, or on a category whose files changed, is refused)
units/<category>/k1-seed0-maeday.json one file per finished unit: metrics (and the pixel metrics' error bounds),
                                      config, timing, shot indices, image scores
adapters/<category>/k1-seed0/         fine-tuned MAEDAY adapters
results.json                          config, versions, every unit, per-cell summaries
tables.md                             Tables 1/2 (or 3 for FOD), AUPRO, F1-max
fig2_shots.png, fig3_repetitions.png  Figs. 2 and 3
```
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import datasets
import numpy as np
import yaml
from tqdm.auto import tqdm

from .atomic_io import make_partial_file
from .data import (
    SYNTHETIC_CATEGORIES,
    load_fod_with_references,
    load_mvtec,
    load_synthetic_dataset,
    select_shots,
    shot_indices,
)
from .data.digest import splits_digest
from .data.features import LABEL_NAMES, check_mask, mask_array
from .data.fod import REFERENCE_FRAMES
from .data.publish import available_configs, load_hub_folder, read_card
from .masking import (
    MASK_SCHEDULES,
    validate_mask_ratio,
    validate_mask_schedule,
    validate_positive_int,
    validate_seed,
)
from .metrics import compute_pixel_metrics, image_f1_max, image_roc_auc
from .report import (
    METHODS,
    plot_repetitions,
    plot_shots,
    render_tables,
    require_matplotlib,
    summarize,
    table_columns,
    write_json,
    write_text,
)

if TYPE_CHECKING:
    from .finetune import FinetuneConfig
    from .patchcore import PatchCoreConfig

logger = logging.getLogger(__name__)

PAPER_REPETITIONS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
"""Repetitions N of Fig. 3."""


DatasetKind = Literal["mvtec", "hub", "synthetic", "fod"]
Study = Literal["main", "repetitions"]

SETTINGS_FILE = "settings.json"
DATA_DIGESTS_KEY = "data_digests"
"""Key of `settings.json` holding, per category, the digest of the data its units were computed on."""
UNITS_DIR = "units"
ADAPTERS_DIR = "adapters"


# --------------------------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetSource:
    """Where the categories come from and how to load one (`load(category) -> DatasetDict`)."""

    kind: DatasetKind
    location: str
    categories: tuple[str, ...]
    """Categories (configs) the source offers."""

    def load(self, category: str) -> datasets.DatasetDict:
        if self.kind == "mvtec":
            return load_mvtec(self.location, category)
        if self.kind == "synthetic":
            return load_synthetic_dataset(self.location, category)
        if self.kind == "fod":
            # Reference frames for the k-shot baselines (paper Table 3: 1-shot PatchCore), held out for every run,
            # so that zero-shot and k-shot methods are scored on the same frames whatever --shots a run has.
            return load_fod_with_references(self.location, category)
        if os.path.isdir(self.location):  # (a local repo folder: read from its files, not a cache of its name)
            return load_hub_folder(self.location, category)
        return datasets.load_dataset(self.location, category)


def _is_hub_folder(folder: Path) -> bool:
    """A dataset repo folder (e.g. `write_hub_folder`'s dry run): a README.md whose YAML header lists `configs`."""
    try:
        header, _ = read_card(folder / "README.md")
    except (yaml.YAMLError, ValueError, UnicodeDecodeError):  # some other README: not a dataset card
        return False
    return isinstance(header, dict) and "configs" in header


def resolve_dataset(spec: str | os.PathLike) -> DatasetSource:
    """Turn `--dataset` into a [`DatasetSource`].

    Accepted forms:

    - `synthetic:DIR`: the synthetic set (`maeday_hf.synthetic`) in MVTec layout under DIR; categories missing there
      are written with the defaults (224 px) — write it yourself first for other sizes.
    - `fod:DIR`: the FOD folder layout (`maeday_hf.data.fod`), with `data.fod.REFERENCE_FRAMES` (at most half) of
      each surface's frames without objects held out as the shots of k-shot methods (Table 3's 1-shot PatchCore).
    - a local folder holding a dataset repo (README.md with `configs:`, e.g. `maeday-publish-dataset --dry-run`):
      `datasets.load_dataset(DIR, category)`.
    - any other local folder: the extracted MVTec AD archive (`<root>/<category>/{train,test,ground_truth}`).
    - `ORG/NAME`: a Hub dataset with one config per category, `datasets.load_dataset(ORG/NAME, category)`.

    Raises:
        `FileNotFoundError`: a local path that does not exist or is not a folder.
        `ValueError`: a folder that is neither MVTec-shaped nor a dataset repo.
        `OSError`: a Hub dataset that cannot be reached or read.
    """
    spec = os.fspath(spec)
    prefix, _, rest = spec.partition(":")
    if prefix in ("synthetic", "fod") and rest:
        folder = Path(rest).expanduser()
        if prefix == "synthetic":
            return DatasetSource("synthetic", str(folder), SYNTHETIC_CATEGORIES)
        if not folder.is_dir():
            raise FileNotFoundError(f"FOD folder {rest!r} not found; expected <DIR>/<indoor|outdoor>/normal, ...")
        return DatasetSource("fod", str(folder), available_configs("fod", folder))
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_hub_folder(path):
            return DatasetSource("hub", str(path), tuple(datasets.get_dataset_config_names(str(path))))
        categories = available_configs("mvtec", path)  # (hidden folders, e.g. a killed writer's, are left out)
        if categories:
            return DatasetSource("mvtec", str(path), categories)
        hint = (
            f" It looks like a single category; pass its parent folder {str(path.parent)!r} and "
            f"--categories {path.name}."
            if (path / "train").is_dir() and (path / "test").is_dir()
            else ""
        )
        raise ValueError(
            f"Dataset folder {spec!r} is not MVTec-shaped: expected <root>/<category>/train/good/*.png, "
            f"<root>/<category>/test/<good|defect>/*.png and <root>/<category>/ground_truth/<defect>/*_mask.png "
            f"(or a dataset repo folder with a README.md listing configs).{hint}"
        )
    if spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") != 1:
        raise FileNotFoundError(
            f"Dataset {spec!r} is neither an existing folder nor a Hub dataset id ORG/NAME "
            f"(nor synthetic:DIR / fod:DIR)."
        )
    try:
        return DatasetSource("hub", spec, tuple(datasets.get_dataset_config_names(spec)))
    except Exception as error:  # datasets raises several types for an unreachable or unreadable repo
        raise OSError(f"Cannot read the Hub dataset {spec!r}: {str(error).splitlines()[0] if str(error) else error}"
                      ) from error


# ------------------------------------------------------------------------------------------------------------ config
@dataclass
class ProtocolConfig:
    """One protocol run.

    Args:
        model (`str`): ViTMAE checkpoint (Hub id or folder); the base of every fine-tune.
        dataset (`str`): see [`resolve_dataset`].
        output_dir (`str`): `RESULTS`; reruns into it resume.
        categories (`Sequence[str]`, *optional*): defaults to every category the dataset has.
        shots (`Sequence[int]`): k values; 0 is zero-shot MAEDAY.
        num_shot_seeds (`int`): shot selections per k > 0 (seeds `0 .. n-1`); the paper uses 3.
        num_masks (`int`), mask_ratio (`float`), mask_seed (`int`), mask_schedule (`str`): MAEDAY inference.
        batch_size (`int`): images per MAEDAY forward pass.
        repetitions (`Sequence[int]`): N values of Fig. 3 (zero-shot, both schedules); empty skips Fig. 3.
        ensemble (`"patchcore"`, *optional*): also PatchCore, 2×PatchCore and MAEDAY+PatchCore for k > 0.
        ensemble_normalization (`str`, defaults to `"zscore"`): how the ensembles standardise each method over the
            category's test images before summing (`maeday_hf.ensemble`); `"none"` sums the raw outputs.
        patchcore (`PatchCoreConfig`, *optional*): PatchCore settings (its `seed` is replaced by 0 and 1).
        finetune (`FinetuneConfig`, *optional*): the few-shot recipe; defaults to the paper's.
        pixel_metrics (`bool`): pixel ROC-AUC, pixel F1-max and AUPRO (needs masks).
        plots (`bool`): write the PNG figures (needs matplotlib).
        bf16 (`bool`, *optional*): the model's precision, for scoring and for fine-tuning (unless `finetune.bf16`
            says otherwise); by default bf16 where `device` multiplies it in hardware (`runs_bfloat16_natively`).
            Decided when the config is made and recorded with the settings, so a run resumed on other hardware
            does not mix precisions unnoticed.
        device (`str`): `"auto"` is each process's accelerator (`accelerate.PartialState().device`).
        show_progress (`bool`): tqdm bars.
    """

    model: str
    dataset: str
    output_dir: str
    categories: Sequence[str] | None = None
    shots: Sequence[int] = (0, 1)
    num_shot_seeds: int = 3
    num_masks: int = 32
    mask_ratio: float = 0.75
    mask_seed: int = 0
    mask_schedule: str = "random"
    batch_size: int = 8
    repetitions: Sequence[int] = PAPER_REPETITIONS
    ensemble: Literal["patchcore"] | None = None
    ensemble_normalization: str = "zscore"
    patchcore: PatchCoreConfig | None = None
    finetune: FinetuneConfig | None = None
    pixel_metrics: bool = True
    plots: bool = True
    bf16: bool | None = None
    device: str = "auto"
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.model, self.dataset, self.output_dir = os.fspath(self.model), os.fspath(self.dataset), os.fspath(
            self.output_dir
        )
        self.categories = None if self.categories is None else tuple(dict.fromkeys(self.categories))
        if self.categories is not None and not self.categories:
            raise ValueError("categories is empty; leave it out to evaluate every category of the dataset.")
        self.shots = tuple(sorted(set(self.shots)))
        if not self.shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.shots):
            raise ValueError(f"shots must be integers >= 0 (0 is zero-shot), got {list(self.shots)}.")
        validate_positive_int(self.num_shot_seeds, "num_shot_seeds")
        validate_positive_int(self.num_masks, "num_masks")
        validate_positive_int(self.batch_size, "batch_size")
        self.mask_ratio = validate_mask_ratio(self.mask_ratio)
        validate_seed(self.mask_seed)
        self.mask_schedule = validate_mask_schedule(self.mask_schedule)
        self.repetitions = tuple(sorted(set(self.repetitions)))
        for n in self.repetitions:
            validate_positive_int(n, "repetitions")
        if self.ensemble not in (None, "patchcore"):
            raise ValueError(f"ensemble must be None or 'patchcore', got {self.ensemble!r}.")
        from .ensemble import validate_normalization_method

        validate_normalization_method(self.ensemble_normalization)
        if self.ensemble is None and self.ensemble_normalization != "zscore":
            raise ValueError(f"ensemble_normalization={self.ensemble_normalization!r} needs ensemble='patchcore'.")
        if self.ensemble is not None and not any(k > 0 for k in self.shots):
            raise ValueError("ensemble='patchcore' needs shots > 0 (PatchCore builds its memory bank from the shots).")
        if self.patchcore is not None and self.ensemble is None:
            raise ValueError("patchcore (PatchCore's settings) needs ensemble='patchcore'; without it none runs.")
        if self.patchcore is None and self.ensemble is not None:
            from .patchcore import PatchCoreConfig

            self.patchcore = PatchCoreConfig()
        if self.finetune is None:
            from .finetune import FinetuneConfig

            self.finetune = FinetuneConfig()
        from .devices import as_torch_device, resolve_device

        device = resolve_device(self.device)  # one that is not here is refused now, before anything is written
        gpu = as_torch_device(device)
        if gpu.type == "cuda" and (gpu.index or 0) != 0 and any(k > 0 for k in self.shots):
            raise ValueError(
                f"device={self.device!r}: the few-shot fine-tunes run through transformers' Trainer, which trains on "
                f"cuda:0 in a single process, so they would not run where the scoring does; make that GPU the "
                f"first visible one instead (CUDA_VISIBLE_DEVICES={gpu.index} with device='cuda')."
            )
        if self.bf16 is None:
            from .reconstruction import runs_bfloat16_natively

            self.bf16 = runs_bfloat16_natively(device)
        elif not isinstance(self.bf16, bool):
            raise TypeError(f"bf16 must be True, False or None (the device decides), got {self.bf16!r}.")
        if self.finetune.bf16 is None:  # fixed here, so a launcher's setting does not change it either
            self.finetune = dataclasses.replace(self.finetune, bf16=self.bf16)

    def settings(self) -> dict[str, Any]:
        """What the value of a unit depends on (categories, shots and seeds only add units)."""
        return {
            "model": _as_location(self.model),
            "model_weights": self._model_weights,
            "dataset": _as_location(self.dataset),
            "mask_ratio": self.mask_ratio,
            "mask_seed": self.mask_seed,
            "num_masks": self.num_masks,
            "mask_schedule": self.mask_schedule,
            "pixel_metrics": self.pixel_metrics,
            "bf16": self.bf16,
            "finetune": self.finetune.recipe(),
            "patchcore": None if self.patchcore is None else _jsonable(
                {**dataclasses.asdict(self.patchcore), "backbone": _as_location(self.patchcore.backbone)}
            ),
        } | (  # the test set of `fod:DIR` (a folder from before the hold-out lacks it, so it is refused, not mixed)
            {"fod_reference_frames": REFERENCE_FRAMES} if os.fspath(self.dataset).startswith("fod:") else {}
        ) | (  # recorded when it is not the default, which every run before the option had
            {"ensemble_normalization": self.ensemble_normalization} if self.ensemble_normalization != "zscore" else {}
        )

    @functools.cached_property
    def _model_weights(self) -> str | None:
        """`model_weights_digest(self.model)`, found once per run (per config) and kept: every unit records it, and a
        Hub lookup that fails midway (the network gone) must not give later units another value."""
        return model_weights_digest(self.model)

    def to_dict(self) -> dict[str, Any]:
        skip = ("finetune", "patchcore")  # their settings() form is JSON-friendly
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return _jsonable({**fields, **self.settings()})


def _as_location(spec: str) -> str:
    """A model or dataset as one string per place: a local folder (also after `synthetic:` / `fod:`) as its absolute
    path with links resolved, so `data`, `./data/`, `/abs/data` and a link to it compare equal, and `data` run from
    another folder does not; a Hub id as it is."""
    prefix, separator, rest = spec.partition(":")
    if separator and prefix in ("synthetic", "fod") and rest:
        return f"{prefix}:{os.path.realpath(os.path.expanduser(rest))}"
    path = os.path.expanduser(spec)
    return os.path.realpath(path) if os.path.isdir(path) else spec


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def model_weights_digest(model: str) -> str | None:
    """A digest of the model's weights: SHA-256 (its first 16 hex digits) over the contents of the checkpoint's
    weight files, as `from_pretrained` finds them (a folder, or a Hub id in the cache); for a few-shot adapter folder,
    over its adapter's weights and its base's digest. None where there are none to find (a Hub id not cached, which
    then fails to load).

    Recorded with the run's settings, so a resume after the folder's checkpoint was replaced (retrained, say) is
    refused instead of mixing two models' units (0.3 s for 500 MB here; a run finds it once)."""
    try:
        return _model_weights_digest(os.path.expanduser(model))
    except (OSError, ValueError, KeyError):  # (nothing to find: the model check names the problem)
        return None


def _model_weights_digest(location: str) -> str | None:
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
        cached_file,
    )

    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        found = {
            name: cached_file(location, name, _raise_exceptions_for_missing_entries=False,
                              _raise_exceptions_for_connection_errors=False)
            for name in (index, single)
        }
        if found[index]:
            with open(found[index], encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            files = [cached_file(location, shard, _raise_exceptions_for_missing_entries=False,
                                 _raise_exceptions_for_connection_errors=False) for shard in shards]
            if all(files):
                return _files_digest(files)
        elif found[single]:
            return _files_digest([found[single]])
    return _adapter_weights_digest(location)


def _adapter_weights_digest(location: str) -> str | None:
    """`maeday_hf.finetune`'s adapter folder: its LoRA weights, and the base they are merged into."""
    from transformers.utils import cached_file

    from .adapter_model import ADAPTER_SUBFOLDER

    kwargs = dict(subfolder=ADAPTER_SUBFOLDER, _raise_exceptions_for_missing_entries=False,
                  _raise_exceptions_for_connection_errors=False)
    adapter = cached_file(location, "adapter_model.safetensors", **kwargs)
    adapter_config = cached_file(location, "adapter_config.json", **kwargs)
    if not (adapter and adapter_config):
        return None
    with open(adapter_config, encoding="utf-8") as handle:
        base = json.load(handle).get("base_model_name_or_path")
    base_digest = model_weights_digest(base) if base else None
    adapter_digest = _files_digest([adapter])
    return hashlib.sha256(f"{adapter_digest} {base_digest}".encode()).hexdigest()[:16]


def _files_digest(files: Sequence[str]) -> str:
    """SHA-256 (its first 16 hex digits) over the files' contents, in order."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """One result: a method on one category's test split, for k shots selected with one seed."""

    category: str
    method: str
    shots: int
    shot_seed: int = 0
    study: Study = "main"
    num_masks: int | None = None
    mask_schedule: str | None = None

    @property
    def name(self) -> str:
        if self.study == "repetitions":
            return f"k0-n{self.num_masks}-{self.mask_schedule}-{self.method}"
        return f"k{self.shots}-seed{self.shot_seed}-{self.method}"

    def path(self, output_dir: str | os.PathLike) -> Path:
        return Path(output_dir) / UNITS_DIR / self.category / f"{self.name}.json"


@dataclass(frozen=True)
class Task:
    """Units computed together because they share shots and predictions (e.g. MAEDAY, PatchCore, their ensemble)."""

    category: str
    shots: int
    shot_seed: int
    num_masks: int
    mask_schedule: str
    units: tuple[Unit, ...]

    def adapter_dir(self, output_dir: str | os.PathLike) -> Path:
        return Path(output_dir) / ADAPTERS_DIR / self.category / f"k{self.shots}-seed{self.shot_seed}"

    def pending(self, output_dir: str | os.PathLike) -> tuple[Unit, ...]:
        return tuple(unit for unit in self.units if not unit.path(output_dir).is_file())


def plan_tasks(config: ProtocolConfig, categories: Sequence[str]) -> list[Task]:
    """Every task of the run, in a fixed order (the same on every process)."""
    tasks = []
    for category in categories:
        for shots in config.shots:
            seeds = range(config.num_shot_seeds) if shots > 0 else range(1)
            methods = ("maeday",) if shots == 0 or config.ensemble is None else METHODS
            for seed in seeds:
                units = tuple(
                    Unit(category, method, shots, seed, "main",
                         config.num_masks if "maeday" in method else None,
                         config.mask_schedule if "maeday" in method else None)
                    for method in methods
                )
                tasks.append(Task(category, shots, seed, config.num_masks, config.mask_schedule, units))
        for num_masks in config.repetitions:
            for schedule in MASK_SCHEDULES:
                unit = Unit(category, "maeday", 0, 0, "repetitions", num_masks, schedule)
                tasks.append(Task(category, 0, 0, num_masks, schedule, (unit,)))
    return tasks


def split_round_robin(tasks: Sequence[Task], process_index: int, num_processes: int) -> list[Task]:
    """The tasks of process `process_index` out of `num_processes`: every `num_processes`-th, starting at its index."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}.")
    return list(tasks[process_index::num_processes])


# ------------------------------------------------------------------------------------------------------- preparation
@dataclass
class PreparedProtocol:
    """A validated run: the source, the loaded categories and the planned tasks."""

    config: ProtocolConfig
    source: DatasetSource
    categories: tuple[str, ...]
    splits: dict[str, datasets.DatasetDict]
    tasks: list[Task]
    data_digests: dict[str, str] = dataclasses.field(default_factory=dict)
    """Per category, `maeday_hf.data.digest.splits_digest` of its splits: what its units and adapters were computed
    on."""


_NORMAL_NAMES = frozenset({"good", "normal", "ok", "pass", "nominal", "negative", "inlier", "undamaged", "clean"})
_ANOMALOUS_NAMES = frozenset({"anomaly", "anomalous", "abnormal", "bad", "defect", "defective", "nok", "ng", "fail",
                              "positive", "outlier", "damaged"})


def _labels_look_reversed(names: Sequence[str]) -> bool:
    """Whether ClassLabel `names` do not plainly read as 0 = normal, 1 = anomalous. Names this cannot place (e.g.
    `["outlier", "inlier"]`) count as not plain: a reversed order would invert every result silently."""
    lowered = [name.lower() for name in names]
    return len(lowered) != 2 or lowered[0] not in _NORMAL_NAMES or lowered[1] not in _ANOMALOUS_NAMES


def _check_category_splits(name: str, splits: datasets.DatasetDict, config: ProtocolConfig) -> None:
    if "test" not in splits:
        raise ValueError(f"Category {name!r} has no test split (splits: {list(splits)}).")
    for split_name, split in splits.items():
        if "label" not in split.column_names:
            continue
        odd = next((label for label in split["label"] if isinstance(label, bool) or label not in (0, 1)), None)
        if odd is not None:
            raise ValueError(
                f"Category {name!r}: {split_name} labels must be 0 (good) and 1 (anomaly), got values such as {odd!r}."
            )
        feature = split.features.get("label")
        if isinstance(feature, datasets.ClassLabel) and _labels_look_reversed(feature.names):
            raise ValueError(
                f"Category {name!r}: the {split_name} split's labels are named {feature.names}, but the protocol reads "
                f"0 as good and 1 as anomaly ({list(LABEL_NAMES)}); publish it with maeday_hf.data, or align the "
                f"label column (datasets' align_labels_with_mapping)."
            )
    train = splits.get("train")
    shots_needed = any(k > 0 for k in config.shots)
    if shots_needed and train is not None and "label" in train.column_names and any(train["label"]):
        raise ValueError(
            f"Category {name!r}: {sum(train['label'])} training images are labelled anomaly; the shots "
            f"(and PatchCore's memory bank) must be normal images."
        )
    test = splits["test"]
    labels = list(test["label"])
    num_anomalous = int(sum(labels))
    if num_anomalous == 0 or num_anomalous == len(labels):
        raise ValueError(
            f"Category {name!r}: image ROC-AUC needs good and anomalous test images, got {len(labels) - num_anomalous} "
            f"good and {num_anomalous} anomalous."
        )
    max_shots = max(config.shots)
    if max_shots > 0:
        num_train = len(splits["train"]) if "train" in splits else 0
        if num_train < max_shots:
            raise ValueError(
                f"Category {name!r} has {num_train} training images but --shots asks for k={max_shots}; "
                f"{'use --shots 0 (this dataset has no train split)' if num_train == 0 else 'lower the shots'}."
            )
        if max_shots == num_train and config.num_shot_seeds > 1:
            logger.warning(
                "Category %r has %d training images and k=%d takes them all: its %d shot seeds select the same shots, "
                "so their std shows only the fine-tune's and PatchCore's randomness, not the choice of shots.",
                name, num_train, max_shots, config.num_shot_seeds,
            )
    if config.pixel_metrics:
        masks = test.cast_column("mask", datasets.Image(decode=False))["mask"]
        unmasked = sum(1 for label, mask in zip(labels, masks) if label == 1 and mask is None)
        if unmasked:
            raise ValueError(
                f"Category {name!r}: {unmasked} of {num_anomalous} anomalous test images have no ground-truth mask, "
                f"so pixel metrics cannot be computed; pass --no-pixel-metrics for image metrics only."
            )
        # Decoded once now: a damaged or empty mask must not fail after the scoring.
        checks = [check_mask(mask, f"{name} test example {index}") for index, mask in enumerate(masks)]
        blank = [index for index, (label, check) in enumerate(zip(labels, checks))
                 if label == 1 and check.num_anomalous_pixels == 0]
        if len(blank) == num_anomalous:
            raise ValueError(
                f"Category {name!r}: none of the ground-truth masks of its {num_anomalous} anomalous test images marks "
                f"an anomalous pixel (all black?), so pixel metrics cannot be computed; pass --no-pixel-metrics for "
                f"image metrics only."
            )
        if blank:
            first = masks[blank[0]]
            logger.warning(
                "Category %r: %d of %d anomalous test images have a ground-truth mask with no anomalous pixel (e.g. "
                "%s): they add only normal pixels to the pixel metrics.", name, len(blank), num_anomalous,
                first.get("path") or f"test example {blank[0]}",
            )
        not_binary = [index for index, check in enumerate(checks) if not check.binary]
        if not_binary:
            first = masks[not_binary[0]]
            logger.warning(
                "Category %r: %d ground-truth mask(s) have more than two grey levels (e.g. %s; a lossy JPEG?): every "
                "pixel above 0 counts as anomalous.", name, len(not_binary),
                first.get("path") or f"test example {not_binary[0]}",
            )


def _recorded_settings(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(output_dir) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{os.fspath(path)!r} is empty or damaged ({error}; a run stopped while writing it, on a file system "
            f"without hard links?): remove it if the units beside it are this run's, or use another --output-dir."
        ) from None


def _settings_to_record(config: ProtocolConfig, data_digests: dict[str, str]) -> dict[str, Any]:
    """Current settings; the PatchCore settings of an earlier run are kept when this run has no ensemble, and the data
    digests of the categories an earlier run had and this one has not."""
    settings = _jsonable(config.settings())
    recorded = _recorded_settings(config.output_dir) or {}
    if settings.get("patchcore") is None and recorded.get("patchcore") is not None:
        settings["patchcore"] = recorded["patchcore"]
        if "ensemble_normalization" in recorded:
            settings["ensemble_normalization"] = recorded["ensemble_normalization"]
    settings[DATA_DIGESTS_KEY] = {**recorded.get(DATA_DIGESTS_KEY, {}), **data_digests}
    return settings


def _comparable_settings(recorded: dict[str, Any]) -> dict[str, Any]:
    """`recorded` settings with their locations as this run writes them: runs recorded before locations were made
    absolute hold them as typed (relative to where they ran, taken to be here)."""
    recorded = {**recorded, **{key: _as_location(recorded[key]) for key in ("model", "dataset") if key in recorded}}
    if isinstance(recorded.get("patchcore"), dict) and "backbone" in recorded["patchcore"]:
        recorded["patchcore"] = {**recorded["patchcore"], "backbone": _as_location(recorded["patchcore"]["backbone"])}
    return recorded


def _differing_settings(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between `recorded` settings (of a run, or of a unit) and `current` ones."""
    recorded = _comparable_settings(recorded)
    # Adding (or leaving out) the PatchCore ensemble only adds (or skips) units; a different PatchCore, or ensembles
    # normalised otherwise, do not fit.
    optional = (
        {"patchcore", "ensemble_normalization"}
        if recorded.get("patchcore") is None or current.get("patchcore") is None
        else set()
    ) | ({"model_weights"} if "model_weights" not in recorded else set()) | {  # (not recorded before 2026-11-29)
        DATA_DIGESTS_KEY  # per category: compared only for the categories both runs have (`_check_data_digests`)
    }
    return sorted(key for key in (set(recorded) | set(current)) - optional if recorded.get(key) != current.get(key))


def _check_settings(config: ProtocolConfig) -> None:
    recorded = _recorded_settings(config.output_dir)
    if recorded is None:
        return
    current = _jsonable(config.settings())
    different = _differing_settings(recorded, current)
    if different:
        changed = (
            f"; the model's weight files changed since (digest {recorded.get('model_weights')} there, "
            f"{current.get('model_weights')} now)" if "model_weights" in different else ""
        )
        raise ValueError(
            f"{config.output_dir!r} holds results of a run with other settings ({', '.join(different)} differ: "
            f"{_describe_differences(recorded, current, different)}{changed}); resume with the same settings or use "
            f"another --output-dir."
        )


def _describe_differences(recorded: dict[str, Any], current: dict[str, Any], keys: Sequence[str]) -> str:
    """`"key: X there, Y now"` for each of `keys`; within settings that are dicts (the fine-tune recipe, PatchCore's),
    only the entries that differ, as `"finetune.bf16: True there, False now"` (an entry one side lacks: "not
    recorded")."""
    recorded = _comparable_settings(recorded)
    missing = object()

    def shown(value: Any) -> str:
        return "not recorded" if value is missing else repr(value)

    parts = []
    for key in keys:
        there, now = recorded.get(key, missing), current.get(key, missing)
        if isinstance(there, dict) and isinstance(now, dict):
            parts.extend(
                f"{key}.{entry}: {shown(there.get(entry, missing))} there, {shown(now.get(entry, missing))} now"
                for entry in sorted(set(there) | set(now), key=str)
                if there.get(entry, missing) != now.get(entry, missing)
            )
        else:
            parts.append(f"{key}: {shown(there)} there, {shown(now)} now")
    return "; ".join(parts)


def _check_data_digests(output_dir: str | os.PathLike, data_digests: dict[str, str]) -> None:
    """Refuse a resume where a category's data changed since `output_dir`'s units and adapters were computed on it
    (images or masks replaced in place, say): they would be mixed with units of the new data."""
    recorded = (_recorded_settings(output_dir) or {}).get(DATA_DIGESTS_KEY, {})
    changed = [
        category for category, digest in data_digests.items()
        if recorded.get(category, digest) != digest and _holds_results_of(output_dir, category)
    ]
    if changed:
        folders = " and ".join(
            os.fspath(Path(output_dir) / kind / category) for category in changed for kind in (UNITS_DIR, ADAPTERS_DIR)
            if (Path(output_dir) / kind / category).is_dir()
        )
        raise ValueError(
            f"The data of {', '.join(map(repr, changed))} changed since {os.fspath(output_dir)!r} was computed on it "
            f"(digest {', '.join(recorded[c] for c in changed)} there, {', '.join(data_digests[c] for c in changed)} "
            f"now): remove {folders} to compute them again on the new data, or use another --output-dir."
        )


def _holds_results_of(output_dir: str | os.PathLike, category: str) -> bool:
    """Whether `output_dir` holds a unit or an adapter of `category` (once they are removed, its recorded data digest
    describes nothing left, and the category is computed afresh). Hidden entries (the temporary files a killed run
    left) are not results."""
    return any(
        not entry.name.startswith(".")
        for kind in (UNITS_DIR, ADAPTERS_DIR) if (Path(output_dir) / kind / category).is_dir()
        for entry in (Path(output_dir) / kind / category).iterdir()
    )


def _record_settings(config: ProtocolConfig, data_digests: dict[str, str] | None = None) -> None:
    """Write `settings.json`: created exclusively where there is none, else (a resume, or a run started in the folder
    since this one was prepared) checked against this run's first: two runs with other settings, or on other data,
    into one folder would mix their units."""
    data_digests = data_digests or {}
    path = Path(config.output_dir) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = make_partial_file(path.parent, f".{SETTINGS_FILE}.partial-")
    try:
        write_json(temporary, _settings_to_record(config, data_digests))
        try:
            _create_exclusively(temporary, path)
        except FileExistsError:
            _check_settings(config)
            _check_data_digests(config.output_dir, data_digests)
            write_json(path, _settings_to_record(config, data_digests))
    finally:
        temporary.unlink(missing_ok=True)


def _create_exclusively(source: Path, path: Path) -> None:
    """`path` with `source`'s content, whole at once where the file system has hard links (created, then filled,
    where it has not); `FileExistsError` if `path` exists."""
    try:
        os.link(source, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system (FAT, some network mounts): created exclusively, then filled
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(source.read_text(encoding="utf-8"))


def _check_model(config: ProtocolConfig) -> None:
    from transformers import AutoConfig

    from .finetune import load_base_config
    from .reconstruction import require_vit_mae_config

    try:
        if any(k > 0 for k in config.shots):
            load_base_config(config.model)  # also rejects adapter folders as a fine-tuning base
        else:
            require_vit_mae_config(AutoConfig.from_pretrained(os.path.expanduser(config.model)), config.model)
    except OSError as error:
        raise OSError(
            f"Cannot load the model {config.model!r}: not a local checkpoint folder and not in the Hugging Face cache "
            f"({str(error).splitlines()[0]})."
        ) from error


def prepare_protocol(config: ProtocolConfig) -> PreparedProtocol:
    """Validate the run and plan its tasks; nothing is computed or written.

    Raises:
        `ValueError`, `FileNotFoundError`, `OSError`, `ImportError`: bad input, named (see the module docstring).
    """
    if config.plots:
        require_matplotlib()
    _check_settings(config)
    source = resolve_dataset(config.dataset)
    if not source.categories:
        raise ValueError(f"Dataset {config.dataset!r} has no categories.")
    categories = config.categories if config.categories is not None else source.categories
    unknown = [c for c in categories if c not in source.categories]
    if unknown:
        raise ValueError(
            f"Unknown category {', '.join(map(repr, unknown))} for dataset {config.dataset!r}; valid: "
            f"{', '.join(source.categories)}."
        )
    # The model first: a bad --model is found before the categories are loaded (a synthetic one is written then).
    _check_model(config)
    if config.ensemble is not None:
        # Loaded now, so a backbone that cannot be had fails before hours of fine-tuning, not after (the runner loads
        # it again, on its own device).
        from .feature_extraction import load_backbone

        load_backbone(config.patchcore.backbone, config.patchcore.out_indices)
    splits = {}
    for category in categories:
        splits[category] = source.load(category)
        _check_category_splits(category, splits[category], config)
    started = time.perf_counter()
    data_digests = {category: splits_digest(splits[category], f"Category {category!r}") for category in categories}
    logger.info("Data digests of %d categories in %.1f s", len(categories), time.perf_counter() - started)
    _check_data_digests(config.output_dir, data_digests)
    tasks = plan_tasks(config, categories)
    logger.info("Planned %d units in %d tasks over %d categories", sum(len(t.units) for t in tasks), len(tasks),
                len(categories))
    return PreparedProtocol(config, source, tuple(categories), splits, tasks, data_digests)


# ---------------------------------------------------------------------------------------------------------- running
class ProcessState(Protocol):
    """What the runner needs of `accelerate.PartialState` (tests pass a stand-in)."""

    process_index: int
    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


def _test_images(test: datasets.Dataset) -> list:
    return [example["image"] for example in test.select_columns(["image"])]


def _gt_masks(test: datasets.Dataset):
    for example in test.select_columns(["mask"]):
        yield None if example["mask"] is None else mask_array(example["mask"])


def compute_metrics(
    predictions: Sequence[dict[str, Any]], labels: np.ndarray, gt_masks: Sequence[np.ndarray | None] | None
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Image ROC-AUC and F1-max, and (given `gt_masks`) pixel ROC-AUC, pixel F1-max and AUPRO (streamed); and the
    bounds on how far each streamed pixel metric can be from its exact value (`metrics.compute_pixel_metrics`; the
    image metrics are exact)."""
    scores = np.array([p["score"] for p in predictions], dtype=np.float64)
    metrics: dict[str, float | None] = {
        "image_roc_auc": image_roc_auc(labels, scores),
        "image_f1_max": image_f1_max(labels, scores),
    }
    error_bounds: dict[str, float | None] = {}
    if gt_masks is not None:
        pixel = compute_pixel_metrics(gt_masks, [p["anomaly_map"] for p in predictions])
        metrics.update(pixel_roc_auc=pixel.pixel_roc_auc, pixel_f1_max=pixel.pixel_f1_max, aupro=pixel.aupro)
        error_bounds.update(pixel_roc_auc=pixel.pixel_roc_auc_error_bound,
                            pixel_f1_max=pixel.pixel_f1_max_error_bound, aupro=pixel.aupro_error_bound)
    return metrics, error_bounds


class _Runner:
    """Executes tasks in one process: caches the zero-shot detector and the PatchCore backbone."""

    def __init__(self, prepared: PreparedProtocol, device) -> None:
        self.prepared = prepared
        self.config = prepared.config
        self.device = device
        self._base_detector = None
        self._feature_extractor = None

    def base_detector(self):
        from .modeling import load_detector

        if self._base_detector is None:
            self._base_detector = load_detector(self.config.model, device=self.device)
        return self._base_detector

    def score_maeday(self, detector, images: list, num_masks: int, schedule: str) -> list[dict[str, Any]]:
        config = self.config
        results = detector(
            (image for image in images), num_masks=num_masks, mask_ratio=config.mask_ratio, seed=config.mask_seed,
            mask_schedule=schedule, batch_size=config.batch_size, bf16=config.bf16,
            threshold=None,  # the metrics need scores and maps only (and a fine-tune's calibrated labels are moot)
        )
        # Only what the metrics read: a fine-tune's calibrated labels and PIL masks would pile up for nothing.
        return [
            {"score": r["score"], "anomaly_map": r["anomaly_map"]}
            for r in tqdm(results, total=len(images), desc="MAEDAY", leave=False, disable=not config.show_progress)
        ]

    def patchcores(self, shot_images: list, num_models: int):
        from .patchcore import PatchCore, fit_patchcores

        if self._feature_extractor is None:
            self._feature_extractor = PatchCore(self.config.patchcore, device=self.device).feature_extractor
        return fit_patchcores(
            shot_images, seeds=tuple(range(num_models)), config=self.config.patchcore,
            feature_extractor=self._feature_extractor, device=self.device,
        )

    def run(self, task: Task) -> list[Unit]:
        """Compute and write the pending units of `task`; returns them."""
        from .ensemble import ensemble_predictions
        from .modeling import load_detector

        output_dir = self.config.output_dir
        pending = task.pending(output_dir)
        if not pending:
            return []
        start = time.perf_counter()
        splits = self.prepared.splits[task.category]
        test = splits["test"]
        # Decoded as they are scored, not all held at once (a 1024 px image is 3 MB): a column reads one per access.
        images = test.select_columns(["image"])["image"]
        methods = {unit.method for unit in pending}
        predictions: dict[str, list[dict[str, Any]]] = {}
        indices = shot_indices(len(splits["train"]), task.shots, task.shot_seed) if task.shots > 0 else []
        if methods & {"maeday", "maeday+patchcore"}:
            if task.shots == 0:
                detector = self.base_detector()
            else:
                detector = load_detector(task.adapter_dir(output_dir), device=self.device)
            predictions["maeday"] = self.score_maeday(detector, images, task.num_masks, task.mask_schedule)
        if methods & {"patchcore", "2xpatchcore", "maeday+patchcore"}:
            shot_images = _test_images(select_shots(splits["train"], task.shots, task.shot_seed))
            models = self.patchcores(shot_images, 2 if "2xpatchcore" in methods else 1)
            images = list(images)  # (decoded once for every PatchCore)
            for index, model in enumerate(models):
                predictions[f"patchcore{index}"] = model.predict(images)
        combined = {
            "maeday": lambda: predictions["maeday"],
            "patchcore": lambda: predictions["patchcore0"],
            "2xpatchcore": lambda: ensemble_predictions(
                [predictions["patchcore0"], predictions["patchcore1"]], method=self.config.ensemble_normalization
            ),
            "maeday+patchcore": lambda: ensemble_predictions(
                [predictions["maeday"], predictions["patchcore0"]], method=self.config.ensemble_normalization
            ),
        }
        seconds = time.perf_counter() - start
        labels = np.asarray(test["label"])
        gt_masks = list(_gt_masks(test)) if self.config.pixel_metrics else None  # decoded once for every method
        for unit in pending:
            outputs = combined[unit.method]()
            metrics, error_bounds = compute_metrics(outputs, labels, gt_masks)
            record = {
                **dataclasses.asdict(unit),
                "unit": unit.name,
                "metrics": metrics,
                "metric_error_bounds": error_bounds,  # of the streamed pixel metrics (histogram), not of the method
                "image_scores": [float(output["score"]) for output in outputs],  # test-split order
                "num_test_images": len(test),
                "num_anomalous": int(labels.sum()),
                "shot_indices": indices,
                "adapter": str(task.adapter_dir(output_dir)) if task.shots > 0 and "maeday" in unit.method else None,
                "task_seconds": seconds,
                "settings": _jsonable(self.config.settings()),
                "data_digest": self.prepared.data_digests.get(task.category),
            }
            write_json(unit.path(output_dir), record)
            logger.info("%s/%s: %s", unit.category, unit.name, {k: v for k, v in metrics.items() if v is not None})
        return list(pending)


def _finetune_missing(prepared: PreparedProtocol, tasks: Sequence[Task], device) -> None:
    """Fine-tune every adapter that a pending MAEDAY unit needs; every process calls this with the same `tasks`."""
    from .finetune import finetune

    config = prepared.config
    recipe = dataclasses.replace(
        config.finetune, use_cpu=str(device).startswith("cpu"), disable_tqdm=not config.show_progress
    )
    needed = [
        task for task in tasks
        if task.shots > 0 and any("maeday" in u.method for u in task.pending(config.output_dir))
        and not task.adapter_dir(config.output_dir).is_dir()
    ]
    calibration_logger = logging.getLogger("maeday_hf.calibration")
    calibration_logger.addFilter(_few_view_calibration_warning_dropped)
    try:
        for task in tqdm(needed, desc="fine-tune", disable=not config.show_progress):
            logger.info("Fine-tuning %s k=%d seed=%d", task.category, task.shots, task.shot_seed)
            finetune(
                config.model, prepared.splits[task.category]["train"], task.adapter_dir(config.output_dir),
                config=recipe, num_shots=task.shots, shot_seed=task.shot_seed,
            )
    finally:
        calibration_logger.removeFilter(_few_view_calibration_warning_dropped)


def _few_view_calibration_warning_dropped(record: logging.LogRecord) -> bool:
    """Drops the calibration's "from only N normal views" warning: the metrics read scores and maps, never an
    adapter's calibrated threshold, so each few-shot fine-tune's warning would be noise."""
    return not (record.levelno == logging.WARNING and record.msg.startswith("Calibrating the threshold from only"))


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("maeday-hf", "torch", "transformers", "peft", "accelerate", "datasets", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _read_unit(path: Path) -> dict[str, Any]:
    """A finished unit's record; a damaged one (emptied, cut, edited) is named, with the way to compute it again."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"not valid JSON ({error})"
    else:
        if isinstance(record, dict) and {"metrics", "image_scores", "unit"} <= set(record):
            return record
        problem = "not a unit record"
    raise ValueError(f"{os.fspath(path)} is {problem}: remove it and rerun to compute that unit again.")


def gather_results(prepared: PreparedProtocol) -> Path:
    """Read every planned unit and write `results.json`, `tables.md` and the figures; returns `results.json`'s path.

    Raises:
        `RuntimeError`: a planned unit has no file (a process failed).
        `ValueError`: a unit was computed with other settings than this run's (another run into the same folder).
    """
    config = prepared.config
    units = [unit for task in prepared.tasks for unit in task.units]
    missing = [str(unit.path(config.output_dir)) for unit in units if not unit.path(config.output_dir).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} unit(s) did not finish, e.g. {missing[:3]}; rerun to complete them.")
    records = [_read_unit(unit.path(config.output_dir)) for unit in units]
    current = _jsonable(config.settings())
    for unit, record in zip(units, records):
        different = _differing_settings(record["settings"], current) if "settings" in record else []
        if different:  # (another run into this folder, with other settings)
            raise ValueError(
                f"{unit.path(config.output_dir)} was computed with other settings ({', '.join(different)} differ) than "
                f"this run's; another run shares {config.output_dir!r}? Remove the units of the other settings, or use "
                f"another --output-dir."
            )
        expected = prepared.data_digests.get(unit.category)
        if record.get("data_digest") is not None and expected is not None and record["data_digest"] != expected:
            raise ValueError(
                f"{unit.path(config.output_dir)} was computed on other data of {unit.category!r} (digest "
                f"{record['data_digest']}, {expected} now); remove it to compute it again on this data."
            )
    output_dir = Path(config.output_dir)
    summary = {}
    for metric in ("image_roc_auc", "pixel_roc_auc", "aupro", "image_f1_max", "pixel_f1_max"):
        cells = summarize(records, metric)
        if cells:
            summary[metric] = {
                f"k{shots}/{method}": {
                    c: cells[(c, shots, method)] for c in prepared.categories if (c, shots, method) in cells
                }
                for shots, method in table_columns(records)
            }
    results = {
        "config": config.to_dict(),
        "dataset": {
            "kind": prepared.source.kind, "location": prepared.source.location, "digests": prepared.data_digests,
        },
        "categories": list(prepared.categories),
        "versions": _versions(),
        "summary": summary,
        "units": records,
    }
    path = write_json(output_dir / "results.json", results)
    write_text(output_dir / "tables.md", render_tables(records, prepared.categories))
    figures = {"fig2_shots.png": None, "fig3_repetitions.png": None}
    if config.plots:  # (each returns None when the records hold nothing to plot)
        figures["fig2_shots.png"] = plot_shots(records, prepared.categories, output_dir / "fig2_shots.png")
        figures["fig3_repetitions.png"] = plot_repetitions(records, output_dir / "fig3_repetitions.png")
    for name, written in figures.items():
        if written is None:  # a figure of an earlier run would no longer match results.json
            (output_dir / name).unlink(missing_ok=True)
    logger.info("Wrote %s, tables.md and figures in %s", path.name, output_dir)
    return path


def execute_protocol(prepared: PreparedProtocol, state: ProcessState | None = None) -> Path | None:
    """Run the pending units of this process, then (main process) gather everything.

    Args:
        prepared (`PreparedProtocol`): from [`prepare_protocol`].
        state (*optional*): `accelerate.PartialState()` by default: `process_index`, `num_processes`,
            `is_main_process`, `wait_for_everyone()`.

    Returns:
        The path of `results.json` on the main process, `None` on the others.
    """
    config = prepared.config
    if state is None:
        from accelerate import PartialState

        from .devices import as_torch_device, resolve_device

        # On a machine without a GPU, accelerate joins the launched processes only when asked for the CPU: without
        # it every process took itself for the only one (each computed every unit and wrote results.json), until a
        # fine-tune's Trainer set the state up for all of them.
        state = PartialState(cpu=as_torch_device(resolve_device(config.device)).type == "cpu")
    device = getattr(state, "device", None) if config.device == "auto" else config.device
    device = device if device is not None else "cpu"
    output_dir = Path(config.output_dir)
    pending = [task for task in prepared.tasks if task.pending(output_dir)]
    num_pending_units = sum(len(task.pending(output_dir)) for task in pending)
    logger.info("%d of %d units left (%d tasks)", num_pending_units, sum(len(t.units) for t in prepared.tasks),
                len(pending))
    if state.is_main_process:
        _record_settings(config, prepared.data_digests)
    state.wait_for_everyone()  # every process listed the same pending tasks before anyone writes a unit
    _finetune_missing(prepared, pending, device)
    runner = _Runner(prepared, device)
    mine = split_round_robin(pending, state.process_index, state.num_processes)
    for task in tqdm(mine, desc=f"units [process {state.process_index}]", disable=not config.show_progress):
        runner.run(task)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return gather_results(prepared)


def run_protocol(config: ProtocolConfig) -> Path | None:
    """[`prepare_protocol`] then [`execute_protocol`]: the whole run, resumable and distributable.

    Example:

    ```python
    >>> from maeday_hf.protocol import ProtocolConfig, run_protocol
    >>> run_protocol(ProtocolConfig("facebook/vit-mae-base", "/data/mvtec", "results", categories=["bottle"]))
    ```
    """
    return execute_protocol(prepare_protocol(config))
