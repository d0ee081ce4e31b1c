"""Publish per-category `DatasetDict`s as one Hub dataset with a config per category, or write that repo folder locally.

On the Hub each config is embedded Parquet (image bytes inside the files) under `<config>/<split>-*.parquet`, listed in
the `configs:` header of README.md, so `load_dataset("ORG/mvtec-ad", "bottle")` needs no loading script. The dry run
([`write_hub_folder`]) writes the same files locally; [`load_hub_folder`] reads them back.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import datasets
import yaml
from datasets.table import embed_table_storage
from datasets.utils.py_utils import convert_file_size_to_int
from huggingface_hub import RepoCard

from ..atomic_io import make_partial_dir, replace_folder, write_atomically
from .fod import FOD_CONFIGS, load_fod_with_references
from .layout import is_hidden
from .mvtec import load_mvtec
from .synthetic import SYNTHETIC_CATEGORIES, load_synthetic_dataset

logger = logging.getLogger(__name__)

README = "README.md"

BUILDERS: dict[str, Callable[[str | os.PathLike, str], datasets.DatasetDict]] = {
    "mvtec": load_mvtec,
    "fod": load_fod_with_references,  # the evaluation protocol's split: reference frames held out as train
    "synthetic": load_synthetic_dataset,
}
"""`builder(root, config) -> DatasetDict` of each dataset a folder can hold."""

MAX_SHARD_BYTES = convert_file_size_to_int(datasets.config.MAX_SHARD_SIZE)
"""Largest Parquet file `write_hub_folder` writes before it splits a split into shards, as `push_to_hub` does (and
each shard is embedded in memory alone: a whole MVTec category at once would take several GB)."""

DEFAULT_LICENSES = {"mvtec": "cc-by-nc-sa-4.0"}
"""The licence a published dataset's card names by default: MVTec AD is released under CC BY-NC-SA 4.0 (its images may
not be used commercially). The FOD and synthetic sets have none by default (`--license` gives one)."""

_LAYOUTS = {"mvtec": "<root>/<category>/train or test", "fod": f"<root>/<{'|'.join(FOD_CONFIGS)}>"}


def available_configs(dataset: str, root: str | os.PathLike) -> tuple[str, ...]:
    """Configs `dataset` offers under `root`, found as the protocol's `resolve_dataset` finds them.

    MVTec AD: the category folders holding `train/` or `test/`; FOD: the surfaces of `FOD_CONFIGS` present; synthetic:
    every category (missing ones are written on loading).

    Raises:
        `ValueError`: `dataset` is not one of `BUILDERS`.
        `FileNotFoundError`: `root` is not a folder (MVTec AD, FOD).
    """
    if dataset not in BUILDERS:
        raise ValueError(f"Unknown dataset {dataset!r}; expected one of {sorted(BUILDERS)}.")
    if dataset == "synthetic":
        return SYNTHETIC_CATEGORIES
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"The {dataset} root {root} is not a folder.")
    if dataset == "fod":
        return tuple(config for config in FOD_CONFIGS if (root / config).is_dir())
    return tuple(sorted(
        p.name for p in root.iterdir() if not is_hidden(p) and ((p / "train").is_dir() or (p / "test").is_dir())
    ))


def load_configs(
    dataset: str, root: str | os.PathLike, configs: Sequence[str] | None = None
) -> dict[str, datasets.DatasetDict]:
    """Configs of `dataset` under `root`, loaded by its builder for [`write_hub_folder`] or [`push_configs_to_hub`].

    Args:
        dataset (`str`): `"mvtec"`, `"fod"` or `"synthetic"` (see `BUILDERS`).
        root (`str` or `os.PathLike`): The dataset's folder (for synthetic: where it is written).
        configs (`Sequence[str]`, *optional*): Configs to load; defaults to all [`available_configs`].

    Returns:
        `dict` config name → its `DatasetDict`.

    Raises:
        `ValueError`: no config found, or a requested one is not available (named, with the available ones).
        `FileNotFoundError`: `root` is not a folder.
    """
    available = available_configs(dataset, root)
    if not configs:
        if not available:
            raise ValueError(f"No {dataset} configs found under {root}; expected {_LAYOUTS[dataset]}.")
        configs = available
    missing = [config for config in configs if config not in available]
    if missing:
        raise ValueError(f"No {dataset} config(s) {missing} under {root}; available: {list(available)}.")
    loaded = {config: BUILDERS[dataset](root, config) for config in dict.fromkeys(configs)}
    for config, splits in loaded.items():
        _warn_if_one_class(dataset, config, splits)
    return loaded


def _warn_if_one_class(dataset: str, config: str, splits: datasets.DatasetDict) -> None:
    """A test split with no good (or no anomalous) image publishes fine but cannot be evaluated: say so now."""
    if "test" not in splits:
        return
    labels = splits["test"]["label"]
    num_anomalous = sum(labels)
    if num_anomalous in (0, len(labels)):
        logger.warning(
            "%s config %r: its test split has %d good and %d anomalous images; maeday-evaluate needs both (image "
            "ROC-AUC) and will refuse it.", dataset, config, len(labels) - num_anomalous, num_anomalous,
        )


def push_configs_to_hub(
    configs: Mapping[str, datasets.DatasetDict],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    license: str | None = None,
) -> None:
    """Push each `DatasetDict` as config `name` of `repo_id` (one commit per config, embedded Parquet).

    Args:
        configs (`Mapping[str, datasets.DatasetDict]`): Config name (e.g. `"bottle"`) → its splits.
        repo_id (`str`): `"ORG/name"` of the dataset repo; created if missing.
        private (`bool`, *optional*): Visibility when the repo is created; a private push into an existing public
            repo is refused before anything is pushed.
        token (`str`, *optional*): Hub token; defaults to the logged-in one.
        license (`str`, *optional*): a Hub licence id (e.g. `"cc-by-nc-sa-4.0"`) for the card, in a commit before
            the configs' (an id the Hub refuses stops the push with nothing pushed); a card that names a licence
            already keeps its own.

    Raises:
        ValueError: a private push into an existing public repo.
        OSError: the Hub refused or could not be reached (the message names the configs already pushed).
    """
    if not configs:
        raise ValueError("No configs to push: got an empty mapping.")
    _check_config_names(configs)
    from huggingface_hub import HfApi

    pushed: list[str] = []
    licence_committed = False
    try:
        # `push_to_hub` sets the visibility only of a repo it creates: a private push into an existing public repo
        # would be public (MVTec AD's licence is non-commercial).
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)  # (None: the owner's default)
        if private and not api.repo_info(repo_id, repo_type="dataset").private:
            raise ValueError(
                f"{repo_id!r} already exists as a public dataset, and a private push was asked for; nothing was "
                f"pushed. Make it private on the Hub, or push without --private."
            )
        if license is not None:  # first: a licence id the Hub refuses stops the push before any config is in
            licence_committed = _add_license_to_remote_card(api, repo_id, license)
        for name, dataset_dict in configs.items():
            logger.info("Pushing config %s (%s) to %s", name, dict(dataset_dict.num_rows), repo_id)
            dataset_dict.push_to_hub(  # (it updates the card's dataset_info and configs, and keeps the rest)
                repo_id, config_name=name, private=private, token=token, commit_message=f"Add config {name}"
            )
            pushed.append(name)
    except ValueError:
        raise
    except Exception as error:  # huggingface_hub's HTTP errors, and httpx's connection errors, which are no OSError
        if pushed:
            done = f"configs already pushed: {pushed}"
        else:
            done = "the card naming the licence was committed, no config was pushed" if licence_committed else (
                "nothing was pushed")
        raise OSError(
            f"Pushing to the Hub dataset {repo_id!r} failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no message'}); {done}."
        ) from error


_GLOB_CHARACTERS = re.compile(r"[*?\[\]{}]")


def _check_config_names(configs: Mapping[str, datasets.DatasetDict]) -> None:
    """A config's files are found by the glob `<config>/<split>-*`: a name holding glob characters (a category folder
    `bottle[1]`) would be written, then match nothing when loaded."""
    for name in configs:
        if not isinstance(name, str) or not name or _GLOB_CHARACTERS.search(name) or "/" in name or name.startswith("."):
            raise ValueError(
                f"Config name {name!r} cannot name a dataset config: its files are found by the pattern "
                f"'<config>/<split>-*', so it must not hold * ? [ ] {{ }} or /, nor start with '.'; rename the "
                f"category folder."
            )


def _add_license_to_remote_card(api, repo_id: str, license: str) -> bool:
    """Name `license` in the card of `repo_id` (a card of its own where it has none yet), unless the card names one
    already; returns whether a commit was made."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        # (force_download: a copy cached earlier could lack configs pushed since, and the upload would drop them)
        header, body = read_card(Path(api.hf_hub_download(repo_id, README, repo_type="dataset", force_download=True)))
    except LocalEntryNotFoundError:
        raise  # the Hub could not be asked (5xx, timeout): not "no card", which would replace the card
    except EntryNotFoundError:
        header, body = {}, ""
    if header.get("license") is not None:
        if header["license"] != license:
            logger.warning("The card of %s names the licence %r; kept (not %r).", repo_id, header["license"], license)
        return False
    card = _card_text({"license": license, **header}, body)
    api.upload_file(path_or_fileobj=card.encode("utf-8"), path_in_repo=README, repo_id=repo_id, repo_type="dataset",
                    commit_message=f"Name the licence: {license}")
    return True


