"""The synthetic defect generator: determinism, exact masks, MVTec layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from maeday_hf.synthetic import CATEGORIES, DEFECT_TYPES, make_normal_image, make_sample, write_synthetic_mvtec


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_defect_changes_exactly_the_masked_pixels(category, defect_type):
    normal = np.asarray(make_normal_image(category, 64, seed=4)).astype(int)
    defective, mask = make_sample(category, defect_type, 64, seed=4)
    changed = np.abs(np.asarray(defective).astype(int) - normal).sum(-1) > 0
    masked = np.asarray(mask) > 0
    assert masked.sum() > 4
    assert not (changed & ~masked).any()
    assert changed[masked].mean() > 0.8


@pytest.mark.parametrize("category", CATEGORIES)
def test_deterministic_per_seed_and_varied_across_seeds(category):
    a, _ = make_sample(category, "stain", 48, seed=1)
    b, _ = make_sample(category, "stain", 48, seed=1)
    c, _ = make_sample(category, "stain", 48, seed=2)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="'carpet'"):
        make_normal_image("carpet")
    with pytest.raises(ValueError, match="'crack'"):
        make_sample("disc", "crack")


def test_mvtec_layout(tmp_path):
    root = write_synthetic_mvtec(tmp_path, categories=("wood",), num_train=2, num_test_good=1,
                                 num_test_per_defect=2, image_size=32)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    assert len(files) == 2 + 1 + 2 * len(DEFECT_TYPES) * 2
    assert "wood/train/good/001.png" in files and "wood/ground_truth/hole/001_mask.png" in files


@pytest.mark.parametrize(
    "kwargs, fragment",
    [(dict(image_size=8), "image_size"), (dict(seed=-1), "seed"), (dict(num_train=1001), "num_train"),
     (dict(num_test_good=-1), "num_test_good"), (dict(num_test_good=0), "num_test_good"),
     (dict(num_test_per_defect=0), "num_test_per_defect"), (dict(num_train=0), "num_train")],
)
def test_settings_that_would_make_a_wrong_set_are_refused(tmp_path, kwargs, fragment):
    # Below 24 px a defect can vanish from its mask; over 1,000 images a split repeats the next one's seeds; an empty
    # split would write a category the MVTec loaders refuse.
    with pytest.raises(ValueError, match=fragment):
        write_synthetic_mvtec(tmp_path, categories=("disc",), **kwargs)
    assert not (tmp_path / "disc").exists()


def test_a_folder_of_real_images_is_never_replaced(tmp_path):
    # "wood" is an MVTec AD category too: a real dataset root must survive a mistaken `maeday synthetic` into it.
    real = tmp_path / "mvtec" / "wood"
    (real / "train" / "good").mkdir(parents=True)
    (real / "train" / "good" / "real_0001.png").write_bytes(b"real")
    (real / "notes.txt").write_text("line 3")
    with pytest.raises(ValueError, match=r"mvtec/wood' exists and holds no .maeday-synthetic.json"):
        write_synthetic_mvtec(tmp_path / "mvtec", categories=("disc", "wood"), num_train=1, num_test_good=1,
                              num_test_per_defect=1, image_size=24)
    assert (real / "train" / "good" / "real_0001.png").read_bytes() == b"real"
    assert (real / "notes.txt").read_text() == "line 3"
    assert sorted(p.name for p in (tmp_path / "mvtec").iterdir()) == ["wood"]  # refused before anything was written


def test_a_synthetic_category_or_an_empty_folder_is_rewritten(tmp_path):
    from maeday_hf.synthetic import SYNTHETIC_MARKER, written_settings

    (tmp_path / "disc").mkdir()
    small = dict(num_train=1, num_test_good=1, num_test_per_defect=1)
    write_synthetic_mvtec(tmp_path, categories=("disc",), image_size=24, **small)
    assert written_settings(tmp_path / "disc") == {"category": "disc", "image_size": 24, "seed": 0, **small}
    write_synthetic_mvtec(tmp_path, categories=("disc",), image_size=32, **small)
    assert Image.open(tmp_path / "disc" / "train" / "good" / "000.png").size == (32, 32)
    assert (tmp_path / "disc" / SYNTHETIC_MARKER).is_file()


def test_a_failed_write_leaves_no_folder_it_created(tmp_path, monkeypatch):
    import maeday_hf.synthetic as synthetic

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "_write_category", fail)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_mvtec(tmp_path / "a" / "b", categories=("disc",), image_size=24)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"image_size must be an integer in \[24, 4096\].*got 100000"):
        write_synthetic_mvtec(tmp_path / "c", categories=("disc",), image_size=100_000)
    assert list(tmp_path.iterdir()) == []


def test_the_synthetic_dataset_is_written_again_for_other_settings(tmp_path):
    from maeday_hf.data import load_synthetic_dataset

    first = load_synthetic_dataset(tmp_path, "disc", num_train=1, num_test_good=1, num_test_per_defect=1,
                                   image_size=24)
    assert first["train"].num_rows == 1
    again = load_synthetic_dataset(tmp_path, "disc", num_train=2, num_test_good=1, num_test_per_defect=1,
                                   image_size=24)
    assert again["train"].num_rows == 2  # not the folder written for one train image
    stamp = (tmp_path / "disc" / "train" / "good" / "000.png").stat().st_mtime_ns
    load_synthetic_dataset(tmp_path, "disc", num_train=2, num_test_good=1, num_test_per_defect=1, image_size=24)
    assert (tmp_path / "disc" / "train" / "good" / "000.png").stat().st_mtime_ns == stamp  # same settings: kept


def test_the_synthetic_dataset_as_written_is_loaded_when_no_setting_is_asked_for(tmp_path):
    from maeday_hf.data import load_synthetic_dataset

    write_synthetic_mvtec(tmp_path, categories=("disc",), num_train=3, num_test_good=1, num_test_per_defect=1,
                          image_size=24)
    assert load_synthetic_dataset(tmp_path, "disc")["train"].num_rows == 3  # not rewritten at the defaults (8)
    assert load_synthetic_dataset(tmp_path, "disc", image_size=24)["train"].num_rows == 3


def test_a_real_folder_that_appears_while_the_set_is_written_survives(tmp_path, monkeypatch):
    import maeday_hf.synthetic as synthetic

    original = synthetic.replace_folder

    def someone_copies_data_in_first(finished, target, **kwargs):
        # After every check before the swap: only a check of what the swap moves aside can see it.
        (tmp_path / "disc" / "train").mkdir(parents=True)
        (tmp_path / "disc" / "train" / "real.png").write_bytes(b"real")
        return original(finished, target, **kwargs)

    monkeypatch.setattr(synthetic, "replace_folder", someone_copies_data_in_first)
    with pytest.raises(ValueError, match="holds no .maeday-synthetic.json"):
        write_synthetic_mvtec(tmp_path, categories=("disc",), num_train=1, num_test_good=1, num_test_per_defect=1,
                              image_size=24)
    assert (tmp_path / "disc" / "train" / "real.png").read_bytes() == b"real"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["disc"]  # put back; nothing else left


def test_a_synthetic_category_without_its_settings_is_loaded_as_it_is_and_said(tmp_path, caplog):
    from maeday_hf.data import load_synthetic_dataset
    from maeday_hf.synthetic import SYNTHETIC_MARKER

    write_synthetic_mvtec(tmp_path, categories=("disc",), num_train=3, num_test_good=1, num_test_per_defect=1,
                          image_size=24)
    (tmp_path / "disc" / SYNTHETIC_MARKER).unlink()  # as an older maeday-hf wrote it
    with caplog.at_level("WARNING", logger="maeday_hf.data.synthetic"):
        assert load_synthetic_dataset(tmp_path, "disc", num_train=1)["train"].num_rows == 3
    assert "records no settings" in caplog.text and "'num_train': 1" in caplog.text
