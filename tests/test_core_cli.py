"""The `maeday` command: outputs on disk, and one-line errors without tracebacks."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import make_tiny_model
from maeday_hf.cli import main
from maeday_hf.synthetic import write_synthetic_mvtec


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return write_synthetic_mvtec(
        tmp_path_factory.mktemp("synthetic"), categories=("stripes",), num_train=1, num_test_good=2,
        num_test_per_defect=1, image_size=48,
    )


def test_detect_writes_scores_and_heatmaps(synthetic_root, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["detect", str(synthetic_root / "stripes" / "test"), "--model", tiny_checkpoint, "--out", str(out),
                   "--num-masks", "3", "--threshold", "1.5", "--device", "cpu", "--batch-size", "2", "--quiet"])
    assert status == 0
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"].split("test/")[1] for row in rows] == [
        "good/000.png", "good/001.png", "hole/000.png", "scratch/000.png", "stain/000.png"
    ]
    for row in rows:
        assert row["label"] == ("anomalous" if float(row["score"]) > 1.5 else "normal")
    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert heatmaps == ["good__000.png", "good__001.png", "hole__000.png", "scratch__000.png", "stain__000.png"]
    assert [row["heatmap"] for row in rows] == heatmaps  # (each row names its image's heatmap)
    assert Image.open(out / "heatmaps" / "hole__000.png").size == (48, 48)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    assert "Scored 5 images" in capsys.readouterr().out


@pytest.mark.parametrize("precision, bf16", [("auto", None), ("fp32", False), ("bf16", True)])
def test_scores_match_the_pipeline(synthetic_root, tiny_checkpoint, tmp_path, precision, bf16):
    from transformers import pipeline

    image = synthetic_root / "stripes" / "test" / "hole" / "000.png"
    main(["detect", str(image), "--model", tiny_checkpoint, "--out", str(tmp_path), "--num-masks", "4", "--quiet",
          "--precision", precision])
    with open(tmp_path / "scores.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    detector = pipeline("anomaly-detection", model=tiny_checkpoint)
    expected = detector(str(image), num_masks=4, **({} if bf16 is None else {"bf16": bf16}))["score"]
    assert float(row["score"]) == pytest.approx(expected, rel=1e-5)
    if bf16 is not None:  # the two precisions really differ, so the option reached the model
        other = detector(str(image), num_masks=4, bf16=not bf16)["score"]
        assert float(row["score"]) != pytest.approx(other, rel=1e-6)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--num-masks", "0"], "num_masks must be >= 1, got 0"),
        (["--mask-ratio", "1.0"], "mask_ratio must be in [0, 1)"),
        (["--mask-batch-size", "0"], "mask_batch_size must be >= 1"),
        (["--device", "nonsense"], "device='nonsense' is not a device"),
        (["--device", "cuda:7"], "device='cuda:7', but"),
        (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    ],
)
def test_bad_options_print_one_line(synthetic_root, tiny_checkpoint, tmp_path, capsys, extra, fragment):
    image = str(synthetic_root / "stripes" / "test" / "good" / "000.png")
    status = main(["detect", image, "--model", tiny_checkpoint, "--out", str(tmp_path / "o"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("maeday: error:") and fragment in err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "scores.csv").exists()


def test_bad_inputs_print_one_line(tiny_checkpoint, tmp_path, capsys):
    import io

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"garbage")
    valid = tmp_path / "valid" / "ok.png"
    valid.parent.mkdir()
    Image.new("RGB", (32, 32)).save(valid)
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(encoded, "PNG")
    damaged = tmp_path / "damaged" / "cut.png"  # a good header, then half the pixels: found only when decoded
    damaged.parent.mkdir()
    damaged.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    empty = tmp_path / "empty"
    empty.mkdir()
    without_processor = tmp_path / "model-without-processor"
    make_tiny_model().save_pretrained(without_processor)
    capsys.readouterr()  # (saving may draw a progress bar)
    cases = [
        (["detect", str(valid), "--model", str(without_processor), "--out", str(tmp_path)],
         "from its folder: Can't load image processor"),
        (["detect", str(tmp_path / "absent.png"), "--model", tiny_checkpoint, "--out", str(tmp_path)], "absent.png"),
        (["detect", str(empty), "--model", tiny_checkpoint, "--out", str(tmp_path)], "no images"),
        (["detect", str(corrupt), "--model", tiny_checkpoint, "--out", str(tmp_path)], "broken.png"),
        (["detect", str(valid), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path)], "no-model"),
        (["detect", str(valid), "--model", "org/not-cached", "--out", str(tmp_path)], "org/not-cached"),
        (["detect", str(corrupt), "--model", tiny_checkpoint, "--out", str(corrupt)], "is a file; expected a folder"),
        (["detect", str(damaged.parent), "--model", tiny_checkpoint, "--out", str(tmp_path / "o"), "--num-workers",
          "1", "--device", "cpu"], "cut.png"),  # the worker process's own message, not "Caught ValueError in ..."
        # Not an image at all: found from its header before the model loads.
        (["detect", str(valid), str(corrupt), "--model", str(tmp_path / "no-model"), "--out",
          str(tmp_path / "o" / "deeper" / "out")], "broken.png' as an image"),
    ]
    for argv, fragment in cases:
        assert main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # a failed run leaves none of the (empty) folders it created


def test_skip_unreadable_leaves_out_damaged_images_and_scores_the_rest(
    synthetic_root, tiny_checkpoint, tmp_path, capsys, caplog
):
    # A batch of inspection images where one copy was cut short and one is not an image: by default the run stops (at
    # the header for the second, when decoding for the first); with --skip-unreadable both are named and left out,
    # and the others score as they would alone.
    folder = tmp_path / "batch"
    shutil.copytree(synthetic_root / "stripes" / "test" / "good", folder)
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(encoded, "PNG")
    (folder / "cut.png").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    (folder / "notes.png").write_bytes(b"not an image")
    argv = ["detect", str(folder), "--model", tiny_checkpoint, "--num-masks", "2", "--device", "cpu", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "stopped")]) == 2
    assert "notes.png" in capsys.readouterr().err and not (tmp_path / "stopped").exists()

    assert main([*argv, "--out", str(tmp_path / "out"), "--skip-unreadable"]) == 0
    assert "Scored 2 images (2 unreadable left out" in capsys.readouterr().out
    left_out = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Left out:")]
    assert len(left_out) == 2 and "cut.png' as an image: image file is truncated" in left_out[0]
    assert "notes.png" in left_out[1]
    with open(tmp_path / "out" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"].rsplit("/", 1)[1] for row in rows] == ["000.png", "001.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "heatmaps").iterdir()) == ["000.png", "001.png"]
    assert main(["detect", str(synthetic_root / "stripes" / "test" / "good"), *argv[2:], "--out",
                 str(tmp_path / "alone")]) == 0
    with open(tmp_path / "alone" / "scores.csv") as handle:
        assert [row["score"] for row in csv.DictReader(handle)] == [row["score"] for row in rows]
    # Nothing readable at all: one line.
    (tmp_path / "none").mkdir()
    shutil.copy(folder / "cut.png", tmp_path / "none" / "cut.png")
    capsys.readouterr()
    assert main(["detect", str(tmp_path / "none"), *argv[2:], "--out", str(tmp_path / "o2"), "--skip-unreadable"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the 1 images could be read" in err


def test_synthetic_into_a_file_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("kept")
    assert main(["synthetic", str(tmp_path / "afile"), "--categories", "disc", "--image-size", "32"]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "kept"


def test_synthetic_command_writes_the_layout(tmp_path, capsys):
    assert main(["synthetic", str(tmp_path / "syn"), "--categories", "disc", "--image-size", "32"]) == 0
    assert (tmp_path / "syn" / "disc" / "ground_truth" / "scratch" / "000_mask.png").exists()
    mask = np.asarray(Image.open(tmp_path / "syn" / "disc" / "ground_truth" / "hole" / "000_mask.png"))
    assert set(np.unique(mask)) <= {0, 255} and mask.any()


def test_names_from_several_folders_keep_their_category(tmp_path):
    from maeday_hf.cli import collect_images

    root = write_synthetic_mvtec(tmp_path, categories=("disc", "wood"), num_train=1, num_test_good=1,
                                 num_test_per_defect=1, image_size=32)
    names = [name for _, name in collect_images([str(root / "disc" / "test"), str(root / "wood" / "test")])]
    assert "disc__test__good__000" in names and "wood__test__hole__000" in names and len(set(names)) == len(names)
    assert [name for _, name in collect_images([str(root / "disc" / "test" / "good" / "000.png")])] == ["000"]


def test_a_second_run_into_the_input_folder_scores_the_same_images(tmp_path, tiny_checkpoint):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # unreadable sidecar: skipped
    (folder / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (32, 32)).save(folder / ".ipynb_checkpoints" / "0-checkpoint.png")
    argv = ["detect", str(folder), "--model", tiny_checkpoint, "--out", str(folder), "--num-masks", "2", "--quiet",
            "--device", "cpu"]
    for _ in range(2):
        assert main(argv) == 0
        with open(folder / "scores.csv", newline="") as file:
            assert [row["path"] for row in csv.DictReader(file)] == [str(folder / "0.png"), str(folder / "1.png")]


def test_worker_processes_give_the_same_scores(synthetic_root, tiny_checkpoint, tmp_path):
    folder = str(synthetic_root / "stripes" / "test")
    common = ["--model", tiny_checkpoint, "--num-masks", "2", "--quiet", "--device", "cpu", "--batch-size", "2"]
    assert main(["detect", folder, "--out", str(tmp_path / "a"), "--num-workers", "0", *common]) == 0
    assert main(["detect", folder, "--out", str(tmp_path / "b"), "--num-workers", "2", *common]) == 0
    assert (tmp_path / "a" / "scores.csv").read_text() == (tmp_path / "b" / "scores.csv").read_text()


def test_verbose_before_or_after_the_command():
    from maeday_hf.cli import build_parser

    common = ["finetune", "--model", "m", "--shots", "x.png", "--output-dir", "o"]
    assert build_parser().parse_args(common).verbose is False
    assert build_parser().parse_args(["-v", *common]).verbose is True
    assert build_parser().parse_args([*common, "--verbose"]).verbose is True  # as scripts/finetune.py passes it


def test_damaged_or_incomplete_checkpoints_print_one_line(tiny_checkpoint, tmp_path, capsys):
    import shutil

    image = tmp_path / "query.png"
    Image.new("RGB", (32, 32)).save(image)
    truncated, without_weights, without_config = (tmp_path / name for name in ("truncated", "no-weights", "no-config"))
    for folder in (truncated, without_weights, without_config):
        shutil.copytree(tiny_checkpoint, folder)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:1000])
    (without_weights / "model.safetensors").unlink()
    (without_config / "config.json").unlink()
    for folder, fragment in [(truncated, "damaged or incomplete"), (without_weights, "no file named model.safetensors"),
                             (without_config, "has no config.json")]:
        assert main(["detect", str(image), "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err and str(folder) in err and "Traceback" not in err, err


def test_a_finished_run_replaces_the_heatmaps_and_a_failed_one_leaves_them(synthetic_root, tiny_checkpoint, tmp_path,
                                                                             monkeypatch):
    from maeday_hf import cli

    test = synthetic_root / "stripes" / "test"
    out = tmp_path / "out"
    common = ["--model", tiny_checkpoint, "--out", str(out), "--num-masks", "2", "--quiet", "--device", "cpu"]
    assert main(["detect", str(test / "good"), *common]) == 0
    first = {path.name: path.read_bytes() for path in (out / "heatmaps").iterdir()}
    scores = (out / "scores.csv").read_text()
    assert sorted(first) == ["000.png", "001.png"]

    # A run that fails while drawing its heatmaps leaves the first run's outputs exactly as they were.
    drawn = []

    def failing_overlay(*args, **kwargs):
        if drawn:
            raise OSError("disk full")
        drawn.append(1)
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr("maeday_hf.visualize.overlay_heatmap", failing_overlay)
    assert main(["detect", str(test / "hole"), str(test / "stain"), *common]) == 2
    assert {path.name: path.read_bytes() for path in (out / "heatmaps").iterdir()} == first
    assert (out / "scores.csv").read_text() == scores
    assert sorted(path.name for path in out.iterdir()) == ["heatmaps", "scores.csv"]  # nothing half-written left
    monkeypatch.undo()

    # A finished run's heatmaps are its own: none of the earlier run's stays next to them.
    assert main(["detect", str(test / "hole"), *common]) == 0
    assert sorted(path.name for path in (out / "heatmaps").iterdir()) == ["000.png"]
    assert (out / "heatmaps" / "000.png").read_bytes() != first["000.png"]
    assert cli.collect_images([str(test / "hole")])[0][1] == "000"


def test_inputs_in_the_heatmaps_folder_and_a_scores_folder_are_refused_before_scoring(tmp_path, tiny_checkpoint,
                                                                                     capsys):
    out = tmp_path / "project"
    (out / "heatmaps").mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 20, 30)).save(out / "heatmaps" / "photo.png")
    original = (out / "heatmaps" / "photo.png").read_bytes()
    common = ["--model", tiny_checkpoint, "--out", str(out), "--num-masks", "2", "--quiet", "--device", "cpu"]
    assert main(["detect", str(out / "heatmaps" / "photo.png"), *common]) == 2
    assert "which this run replaces" in capsys.readouterr().err
    (tmp_path / "link").symlink_to(out, target_is_directory=True)  # the same folder under another name
    linked = [*common[:2], "--out", str(tmp_path / "link"), *common[4:]]
    assert main(["detect", str(out / "heatmaps" / "photo.png"), *linked]) == 2
    assert "which this run replaces" in capsys.readouterr().err
    assert (out / "heatmaps" / "photo.png").read_bytes() == original  # the user's image, untouched
    other = tmp_path / "other"
    (other / "scores.csv").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "query.png")
    assert main(["detect", str(tmp_path / "query.png"), *common[:2], "--out", str(other), "--quiet"]) == 2
    assert "is not a file" in capsys.readouterr().err and not (other / "heatmaps").exists()


def test_a_heatmaps_folder_holding_what_detect_does_not_write_is_not_replaced(tmp_path, tiny_checkpoint, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "query.png")
    out = tmp_path / "out"
    common = [str(tmp_path / "query.png"), "--model", tiny_checkpoint, "--out", str(out), "--num-masks", "2",
              "--quiet", "--device", "cpu"]
    # A previous run's folder (heatmaps, maps/, masks/, and what file browsers add there) is replaced, as before.
    assert main(["detect", *common, "--save-maps", "--threshold", "0"]) == 0
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "masks/Thumbs.db"):
        (out / "heatmaps" / name).write_bytes(b"")
    for name in (".AppleDouble", "@eaDir"):
        (out / "heatmaps" / name).mkdir()
    assert main(["detect", *common]) == 0
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["query.png"]
    # A link named heatmaps: only the link is replaced, what it points to stays as it is.
    shutil.rmtree(out / "heatmaps")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "notes.txt").write_text("mine")
    (out / "heatmaps").symlink_to(tmp_path / "shared", target_is_directory=True)
    assert main(["detect", *common]) == 0
    assert (out / "heatmaps").is_dir() and not (out / "heatmaps").is_symlink()
    assert (tmp_path / "shared" / "notes.txt").read_text() == "mine"
    # A file named heatmaps, a note beside the heatmaps, anything else in maps/: refused before the model loads, kept.
    for where, what in (("heatmaps", "is not a folder"), ("heatmaps/notes.txt", "heatmaps/notes.txt' which maeday"),
                        ("heatmaps/maps/readme.md", "heatmaps/maps/readme.md' which maeday")):
        shutil.rmtree(out / "heatmaps", ignore_errors=True)
        (out / "heatmaps").unlink(missing_ok=True)
        (out / where).parent.mkdir(parents=True, exist_ok=True)
        (out / where).write_text("mine")
        capsys.readouterr()
        assert main(["detect", *common]) == 2
        err = capsys.readouterr().err
        assert what.replace("' which", "', which") in err and err.count("\n") == 1, err
        assert (out / where).read_text() == "mine"


def test_an_out_folder_that_cannot_be_written_is_named_before_the_model_loads(tmp_path, tiny_checkpoint, capsys,
                                                                              monkeypatch):
    import os

    from maeday_hf import cli

    Image.new("RGB", (32, 32)).save(tmp_path / "query.png")
    out = tmp_path / "read-only" / "results"
    (tmp_path / "read-only").mkdir()
    common = [str(tmp_path / "query.png"), "--model", tiny_checkpoint, "--num-masks", "2", "--quiet", "--device", "cpu"]
    import maeday_hf.modeling

    loads, real_load = [], maeday_hf.modeling.load_detector
    monkeypatch.setattr(maeday_hf.modeling, "load_detector", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    real_access = os.access
    # (simulated: the tests may run as root, whom a read-only folder does not stop)
    monkeypatch.setattr(os, "access", lambda path, mode, **k: os.fspath(path) != str(tmp_path / "read-only") and
                        real_access(path, mode, **k))
    assert main(["detect", *common, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out '{out}' is not writable: '{tmp_path / 'read-only'}' does not let this user" in err
    assert err.count("\n") == 1 and not loads and not out.exists()
    # `..` after a link is checked where it leads, not where the text would.
    (tmp_path / "writable" / "deep").mkdir(parents=True)
    (tmp_path / "read-only" / "link").symlink_to(tmp_path / "writable" / "deep", target_is_directory=True)
    from maeday_hf.cli import _nearest_existing

    assert os.path.samefile(_nearest_existing(tmp_path / "read-only" / "link" / ".." / "results"),
                            tmp_path / "writable")
    (tmp_path / "a-file").write_text("")
    assert main(["detect", *common, "--out", str(tmp_path / "a-file" / "results")]) == 2
    assert "cannot be created: " in capsys.readouterr().err
    # Refused only when the temporary folder is made (a file system the access check cannot see through): --out is
    # named, not the hidden temporary name.
    monkeypatch.setattr(os, "access", real_access)

    def refuse(parent, prefix):
        raise PermissionError(13, "Permission denied", os.path.join(parent, prefix + "1234"))

    monkeypatch.setattr(cli, "make_held_partial_dir", refuse)
    assert main(["detect", *common, "--out", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write into --out '{tmp_path / 'elsewhere'}': Permission denied" in err and ".heatmaps" not in err
    assert not (tmp_path / "elsewhere").exists()


def test_names_too_long_for_a_file_are_shortened_and_stay_unique(tmp_path, tiny_checkpoint):
    from maeday_hf.cli import collect_images

    deep = tmp_path / "data" / ("é" * 60) / ("a" * 100) / ("b" * 100)
    deep.mkdir(parents=True)
    for name in ("x.png", "y.png"):
        Image.new("RGB", (32, 32)).save(deep / name)
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "short.png")
    names = [name for _, name in collect_images([str(tmp_path / "data")])]
    assert "short" in names and len(set(names)) == 3
    assert all(len(name.encode()) <= 200 for name in names)
    out = tmp_path / "out"
    assert main(["detect", str(tmp_path / "data"), "--model", tiny_checkpoint, "--out", str(out), "--num-masks", "2",
                 "--quiet", "--device", "cpu"]) == 0
    assert len(list((out / "heatmaps").iterdir())) == 3


def test_folders_are_followed_through_links_once_and_a_broken_link_is_named(tmp_path, tiny_checkpoint, capsys):
    import os

    from maeday_hf.cli import CommandError, collect_images

    data = tmp_path / "data"
    (data / "real").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (32, 32)).save(data / "real" / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "elsewhere" / "b.png")
    (data / "real" / "ext").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # images kept elsewhere
    (data / "real" / "loop").symlink_to(data, target_is_directory=True)  # a link back up: walked once
    (data / "alias").symlink_to(data / "real", target_is_directory=True)  # the same folder again, sorted first
    names = sorted(name for _, name in collect_images([str(data)]))
    assert names == ["real__a", "real__ext__b"]  # (named by the real path)
    (data / "real" / "c.png").symlink_to(tmp_path / "synced-later.png")
    with pytest.raises(CommandError, match=r"c.png' is a broken link"):
        collect_images([str(data)])
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(CommandError, match="neither a file nor a folder"):
        collect_images([str(tmp_path / "pipe.png")])


def test_a_folder_that_cannot_be_read_is_named_not_skipped(tmp_path, monkeypatch, caplog):
    # os.walk skips a folder it cannot list: its images would drop out of scores.csv without a word. (The refusal is
    # simulated: the tests may run as root, whom chmod 000 does not stop.)
    import logging
    import os

    from maeday_hf.cli import CommandError, collect_images

    data = tmp_path / "data"
    (data / "locked").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(data / "a.png")
    Image.new("RGB", (32, 32)).save(data / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    # A subfolder (a mount point's lost+found, say): named in a warning, the rest scored.
    with caplog.at_level(logging.WARNING, logger="maeday_hf"):
        assert [name for _, name in collect_images([str(data)])] == ["a"]
    assert "Skipping folder" in caplog.text and "locked" in caplog.text
    # The folder given itself: an error (not "no images found in folder").
    with pytest.raises(CommandError, match=r"cannot read folder '.*locked': Permission denied"):
        collect_images([str(data / "locked")])


def test_heatmap_names_are_file_names_everywhere(tmp_path, tiny_checkpoint):
    # --out may be a shared (SMB/NTFS/FAT) folder: no character Windows refuses, no device name, no newline.
    from maeday_hf.cli import collect_images

    data = tmp_path / "data"
    data.mkdir()
    for name in ('a:b*c?.png', "CON.png", "new\nline.png", 'say "hi", twice.png', "a_b_c_.png"):
        Image.new("RGB", (32, 32)).save(data / name)
    names = [name for _, name in collect_images([str(data)])]
    assert sorted(name[6:] for name in names) == sorted(  # (a:b*c? and a_b_c_ meet: both get an index)
        ["a_b_c_", "a_b_c_", "_CON", "new_line", 'say _hi_, twice'])
    assert all(name[:5].isdigit() for name in names)
    out = tmp_path / "out"
    assert main(["detect", str(data), "--model", tiny_checkpoint, "--out", str(out), "--num-masks", "2", "--quiet",
                 "--device", "cpu"]) == 0
    assert len(list((out / "heatmaps").iterdir())) == 5
    scores = (out / "scores.csv").read_bytes()
    assert scores.count(b"\r\n") == 6 and b"\r\r" not in scores  # the csv module's line ends, nothing added
    rows = list(csv.reader(io.StringIO(scores.decode("utf-8"), newline="")))
    assert sorted(row[0].rsplit("/", 1)[-1] for row in rows[1:]) == sorted(
        ['a:b*c?.png', "CON.png", "new\nline.png", 'say "hi", twice.png', "a_b_c_.png"])


def test_maps_wait_beside_the_heatmaps_not_in_the_temporary_folder(synthetic_root, tiny_checkpoint, tmp_path,
                                                                   monkeypatch):
    import tempfile

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    seen = []
    real_save = np.save
    monkeypatch.setattr(np, "save", lambda file, array, *args, **kwargs: (seen.append(file), real_save(file, array)))
    out = tmp_path / "out"
    assert main(["detect", str(synthetic_root / "stripes" / "test" / "good"), "--model", tiny_checkpoint, "--out",
                 str(out), "--num-masks", "2", "--quiet", "--device", "cpu"]) == 0
    assert len(seen) == 2 and all(str(file).startswith(str(out)) for file in seen)
    assert not list(temporary.iterdir()) and not [p for p in out.rglob(".*")]
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["000.png", "001.png"]


def test_the_heatmaps_folder_given_as_input_is_named_as_such(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    (out / "heatmaps").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(out / "heatmaps" / "x.png")
    assert main(["detect", str(out / "heatmaps"), "--model", tiny_checkpoint, "--out", str(out), "--quiet"]) == 2
    assert "is the heatmaps folder this run replaces" in capsys.readouterr().err


def test_the_installed_commands_run_as_modules_too():
    import subprocess
    import sys

    # (`accelerate launch -m maeday_hf finetune ...`, `accelerate launch -m maeday_hf.commands.evaluate ...`)
    for module, usage in (("maeday_hf", "usage: maeday "), ("maeday_hf.commands.evaluate", "usage: maeday-evaluate")):
        completed = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                                   timeout=120)
        assert completed.returncode == 0 and completed.stdout.startswith(usage), completed.stderr[-2000:]


def test_a_file_name_that_is_not_utf8_is_scored_and_listed_as_it_is(tmp_path, tiny_checkpoint):
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    raw_name = b"\xe9t\xe9.png"  # Latin-1 bytes, not UTF-8
    Image.new("RGB", (32, 32)).save(os.path.join(os.fsencode(folder), raw_name), format="PNG")
    out = tmp_path / "out"
    assert main(["detect", str(folder), "--model", tiny_checkpoint, "--out", str(out), "--num-masks", "2", "--quiet",
                 "--device", "cpu"]) == 0
    assert raw_name in (out / "scores.csv").read_bytes()
    assert len(list((out / "heatmaps").iterdir())) == 1


@pytest.fixture
def image_server(tmp_path):
    """A local HTTP server for the files of a fresh folder: `(folder, base URL)`."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # (the server's request log would go to the stderr the tests read)
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_image_urls_are_scored_like_the_same_files(synthetic_root, tiny_checkpoint, tmp_path, image_server):
    served, base = image_server
    local = synthetic_root / "stripes" / "test" / "hole" / "000.png"
    (served / "a b.png").write_bytes(local.read_bytes())
    url = f"{base}/a%20b.png?token=1"
    common = ["--model", tiny_checkpoint, "--num-masks", "3", "--device", "cpu", "--quiet"]
    fetched = []
    import maeday_hf.images

    def counted_download(*args, **kwargs):
        fetched.append(args[0])
        return original_download(*args, **kwargs)

    original_download = maeday_hf.images.download
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(maeday_hf.images, "download", counted_download)
        assert main(["detect", url, str(local), url, "--out", str(tmp_path / "both"), *common]) == 0
    assert fetched == [url]  # given twice, fetched once
    with open(tmp_path / "both" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [url, str(local), url]
    assert rows[0]["score"] == rows[1]["score"] == rows[2]["score"]
    heatmaps = tmp_path / "both" / "heatmaps"
    assert sorted(p.name for p in heatmaps.iterdir()) == ["00000_a_b.png", "00001_000.png", "00002_a_b.png"]
    assert [row["heatmap"] for row in rows] == ["00000_a_b.png", "00001_000.png", "00002_a_b.png"]
    assert np.array_equal(np.asarray(Image.open(heatmaps / "00000_a_b.png")),
                          np.asarray(Image.open(heatmaps / "00001_000.png")))


def test_a_bad_url_prints_one_line_before_the_model_loads(tmp_path, image_server, capsys):
    served, base = image_server
    (served / "page.html").write_text("<html>not an image</html>")
    with_password = base.replace("http://", "http://user:secret@")
    for url, fragment in ((f"{base}/missing.png", "HTTP 404"), (f"{base}/page.html", "as an image"),
                          (f"{with_password}/page.html", "as an image")):
        out = tmp_path / "out"
        # A model that does not exist: the URL's error comes first.
        assert main(["detect", url, "--model", str(tmp_path / "no-model"), "--out", str(out), "--quiet"]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and fragment in error and "Traceback" not in error
        assert url.replace("user:secret@", "") in error and "secret" not in error  # (errors end up in logs)
        assert "BytesIO" not in error  # (PIL's name for the downloaded bytes: the URL names them already)
        assert not out.exists()
    assert main(["detect", f"{base}/x.png", "--timeout", "0", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--timeout must be" in capsys.readouterr().err
    for url in ("http://[::1/a.png", "http://a..b/x.png"):  # malformed: one line that names the URL
        assert main(["detect", url, "--out", str(tmp_path / "o"), "--quiet"]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and url in error and "not a valid URL" in error, error


def test_url_names_and_timeouts(synthetic_root, tiny_checkpoint, tmp_path, image_server, capsys):
    served, base = image_server
    image = synthetic_root / "stripes" / "test" / "good" / "000.png"
    (served / "Part.png").write_bytes(image.read_bytes())
    (served / "part.png").write_bytes(image.read_bytes())
    port = base.rsplit(":", 1)[1]
    urls = [f"{base}/Part.png", f"{base}/part.png", f"http://user:secret@127.0.0.1:{port}/"]
    (served / "index.html").write_bytes(image.read_bytes())  # what the bare URL serves
    # No time limit (inf, or one too long for a socket's clock) downloads as usual.
    for timeout in ("inf", "1e10"):
        out = tmp_path / f"out-{timeout}"
        assert main(["detect", *urls, "--model", tiny_checkpoint, "--num-masks", "2", "--device", "cpu", "--quiet",
                     "--out", str(out), "--timeout", timeout]) == 0, capsys.readouterr().err
        # Names that differ only in case would be one file on macOS and Windows; no password in a name.
        assert sorted(path.name for path in (out / "heatmaps").iterdir()) == [
            "00000_Part.png", "00001_part.png", "00002_127.0.0.1.png"
        ]
        # Nor in scores.csv, which lists each URL as given otherwise.
        with open(out / "scores.csv") as handle:
            listed = [row["path"] for row in csv.DictReader(handle)]
        assert listed == [*urls[:2], f"http://127.0.0.1:{port}/"]


def test_skip_unreadable_names_a_url_by_itself(synthetic_root, tiny_checkpoint, tmp_path, image_server, caplog,
                                               monkeypatch):
    import tempfile

    # Downloads land in a folder whose name repr() escapes (as every Windows path is): the URL must still be named.
    (tmp_path / "a\\b").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a\\b"))
    served, base = image_server
    (served / "ok.png").write_bytes((synthetic_root / "stripes" / "test" / "good" / "000.png").read_bytes())
    (served / "page.png").write_bytes(b"<html>not an image</html>")
    port = base.rsplit(":", 1)[1]
    urls = [f"{base}/ok.png", f"http://user:secret@127.0.0.1:{port}/page.png"]
    assert main(["detect", *urls, "--model", tiny_checkpoint, "--num-masks", "2", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "out"), "--skip-unreadable"]) == 0
    (left_out,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Left out:")]
    assert f"Cannot read 'http://127.0.0.1:{port}/page.png' as an image" in left_out  # (no password, no temp copy)
    with open(tmp_path / "out" / "scores.csv") as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == [urls[0]]


def test_sigterm_is_handled_like_ctrl_c():
    import os
    import signal

    from maeday_hf.cli import Terminated, interrupted_status, terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # (Python runs the handler between bytecodes)
            pass
    assert signal.getsignal(signal.SIGTERM) is before
    assert interrupted_status(Terminated()) == 143 and interrupted_status(KeyboardInterrupt()) == 130


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # (the Terminated the finaliser drops)
def test_a_second_sigterm_spares_the_clean_up_and_one_lost_in_a_finaliser_is_raised_again():
    import os
    import signal

    from maeday_hf.cli import Terminated, terminate_as_interrupt

    def settle():
        for _ in range(1000):  # (Python runs the handler between bytecodes)
            pass

    cleaned = []
    with pytest.raises(Terminated), terminate_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            settle()
        finally:  # a scheduler repeating its SIGTERM while the first one's clean-up runs: the clean-up finishes
            os.kill(os.getpid(), signal.SIGTERM)
            settle()
            cleaned.append(True)
    assert cleaned == [True]

    class RaisesInFinaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            settle()  # the Terminated raised here is dropped by Python ("Exception ignored in ...")

    with pytest.raises(Terminated), terminate_as_interrupt():
        RaisesInFinaliser()  # (collected at once)
        settle()
        # The process must still stop on SIGTERM (it used to ignore every later one).
        os.kill(os.getpid(), signal.SIGTERM)
        settle()


def _sigterm_while_scoring(arguments: list[str], out, temporary, settle: float, whole_group: bool):
    """Start `maeday detect ARGUMENTS --out OUT` (temporary files under `temporary`), send SIGTERM once it has started
    scoring and `settle` seconds more (to it alone, or to its whole process group); returns `(status, stderr)`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "maeday_hf", "detect", *arguments, "--out", str(out), "--quiet"]
    process = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(temporary)}, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".heatmaps.partial-*")):  # scoring has started
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        time.sleep(settle)
        if whole_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return status, process.stderr.read()


def test_a_terminated_run_leaves_the_previous_results_and_no_temporary_files(synthetic_root, tiny_checkpoint, tmp_path):
    # `kill`, `timeout`, a batch scheduler: the same clean-up as Ctrl-C, then exit status 143.
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("path,score\nearlier.png,1\n")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    status, stderr = _sigterm_while_scoring(
        [str(synthetic_root), "--model", tiny_checkpoint, "--num-masks", "4096", "--device", "cpu"], out, temporary,
        settle=0.5, whole_group=False,
    )
    assert status == 143 and stderr.strip().endswith("maeday: terminated")
    assert sorted(path.name for path in out.iterdir()) == ["scores.csv"]
    assert (out / "scores.csv").read_text() == "path,score\nearlier.png,1\n"
    assert not list(temporary.iterdir())


def test_a_run_removes_what_a_killed_run_left_in_its_output(synthetic_root, tiny_checkpoint, tmp_path):
    import os

    from maeday_hf.atomic_io import let_go, make_held_partial_dir, make_held_partial_file

    out = tmp_path / "out"
    for path, handle in (make_held_partial_dir(out, ".heatmaps.partial-"),
                         make_held_partial_file(out, ".scores.csv.partial-")):
        let_go(handle)  # a run killed with SIGKILL: no clean-up, its lock gone with it
        os.utime(path, (0, 0))
    image = synthetic_root / "stripes" / "test" / "good" / "000.png"
    assert main(["detect", str(image), "--model", tiny_checkpoint, "--out", str(out), "--num-masks", "2",
                 "--device", "cpu", "--quiet"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["heatmaps", "scores.csv"]


def test_a_sigterm_to_the_whole_process_group_stops_decoding_workers_quietly(synthetic_root, tiny_checkpoint,
                                                                              tmp_path):
    # `timeout`, Slurm and systemd signal the process group: the DataLoader workers get SIGTERM from outside too.
    out = tmp_path / "out"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    status, stderr = _sigterm_while_scoring(
        [str(synthetic_root), "--model", tiny_checkpoint, "--num-masks", "4096", "--device", "cpu", "--num-workers",
         "2", "--batch-size", "1"], out, temporary, settle=1.0, whole_group=True,
    )
    assert status == 143 and stderr.strip().endswith("maeday: terminated"), stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert not list(temporary.glob("pymp-*")) and not list(temporary.glob("maeday-*"))
    assert not out.exists() or not list(out.iterdir())


def test_max_image_pixels_lets_larger_images_in_and_no_more(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above 2,000 pixels (restored after)
    Image.new("RGB", (100, 50), "gray").save(tmp_path / "line-scan.png")  # 5,000 pixels
    common = [str(tmp_path / "line-scan.png"), "--model", tiny_checkpoint, "--num-masks", "2", "--quiet"]
    assert main(["detect", *common, "--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "line-scan.png" in error and "--max-image-pixels" in error and "Traceback" not in error
    assert main(["detect", *common, "--out", str(tmp_path / "b"), "--max-image-pixels", "4999"]) == 2
    assert "line-scan.png" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no decompression-bomb warning either: the user chose the bound
        assert main(["detect", *common, "--out", str(tmp_path / "c"), "--max-image-pixels", "5_000"]) == 0
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after the run
    assert main(["detect", *common, "--out", str(tmp_path / "e"), "--max-image-pixels", "4998"]) == 2
    assert "exceeds limit of 4998 pixels" in capsys.readouterr().err  # (an int, as Pillow's own limits are)
    with pytest.raises(SystemExit) as exit_status:
        main(["detect", *common, "--out", str(tmp_path / "d"), "--max-image-pixels", "0"])
    assert exit_status.value.code == 2
    assert "--max-image-pixels: expected a number of pixels >= 1 (e.g. 400000000), got '0'" in capsys.readouterr().err


def test_save_maps_keeps_each_map_and_mask_beside_the_heatmaps(synthetic_root, tiny_checkpoint, tmp_path, capsys):
    from transformers import pipeline

    test = synthetic_root / "stripes" / "test"
    common = ["--model", tiny_checkpoint, "--num-masks", "3", "--device", "cpu", "--quiet", "--out", str(tmp_path / "o")]
    assert main(["detect", str(test / "hole"), str(test / "good"), "--threshold", "1.2", "--save-maps", *common]) == 0
    assert "(with maps/ and masks/)" in capsys.readouterr().out
    heatmaps = tmp_path / "o" / "heatmaps"
    names = sorted(path.stem for path in heatmaps.glob("*.png"))
    assert sorted(path.stem for path in (heatmaps / "maps").iterdir()) == names
    assert sorted(path.stem for path in (heatmaps / "masks").iterdir()) == names
    detector = pipeline("anomaly-detection", model=tiny_checkpoint)
    expected = detector(str(test / "hole" / "000.png"), num_masks=3, threshold=1.2)
    anomaly_map = np.load(heatmaps / "maps" / "hole__000.npy")
    assert anomaly_map.dtype == np.float32 and anomaly_map.shape == (48, 48)
    np.testing.assert_allclose(anomaly_map, expected["anomaly_map"], rtol=1e-5, atol=1e-7)
    mask = np.asarray(Image.open(heatmaps / "masks" / "hole__000.png"))
    assert np.array_equal(mask, np.asarray(expected["mask"])) and set(np.unique(mask)) <= {0, 255}
    # Each heatmap (drawn in threads) is its image's map over its image, on the run's one colour scale.
    from maeday_hf.images import load_rgb_image
    from maeday_hf.visualize import overlay_heatmap

    maps = {name: np.load(heatmaps / "maps" / f"{name}.npy") for name in names}
    vmax = max(float(anomaly_map.max()) for anomaly_map in maps.values())
    for name, anomaly_map in maps.items():
        folder, stem = name.split("__")
        drawn = overlay_heatmap(load_rgb_image(test / folder / f"{stem}.png"), anomaly_map, vmin=0.0, vmax=vmax)
        assert np.array_equal(np.asarray(Image.open(heatmaps / f"{name}.png")), np.asarray(drawn)), name
    # Without a threshold there are no masks; a run without the option leaves no maps of an earlier one behind.
    assert main(["detect", str(test / "hole"), "--save-maps", *common]) == 0
    assert (heatmaps / "maps").is_dir() and not (heatmaps / "masks").exists()
    assert main(["detect", str(test / "hole"), *common]) == 0
    assert not (heatmaps / "maps").exists() and not [p for p in (tmp_path / "o").rglob(".*")]
    # A second run into the same --out does not score the first one's masks or maps as inputs.
    assert main(["detect", str(tmp_path / "o"), "--save-maps", "--threshold", "1.2", *common]) == 2
    assert "no images" in capsys.readouterr().err


def test_the_programs_skip_the_final_garbage_collection_at_exit_and_main_does_not(monkeypatch):
    # Freezing the heap at exit spares the last collections' walk over torch's and transformers' objects (~1 s of
    # every command on 2 cores). Only the programs' own processes do it: main() run in-process (a notebook, a script
    # such as study_few_shot) must leave its caller's cyclic garbage to be finalised.
    import gc
    import sys
    from importlib import metadata

    from maeday_hf import cli
    from maeday_hf.commands import evaluate, publish_dataset

    registered = []
    monkeypatch.setattr(cli, "_FREEZE_REGISTERED", False)
    monkeypatch.setattr(cli.atexit, "register", registered.append)
    for command in (cli.main, evaluate.main, publish_dataset.main):
        with pytest.raises(SystemExit):
            command(["--help"])
    assert registered == []
    monkeypatch.setattr(sys, "argv", ["prog", "--help"])
    for program in (cli.program, evaluate.program, publish_dataset.program):
        with pytest.raises(SystemExit):
            program()
    assert registered == [gc.freeze]  # (once, however many commands one process runs)
    # The installed commands are the programs.
    scripts = {entry.name: entry.value for entry in metadata.entry_points(group="console_scripts")
               if entry.value.startswith("maeday_hf.")}
    assert scripts == {"maeday": "maeday_hf.cli:program", "maeday-evaluate": "maeday_hf.commands.evaluate:program",
                       "maeday-publish-dataset": "maeday_hf.commands.publish_dataset:program"}


def test_heatmap_threads_keep_to_a_memory_budget(synthetic_root, tiny_checkpoint, tmp_path, monkeypatch):
    # Up to 8 threads draw heatmaps, each holding a full-size image, map and blend: as many as ~70 bytes a pixel of
    # the largest image fit in the budget (16 MP images: 1 thread in 1 GiB), at least one.
    from maeday_hf import cli

    threads = []
    real_prefetch = cli.prefetch

    def recorded(items, function, num_threads, lookahead):
        threads.append(num_threads)
        return real_prefetch(items, function, num_threads, lookahead)

    monkeypatch.setattr(cli, "prefetch", recorded)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 16)
    image = synthetic_root / "stripes" / "test" / "hole" / "000.png"  # 48 x 48
    common = [str(image), "--model", tiny_checkpoint, "--num-masks", "2", "--quiet", "--device", "cpu"]
    for budget, expected in ((2**30, 8), (70 * 48 * 48 * 3, 3), (1, 1)):
        monkeypatch.setattr(cli, "_HEATMAP_MEMORY_BUDGET", budget)
        assert main(["detect", *common, "--out", str(tmp_path / str(budget))]) == 0
        assert threads[-1] == expected