def _card_text(header: dict, body: str) -> str:
    return f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n{body}"


def _estimated_nbytes(dataset: datasets.Dataset) -> int:
    """Bytes of `dataset` once its image files are embedded: its table plus the files its image columns point to."""
    total = dataset.data.nbytes
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            for value in dataset.cast_column(name, datasets.Image(decode=False))[name]:
                if value and value.get("bytes") is None and value.get("path"):
                    total += os.path.getsize(value["path"])
    return total


def _embedded(dataset: datasets.Dataset) -> datasets.Dataset:
    """Image files read into the table, as `push_to_hub` does, so the Parquet file stands alone."""
    return dataset.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True).with_format(None)


def read_card(readme: Path) -> tuple[dict, str]:
    """YAML header and body of an existing dataset card (empty if there is none), parsed as the Hub parses cards.

    Raises:
        yaml.YAMLError: the header is not valid YAML.
        ValueError: the file is not UTF-8 text, or it opens a header (`---`) that it never closes (its configs would
            be lost when the card is written again).
    """
    if not readme.is_file():
        return {}, ""
    try:
        text = readme.read_text(encoding="utf-8-sig")  # (a byte-order mark is not part of the card)
    except UnicodeDecodeError as error:
        raise ValueError(f"{readme} is not UTF-8 text ({error}).") from None
    if text.split("\n", 1)[0].rstrip("\r") != "---":  # (a Markdown rule such as "-----" opens no header)
        return {}, text
    header = re.match(r"---\r?\n(.*?\r?\n)?---[ \t]*(\r?\n|$)", text, flags=re.DOTALL)
    if header is None:
        raise ValueError(f"{readme} opens a YAML header with '---' but never closes it with another '---' line.")
    if not (header.group(1) or "").strip():
        return {}, text[header.end():]  # an empty header
    card = RepoCard(text)
    return card.data.to_dict(), card.text


