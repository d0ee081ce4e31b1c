"""maeday-publish-dataset (scripts/publish_dataset.py in a clone): the configs found under --root by default; user
errors as one line and exit status 2."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import load_script
from maeday_hf.commands import publish_dataset as publish_script
from maeday_hf.data import load_hub_folder


def test_the_clones_script_is_the_installed_program():
    script = load_script("publish_dataset")
    assert script.main is publish_script.main and script.program is publish_script.program


@pytest.fixture()
def fod_root(tmp_path) -> Path:
    """Only the `indoor` surface: one frame without and one with an object."""
    for folder in ("normal", "foreign_object"):
        path = tmp_path / "fod" / "indoor" / folder / "0.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(path)
    return tmp_path / "fod"


def test_default_publishes_the_configs_found_under_root(fod_root, tmp_path):
    out = tmp_path / "hub"
    assert publish_script.main(["fod", "--root", str(fod_root), "--dry-run", str(out)]) == 0
    assert datasets.get_dataset_config_names(str(out)) == ["indoor"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["fod", "--categories", "indoor", "outdoor"], r"No fod config\(s\) \['outdoor'\] under .*fod; available: "
                                                       r"\['indoor'\]\."),
        (["synthetic", "--categories", "stripes", "nope"], r"No synthetic config\(s\) \['nope'\] under .*; "
                                                           r"available: \['stripes', "),
        (["mvtec"], r"No mvtec configs found under .*fod; expected <root>/<category>/train or test\."),
    ],
)
def test_user_errors_are_one_line_and_exit_status_2(fod_root, tmp_path, capsys, argv, expected):
    dataset, *options = argv
    argv = [dataset, "--root", str(fod_root), *options, "--dry-run", str(tmp_path / "hub")]
    assert publish_script.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("maeday-publish-dataset: error: ")
    assert re.search(expected, error), error
    assert not (tmp_path / "hub").exists() and not (fod_root / "stripes").exists()


def test_a_dry_run_into_a_file_stops_before_anything_is_loaded(tmp_path, capsys):
    (tmp_path / "afile").write_text("notes")
    argv = ["synthetic", "--root", str(tmp_path / "synthetic"), "--dry-run", str(tmp_path / "afile")]
    assert publish_script.main(argv) == 2
    assert capsys.readouterr().err == (f"maeday-publish-dataset: error: {tmp_path / 'afile'} is a file; the dataset "
                                       f"repo is written as a folder there (give a folder, new or written before).\n")
    assert not (tmp_path / "synthetic").exists() and (tmp_path / "afile").read_text() == "notes"


def test_missing_root_is_named(tmp_path, capsys):
    assert publish_script.main(["mvtec", "--root", str(tmp_path / "nowhere"), "--dry-run", str(tmp_path / "hub")]) == 2
    assert capsys.readouterr().err == f"maeday-publish-dataset: error: The mvtec root {tmp_path / 'nowhere'} is not a folder.\n"


def test_a_dry_run_never_replaces_the_datasets_own_folders(fod_root, tmp_path, capsys):
    # `--dry-run` pointed at --root replaced each category folder (its frames and masks) with Parquet, exit 0.
    frames = sorted(p.relative_to(fod_root) for p in fod_root.rglob("*") if p.is_file())
    for dry_run in (fod_root, fod_root / "repo", tmp_path):  # the same folder, inside it, around it
        assert publish_script.main(["fod", "--root", str(fod_root), "--dry-run", str(dry_run)]) == 2
        assert "overlap" in capsys.readouterr().err
    assert sorted(p.relative_to(fod_root) for p in fod_root.rglob("*") if p.is_file()) == frames
    # Through the API, or a folder of the user's named like a config: refused before anything is written.
    from maeday_hf.data import write_hub_folder
    from maeday_hf.data.fod import load_fod

    out = tmp_path / "hub"
    (out / "indoor").mkdir(parents=True)
    (out / "indoor" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"indoor holds 'notes.txt', which is not a Parquet shard"):
        write_hub_folder({"indoor": load_fod(fod_root, "indoor")}, out)
    assert sorted(p.name for p in out.iterdir()) == ["indoor"]
    (out / "indoor" / "notes.txt").unlink()
    write_hub_folder({"indoor": load_fod(fod_root, "indoor")}, out)  # (an empty folder, or a dry run's, is fine)
    write_hub_folder({"indoor": load_fod(fod_root, "indoor")}, out)
    assert sorted(p.suffix for p in (out / "indoor").iterdir()) == [".parquet"]


def test_a_rewritten_config_drops_its_stale_dataset_info_and_keeps_its_entry(fod_root, tmp_path):
    # A clone of a pushed repo carries `dataset_info` (split sizes); a rewrite with other sizes must still load.
    import yaml

    from maeday_hf.data import write_hub_folder
    from maeday_hf.data.fod import load_fod

    out = tmp_path / "hub"
    write_hub_folder({"indoor": load_fod(fod_root, "indoor")}, out)
    header, body = (out / "README.md").read_text().split("---\n")[1:3]
    card = yaml.safe_load(header)
    card["configs"][0]["default"] = True
    card["dataset_info"] = [
        {"config_name": "indoor", "splits": [{"name": "test", "num_examples": 99}]},
        {"config_name": "other", "splits": [{"name": "test", "num_examples": 3}]},
    ]
    (out / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n{body}")
    write_hub_folder({"indoor": load_fod(fod_root, "indoor")}, out)
    rewritten = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert rewritten["dataset_info"] == [{"config_name": "other", "splits": [{"name": "test", "num_examples": 3}]}]
    assert rewritten["configs"][0]["default"] is True
    loaded = datasets.load_dataset(str(out), "indoor", cache_dir=str(tmp_path / "cache"))
    assert len(loaded["test"]) == len(load_fod(fod_root, "indoor")["test"])


def test_a_config_name_its_glob_pattern_would_not_find_is_refused(fod_root, tmp_path):
    # Written without error, `bottle[1]/test-*` then matched nothing when loaded ("all the data_files are invalid").
    from maeday_hf.data import push_configs_to_hub, write_hub_folder
    from maeday_hf.data.fod import load_fod

    dataset = load_fod(fod_root, "indoor")
    for name in ("bottle[1]", "a*", "x/y", ".hidden", ""):
        with pytest.raises(ValueError, match="cannot name a dataset config"):
            write_hub_folder({name: dataset}, tmp_path / "hub")
        with pytest.raises(ValueError, match="cannot name a dataset config"):
            push_configs_to_hub({name: dataset}, "ORG/x")
    assert not (tmp_path / "hub").exists()


def test_a_config_that_cannot_be_evaluated_is_published_with_a_warning(fod_root, tmp_path, caplog):
    assert publish_script.main(["fod", "--root", str(fod_root), "--dry-run", str(tmp_path / "both")]) == 0
    assert "needs both" not in caplog.text
    # No frame with an object: the set publishes, but maeday-evaluate refuses it (image ROC-AUC needs both classes).
    (fod_root / "indoor" / "foreign_object" / "0.png").unlink()
    out = tmp_path / "hub"
    assert publish_script.main(["fod", "--root", str(fod_root), "--dry-run", str(out)]) == 0
    assert "fod config 'indoor': its test split has 1 good and 0 anomalous images; maeday-evaluate needs both" in (
        caplog.text
    )
    assert load_hub_folder(out, "indoor")["test"]["label"] == [0]
