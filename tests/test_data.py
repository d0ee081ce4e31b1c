"""Dataset builders on small trees written here: counts, labels, mask alignment, errors naming paths, publishing."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
from PIL import ExifTags, Image

from maeday_hf.data import (
    FOD_CONFIGS,
    LABEL_NAMES,
    MVTEC_CATEGORIES,
    MVTEC_OBJECTS,
    MVTEC_TEXTURES,
    load_fod,
    load_mvtec,
    load_synthetic_dataset,
    push_configs_to_hub,
    select_shots,
    shot_indices,
    write_hub_folder,
)
from maeday_hf.data.publish import read_card

SIZE = (12, 10)  # width, height: not square, so a transposed mask would show
DEFECTS = {"broken": 2, "scratch": 1}


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image(seed: int, grayscale: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (SIZE[1], SIZE[0]) if grayscale else (SIZE[1], SIZE[0], 3)
    return rng.integers(0, 255, shape, dtype=np.uint8)


def _mask(seed: int) -> np.ndarray:
    mask = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    mask[seed % 5 : seed % 5 + 3, 2:6] = 255
    return mask


def write_mvtec_category(root: Path, category: str, grayscale: bool = False) -> Path:
    """3 train good, 2 test good, and DEFECTS test images with masks, in the MVTec AD layout."""
    for index in range(3):
        _save(root / category / "train" / "good" / f"{index:03d}.png", _image(index, grayscale))
    for index in range(2):
        _save(root / category / "test" / "good" / f"{index:03d}.png", _image(10 + index, grayscale))
    for defect, count in DEFECTS.items():
        for index in range(count):
            _save(root / category / "test" / defect / f"{index:03d}.png", _image(20 + index, grayscale))
            _save(root / category / "ground_truth" / defect / f"{index:03d}_mask.png", _mask(index))
    return root


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    write_mvtec_category(root, "bottle")
    write_mvtec_category(root, "grid", grayscale=True)
    return root


def test_category_lists_match_paper():
    assert len(MVTEC_OBJECTS) == 10 and len(MVTEC_TEXTURES) == 5 and len(set(MVTEC_CATEGORIES)) == 15
    assert {"carpet", "grid", "leather", "tile", "wood"} == set(MVTEC_TEXTURES)


@pytest.mark.parametrize("category, mode", [("bottle", "RGB"), ("grid", "L")])
def test_mvtec_counts_labels_and_masks(mvtec_root, category, mode):
    dataset = load_mvtec(mvtec_root, category)
    assert set(dataset) == {"train", "test"}
    assert dataset["test"].features["label"].names == list(LABEL_NAMES)
    train, test = dataset["train"], dataset["test"]
    assert len(train) == 3 and set(train["label"]) == {0} and set(train["defect_type"]) == {"good"}
    assert len(test) == 2 + sum(DEFECTS.values())
    assert sorted(test["defect_type"]) == sorted(["good"] * 2 + [d for d, n in DEFECTS.items() for _ in range(n)])
    for example in test:
        assert example["category"] == category
        assert example["image"].mode == mode and example["image"].size == SIZE
        assert example["label"] == int(example["defect_type"] != "good")
        if example["label"] == 0:
            assert example["mask"] is None
        else:  # aligned: the mask read back is the one written for this image's stem
            stem = Path(example["image"].filename).stem
            assert example["mask"].size == SIZE
            np.testing.assert_array_equal(np.asarray(example["mask"]), _mask(int(stem)))


def _copy_category(mvtec_root: Path, tmp_path: Path, category: str = "bottle") -> Path:
    shutil.copytree(mvtec_root / category, tmp_path / category)
    return tmp_path


def test_missing_mask_names_the_file(mvtec_root, tmp_path):
    root = _copy_category(mvtec_root, tmp_path)
    missing = root / "bottle" / "ground_truth" / "broken" / "001_mask.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_mvtec(root, "bottle")


def test_extra_mask_names_the_file(mvtec_root, tmp_path):
    root = _copy_category(mvtec_root, tmp_path)
    extra = root / "bottle" / "ground_truth" / "scratch" / "007_mask.png"
    _save(extra, _mask(0))
    with pytest.raises(ValueError, match=str(extra)):
        load_mvtec(root, "bottle")


def test_mask_size_mismatch_names_both_files(mvtec_root, tmp_path):
    root = _copy_category(mvtec_root, tmp_path)
    mask = root / "bottle" / "ground_truth" / "scratch" / "000_mask.png"
    _save(mask, np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=f"{mask} is 4x4 but its image .*000.png is 12x10"):
        load_mvtec(root, "bottle")


def test_unknown_category_and_non_mvtec_folder(mvtec_root, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown category 'bottel'.*\['bottle', 'grid'\]"):
        load_mvtec(mvtec_root, "bottel")
    (tmp_path / "bottle" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"bottle/train/good: expected the MVTec AD layout"):
        load_mvtec(tmp_path, "bottle")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_mvtec(tmp_path / "nowhere", "bottle")


@pytest.fixture()
def fod_root(tmp_path) -> Path:
    """indoor: 3 normal frames, 3 object frames; masks for two, boxes for two (one frame has both)."""
    config_dir = tmp_path / "indoor"
    for index in range(3):
        _save(config_dir / "normal" / f"n{index}.png", _image(index, grayscale=False))
        _save(config_dir / "foreign_object" / f"o{index}.png", _image(10 + index, grayscale=False))
    _save(config_dir / "masks" / "o0_mask.png", _mask(0))
    _save(config_dir / "masks" / "o1_mask.png", _mask(1))
    boxes = {"o1.png": [[1, 2, 5, 6]], "o2.png": [[0, 0, 3, 3], [4, 4, 8, 9]]}
    (config_dir / "boxes.json").write_text(json.dumps(boxes))
    return tmp_path


def test_fod_layout(fod_root):
    dataset = load_fod(fod_root, "indoor")
    test = dataset["test"]
    assert list(dataset) == ["test"] and len(test) == 6
    assert test["label"] == [0, 0, 0, 1, 1, 1]
    assert test["defect_type"] == ["good"] * 3 + ["foreign_object"] * 3
    assert [m is not None for m in test["mask"]] == [False] * 3 + [True, True, False]
    assert test["boxes"] == [[], [], [], [], [[1, 2, 5, 6]], [[0, 0, 3, 3], [4, 4, 8, 9]]]
    assert set(test["category"]) == {"indoor"} and FOD_CONFIGS == ("indoor", "outdoor")
    out = write_hub_folder({"indoor": dataset}, fod_root / "hub")
    loaded = datasets.load_dataset(str(out), "indoor", cache_dir=str(fod_root / "cache"))["test"]
    assert loaded["boxes"] == test["boxes"] and loaded.features == test.features


def test_a_frame_without_objects_never_gets_boxes_of_a_namesake(fod_root):
    shutil.copy(fod_root / "indoor" / "normal" / "n0.png", fod_root / "indoor" / "normal" / "o1.png")
    test = load_fod(fod_root, "indoor")["test"]
    boxes = {(name, label): frame_boxes for name, label, frame_boxes in zip(
        [Path(image["path"]).name for image in test.cast_column("image", datasets.Image(decode=False))["image"]],
        test["label"], test["boxes"])}
    assert boxes[("o1.png", 0)] == [] and boxes[("o1.png", 1)] == [[1, 2, 5, 6]]


def test_fod_reference_frames_are_held_out_of_the_test_split(fod_root):
    def paths(split):
        return [image["path"] for image in split.cast_column("image", datasets.Image(decode=False))["image"]]

    full = load_fod(fod_root, "indoor")["test"]
    held = load_fod(fod_root, "indoor", num_reference=2)
    assert list(held) == ["train", "test"] and held["train"]["label"] == [0, 0]
    assert sorted(paths(held["train"]) + paths(held["test"])) == sorted(paths(full))  # a partition
    assert held["test"]["label"] == [0, 1, 1, 1]
    assert paths(load_fod(fod_root, "indoor", num_reference=2)["train"]) == paths(held["train"])  # fixed
    for bad in (3, -1):
        with pytest.raises(ValueError, match="num_reference"):
            load_fod(fod_root, "indoor", num_reference=bad)


def test_fod_errors(fod_root):
    with pytest.raises(ValueError, match="Unknown FOD config 'kitchen'"):
        load_fod(fod_root, "kitchen")
    with pytest.raises(FileNotFoundError, match="outdoor"):
        load_fod(fod_root, "outdoor")
    (fod_root / "indoor" / "boxes.json").write_text(json.dumps({"n0.png": [[0, 0, 1, 1]]}))
    with pytest.raises(ValueError, match=r"\['n0.png'\], which are not frames"):
        load_fod(fod_root, "indoor")
    (fod_root / "indoor" / "boxes.json").unlink()
    stray = fod_root / "indoor" / "masks" / "n1_mask.png"
    _save(stray, _mask(0))
    with pytest.raises(ValueError, match=str(stray)):
        load_fod(fod_root, "indoor")


def test_a_misnamed_fod_mask_folder_or_boxes_file_is_named_not_left_out(fod_root, caplog):
    # The masks and the boxes are optional: `Masks/` or `Boxes.json` loaded as a set with no masks or boxes at all.
    indoor = fod_root / "indoor"
    (indoor / "masks").rename(indoor / "Masks")
    with pytest.raises(ValueError, match=r"Masks is named 'Masks'; the FOD layout reads 'masks'"):
        load_fod(fod_root, "indoor")
    (indoor / "Masks").rename(indoor / "masks")
    (indoor / "boxes.json").rename(indoor / "Boxes.json")
    with pytest.raises(ValueError, match=r"Boxes.json is named 'Boxes.json'; the FOD layout reads 'boxes.json'"):
        load_fod(fod_root, "indoor")
    (indoor / "Boxes.json").unlink()
    (indoor / "boxes.json").mkdir()
    with pytest.raises(ValueError, match=r"boxes.json is a folder; the FOD layout expects a JSON file there"):
        load_fod(fod_root, "indoor")
    (indoor / "boxes.json").rmdir()
    # Beside the right name (a case-sensitive file system), a wrongly cased one is only left out, with a warning.
    (indoor / "Masks").mkdir()
    with caplog.at_level(logging.WARNING):
        assert sum(mask is not None for mask in load_fod(fod_root, "indoor")["test"]["mask"]) == 2
    assert "Masks is left out: the FOD layout reads" in caplog.text
    (indoor / "Masks").rmdir()
    (indoor / "notes.txt").write_text("")
    (indoor / ".DS_Store").write_text("")
    with caplog.at_level(logging.WARNING):
        assert len(load_fod(fod_root, "indoor")["test"]) == 6
    assert "notes.txt is not part of the FOD layout" in caplog.text and ".DS_Store" not in caplog.text


def test_select_shots_deterministic_nested_and_validated(mvtec_root):
    train = load_mvtec(mvtec_root, "bottle")["train"]
    random.seed(123)
    np.random.seed(123)
    first = select_shots(train, 2, seed=0)["image"]
    random.seed(7)
    np.random.seed(7)
    assert [im.filename for im in select_shots(train, 2, seed=0)["image"]] == [im.filename for im in first]
    # Fixed values: the same seed must pick the same shots on every machine and version.
    assert shot_indices(100, 4, seed=0) == [90, 15, 98, 84]
    assert shot_indices(100, 3, seed=1) == shot_indices(100, 4, seed=1)[:3]
    assert len({tuple(shot_indices(100, 4, seed)) for seed in range(3)}) == 3
    with pytest.raises(ValueError, match="k=4 shots from a split of 3"):
        select_shots(train, 4, seed=0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        select_shots(train, 0, seed=0)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        select_shots(list(train), 1, seed=0)
    # Not integers: refused, not read as 1 shot (True) or as some fixed seed of their own (None, 1.5).
    for k, seed, message in ((2.0, 0, r"k must be an integer, got 2\.0"), (True, 0, "k must be an integer"),
                             (1, None, "seed must be an integer, got None"), (1, 1.5, "seed must be an integer")):
        with pytest.raises(TypeError, match=message):
            select_shots(train, k, seed=seed)
    assert shot_indices(100, np.int64(4), seed=np.int64(0)) == shot_indices(100, 4, seed=0)


def test_dry_run_folder_loads_back_without_the_source_files(mvtec_root, tmp_path):
    source = _copy_category(mvtec_root, tmp_path / "src")
    shutil.copytree(mvtec_root / "grid", source / "grid")
    out = tmp_path / "hub"
    write_hub_folder({"bottle": load_mvtec(source, "bottle")}, out, card_body="# MVTec AD\n")
    write_hub_folder({"grid": load_mvtec(source, "grid")}, out)  # a second run adds a config, keeps the first
    shutil.rmtree(source)  # embedded Parquet: nothing refers back to the PNGs
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md",
        "bottle/test-00000-of-00001.parquet",
        "bottle/train-00000-of-00001.parquet",
        "grid/test-00000-of-00001.parquet",
        "grid/train-00000-of-00001.parquet",
    ]
    assert (out / "README.md").read_text().endswith("# MVTec AD\n")
    cache = tmp_path / "cache"
    for category, mode in (("bottle", "RGB"), ("grid", "L")):
        loaded = datasets.load_dataset(str(out), category, cache_dir=str(cache))
        assert loaded["test"].features["label"].names == list(LABEL_NAMES)
        assert len(loaded["train"]) == 3 and len(loaded["test"]) == 5
        example = next(e for e in loaded["test"] if e["label"] == 1)
        assert example["image"].mode == mode and example["mask"].size == SIZE


def test_dry_run_shards_large_splits_and_swaps_each_config_whole(mvtec_root, tmp_path, monkeypatch):
    import maeday_hf.data.publish as publish

    out = tmp_path / "hub"
    cache = tmp_path / "cache"
    bottle = load_mvtec(mvtec_root, "bottle")
    write_hub_folder({"bottle": bottle}, out)
    before = {path.name: path.read_bytes() for path in (out / "bottle").iterdir()}
    # Shards as push_to_hub cuts them (every split here is under a KB or two: a 300-byte bound makes several).
    monkeypatch.setattr(publish, "MAX_SHARD_BYTES", 300)
    grid = load_mvtec(mvtec_root, "grid")
    write_hub_folder({"grid": grid}, out)
    shards = sorted(path.name for path in (out / "grid").iterdir())
    num_shards = {split: min(len(grid[split]), publish._estimated_nbytes(grid[split]) // 300 + 1)  # (a row at least)
                  for split in ("train", "test")}
    assert min(num_shards.values()) > 1
    assert shards == sorted(f"{split}-{index:05d}-of-{count:05d}.parquet"
                            for split, count in num_shards.items() for index in range(count))
    loaded = datasets.load_dataset(str(out), "grid", cache_dir=str(cache / "1"))
    for split in ("train", "test"):  # every row, in order
        assert loaded[split]["label"] == grid[split]["label"]
        assert [np.asarray(image).tolist() for image in loaded[split]["image"]] == [
            np.asarray(image).tolist() for image in grid[split]["image"]]
    # A run that fails while writing a config leaves it as it was (no new train split beside the old test split),
    # and leaves no partial folder.
    real = publish._embedded
    calls = []

    def fail_on_the_second_split(dataset):
        calls.append(len(dataset))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(dataset)

    monkeypatch.setattr(publish, "MAX_SHARD_BYTES", 10**9)
    monkeypatch.setattr(publish, "_embedded", fail_on_the_second_split)
    with pytest.raises(KeyboardInterrupt):
        smaller = datasets.DatasetDict({split: data.select(range(2)) for split, data in bottle.items()})
        write_hub_folder({"bottle": smaller}, out)
    assert {path.name: path.read_bytes() for path in (out / "bottle").iterdir()} == before
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "bottle", "grid"]
    # Written again with one shard per split, the config holds no stale shard of the earlier run.
    monkeypatch.setattr(publish, "_embedded", real)
    write_hub_folder({"grid": grid}, out)
    assert sorted(path.name for path in (out / "grid").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]


def test_dry_run_into_a_file_is_refused_before_any_work(mvtec_root, tmp_path):
    target = tmp_path / "afile"
    target.write_text("notes")
    with pytest.raises(NotADirectoryError, match="afile is a file"):
        write_hub_folder({"bottle": load_mvtec(mvtec_root, "bottle")}, target)
    assert target.read_text() == "notes"


@pytest.mark.parametrize("where", ["train/good/003.png", "test/scratch/001.png", "ground_truth/scratch/000_mask.png"])
def test_a_file_that_is_no_image_is_named_when_the_category_is_listed(mvtec_root, tmp_path, where):
    source = _copy_category(mvtec_root, tmp_path / "src")
    bad = source / "bottle" / where
    if where.startswith("test/"):  # an extra test image needs its mask
        _save(source / "bottle" / "ground_truth" / "scratch" / "001_mask.png", _mask(1))
    bad.write_bytes(b"")  # e.g. a failed download; listed by its suffix
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_mvtec(source, "bottle")


@pytest.mark.parametrize("configs", ["foo", "[{data_files: x}]", "[{config_name: 3}]"])
def test_a_malformed_configs_header_is_one_error_and_nothing_written(mvtec_root, tmp_path, configs):
    (tmp_path / "README.md").write_text(f"---\nconfigs: {configs}\n---\nbody\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"README.md: its `configs:` header is .* expected a list"):
        write_hub_folder({"bottle": load_mvtec(mvtec_root, "bottle")}, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md"]


def test_an_unclosed_or_non_utf8_card_is_one_error_and_a_bom_is_read(mvtec_root, tmp_path):
    from maeday_hf.data.publish import read_card

    readme = tmp_path / "README.md"
    readme.write_text("---\nconfigs:\n- config_name: other\n", encoding="utf-8")
    with pytest.raises(ValueError, match="never closes it"):
        write_hub_folder({"bottle": load_mvtec(mvtec_root, "bottle")}, tmp_path)
    readme.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="README.md is not UTF-8 text"):
        read_card(readme)
    # A Markdown rule opens no header, and an empty header leaves no stray dashes in the body.
    readme.write_text("-----\n# Title\n", encoding="utf-8")
    assert read_card(readme) == ({}, "-----\n# Title\n")
    readme.write_text("---\n---\n# Title\n", encoding="utf-8")
    assert read_card(readme) == ({}, "# Title\n")
    readme.write_text("\ufeff---\nconfigs:\n- config_name: other\n---\nbody\n", encoding="utf-8")
    write_hub_folder({"bottle": load_mvtec(mvtec_root, "bottle")}, tmp_path)
    assert [entry["config_name"] for entry in read_card(readme)[0]["configs"]] == ["bottle", "other"]


def _hub_api(existing_private: bool | None):
    """A mocked `HfApi` class whose repo exists with that visibility (None: created by the push, as asked)."""
    api = mock.MagicMock()
    api.repo_info.return_value.private = existing_private
    return mock.patch("huggingface_hub.HfApi", return_value=api), api


def test_push_calls_one_config_per_category(mvtec_root):
    configs = {name: load_mvtec(mvtec_root, name) for name in ("bottle", "grid")}
    patched, api = _hub_api(existing_private=True)
    with patched, mock.patch.object(datasets.DatasetDict, "push_to_hub", autospec=True) as push:
        push_configs_to_hub(configs, "ORG/mvtec-ad", private=True)
    api.create_repo.assert_called_once_with("ORG/mvtec-ad", repo_type="dataset", private=True, exist_ok=True)
    assert [(c.args[1], c.kwargs["config_name"], c.kwargs["private"]) for c in push.call_args_list] == [
        ("ORG/mvtec-ad", "bottle", True),
        ("ORG/mvtec-ad", "grid", True),
    ]
    assert [c.args[0] for c in push.call_args_list] == [configs["bottle"], configs["grid"]]
    with pytest.raises(ValueError, match="empty"):
        push_configs_to_hub({}, "ORG/mvtec-ad")


def test_a_private_push_into_a_public_repo_pushes_nothing(mvtec_root):
    # push_to_hub sets the visibility only of a repo it creates: the data would have gone out public.
    configs = {"bottle": load_mvtec(mvtec_root, "bottle")}
    patched, api = _hub_api(existing_private=False)
    with patched, mock.patch.object(datasets.DatasetDict, "push_to_hub", autospec=True) as push:
        with pytest.raises(ValueError, match="already exists as a public dataset"):
            push_configs_to_hub(configs, "ORG/mvtec-ad", private=True)
        push_configs_to_hub(configs, "ORG/mvtec-ad")  # (no visibility asked: the repo's own)
    assert push.call_count == 1
    assert api.create_repo.call_args.kwargs["private"] is None  # (an organisation's private default stays)


def test_a_failed_push_is_one_oserror_naming_what_was_pushed(mvtec_root):
    class ConnectError(Exception):  # as huggingface_hub's HTTP client raises it: no OSError
        pass

    configs = {name: load_mvtec(mvtec_root, name) for name in ("bottle", "grid")}
    patched, _ = _hub_api(existing_private=None)

    def second_fails(dataset_dict, repo_id, config_name, **kwargs):
        if config_name == "grid":
            raise ConnectError("[Errno -2] Name or service not known")

    with patched, mock.patch.object(datasets.DatasetDict, "push_to_hub", autospec=True, side_effect=second_fails):
        with pytest.raises(OSError, match=r"ConnectError: \[Errno -2\] .*; configs already pushed: \['bottle'\]"):
            push_configs_to_hub(configs, "ORG/mvtec-ad")


def test_synthetic_set_has_the_same_features(tmp_path):
    dataset = load_synthetic_dataset(tmp_path, "stripes", num_train=2, num_test_good=1, num_test_per_defect=1,
                                     image_size=24)
    assert dataset["test"].features == load_mvtec(tmp_path, "stripes")["test"].features
    assert len(dataset["train"]) == 2 and sum(dataset["test"]["label"]) == len(dataset["test"]) - 1
    with pytest.raises(ValueError, match="Unknown synthetic category"):
        load_synthetic_dataset(tmp_path, "bottle")


@pytest.mark.parametrize("ending", ["---\n", "---", "--- \n"])
def test_dataset_cards_are_read_as_the_hub_reads_them(tmp_path, ending):
    from maeday_hf.data.publish import read_card
    from maeday_hf.protocol import _is_hub_folder

    (tmp_path / "README.md").write_text(f"---\nconfigs:\n- config_name: bottle\n{ending}body\n" if ending != "---"
                                        else "---\nconfigs:\n- config_name: bottle\n---", encoding="utf-8")
    header, _ = read_card(tmp_path / "README.md")
    assert header["configs"] == [{"config_name": "bottle"}] and _is_hub_folder(tmp_path)
    (tmp_path / "README.md").write_bytes(b"---\n\xff\xfe not text\n---\n")
    assert not _is_hub_folder(tmp_path)


def _png_with_exif_after_pixels(path: Path) -> None:
    """Move the eXIf chunk of a PNG behind its pixel data (allowed by the PNG spec, found only by decoding)."""
    data = path.read_bytes()
    chunks, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append(data[position : position + 12 + length])
        position += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    path.write_bytes(data[:8] + b"".join(rest[:-1]) + b"".join(exif) + rest[-1])


@pytest.mark.parametrize("suffix, exif_after_pixels", [(".jpg", False), (".png", False), (".png", True)])
def test_masks_match_the_image_as_shown_with_exif_orientation(tmp_path, suffix, exif_after_pixels):
    from maeday_hf.images import load_rgb_image

    config_dir = tmp_path / "indoor"
    stored = Image.fromarray(_image(0, grayscale=False))  # 12 wide, 10 high as stored
    exif = stored.getexif()
    exif[ExifTags.Base.Orientation] = 6  # a phone held upright: shown 10 wide, 12 high
    for folder in ("normal", "foreign_object"):
        path = config_dir / folder / f"0{suffix}"
        path.parent.mkdir(parents=True)
        stored.save(path, exif=exif)
        if exif_after_pixels:
            _png_with_exif_after_pixels(path)
    mask_path = config_dir / "masks" / "0_mask.png"
    _save(mask_path, np.zeros((12, 10), dtype=np.uint8))  # drawn on the upright photo
    example = load_fod(tmp_path, "indoor")["test"][1]
    upright = (10, 12)
    shown = load_rgb_image(config_dir / "foreign_object" / f"0{suffix}")  # what the pipeline's anomaly map follows
    assert example["image"].size == example["mask"].size == shown.size == upright
    _save(mask_path, np.zeros((10, 12), dtype=np.uint8))  # the stored size: would decode turned against its image
    with pytest.raises(ValueError, match=rf"{mask_path} is 12x10: the stored size .* EXIF orientation 6 .* 10x12"):
        load_fod(tmp_path, "indoor")


def test_hidden_files_and_folders_are_skipped(mvtec_root, tmp_path):
    root = _copy_category(mvtec_root, tmp_path)
    junk = b"\x00\x05\x16\x07 AppleDouble resource fork"
    for folder in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
        (root / "bottle" / folder / "._000.png").write_bytes(junk)
        (root / "bottle" / folder / ".DS_Store").write_bytes(junk)
    (root / "bottle" / "ground_truth" / "broken" / "._000_mask.png").write_bytes(junk)
    for folder in ("test", "ground_truth"):
        (root / "bottle" / folder / ".ipynb_checkpoints").mkdir()
    (root / "bottle" / "test" / ".ipynb_checkpoints" / "000.png").write_bytes(junk)
    dataset = load_mvtec(root, "bottle")
    assert len(dataset["train"]) == 3 and len(dataset["test"]) == 2 + sum(DEFECTS.values())
    assert set(dataset["test"]["defect_type"]) == {"good", *DEFECTS}


@pytest.mark.parametrize("folder, name", [("test/scratch", "000.jpg"), ("ground_truth/scratch", "000_mask.jpg")])
def test_two_files_with_one_stem_are_refused(mvtec_root, tmp_path, folder, name):
    root = _copy_category(mvtec_root, tmp_path)
    twin = root / "bottle" / folder / name
    _save(twin, _mask(0))
    with pytest.raises(ValueError, match=rf"{twin.parent}/000.* and {twin.parent}/000.* share the stem '000'"):
        load_mvtec(root, "bottle")


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"o1.png": [1, 2, 5, 6]}', r"boxes of o1.png are \[1, 2, 5, 6\]; expected a list of boxes"),
        ('{"o1.png": null}', "boxes of o1.png are null; expected a list of boxes"),
        ('{"o1.png": [[1, 2, 5, "6"]]}', r'box \[1, 2, 5, "6"\] of o1.png is not \[x_min, y_min, x_max, y_max\]'),
        ('{"o1.png": [[1, 2, 5]]}', r"box \[1, 2, 5\] of o1.png"),
        ('{"o1.png": [[5, 2, 1, 6]]}', r"box \[5, 2, 1, 6\] of o1.png .* min < max"),
        ('{"o1.png": [[1, 2, NaN, 6]]}', r"box \[1, 2, NaN, 6\] of o1.png .* finite numbers"),
        # Frames are 12x10: a box may end on the frame's edge, not past it, nor start before 0.
        ('{"o1.png": [[1, 2, 13, 6]]}', r"box \[1, 2, 13, 6\] of o1.png reaches outside the frame, which is 12x10"),
        ('{"o1.png": [[1, 2, 5, 10.5]]}', r"box \[1, 2, 5, 10.5\] of o1.png reaches outside the frame"),
        ('{"o1.png": [[-1, 2, 5, 6]]}', r"box \[-1, 2, 5, 6\] of o1.png reaches outside .* 0 <= x_min < x_max <= 12"),
        ('{"o1.png": [[1, 2, 5, 6]]', "is not valid JSON"),
        ("[[1, 2, 5, 6]]", "must hold an object"),
    ],
)
def test_malformed_boxes_are_refused_naming_the_file_and_box(fod_root, content, expected):
    boxes = fod_root / "indoor" / "boxes.json"
    boxes.write_text(content)
    with pytest.raises(ValueError, match=rf"{boxes}.*{expected}"):
        load_fod(fod_root, "indoor")


def test_boxes_are_checked_against_the_frame_as_shown(fod_root):
    frame = fod_root / "indoor" / "foreign_object" / "o2.png"
    boxes = fod_root / "indoor" / "boxes.json"
    boxes.write_text(json.dumps({"o2.png": [[0, 0, 12, 10]]}))  # the whole 12x10 frame
    assert load_fod(fod_root, "indoor")["test"]["boxes"][5] == [[0, 0, 12, 10]]
    stored = Image.open(frame)
    exif = stored.getexif()
    exif[ExifTags.Base.Orientation] = 6  # shown 10 wide, 12 high
    stored.save(frame, exif=exif)
    with pytest.raises(ValueError, match=r"box \[0, 0, 12, 10\] of o2.png reaches outside the frame, which is 10x12"):
        load_fod(fod_root, "indoor")
    boxes.write_text(json.dumps({"o2.png": [[0, 0, 10, 12]]}))
    assert load_fod(fod_root, "indoor")["test"]["boxes"][5] == [[0, 0, 10, 12]]


def test_masks_of_any_mode_read_as_their_grey_level():
    from maeday_hf.data.features import mask_array

    defect = np.zeros((6, 8), dtype=bool)
    defect[2:4, 3:6] = True
    grey = np.where(defect, 255, 0).astype(np.uint8)
    palette = Image.fromarray(np.where(defect, 0, 1).astype(np.uint8), mode="P")  # index 0 is white: the defect
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0, 0, 0] * 254)
    modes = {
        "L": Image.fromarray(grey),
        "P": palette,
        "RGB": Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)),
        "LA": Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=-1), mode="LA"),
        "I;16": Image.fromarray(np.where(defect, 65535, 0).astype(np.uint16)),
        "I;16 labels": Image.fromarray(defect.astype(np.uint16)),  # 0/1: a label image, not a grey level
        "1": Image.fromarray(defect),
    }
    # Painted on a transparent background that holds white: the transparent pixels are not the defect.
    opaque = np.where(defect, 255, 0).astype(np.uint8)
    white = np.full_like(grey, 255)
    modes["RGBA"] = Image.fromarray(np.stack([white, white, white, opaque], axis=-1), mode="RGBA")
    modes["LA transparent"] = Image.fromarray(np.stack([white, opaque], axis=-1), mode="LA")
    transparent_palette = Image.fromarray(np.where(defect, 0, 1).astype(np.uint8), mode="P")
    transparent_palette.putpalette([255, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)  # red defect, white background ...
    transparent_palette.info["transparency"] = 1  # ... that is transparent
    modes["P transparent"] = transparent_palette
    for mode, mask in modes.items():
        values = mask_array(mask)
        assert values.shape == defect.shape and np.array_equal(values > 0, defect), mode


def test_a_damaged_mask_fails_the_protocol_before_anything_runs(tmp_path, tiny_checkpoint):
    from maeday_hf.protocol import ProtocolConfig, prepare_protocol
    from maeday_hf.synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(tmp_path / "data", categories=("disc",), num_train=2, num_test_good=1,
                                 num_test_per_defect=1, image_size=32)
    mask = next((root / "disc" / "ground_truth").rglob("*_mask.png"))
    mask.write_bytes(mask.read_bytes()[:60])  # the header survives (size checks pass), the pixels do not
    config = ProtocolConfig(tiny_checkpoint, str(root), str(tmp_path / "out"), shots=(0,), repetitions=(), plots=False,
                            device="cpu")
    with pytest.raises(ValueError, match=f"Cannot read the ground-truth mask '{mask}'"):
        prepare_protocol(config)
    assert not (tmp_path / "out").exists()


def test_blank_masks_are_found_before_anything_runs(tmp_path, tiny_checkpoint, caplog):
    # All black: the pixel metrics would fail only after every unit was fine-tuned and scored, and again on a rerun.
    from maeday_hf.protocol import ProtocolConfig, prepare_protocol
    from maeday_hf.synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(tmp_path / "data", categories=("disc",), num_train=2, num_test_good=1,
                                 num_test_per_defect=1, image_size=32)
    masks = sorted((root / "disc" / "ground_truth").rglob("*_mask.png"))
    assert len(masks) > 1
    Image.new("L", (32, 32), 0).save(masks[0])
    config = ProtocolConfig(tiny_checkpoint, str(root), str(tmp_path / "out"), shots=(0,), repetitions=(), plots=False,
                            device="cpu")
    with caplog.at_level("WARNING", logger="maeday_hf.protocol"):
        prepare_protocol(config)  # one blank mask among others: the metrics are defined, but it is said
    assert f"1 of {len(masks)} anomalous test images have a ground-truth mask with no anomalous pixel" in caplog.text
    assert masks[0].name in caplog.text
    for mask in masks:
        Image.new("L", (32, 32), 0).save(mask)
    config = dataclasses.replace(config, output_dir=str(tmp_path / "out2"))
    with pytest.raises(ValueError, match="none of the ground-truth masks of its .* marks an anomalous pixel"):
        prepare_protocol(config)
    assert not (tmp_path / "out2").exists()
    prepare_protocol(dataclasses.replace(config, pixel_metrics=False))  # image metrics need no masks


def test_shot_seeds_that_must_select_the_same_shots_are_reported(tmp_path, tiny_checkpoint, caplog):
    from maeday_hf.protocol import ProtocolConfig, prepare_protocol
    from maeday_hf.synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(tmp_path / "data", categories=("disc",), num_train=2, num_test_good=1,
                                 num_test_per_defect=1, image_size=32)
    for shots, expected in (((1,), False), ((1, 2), True)):
        config = ProtocolConfig(tiny_checkpoint, str(root), str(tmp_path / f"out{len(shots)}"), shots=shots,
                                num_shot_seeds=3, repetitions=(), plots=False, device="cpu")
        caplog.clear()
        with caplog.at_level("WARNING", logger="maeday_hf.protocol"):
            prepare_protocol(config)
        assert ("its 3 shot seeds select the same shots" in caplog.text) is expected


def test_a_mask_with_more_than_two_grey_levels_is_reported(tmp_path, tiny_checkpoint, caplog):
    from maeday_hf.protocol import ProtocolConfig, prepare_protocol
    from maeday_hf.synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(tmp_path / "data", categories=("disc",), num_train=2, num_test_good=1,
                                 num_test_per_defect=1, image_size=32)
    mask = next((root / "disc" / "ground_truth").rglob("*_mask.png"))
    values = np.asarray(Image.open(mask)).copy()
    values[0, 0] = 3  # as JPEG compression leaves them
    Image.fromarray(values).save(mask)
    config = ProtocolConfig(tiny_checkpoint, str(root), str(tmp_path / "out"), shots=(0,), repetitions=(), plots=False,
                            device="cpu")
    with caplog.at_level("WARNING", logger="maeday_hf.protocol"):
        prepare_protocol(config)
    assert "1 ground-truth mask(s) have more than two grey levels" in caplog.text and mask.name in caplog.text


def test_a_rewritten_repo_folder_loads_its_new_rows(mvtec_root, tmp_path):
    # datasets.load_dataset(folder, config) caches a local repo folder under its name and card: after a rewrite it
    # gave the old rows (and so did the protocol, whose data digest then saw nothing change).
    from maeday_hf.data import load_hub_folder
    from maeday_hf.protocol import resolve_dataset

    source = _copy_category(mvtec_root, tmp_path / "src")
    out = tmp_path / "mvtec-ad"
    write_hub_folder({"bottle": load_mvtec(source, "bottle")}, out)
    assert len(load_hub_folder(out, "bottle")["test"]) == 5
    assert len(resolve_dataset(str(out)).load("bottle")["test"]) == 5
    (source / "bottle" / "test" / "scratch" / "000.png").unlink()
    (source / "bottle" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    write_hub_folder({"bottle": load_mvtec(source, "bottle")}, out)
    loaded = resolve_dataset(str(out)).load("bottle")
    assert len(loaded["test"]) == 4 and len(load_hub_folder(out, "bottle")["test"]) == 4
    assert loaded["test"].features == load_mvtec(source, "bottle")["test"].features
    with pytest.raises(ValueError, match=r"lists no config 'grid'; it lists \['bottle'\]"):
        load_hub_folder(out, "grid")
    # Other card forms datasets reads: a config given by its data_dir, and its features in the card alone.
    card = (out / "README.md").read_text()
    (out / "README.md").write_text("---\nconfigs:\n- config_name: bottle\n  data_dir: bottle\n---\n")
    assert len(load_hub_folder(out, "bottle")["test"]) == 4
    # A rewrite of a config keeps its `default: true`, not keys describing its old files (data_dir, features).
    (out / "README.md").write_text(card.replace("- config_name: bottle\n", "- config_name: bottle\n  default: true\n"
                                                "  data_dir: bottle\n  features: []\n"))
    write_hub_folder({"bottle": load_mvtec(source, "bottle")}, out)
    entry = read_card(out / "README.md")[0]["configs"][0]
    assert set(entry) == {"config_name", "default", "data_files"} and entry["default"] is True
    assert len(datasets.load_dataset(str(out), "bottle", cache_dir=str(tmp_path / "cache"))["test"]) == 4


def test_splits_digest_follows_the_bytes_and_examples_not_where_the_files_are(mvtec_root, tmp_path):
    from maeday_hf.data.digest import splits_digest

    source = _copy_category(mvtec_root, tmp_path / "src")
    first = splits_digest(load_mvtec(source, "bottle"))
    assert splits_digest(load_mvtec(_copy_category(mvtec_root, tmp_path / "moved"), "bottle")) == first
    # Embedded in Parquet (the published dataset) rather than referenced by path: the same examples, the same digest.
    write_hub_folder({"bottle": load_mvtec(source, "bottle")}, tmp_path / "hub")
    published = datasets.load_dataset(str(tmp_path / "hub"), "bottle", cache_dir=str(tmp_path / "cache"))
    assert splits_digest(published) == first
    # One pixel of one mask, replaced in place: the paths (all `datasets` fingerprints a from_dict by) are the same.
    mask_path = source / "bottle" / "ground_truth" / "scratch" / "000_mask.png"
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = 255 - mask[0, 0]
    Image.fromarray(mask).save(mask_path)
    changed = load_mvtec(source, "bottle")
    assert splits_digest(changed) != first
    # The examples' order and their other columns count too.
    test = changed["test"]
    reordered = datasets.DatasetDict({"train": changed["train"], "test": test.select(range(len(test))[::-1])})
    retyped = test.remove_columns("defect_type").add_column("defect_type", ["other"] * len(test))
    relabelled = datasets.DatasetDict({"train": changed["train"], "test": retyped})
    digests = {splits_digest(changed), splits_digest(reordered), splits_digest(relabelled)}
    assert len(digests) == 3
    # Images nested in other columns are read by their bytes too, never by a decoded object's repr (which holds a
    # memory address: each process would find another digest).
    views = datasets.Features({"image": datasets.Image(), "views": datasets.List(datasets.Image())})
    nested = datasets.Dataset.from_dict(
        {"image": [str(mask_path)], "views": [[str(mask_path), str(mask_path)]]}, features=views)
    first_nested = splits_digest(datasets.DatasetDict({"train": nested}))
    assert first_nested == splits_digest(datasets.DatasetDict({"train": nested.select([0])}))
    Image.fromarray(255 - mask).save(mask_path)
    assert splits_digest(datasets.DatasetDict({"train": nested})) != first_nested
    # Dates, times and decimals are read by value (a type the digest cannot read is refused, never hashed by repr).
    from datetime import datetime, timedelta
    from decimal import Decimal

    def dated(when):
        return datasets.DatasetDict({"test": datasets.Dataset.from_dict(
            {"taken": [when], "exposure": [timedelta(milliseconds=5)], "gain": [Decimal("1.5")]})})

    assert splits_digest(dated(datetime(2024, 1, 1))) == splits_digest(dated(datetime(2024, 1, 1)))
    assert splits_digest(dated(datetime(2024, 1, 1))) != splits_digest(dated(datetime(2024, 1, 2)))
    mask_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"Category 'bottle' test example \d+: cannot read .*000_mask.png"):
        splits_digest(changed, "Category 'bottle'")


def test_the_card_names_the_licence_and_an_owners_licence_is_kept(mvtec_root, tmp_path):
    # MVTec AD is CC BY-NC-SA 4.0: its published card says so by default (maeday-publish-dataset), in the dry run and
    # in the push (one commit more, before the configs: an id the Hub refuses stops the push before they go in).
    from maeday_hf.commands import publish_dataset

    out = tmp_path / "repo"
    assert publish_dataset.main(["mvtec", "--root", str(mvtec_root), "--categories", "bottle", "--dry-run",
                                 str(out)]) == 0
    assert read_card(out / "README.md")[0]["license"] == "cc-by-nc-sa-4.0"
    readme = out / "README.md"
    readme.write_text(readme.read_text().replace("license: cc-by-nc-sa-4.0", "license: other"))
    write_hub_folder({"grid": load_mvtec(mvtec_root, "grid")}, out, license="cc-by-nc-sa-4.0")
    assert read_card(readme)[0]["license"] == "other"  # (the owner's)
    configs = {"bottle": load_mvtec(mvtec_root, "bottle")}
    pushed_card = tmp_path / "pushed-README.md"
    pushed_card.write_text("---\nconfigs:\n- config_name: bottle\n  data_files: bottle/*\n---\n# MVTec AD\n")
    patched, api = _hub_api(existing_private=None)
    api.hf_hub_download.return_value = str(pushed_card)
    with patched, mock.patch.object(datasets.DatasetDict, "push_to_hub", autospec=True) as push:
        api.attach_mock(push, "push_to_hub")  # (one call record: the order of the card's and the configs' commits)
        push_configs_to_hub(configs, "ORG/mvtec-ad", license="cc-by-nc-sa-4.0")
    api.hf_hub_download.assert_called_once_with("ORG/mvtec-ad", "README.md", repo_type="dataset", force_download=True)
    assert [name for name, *_ in api.mock_calls if name in ("upload_file", "push_to_hub")] == [
        "upload_file", "push_to_hub"]
    upload = api.upload_file.call_args.kwargs
    assert (upload["path_in_repo"], upload["repo_id"], upload["repo_type"]) == ("README.md", "ORG/mvtec-ad", "dataset")
    uploaded = tmp_path / "uploaded.md"
    uploaded.write_bytes(upload["path_or_fileobj"])
    header, body = read_card(uploaded)
    assert header["license"] == "cc-by-nc-sa-4.0" and header["configs"][0]["config_name"] == "bottle"
    assert body == "# MVTec AD\n"
    # A card naming a licence already: nothing uploaded; and none asked for: nothing read.
    pushed_card.write_text("---\nlicense: other\n---\n")
    for license in ("cc-by-nc-sa-4.0", None):
        patched, api = _hub_api(existing_private=None)
        api.hf_hub_download.return_value = str(pushed_card)
        with patched, mock.patch.object(datasets.DatasetDict, "push_to_hub", autospec=True):
            push_configs_to_hub(configs, "ORG/mvtec-ad", license=license)
        assert not api.upload_file.called
        assert api.hf_hub_download.called == (license is not None)
    # A new repo (no card yet): a card naming the licence alone, which push_to_hub then fills in.
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    patched, api = _hub_api(existing_private=None)
    api.hf_hub_download.side_effect = EntryNotFoundError("README.md")
    with patched, mock.patch.object(datasets.DatasetDict, "push_to_hub", autospec=True) as push:
        push_configs_to_hub(configs, "ORG/mvtec-ad", license="cc-by-nc-sa-4.0")
    uploaded.write_bytes(api.upload_file.call_args.kwargs["path_or_fileobj"])
    assert read_card(uploaded) == ({"license": "cc-by-nc-sa-4.0"}, "") and push.call_count == 1
    # The Hub refusing the licence id, or not answering when asked for the card: no config pushed, and said so.
    for failure in ("upload", "download"):
        patched, api = _hub_api(existing_private=None)
        api.hf_hub_download.side_effect = EntryNotFoundError("README.md")
        if failure == "upload":
            api.upload_file.side_effect = RuntimeError("400 Bad Request: invalid license id")
        else:
            api.hf_hub_download.side_effect = LocalEntryNotFoundError("503: cannot reach the Hub")
        with patched, mock.patch.object(datasets.DatasetDict, "push_to_hub", autospec=True) as push:
            with pytest.raises(OSError, match=r"nothing was pushed"):
                push_configs_to_hub(configs, "ORG/mvtec-ad", license="cc-by-nc-sa-4.0")
        assert not push.called and api.upload_file.called == (failure == "upload")
    # The card committed, then the first config refused: said as it is.
    patched, api = _hub_api(existing_private=None)
    api.hf_hub_download.side_effect = EntryNotFoundError("README.md")
    with patched, mock.patch.object(datasets.DatasetDict, "push_to_hub", autospec=True,
                                    side_effect=RuntimeError("502 Bad Gateway")):
        with pytest.raises(OSError, match=r"502 Bad Gateway\); the card naming the licence was committed, no config "
                                          r"was pushed\."):
            push_configs_to_hub(configs, "ORG/mvtec-ad", license="cc-by-nc-sa-4.0")


# --- pinned by a mutation review ----------------------------------------------------------------------------------


def test_k_may_be_every_example():
    assert sorted(shot_indices(3, 3, seed=0)) == [0, 1, 2]


def test_a_zero_one_label_mask_and_half_transparent_paint_count_as_defect():
    import io

    from maeday_hf.data.features import check_mask, mask_array

    labels = np.zeros((6, 8), np.uint8)
    labels[2:4, 3:6] = 1  # a label mask: 1 is the defect, not "almost black"
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG")
    assert check_mask({"bytes": buffer.getvalue(), "path": None}, "labels").num_anomalous_pixels == 6
    white = np.full((6, 8), 255, np.uint8)
    painted = Image.fromarray(np.stack([white, white, white, labels * 128], axis=-1), mode="RGBA")
    assert np.array_equal(mask_array(painted) > 0, labels > 0)  # paint at alpha 128 is still paint


def test_fod_holds_out_at_most_half_of_an_odd_number_of_normal_frames(tmp_path):
    from maeday_hf.data import load_fod_with_references

    for folder, count in (("normal", 7), ("foreign_object", 2)):
        (tmp_path / "indoor" / folder).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index * 20, 0, 0)).save(tmp_path / "indoor" / folder / f"{index:03d}.png")
    splits = load_fod_with_references(tmp_path, "indoor")
    assert len(splits["train"]) == 3 and len(splits["test"]) == 6  # 3 of 7, not 4


def test_a_ground_truth_file_without_the_mask_suffix_is_refused(tmp_path):
    from maeday_hf.synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(tmp_path / "data", categories=("disc",), num_train=2, num_test_good=1,
                                 num_test_per_defect=1, image_size=32)
    mask = next((root / "disc" / "ground_truth").rglob("*_mask.png"))
    renamed = mask.with_name(mask.name.replace("_mask", ""))  # 000.png: the image's name, not its mask's
    mask.rename(renamed)
    with pytest.raises(ValueError, match=f"without a matching image: .*{renamed.name}"):
        load_mvtec(root, "disc")
