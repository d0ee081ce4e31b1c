"""The protocol end to end on the synthetic set with a tiny ViTMAE: outputs, tables, resume, processes, errors."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script
from maeday_hf.commands import evaluate as evaluate_script
from maeday_hf import protocol
from maeday_hf.data import load_fod_with_references, load_mvtec, write_hub_folder
from maeday_hf.finetune import FinetuneConfig
from maeday_hf.protocol import (
    ProtocolConfig,
    Unit,
    execute_protocol,
    plan_tasks,
    prepare_protocol,
    resolve_dataset,
    split_round_robin,
)
from maeday_hf.report import category_groups, format_cell, render_tables
from maeday_hf.synthetic import write_synthetic_mvtec

CATEGORIES = ("stripes", "disc")  # one texture, one object
FAST = ["--num-masks", "2", "--finetune-steps", "3", "--finetune-batch-size", "4", "--finetune-learning-rate", "0.2",
        "--quiet"]




def test_the_clones_script_is_the_installed_program():
    script = load_script("evaluate")
    assert (script.main, script.program, script.build_parser, script.config_from_args) == (
        evaluate_script.main, evaluate_script.program, evaluate_script.build_parser, evaluate_script.config_from_args)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_mvtec(root, categories=CATEGORIES, num_train=3, num_test_good=2, num_test_per_defect=1,
                          image_size=32)
    return root


def _argv(model, root, output_dir, *extra) -> list[str]:
    return ["--model", str(model), "--dataset", f"synthetic:{root}", "--output-dir", str(output_dir),
            "--categories", *CATEGORIES, *FAST, *extra]


@pytest.fixture(scope="module")
def protocol_run(tiny_checkpoint, synthetic_root, tmp_path_factory) -> Path:
    """0-shot and 1-shot (2 shot seeds), Fig. 3 with N in {1, 2}."""
    output_dir = tmp_path_factory.mktemp("results")
    argv = _argv(tiny_checkpoint, synthetic_root, output_dir, "--shots", "0", "1", "--shot-seeds", "2",
                 "--repetitions", "1", "2")
    assert evaluate_script.main(argv) == 0
    return output_dir


def _unit_metric(output_dir: Path, category: str, name: str, metric: str) -> float:
    return json.loads((output_dir / "units" / category / f"{name}.json").read_text())["metrics"][metric]


def _table_rows(tables: str, title: str) -> dict[str, dict[str, str]]:
    """`row label -> {column header -> cell}` of the Markdown table under `## <title>`."""
    section = tables.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip("|").split("|") for line in section.strip().splitlines()]
    header = [cell.strip() for cell in lines[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in lines[2:]}


def test_end_to_end_writes_units_results_tables_and_figures(protocol_run):
    results = json.loads((protocol_run / "results.json").read_text())
    # The tables say what they cover (a rerun with fewer seeds would otherwise look the same).
    assert f"Percent; {len(CATEGORIES)} categories; k-shot cells: mean ± std over 2 shot seeds (0, 1)." in (
        protocol_run / "tables.md").read_text()
    # Per category: one 0-shot unit, two 1-shot seeds, 2 repetition counts x 2 schedules.
    assert len(results["units"]) == len(CATEGORIES) * (1 + 2 + 4)
    assert len(list((protocol_run / "units").rglob("*.json"))) == len(results["units"])
    assert {"torch", "transformers", "maeday-hf"} <= set(results["versions"])
    assert results["config"]["num_masks"] == 2 and results["config"]["finetune"]["num_steps"] == 3
    for unit in results["units"]:
        assert set(unit["metrics"]) == {"image_roc_auc", "image_f1_max", "pixel_roc_auc", "pixel_f1_max", "aupro"}
        assert all(0 <= value <= 1 for value in unit["metrics"].values())
        # The streamed pixel metrics carry their own bounds (the image metrics are exact).
        assert set(unit["metric_error_bounds"]) == {"pixel_roc_auc", "pixel_f1_max", "aupro"}
        assert all(0 <= value < 1 for value in unit["metric_error_bounds"].values())
    for category in CATEGORIES:
        for seed in (0, 1):
            assert (protocol_run / "adapters" / category / f"k1-seed{seed}" / "config.json").is_file()
    for figure in ("fig2_shots.png", "fig3_repetitions.png"):
        assert (protocol_run / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_without_figures_removes_the_earlier_ones(protocol_run, tiny_checkpoint, synthetic_root, tmp_path):
    import shutil

    rerun = tmp_path / "results"
    shutil.copytree(protocol_run, rerun)
    argv = _argv(tiny_checkpoint, synthetic_root, rerun, "--shots", "0", "1", "--shot-seeds", "2",
                 "--repetitions", "1", "2", "--no-plots")
    assert evaluate_script.main(argv) == 0  # every unit is done: only gathered again
    assert not list(rerun.glob("fig*.png")) and (rerun / "results.json").is_file()


@pytest.mark.parametrize(("title", "metric"), [("Table 1. Image-level ROC-AUC", "image_roc_auc"),
                                               ("Table 2. Pixel-level ROC-AUC", "pixel_roc_auc")])
def test_tables_are_mean_and_std_over_shot_seeds_of_the_unit_files(protocol_run, title, metric):
    rows = _table_rows((protocol_run / "tables.md").read_text(), title)
    assert list(rows)[:3] == ["**Objects**", "disc", "Mean (Objects)"]  # the synthetic set's own object/texture lists
    assert list(rows)[-1] == "Mean (All)"
    category_means = {0: [], 1: []}
    for category in CATEGORIES:
        zero = _unit_metric(protocol_run, category, "k0-seed0-maeday", metric)
        seeds = [_unit_metric(protocol_run, category, f"k1-seed{s}-maeday", metric) for s in (0, 1)]
        assert rows[category]["0-shot MAEDAY"] == f"{100 * zero:.1f}"
        assert rows[category]["1-shot MAEDAY"] == f"{100 * np.mean(seeds):.1f} ± {100 * np.std(seeds):.1f}"
        category_means[0].append(zero)
        category_means[1].append(np.mean(seeds))
    assert rows["Mean (All)"]["0-shot MAEDAY"] == f"{100 * np.mean(category_means[0]):.1f}"
    assert rows["Mean (All)"]["1-shot MAEDAY"] == f"{100 * np.mean(category_means[1]):.1f}"


def test_rerun_does_no_new_work_and_an_interrupted_run_continues(protocol_run, tiny_checkpoint, synthetic_root,
                                                                  monkeypatch):
    import maeday_hf.finetune

    calls = {"finetune": 0, "score": 0}
    real_score = protocol._Runner.score_maeday

    def counting_score(self, *args, **kwargs):
        calls["score"] += 1
        return real_score(self, *args, **kwargs)

    def no_finetune(*args, **kwargs):
        calls["finetune"] += 1
        raise AssertionError("a finished adapter must not be fine-tuned again")

    monkeypatch.setattr(protocol._Runner, "score_maeday", counting_score)
    monkeypatch.setattr(maeday_hf.finetune, "finetune", no_finetune)
    argv = _argv(tiny_checkpoint, synthetic_root, protocol_run, "--shots", "0", "1", "--shot-seeds", "2",
                 "--repetitions", "1", "2")
    units = sorted((protocol_run / "units").rglob("*.json"))
    mtimes = {path: path.stat().st_mtime_ns for path in units}

    assert evaluate_script.main(argv) == 0
    assert calls == {"finetune": 0, "score": 0}
    assert {path: path.stat().st_mtime_ns for path in units} == mtimes

    # An interrupted run: one unit never written. Only that unit is computed; its adapter is reused.
    lost = protocol_run / "units" / "disc" / "k1-seed1-maeday.json"
    expected = json.loads(lost.read_text())["metrics"]
    lost.unlink()
    assert evaluate_script.main(argv) == 0
    assert calls == {"finetune": 0, "score": 1}
    assert json.loads(lost.read_text())["metrics"] == pytest.approx(expected)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in mtimes.items() if path != lost)


class _ThreadState:
    """A stand-in for `accelerate.PartialState` in one of `num_processes` threads sharing a barrier."""

    def __init__(self, process_index: int, num_processes: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.barrier = process_index, num_processes, barrier
        self.is_main_process = process_index == 0
        self.device = "cpu"

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=120)


def test_two_runs_with_other_settings_into_one_folder_do_not_mix(tiny_checkpoint, synthetic_root, tmp_path,
                                                                   monkeypatch):
    # Both were prepared before either wrote settings.json: the second to start its units is refused, and units of
    # other settings are never gathered under this run's.
    output_dir = tmp_path / "results"
    common = dict(categories=CATEGORIES[:1], shots=(0,), num_masks=2, repetitions=(), plots=False, show_progress=False,
                  device="cpu")
    first = prepare_protocol(ProtocolConfig(tiny_checkpoint, f"synthetic:{synthetic_root}", str(output_dir),
                                            mask_seed=0, **common))
    second = prepare_protocol(ProtocolConfig(tiny_checkpoint, f"synthetic:{synthetic_root}", str(output_dir),
                                             mask_seed=1, **common))
    single = _ThreadState(0, 1, threading.Barrier(1))
    assert execute_protocol(second, single).is_file()
    with pytest.raises(ValueError, match=r"other settings \(mask_seed differ"):
        execute_protocol(first, single)
    assert json.loads((output_dir / "settings.json").read_text())["mask_seed"] == 1
    assert not list(output_dir.glob(".settings.json.partial-*"))
    # Where the file system has no hard links, the settings are created exclusively all the same.
    elsewhere = tmp_path / "no-links"
    prepared = prepare_protocol(ProtocolConfig(tiny_checkpoint, f"synthetic:{synthetic_root}", str(elsewhere),
                                               mask_seed=1, **common))
    other = ProtocolConfig(tiny_checkpoint, f"synthetic:{synthetic_root}", str(elsewhere), mask_seed=0, **common)
    with monkeypatch.context() as patch:
        patch.setattr(protocol.os, "link", lambda *args: (_ for _ in ()).throw(PermissionError(1, "no links")))
        protocol._record_settings(prepared.config)
        assert json.loads((elsewhere / "settings.json").read_text())["mask_seed"] == 1
        with pytest.raises(ValueError, match=r"other settings \(mask_seed differ"):
            protocol._record_settings(other)
        protocol._record_settings(prepared.config)  # (a resume)
    assert json.loads((elsewhere / "settings.json").read_text())["mask_seed"] == 1
    # A unit written by a run of other settings (one that got past the settings before this fix, say) is refused.
    unit_path = next((output_dir / "units").rglob("*.json"))
    unit = json.loads(unit_path.read_text())
    unit["settings"]["mask_seed"] = 0
    unit_path.write_text(json.dumps(unit))
    with pytest.raises(ValueError, match=f"{unit_path.name} was computed with other settings \\(mask_seed differ\\)"):
        protocol.gather_results(second)


def test_an_empty_settings_file_is_one_clear_error(tiny_checkpoint, synthetic_root, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "settings.json").write_text("")  # (a run stopped while creating it, without hard links)
    assert "settings.json' is empty or damaged" in _run_error(capsys, _argv(tiny_checkpoint, synthetic_root,
                                                                            tmp_path / "out"))


def test_units_are_split_round_robin_across_processes_and_gathered_once(tiny_checkpoint, synthetic_root, tmp_path,
                                                                        monkeypatch):
    config = ProtocolConfig(tiny_checkpoint, f"synthetic:{synthetic_root}", str(tmp_path / "results"),
                            categories=CATEGORIES, shots=(0,), num_masks=2, repetitions=(1,), show_progress=False)
    prepared = prepare_protocol(config)
    done: dict[int, list] = {0: [], 1: []}
    real_run = protocol._Runner.run

    def recording_run(self, task):
        done[threading.current_thread().process_index].append(task)
        return real_run(self, task)

    monkeypatch.setattr(protocol._Runner, "run", recording_run)
    barrier, returned, errors = threading.Barrier(2), {}, []

    def process(index: int) -> None:
        threading.current_thread().process_index = index
        try:
            returned[index] = execute_protocol(prepared, _ThreadState(index, 2, barrier))
        except BaseException as error:  # surfaced below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert returned[1] is None and returned[0] == tmp_path / "results" / "results.json"
    for index in (0, 1):
        assert done[index] == split_round_robin(prepared.tasks, index, 2)
    results = json.loads(returned[0].read_text())
    assert len(results["units"]) == len(prepared.tasks) == len(CATEGORIES) * (1 + 2)


def test_plan_and_round_robin():
    config = ProtocolConfig("m", "d", "out", shots=(0, 2), num_shot_seeds=3, repetitions=(1, 4), ensemble="patchcore")
    tasks = plan_tasks(config, ["a"])
    names = [unit.name for task in tasks for unit in task.units]
    assert names[0] == "k0-seed0-maeday"  # zero-shot: MAEDAY only, one "seed"
    assert "k2-seed2-maeday+patchcore" in names and "k0-n4-balanced-maeday" in names
    assert len(names) == 1 + 3 * 4 + 2 * 2
    shares = [split_round_robin(tasks, index, 3) for index in range(3)]
    assert sorted(sum(shares, []), key=tasks.index) == tasks
    assert Unit("a", "maeday", 1, 2).path("out") == Path("out/units/a/k1-seed2-maeday.json")


def _run_error(capsys, argv) -> str:
    assert evaluate_script.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_unknown_category_is_named_with_the_valid_ones(tiny_checkpoint, synthetic_root, tmp_path, capsys):
    argv = _argv(tiny_checkpoint, synthetic_root, tmp_path / "out")
    argv[argv.index("--categories") + 1] = "bottle"
    err = _run_error(capsys, argv)
    assert "'bottle'" in err and "stripes" in err and "plate" in err
    assert not (tmp_path / "out").exists()  # nothing written before the input was checked


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_a_device_that_is_not_here_is_refused_before_anything_is_written(
    tiny_checkpoint, synthetic_root, tmp_path, capsys, precision
):
    for device in ("nonsense", "cuda:7"):
        argv = _argv(tiny_checkpoint, synthetic_root, tmp_path / "out") + ["--device", device, "--precision", precision]
        assert f"device={device!r}" in _run_error(capsys, argv)
        assert not (tmp_path / "out").exists()


def test_patchcore_options_without_the_ensemble_are_refused(tiny_checkpoint, synthetic_root, tmp_path, capsys):
    for option in (["--patchcore-backbone", "no/such-backbone"], ["--patchcore-image-size", "5"]):
        err = _run_error(capsys, _argv(tiny_checkpoint, synthetic_root, tmp_path / "out", *option))
        assert "need --ensemble patchcore" in err
    assert not (tmp_path / "out").exists()
    from maeday_hf.patchcore import PatchCoreConfig

    with pytest.raises(ValueError, match="needs ensemble='patchcore'"):
        ProtocolConfig(tiny_checkpoint, str(synthetic_root), str(tmp_path / "out"), patchcore=PatchCoreConfig(),
                       device="cpu")


def test_folder_that_is_not_mvtec_shaped(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "data" / "photos").mkdir(parents=True)
    argv = ["--model", tiny_checkpoint, "--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")]
    assert "not MVTec-shaped" in _run_error(capsys, argv)


def test_single_category_folder_gets_a_hint(tiny_checkpoint, synthetic_root, tmp_path, capsys):
    argv = ["--model", tiny_checkpoint, "--dataset", str(synthetic_root / "disc"), "--output-dir", str(tmp_path / "o")]
    err = _run_error(capsys, argv)
    assert "single category" in err and "--categories disc" in err


def test_dataset_without_masks_when_pixel_metrics_are_asked(tiny_checkpoint, tmp_path, capsys):
    for folder, value in (("normal", 100), ("foreign_object", 200)):
        (tmp_path / "fod" / "indoor" / folder).mkdir(parents=True)
        Image.new("RGB", (32, 32), (value,) * 3).save(tmp_path / "fod" / "indoor" / folder / "000.png")
    argv = ["--model", tiny_checkpoint, "--dataset", f"fod:{tmp_path / 'fod'}", "--shots", "0",
            "--output-dir", str(tmp_path / "out")]
    err = _run_error(capsys, argv)
    assert "'indoor'" in err and "no ground-truth mask" in err and "--no-pixel-metrics" in err


def test_fod_k_shot_units_draw_reference_frames_and_every_method_scores_the_same_frames(tiny_checkpoint, tmp_path):
    # Table 3: zero-shot MAEDAY against k-shot baselines, which need frames without objects as shots.
    for folder, values in (("normal", range(40, 240, 25)), ("foreign_object", (30, 230))):
        (tmp_path / "fod" / "indoor" / folder).mkdir(parents=True)
        for index, value in enumerate(values):
            Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(
                tmp_path / "fod" / "indoor" / folder / f"{index:03d}.png")
    argv = ["--model", tiny_checkpoint, "--dataset", f"fod:{tmp_path / 'fod'}", "--shots", "0", "1",
            "--shot-seeds", "2", "--repetitions", "--no-pixel-metrics", "--no-plots",
            "--output-dir", str(tmp_path / "out"), *FAST]
    assert evaluate_script.main(argv) == 0
    units = [json.loads(path.read_text()) for path in sorted((tmp_path / "out" / "units").rglob("*.json"))]
    assert sorted((unit["shots"], unit["shot_seed"]) for unit in units) == [(0, 0), (1, 0), (1, 1)]
    # 8 frames without objects: 4 held out (at most half), 4 + 2 scored by every unit.
    assert {(unit["num_test_images"], unit["num_anomalous"]) for unit in units} == {(6, 2)}
    assert {tuple(unit["shot_indices"]) for unit in units if unit["shots"] == 1} <= {(0,), (1,), (2,), (3,)}
    # The published set has the same split as fod:DIR.
    write_hub_folder({"indoor": load_fod_with_references(tmp_path / "fod", "indoor")}, tmp_path / "hub")
    published = resolve_dataset(tmp_path / "hub").load("indoor")
    assert {name: len(split) for name, split in published.items()} == {"train": 4, "test": 6}
    # A results folder from before the hold-out (its settings lack it) is refused, not mixed with the new test set.
    settings_path = tmp_path / "out" / "settings.json"
    settings = json.loads(settings_path.read_text())
    assert settings.pop("fod_reference_frames") == 5
    settings_path.write_text(json.dumps(settings))
    assert evaluate_script.main(argv) == 2


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--shots", "5"], "3 training images"),
        (["--shots", "-1"], "shots must be integers >= 0"),
        (["--ensemble", "patchcore", "--shots", "0"], "needs shots > 0"),
    ],
)
def test_bad_options(tiny_checkpoint, synthetic_root, tmp_path, capsys, extra, expected):
    assert expected in _run_error(capsys, _argv(tiny_checkpoint, synthetic_root, tmp_path / "out", *extra))


def test_a_patchcore_backbone_that_cannot_load_fails_before_any_fine_tune(tiny_checkpoint, synthetic_root, tmp_path,
                                                                           capsys):
    argv = _argv(tiny_checkpoint, synthetic_root, tmp_path / "out", "--shots", "1", "--shot-seeds", "1",
                 "--ensemble", "patchcore", "--patchcore-backbone", str(tmp_path / "no-backbone"))
    assert "no-backbone" in _run_error(capsys, argv)
    assert not (tmp_path / "out" / "adapters").exists()


def test_few_shot_units_do_not_warn_about_the_calibrated_threshold(tiny_checkpoint, synthetic_root, tmp_path, caplog):
    # The fine-tunes are calibrated at 32 masks, the units score at 2: the protocol asks for no labels at all. Nor
    # does it read the adapters' thresholds, so the calibration's few-views warning (1 shot x 4 views) is dropped.
    argv = _argv(tiny_checkpoint, synthetic_root, tmp_path / "out", "--shots", "1", "--shot-seeds", "1",
                 "--repetitions", "--no-plots", "--categories", "disc")
    with caplog.at_level("WARNING"):
        assert evaluate_script.main(argv) == 0
    assert "calibrated threshold" not in caplog.text and "Calibrating the threshold" not in caplog.text
    assert not logging.getLogger("maeday_hf.calibration").filters  # (and only during the protocol's fine-tunes)


def test_missing_model(synthetic_root, tmp_path, capsys):
    err = _run_error(capsys, _argv(tmp_path / "no-model", synthetic_root, tmp_path / "out", "--shots", "0"))
    assert "no-model" in err


def test_a_resume_compares_places_not_spellings(tiny_checkpoint, synthetic_root, tmp_path, monkeypatch, capsys):
    import shutil

    for place in ("here", "there"):
        shutil.copytree(tiny_checkpoint, tmp_path / place / "model")
        shutil.copytree(synthetic_root, tmp_path / place / "data")
    common = ["--output-dir", str(tmp_path / "out"), "--shots", "0", "--repetitions", "--no-plots", "--categories",
              "disc", *FAST]
    monkeypatch.chdir(tmp_path / "here")
    assert evaluate_script.main(["--model", "model", "--dataset", "synthetic:data", *common]) == 0
    # The same folders spelled otherwise: a resume.
    assert evaluate_script.main(["--model", "./model/", "--dataset", f"synthetic:{tmp_path / 'here' / 'data'}/",
                                 *common]) == 0
    # A folder written before locations were recorded absolute holds them as typed: it resumes from where it ran.
    settings_path = tmp_path / "out" / "settings.json"
    settings = json.loads(settings_path.read_text())
    settings_path.write_text(json.dumps({**settings, "model": "model", "dataset": "synthetic:./data/"}))
    assert evaluate_script.main(["--model", str(tmp_path / "here" / "model"), "--dataset", "synthetic:data",
                                 *common]) == 0
    # A link to the same folders is the same place.
    (tmp_path / "link").symlink_to(tmp_path / "here", target_is_directory=True)
    assert evaluate_script.main(["--model", str(tmp_path / "link" / "model"), "--dataset",
                                 f"synthetic:{tmp_path / 'link' / 'data'}", *common]) == 0
    # The same spelling from another folder names other folders: refused.
    monkeypatch.chdir(tmp_path / "there")
    assert "model" in _run_error(capsys, ["--model", "model", "--dataset", "synthetic:data", *common])


def test_a_run_from_before_a_recipe_setting_existed_is_refused_naming_it(protocol_run, tiny_checkpoint,
                                                                          synthetic_root, tmp_path, capsys):
    # E.g. a folder from before the views were cut from larger shots: its adapters were trained otherwise.
    import shutil

    older = tmp_path / "older"
    shutil.copytree(protocol_run, older)
    settings = json.loads((older / "settings.json").read_text())
    del settings["finetune"]["view_supersampling"]
    (older / "settings.json").write_text(json.dumps(settings))
    error = _run_error(capsys, _argv(tiny_checkpoint, synthetic_root, older, "--shots", "0"))
    assert "finetune.view_supersampling: not recorded there, 3.0 now" in error
    assert "learning_rate" not in error


def test_differences_are_described_as_they_are_compared(tmp_path, monkeypatch):
    from maeday_hf.protocol import _describe_differences, _differing_settings

    (tmp_path / "tiny").mkdir()
    (tmp_path / "bb").mkdir()
    monkeypatch.chdir(tmp_path)  # (folders recorded as typed, relative to where that run ran)
    recorded = {"finetune": {"a": None}, "model": "tiny", "patchcore": {"backbone": "bb", "seed": 0}}
    current = {"finetune": {}, "model": os.path.realpath("tiny"), "patchcore": {"backbone": os.path.realpath("bb"),
                                                                                "seed": 1}}
    different = _differing_settings(recorded, current)
    assert different == ["finetune", "patchcore"]  # (the relative locations are the same places)
    assert _describe_differences(recorded, current, different) == (
        "finetune.a: None there, not recorded now; patchcore.seed: 0 there, 1 now"
    )


def test_rerun_with_other_settings_is_refused(protocol_run, tiny_checkpoint, synthetic_root, capsys):
    argv = _argv(tiny_checkpoint, synthetic_root, protocol_run, "--shots", "0") + ["--num-masks", "3"]
    recorded = json.loads((protocol_run / "settings.json").read_text())["num_masks"]
    assert f"num_masks: {recorded} there, 3 now" in _run_error(capsys, argv)


def test_precision_is_decided_once_recorded_and_a_resume_in_another_is_refused(
    protocol_run, tiny_checkpoint, synthetic_root, capsys, monkeypatch
):
    import maeday_hf.reconstruction as reconstruction

    recorded = json.loads((protocol_run / "results.json").read_text())["config"]
    assert recorded["bf16"] is reconstruction.runs_bfloat16_natively("cpu")
    assert recorded["finetune"]["bf16"] is recorded["bf16"]  # fine-tunes in the protocol's precision
    for native in (False, True):
        monkeypatch.setattr(reconstruction, "runs_bfloat16_natively", lambda device: native)
        config = ProtocolConfig(tiny_checkpoint, "unused", "unused", device="cpu")
        assert config.bf16 is native and config.finetune.bf16 is native and config.settings()["bf16"] is native
    assert ProtocolConfig(tiny_checkpoint, "unused", "unused", bf16=False, finetune=FinetuneConfig(bf16=True)
                          ).finetune.bf16 is True  # an explicit recipe keeps its own
    other = "fp32" if recorded["bf16"] else "bf16"
    argv = _argv(tiny_checkpoint, synthetic_root, protocol_run, "--shots", "0", "1", "--shot-seeds", "2",
                 "--repetitions", "1", "2", "--precision", other)
    error = _run_error(capsys, argv)
    # Each difference as "there, now", down to the entry of the fine-tune recipe that differs (not the whole recipe).
    was, now = recorded["bf16"], not recorded["bf16"]
    assert f"bf16: {was} there, {now} now; finetune.bf16: {was} there, {now} now" in error
    assert "learning_rate" not in error


def test_labels_named_in_another_order_or_anomalous_shots_are_refused(synthetic_root, tiny_checkpoint, tmp_path):
    import datasets

    splits = load_mvtec(synthetic_root, "stripes")
    config = ProtocolConfig(tiny_checkpoint, "unused", str(tmp_path), shots=(0, 1), device="cpu")
    protocol._check_category_splits("stripes", splits, config)  # as published: fine
    # The same data with the class names swapped (and the values with them): 1 would no longer mean anomaly.
    flipped = datasets.DatasetDict({
        name: split.cast_column("label", datasets.ClassLabel(names=["anomaly", "good"])).map(
            lambda example: {"label": 1 - example["label"]})
        for name, split in splits.items()
    })
    with pytest.raises(ValueError, match=r"labels are named \['anomaly', 'good'\]"):
        protocol._check_category_splits("stripes", flipped, config)
    # Other names in the right order are fine, and so is a train split without labels.
    renamed = datasets.DatasetDict({
        name: split.cast_column("label", datasets.ClassLabel(names=["normal", "anomalous"]))
        for name, split in splits.items()
    })
    protocol._check_category_splits("stripes", renamed, config)
    unlabelled_train = datasets.DatasetDict({"train": splits["train"].remove_columns("label"), "test": splits["test"]})
    protocol._check_category_splits("stripes", unlabelled_train, config)
    # Names it cannot place are refused: reversed, they would invert every result silently.
    unplaced = datasets.DatasetDict({
        name: split.cast_column("label", datasets.ClassLabel(names=["class_a", "class_b"]))
        for name, split in splits.items()
    })
    with pytest.raises(ValueError, match="labels are named"):
        protocol._check_category_splits("stripes", unplaced, config)
    as_text = datasets.DatasetDict({
        name: split.cast_column("label", datasets.Value("int64")).map(
            lambda example: {"label": ["good", "anomaly"][example["label"]]},
            features=datasets.Features({**split.features, "label": datasets.Value("string")}))
        for name, split in splits.items()
    })
    with pytest.raises(ValueError, match="must be 0 \\(good\\) and 1 \\(anomaly\\)"):
        protocol._check_category_splits("stripes", as_text, config)
    with_anomalous_shot = datasets.DatasetDict(
        {"train": splits["train"].map(lambda example, index: {"label": int(index == 0)}, with_indices=True),
         "test": splits["test"]})
    with pytest.raises(ValueError, match="1 training images are labelled anomaly"):
        protocol._check_category_splits("stripes", with_anomalous_shot, config)


def test_hub_folder_is_resolved_by_its_configs(synthetic_root, tmp_path):
    write_hub_folder({"stripes": load_mvtec(synthetic_root, "stripes")}, tmp_path / "repo")
    source = resolve_dataset(tmp_path / "repo")
    assert (source.kind, source.categories) == ("hub", ("stripes",))
    assert resolve_dataset(synthetic_root).kind == "mvtec"


def test_hidden_folders_are_not_categories(tmp_path):
    for name in ("wood", ".wood.partial-1a2b", ".ipynb_checkpoints"):
        (tmp_path / "mvtec" / name / "train").mkdir(parents=True)
    assert resolve_dataset(tmp_path / "mvtec").categories == ("wood",)


def test_report_formatting_and_groups():
    assert format_cell({"mean": 0.7432, "std": 0.0, "values": [0.7432]}) == "74.3"
    assert format_cell({"mean": 0.748, "std": 0.0012, "values": [0.747, 0.749]}) == "74.8 ± 0.1"
    assert format_cell(None) == "–"
    assert category_groups(["wood", "bottle"]) == [("Objects", ["bottle"]), ("Textures", ["wood"])]
    assert category_groups(["a", "b"]) == [("Categories", ["a", "b"])]
    records = [
        {"category": c, "method": m, "shots": k, "shot_seed": 0, "study": "main", "metrics": {"image_roc_auc": v}}
        for c, m, k, v in [("indoor", "maeday", 0, 0.956), ("outdoor", "maeday", 0, 0.856),
                           ("indoor", "patchcore", 1, 0.982), ("outdoor", "patchcore", 1, 0.732)]
    ]
    tables = render_tables(records, ["indoor", "outdoor"])
    rows = _table_rows(tables, "Table 3. Foreign Object Detection, image-level ROC-AUC")
    assert rows["MAEDAY"] == {"Method": "MAEDAY", "Shots": "0", "indoor": "95.6", "outdoor": "85.6", "Mean": "90.6"}
    assert rows["PC"]["Mean"] == "85.7"


def test_ensemble_patchcore_units(tiny_checkpoint, tmp_path, capsys):
    from transformers import ResNetBackbone, ResNetConfig

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    backbone = tmp_path / "resnet"
    ResNetBackbone(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic",
                                out_indices=[4])).eval().save_pretrained(backbone)
    # PatchCore's Gaussian (σ=4, kernel 33) needs maps larger than 33 px.
    root = write_synthetic_mvtec(tmp_path / "data", categories=["disc"], num_train=2, num_test_good=2,
                                 num_test_per_defect=1, image_size=64)
    maeday_only = ["--model", tiny_checkpoint, "--dataset", str(root), "--output-dir", str(tmp_path / "out"), *FAST,
                   "--shots", "1", "--shot-seeds", "1", "--repetitions", "--no-plots"]
    assert evaluate_script.main(maeday_only) == 0
    # Adding the ensemble to a finished run only adds units: allowed, and the fine-tuned adapter is reused.
    argv = maeday_only + ["--ensemble", "patchcore", "--patchcore-backbone", str(backbone),
                          "--patchcore-image-size", "64"]
    assert evaluate_script.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(unit["method"] for unit in results["units"]) == ["2xpatchcore", "maeday", "maeday+patchcore",
                                                                    "patchcore"]
    assert {unit["shot_indices"][0] for unit in results["units"]} == {results["units"][0]["shot_indices"][0]}
    # What each ensemble unit sums: MAEDAY + PatchCore (coreset seed 0), each standardised over the test split.
    scores = {unit["method"]: np.array(unit["image_scores"]) for unit in results["units"]}

    def standardised(values):
        return (values - values.mean()) / values.std()

    np.testing.assert_allclose(scores["maeday+patchcore"],
                               standardised(scores["maeday"]) + standardised(scores["patchcore"]), rtol=1e-6, atol=1e-9)
    # 2xPatchCore: seed 0 plus another standardised PatchCore (seed 1), not MAEDAY.
    second = scores["2xpatchcore"] - standardised(scores["patchcore"])
    assert abs(second.mean()) < 1e-9 and second.std() == pytest.approx(1.0, rel=1e-6)
    assert not np.allclose(second, standardised(scores["maeday"]))
    header = _table_rows((tmp_path / "out" / "tables.md").read_text(), "Table 1. Image-level ROC-AUC")["disc"]
    assert list(header)[1:] == ["1-shot PC", "1-shot MAEDAY", "1-shot 2×PC", "1-shot MAEDAY+PC"]
    # ... but another PatchCore would not fit the recorded units.
    capsys.readouterr()  # (progress bars of the runs above, shown when no earlier test turned them off)
    assert "patchcore" in _run_error(capsys, argv[:-1] + ["48"])
    assert "ensemble_normalization" in _run_error(capsys, argv + ["--ensemble-normalization", "none"])
    assert evaluate_script.main(maeday_only) == 0  # leaving the ensemble out again is fine
    assert evaluate_script.main(argv) == 0  # and adding it back, normalised as before

    # The paper's plain sum, in another folder: the raw scores added, the units record the choice.
    plain = argv + ["--ensemble-normalization", "none"]
    plain[plain.index("--output-dir") + 1] = str(tmp_path / "plain")
    assert evaluate_script.main(plain) == 0
    units = json.loads((tmp_path / "plain" / "results.json").read_text())["units"]
    plain_scores = {unit["method"]: np.array(unit["image_scores"]) for unit in units}
    np.testing.assert_allclose(plain_scores["maeday+patchcore"], plain_scores["maeday"] + plain_scores["patchcore"],
                               rtol=1e-6)
    assert {unit["settings"]["ensemble_normalization"] for unit in units} == {"none"}
    assert "needs ensemble" in _run_error(capsys, maeday_only + ["--ensemble-normalization", "robust"])


def test_the_full_finetune_ablation_is_a_protocol_option(tiny_checkpoint, synthetic_root, tmp_path):
    argv = ["--model", str(tiny_checkpoint), "--dataset", f"synthetic:{synthetic_root}", "--output-dir", str(tmp_path)]
    configs = [evaluate_script.config_from_args(evaluate_script.build_parser().parse_args(argv + extra))
               for extra in ([], ["--full-finetune"])]
    assert [(c.finetune.full_finetune, c.finetune.resolved_learning_rate) for c in configs] == [(False, 1e-2),
                                                                                                 (True, 1e-4)]
    assert configs[0].settings()["finetune"] != configs[1].settings()["finetune"]  # a resume cannot mix the two


def test_a_second_gpu_is_refused_where_the_fine_tunes_would_train_on_the_first(tiny_checkpoint, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1 with device='cuda'"):
        ProtocolConfig(tiny_checkpoint, "unused", "unused", shots=(0, 1), device="cuda:1", bf16=False)
    assert ProtocolConfig(tiny_checkpoint, "unused", "unused", shots=(0,), device="cuda:1", bf16=False).device == (
        "cuda:1"  # zero-shot only: nothing is fine-tuned
    )


def test_a_resume_after_the_models_weights_changed_is_refused(synthetic_root, tmp_path, capsys):
    from conftest import make_tiny_model, save_tiny_checkpoint

    from maeday_hf.protocol import model_weights_digest

    model = tmp_path / "model"
    save_tiny_checkpoint(str(model))
    first = model_weights_digest(str(model))
    argv = _argv(model, synthetic_root, tmp_path / "out", "--shots", "0", "--repetitions")
    assert evaluate_script.main(argv) == 0
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["model_weights"] == first
    assert evaluate_script.main(argv) == 0  # the same checkpoint: resumes
    # The same folder, other weights (retrained into it, say): its units would be mixed with the earlier ones.
    make_tiny_model(seed=7).save_pretrained(model)
    assert model_weights_digest(str(model)) != first
    capsys.readouterr()  # (the save's progress bar)
    assert "the model's weight files changed since" in _run_error(capsys, argv)
    # A run recorded before the digest was kept resumes as before.
    settings_path = tmp_path / "out" / "settings.json"
    settings = json.loads(settings_path.read_text())
    del settings["model_weights"]
    settings_path.write_text(json.dumps(settings))
    for unit in (tmp_path / "out" / "units").rglob("*.json"):
        record = json.loads(unit.read_text())
        del record["settings"]["model_weights"]
        unit.write_text(json.dumps(record))
    assert evaluate_script.main(argv) == 0


def test_the_weights_digest_follows_the_contents_of_every_shard(tmp_path):
    from conftest import make_tiny_model

    from maeday_hf.protocol import model_weights_digest

    model = make_tiny_model(seed=3)
    model.save_pretrained(tmp_path / "whole")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    whole, sharded = model_weights_digest(str(tmp_path / "whole")), model_weights_digest(str(tmp_path / "sharded"))
    assert whole is not None and sharded is not None
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of the last shard's last tensor
    shard.write_bytes(bytes(data))
    assert model_weights_digest(str(tmp_path / "sharded")) != sharded
    assert model_weights_digest(str(tmp_path / "missing")) is None
    # A few-shot adapter folder: its LoRA weights and its base's.
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter-run" / "adapter"
    adapter.mkdir(parents=True)
    save_file({"lora_A": torch.ones(2, 2)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "whole")}))
    first = model_weights_digest(str(tmp_path / "adapter-run"))
    assert first is not None and first != whole
    make_tiny_model(seed=4).save_pretrained(tmp_path / "whole")  # the base replaced
    assert model_weights_digest(str(tmp_path / "adapter-run")) != first
    second = model_weights_digest(str(tmp_path / "adapter-run"))
    save_file({"lora_A": torch.zeros(2, 2)}, str(adapter / "adapter_model.safetensors"))  # the adapter retrained
    assert model_weights_digest(str(tmp_path / "adapter-run")) not in (first, second)


def test_the_weights_digest_is_found_once_per_run(tiny_checkpoint, monkeypatch):
    import maeday_hf.protocol as protocol

    calls = []
    monkeypatch.setattr(protocol, "model_weights_digest", lambda model: calls.append(model) or "d1")
    config = ProtocolConfig(tiny_checkpoint, "unused", "unused", device="cpu")
    assert config.settings()["model_weights"] == config.settings()["model_weights"] == "d1"
    monkeypatch.setattr(protocol, "model_weights_digest", lambda model: None)  # e.g. the Hub gone midway
    assert config.settings()["model_weights"] == "d1" and calls == [tiny_checkpoint]


def test_a_resume_on_a_category_whose_files_changed_is_refused(tiny_checkpoint, tmp_path, capsys):
    root = tmp_path / "data"
    write_synthetic_mvtec(root, categories=CATEGORIES, num_train=3, num_test_good=2, num_test_per_defect=1,
                          image_size=32)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_checkpoint), "--dataset", str(root), "--output-dir", str(out), "--shots", "0",
            "--repetitions", *FAST]
    assert evaluate_script.main([*argv, "--categories", CATEGORIES[0]]) == 0
    first = json.loads((out / "settings.json").read_text())["data_digests"]
    assert list(first) == [CATEGORIES[0]]
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["digests"] == first
    assert all(unit["data_digest"] == first[CATEGORIES[0]] for unit in results["units"])
    # Another category added: the first keeps its digest, the second gets its own.
    assert evaluate_script.main([*argv, "--categories", *CATEGORIES]) == 0
    both = json.loads((out / "settings.json").read_text())["data_digests"]
    assert both[CATEGORIES[0]] == first[CATEGORIES[0]] and set(both) == set(CATEGORIES)
    # One ground-truth mask of the second category fixed in place (same path): its units were computed on the old one.
    mask_path = sorted((root / CATEGORIES[1] / "ground_truth").rglob("*.png"))[0]
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = 255 - mask[0, 0]
    Image.fromarray(mask).save(mask_path)
    err = _run_error(capsys, [*argv, "--categories", *CATEGORIES])
    assert f"The data of '{CATEGORIES[1]}' changed since" in err and str(out / "units" / CATEGORIES[1]) in err
    # The unchanged category alone still resumes; the changed one is computed again once its units are removed.
    assert evaluate_script.main([*argv, "--categories", CATEGORIES[0]]) == 0
    for unit in (out / "units" / CATEGORIES[1]).glob("*.json"):
        unit.unlink()
    (out / "units" / CATEGORIES[1] / ".k0-seed0-maeday.json.0123456789ab.tmp").write_text("")  # (a killed run's)
    assert evaluate_script.main([*argv, "--categories", *CATEGORIES]) == 0
    assert json.loads((out / "settings.json").read_text())["data_digests"][CATEGORIES[1]] != both[CATEGORIES[1]]
    # A unit of other data that got into the folder all the same (copied from another run, say) is refused when the
    # tables are made.
    unit_path = next((out / "units" / CATEGORIES[0]).glob("*.json"))
    record = json.loads(unit_path.read_text())
    record["data_digest"] = "0" * 16
    unit_path.write_text(json.dumps(record))
    assert f"{unit_path.name} was computed on other data of '{CATEGORIES[0]}'" in _run_error(
        capsys, [*argv, "--categories", *CATEGORIES])


def test_accelerate_launch_on_cpus_splits_the_units_of_a_zero_shot_run(tiny_checkpoint, synthetic_root, tmp_path):
    # Without a GPU, accelerate joins the launched processes only when its state is asked for the CPU: each process
    # took itself for the only one, computed every unit and wrote results.json (a fine-tune's Trainer set the state
    # up for all of them, so only runs that fine-tuned something were split).
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
        str(Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"),
        *_argv(tiny_checkpoint, synthetic_root, out, "--shots", "0", "--repetitions", "1", "--verbose"),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_CONFIG_FILE=str(tmp_path / "no-accelerate-config.yaml"))
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("results.json") == 1  # gathered by the main process alone
    computed = [line for line in completed.stderr.splitlines() if "maeday_hf.protocol: " in line and "/k0-" in line]
    units = [path for path in (out / "units").rglob("*.json")]
    assert len(units) >= len(CATEGORIES) * 2 and len(computed) == len(units)  # each unit computed once, not twice


def test_a_damaged_unit_file_is_named_with_the_way_out(protocol_run, tiny_checkpoint, synthetic_root, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(protocol_run, out)
    argv = _argv(tiny_checkpoint, synthetic_root, out, "--shots", "0", "1", "--shot-seeds", "2", "--repetitions", "1",
                 "2")
    unit = out / "units" / CATEGORIES[0] / "k0-seed0-maeday.json"
    for damage, problem in (("", "not valid JSON"), ("{}", "not a unit record")):
        unit.write_text(damage)
        err = _run_error(capsys, argv)
        assert f"{unit} is {problem}" in err and "remove it and rerun" in err
    unit.unlink()  # (as the message says: the unit is computed again)
    assert evaluate_script.main(argv) == 0 and "metrics" in json.loads(unit.read_text())


def test_a_model_that_cannot_be_loaded_is_named_before_any_data_is_written(tmp_path, capsys):
    # A synthetic dataset is written when its categories are loaded: a bad --model wrote 3 MB of it first.
    argv = ["--model", str(tmp_path / "no-model"), "--dataset", f"synthetic:{tmp_path / 'new-synthetic'}",
            "--output-dir", str(tmp_path / "out"), "--categories", *CATEGORIES, *FAST]
    assert "no-model" in _run_error(capsys, argv)
    assert not (tmp_path / "new-synthetic").exists() and not (tmp_path / "out").exists()


def test_matplotlib_missing_or_broken_is_told_apart(monkeypatch):
    import builtins

    from maeday_hf.report import require_matplotlib

    real_import = builtins.__import__

    def importing_matplotlib_raises(error):
        def patched(name, *args, **kwargs):
            if name == "matplotlib.figure":
                raise error
            return real_import(name, *args, **kwargs)
        return patched

    not_installed = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
    monkeypatch.setattr(builtins, "__import__", importing_matplotlib_raises(not_installed))
    with pytest.raises(ImportError, match=r"need matplotlib: pip install \"maeday-hf\[plots\]\" \(or pass --no-plots"):
        require_matplotlib()
    # Installed, but a piece of it cannot load (built for another Python), or built for numpy 1 under numpy 2.
    for broken in (ModuleNotFoundError("No module named 'matplotlib._path'", name="matplotlib._path"),
                   ImportError("numpy.core.multiarray failed to import")):
        monkeypatch.setattr(builtins, "__import__", importing_matplotlib_raises(broken))
        with pytest.raises(ImportError, match=rf"installed but fails to import \({type(broken).__name__}: "
                                              rf"{re.escape(str(broken))}\): pip install -U"):
            require_matplotlib()


# --- pinned by a mutation review ----------------------------------------------------------------------------------


def test_cells_are_means_over_every_shot_seed_and_a_mean_over_missing_categories_is_blank():
    from maeday_hf.report import render_category_table, summarize

    records = [
        {"category": "bottle", "method": "maeday", "shots": 1, "shot_seed": seed, "study": "main",
         "metrics": {"image_roc_auc": value}}
        for seed, value in ((0, 0.1), (1, 0.2), (2, 0.9))  # three seeds: the mean (0.4) is not the median (0.2)
    ]
    assert summarize(records, "image_roc_auc")[("bottle", 1, "maeday")]["mean"] == pytest.approx(0.4)
    table = render_category_table(records, "image_roc_auc", ["bottle", "wood"])
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    assert rows["Mean (Objects)"] == "40.0" and rows["Mean (All)"] == "–"  # (no wood: not a mean of bottle alone)


@pytest.fixture(scope="module")
def patchcore_sized_root(tmp_path_factory) -> Path:
    """One category at 64 px (PatchCore's Gaussian, σ = 4, needs maps larger than its 33 px kernel)."""
    return write_synthetic_mvtec(tmp_path_factory.mktemp("synthetic64"), categories=["disc"], num_train=4,
                                 num_test_good=2, num_test_per_defect=1, image_size=64)


def _protocol_config(model, root, output_dir, **overrides) -> ProtocolConfig:
    settings = dict(categories=["disc"], num_masks=2, repetitions=(), plots=False, show_progress=False, device="cpu",
                    finetune=FinetuneConfig(num_steps=2, batch_size=4, learning_rate=0.2))
    return ProtocolConfig(model, str(root), str(output_dir), **{**settings, **overrides})


def test_units_score_with_the_runs_mask_ratio_and_pair_each_image_with_its_own_mask(
    tiny_checkpoint, patchcore_sized_root, tmp_path, monkeypatch
):
    from maeday_hf.modeling import load_detector

    seen = []
    real = protocol.compute_metrics
    monkeypatch.setattr(protocol, "compute_metrics", lambda predictions, labels, gt_masks: seen.append(
        (predictions, labels, gt_masks)) or real(predictions, labels, gt_masks))
    protocol.run_protocol(_protocol_config(tiny_checkpoint, patchcore_sized_root, tmp_path / "out", shots=(0,),
                                           mask_ratio=0.5))
    (predictions, labels, gt_masks), = seen
    assert [mask is not None and bool(mask.any()) for mask in gt_masks] == [bool(label) for label in labels]
    test = load_mvtec(patchcore_sized_root, "disc")["test"]
    direct = load_detector(tiny_checkpoint, device="cpu")(list(test["image"]), num_masks=2, mask_ratio=0.5, seed=0,
                                                          threshold=None)
    np.testing.assert_allclose([p["score"] for p in predictions], [r["score"] for r in direct], rtol=1e-5)


def test_patchcore_units_fit_the_recorded_shots_with_two_coreset_seeds(
    tiny_checkpoint, patchcore_sized_root, tmp_path, monkeypatch
):
    import maeday_hf.patchcore as patchcore_module
    from transformers import ResNetBackbone, ResNetConfig

    from maeday_hf.ensemble import ensemble_predictions
    from maeday_hf.patchcore import PatchCoreConfig

    torch.manual_seed(0)
    backbone = tmp_path / "resnet"
    ResNetBackbone(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic",
                                out_indices=[4])).eval().save_pretrained(backbone)
    fitted = []
    real = patchcore_module.fit_patchcores

    def recording(shots, *args, **kwargs):
        models = real(shots, *args, **kwargs)
        fitted.append(([np.asarray(shot) for shot in shots], models))
        return models

    monkeypatch.setattr(patchcore_module, "fit_patchcores", recording)
    # A bank smaller than the shots' patches (min_coreset_size=1), so the two coreset seeds pick different banks.
    patchcore = PatchCoreConfig(backbone=str(backbone), image_size=64, min_coreset_size=1, coreset_ratio=0.3)
    protocol.run_protocol(_protocol_config(tiny_checkpoint, patchcore_sized_root, tmp_path / "out", shots=(1,),
                                           num_shot_seeds=2, ensemble="patchcore", patchcore=patchcore,
                                           pixel_metrics=False))
    splits = load_mvtec(patchcore_sized_root, "disc")
    test_images = list(splits["test"]["image"])
    assert len(fitted) == 2
    for seed, (shot_images, models) in enumerate(fitted):
        assert not torch.equal(models[0].memory_bank, models[1].memory_bank)
        unit = json.loads((tmp_path / "out" / "units" / "disc" / f"k1-seed{seed}-2xpatchcore.json").read_text())
        recorded_shots = [np.asarray(splits["train"][index]["image"].convert("RGB")) for index in unit["shot_indices"]]
        assert len(shot_images) == len(recorded_shots)
        assert all(np.array_equal(shot, recorded) for shot, recorded in zip(shot_images, recorded_shots))
        expected = ensemble_predictions([models[0].predict(test_images), models[1].predict(test_images)])
        np.testing.assert_allclose(unit["image_scores"], [p["score"] for p in expected], rtol=1e-5)


def test_the_defaults_are_the_papers_protocol():
    from maeday_hf.masking import make_mask_noise

    config = ProtocolConfig("unused", "unused", "unused", device="cpu")
    assert (config.num_masks, config.mask_ratio, config.num_shot_seeds, config.mask_schedule) == (32, 0.75, 3, "random")
    assert torch.equal(make_mask_noise(4, 16, seed=0), make_mask_noise(4, 16, 0.75, "random", seed=0))
