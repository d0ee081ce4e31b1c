"""The synthetic defect generator: determinism, exact masks, MVTec layout."""

from __future__ import annotations

import numpy as np
import pytest

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
    # Below 16 px a defect can vanish from its mask; over 1,000 images a split repeats the next one's seeds; an empty
    # split would write a category the MVTec loaders refuse.
    with pytest.raises(ValueError, match=fragment):
        write_synthetic_mvtec(tmp_path, categories=("disc",), **kwargs)
    assert not (tmp_path / "disc").exists()