def load_hub_folder(folder: str | os.PathLike, config: str, **load_kwargs) -> datasets.DatasetDict:
    """One config of a local dataset repo folder (`write_hub_folder`'s, or a clone of a Hub repo), read from the Parquet
    files its card lists.

    `datasets.load_dataset(folder, config)` caches a local repo folder under its name and card, not its files: once the
    folder is rewritten (or another folder of the same name is loaded) it can return the old rows. Here the card is
    read as `datasets` reads it (its `data_files` or `data_dir`, its features), and the Parquet files it names are
    loaded themselves, which keys the cache on their paths and modification times (a file replaced by one with the
    same modification time, as `cp -p` can leave, is still read from the cache).

    Raises:
        ValueError: the card lists no such config (the ones it lists are named).
    """
    folder = Path(folder)
    header, _ = read_card(folder / README)
    names = [entry.get("config_name") for entry in header.get("configs", []) if isinstance(entry, dict)]
    if config not in names:
        raise ValueError(f"{folder / README} lists no config {config!r}; it lists {sorted(map(str, names))}.")
    builder = datasets.load_dataset_builder(os.fspath(folder), config)  # (reads the card: nothing is prepared)
    files = {str(split): list(paths) for split, paths in (builder.config.data_files or {}).items()}
    if not files:
        raise ValueError(f"{folder / README}: config {config!r} names no data files.")
    features = getattr(builder.config, "features", None) or builder.info.features
    return datasets.load_dataset("parquet", data_files=files, features=features, **load_kwargs)


def check_hub_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a `Path`, if `write_hub_folder` can write there (a folder, or nothing yet).

    Raises:
        NotADirectoryError: `folder` is a file.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"{folder} is a file; the dataset repo is written as a folder there (give a folder, new or written before)."
        )
    return folder


def _check_replaceable_config(config_folder: Path, shown: Path | None = None) -> None:
    """Refuse to replace `config_folder` (shown as `shown`) unless it is missing or holds only Parquet shards (and hidden
    files): what a dry run writes there. Anything else (the dataset's own images, when the dry run was pointed at
    --root) must not be deleted by it."""
    shown = shown if shown is not None else config_folder
    if not (config_folder.exists() or config_folder.is_symlink()):
        return
    if config_folder.is_symlink() or not config_folder.is_dir():
        raise ValueError(f"{shown} is not a folder of Parquet shards, and writing the config would replace it; choose "
                         f"another folder for the dataset repo.")
    foreign = next(
        (entry for entry in config_folder.iterdir()
         if not is_hidden(entry) and not (entry.is_file() and entry.suffix == ".parquet")),
        None,
    )
    if foreign is not None:
        raise ValueError(
            f"{shown} holds {foreign.name!r}, which is not a Parquet shard of a dataset repo, and writing the config "
            f"would replace that folder (is this the dataset's own folder?); choose another folder for the dataset "
            f"repo."
        )


def write_hub_folder(
    configs: Mapping[str, datasets.DatasetDict],
    folder: str | os.PathLike,
    card_body: str | None = None,
    license: str | None = None,
) -> Path:
    """Write the dataset repo `push_configs_to_hub` would produce into `folder` (the dry run).

    Configs already in `folder/README.md` are kept, so categories can be written one run at a time.

    Args:
        configs (`Mapping[str, datasets.DatasetDict]`): Config name → its splits.
        folder (`str` or `os.PathLike`): Output folder, created if missing.
        card_body (`str`, *optional*): Markdown below the YAML header; keeps the existing body when `None`.
        license (`str`, *optional*): a Hub licence id for the card, unless it names one already.

    Returns:
        `Path` of `folder`. Files: `<config>/<split>-<index>-of-<num_shards>.parquet` (shards of at most
        `MAX_SHARD_BYTES`, as `push_to_hub` names them) and `README.md`. Each config is written whole into a hidden
        partial folder, then swapped in (`atomic_io.replace_folder`): an interrupted run leaves every config as it
        was, never one split new and another old; the card is written last.

    Example:

    ```python
    >>> write_hub_folder({"bottle": load_mvtec(root, "bottle")}, "out/mvtec-ad")
    >>> load_hub_folder("out/mvtec-ad", "bottle")["test"].features["label"].names
    ['good', 'anomaly']
    ```
    """
    if not configs:
        raise ValueError("No configs to write: got an empty mapping.")
    _check_config_names(configs)
    folder = check_hub_folder(folder)
    try:
        header, body = read_card(folder / README)
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise ValueError(f"{folder / README} has a YAML header that does not parse: {problem}") from None
    existing = header.get("configs", [])
    if not isinstance(existing, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("config_name"), str) for entry in existing
    ):
        raise ValueError(
            f"{folder / README}: its `configs:` header is {existing!r:.200}; expected a list of entries with a "
            f"config_name (as the Hub's dataset cards have). Fix or remove it, then run again."
        )
    entries = {entry["config_name"]: entry for entry in existing}
    for name in configs:  # all of them before anything is written
        _check_replaceable_config(folder / name)
    folder.mkdir(parents=True, exist_ok=True)
    for name, dataset_dict in configs.items():
        partial = make_partial_dir(folder, f".{name}.partial-")
        try:
            for split, dataset in dataset_dict.items():
                num_shards = max(1, min(len(dataset), _estimated_nbytes(dataset) // MAX_SHARD_BYTES + 1))
                for index in range(num_shards):
                    shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
                    path = partial / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
                    _embedded(shard).to_parquet(str(path))
                    logger.info("Wrote %s/%s (%d rows)", name, path.name, len(shard))
            replace_folder(partial, folder / name, check_replaced=lambda old, shown=folder / name: (
                _check_replaceable_config(old, shown)))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        entries[name] = {  # (an existing entry's `default: true` is kept; its keys describing files are not)
            **{key: value for key, value in entries.get(name, {}).items() if key == "default"},
            "config_name": name,
            "data_files": [{"split": split, "path": f"{name}/{split}-*"} for split in dataset_dict],
        }
    header["configs"] = [entries[name] for name in sorted(entries)]
    # The sizes and features `push_to_hub` recorded for a config describe its old files: `datasets` would refuse the
    # rewritten ones (NonMatchingSplitsSizesError). Dropped for the configs written.
    info = header.get("dataset_info")
    if isinstance(info, dict) and info.get("config_name", "default") in configs:
        del header["dataset_info"]
    elif isinstance(info, list):
        kept = [entry for entry in info if not (isinstance(entry, dict) and entry.get("config_name") in configs)]
        if kept:
            header["dataset_info"] = kept
        else:
            del header["dataset_info"]
    if license is not None and header.get("license") is None:
        header = {"license": license, **header}
    card = _card_text(header, body if card_body is None else card_body)
    write_atomically(folder / README, lambda temp: Path(temp).write_text(card, encoding="utf-8"))
    return folder
