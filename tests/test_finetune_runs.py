"""Few-shot fine-tuning runs end to end: bad input, interruption, push, split shots, full fine-tune, accelerate."""

from __future__ import annotations

import dataclasses
import json
import time
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
from PIL import Image
from transformers import BertConfig

from maeday_hf.cli import main as cli_main
from maeday_hf.data import select_shots
from maeday_hf.finetune import FinetuneConfig, MaedayTrainer, finetune
from maeday_hf.modeling import load_detector
from maeday_hf.shot_views import shots_from_split

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_steps=2, batch_size=2, disable_tqdm=True, use_cpu=True, calibration_views_per_shot=1,
            calibration_num_masks=2)


@pytest.fixture
def shot_files(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        path = tmp_path / "shots" / f"{index:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts: errors must come before it."""
    monkeypatch.setattr(MaedayTrainer, "train", mock.Mock(side_effect=AssertionError("training started")))


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(full_finetune=True, lora_rank=8), ValueError, "full_finetune"),
        (dict(num_steps=0), ValueError, "num_steps"),
        (dict(batch_size=True), TypeError, "batch_size"),  # a wrong type is a TypeError, as everywhere
        (dict(learning_rate=-1.0), ValueError, "learning_rate"),
        (dict(mask_ratio=1.0), ValueError, "mask_ratio"),
        (dict(lora_dropout=1.5), ValueError, "lora_dropout"),
        (dict(min_crop_scale=0.0), ValueError, "min_crop_scale"),
        (dict(bf16="yes"), TypeError, "bf16"),
        (dict(seed=2**32), ValueError, "seed"),  # refused here, not by the Trainer after the model has loaded
        (dict(seed=2**32 + 5), ValueError, r"seed must be in \[0, 2\*\*32\)"),  # would repeat seed 5's draws
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(momentum=1.0), ValueError, "momentum must be < 1"),
        (dict(graph_warmup_steps=0), ValueError, "graph_warmup_steps"),
        (dict(calibration_num_std=float("nan")), ValueError, "calibration_num_std"),  # not "training diverged", later
        (dict(calibration_num_std=-1.0), ValueError, "calibration_num_std"),
        # A flag given as a string: "False" is truthy, and would train all weights (or keep the augmentation).
        (dict(full_finetune="False"), TypeError, "full_finetune must be True or False, got 'False'"),
        (dict(augment="no"), TypeError, "augment must be True or False"),
        (dict(use_cpu=1), TypeError, "use_cpu must be True or False"),
        (dict(cuda_graph=None), TypeError, "cuda_graph must be True or False"),
        (dict(disable_tqdm="yes"), TypeError, "disable_tqdm must be True or False"),
        (dict(min_crop_scale="0.5"), TypeError, "min_crop_scale must be a number"),
        (dict(max_rotation_degrees=float("nan")), ValueError, "max_rotation_degrees"),
        (dict(view_supersampling=0.5), ValueError, r"view_supersampling must be in \[1, 8\]"),
        (dict(view_supersampling=float("inf")), ValueError, "view_supersampling"),
        (dict(view_supersampling=float("nan")), ValueError, "view_supersampling"),
        (dict(view_supersampling="2"), TypeError, "view_supersampling must be a number"),
    ],
)
def test_config_rejects_bad_values_and_conflicts(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        FinetuneConfig(**kwargs)


def test_config_defaults_are_the_paper_recipe():
    recipe = FinetuneConfig().recipe()
    assert [recipe[key] for key in ("num_steps", "batch_size", "learning_rate", "momentum", "weight_decay")] == [
        50, 32, 1e-2, 0.9, 0.05]
    assert (recipe["lora_rank"], recipe["lora_alpha"], recipe["lora_dropout"], recipe["mask_ratio"]) == (
        32, 32.0, 0.0, 0.75)
    full = FinetuneConfig(full_finetune=True).recipe()
    assert full["learning_rate"] == 1e-4 and full["lora_rank"] is full["lora_alpha"] is full["lora_dropout"] is None


def _optimizer_learning_rate(config: FinetuneConfig, tmp_path) -> float:
    import torch

    from conftest import make_tiny_model
    from maeday_hf.finetune import build_trainer
    from maeday_hf.shot_views import ShotViews

    model = make_tiny_model()
    views = ShotViews(torch.randn(1, 3, 32, 32), num_views=4, num_patches=16)
    trainer = build_trainer(model, model, views, dataclasses.replace(config, use_cpu=True, bf16=False), tmp_path)
    return trainer.create_optimizer().param_groups[0]["lr"]


@pytest.mark.parametrize(
    "overrides, source_side",
    [
        (dict(), 72),  # two shots of 72 x 72 and one of 108 x 80 on a 32 px model: the smallest side allows 2.25x
        (dict(view_supersampling=1.5), 48),
        (dict(view_supersampling=1.0), None),  # cut from the shots as the model sees them
        (dict(augment=False), None),  # no crops to cut
    ],
)
def test_views_are_cut_from_the_shots_at_the_largest_size_they_allow(
    overrides, source_side, tiny_checkpoint, tmp_path, monkeypatch
):
    import maeday_hf.finetune as finetune_module

    rng = np.random.default_rng(1)
    shots = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in ((72, 72), (108, 80), (72, 72))]
    seen = {}
    real_views, real_calibration = finetune_module.ShotViews, finetune_module.calibrate_threshold

    def recording_views(pixel_values, *args, source_pixel_values=None, **kwargs):
        seen["views"] = (pixel_values, source_pixel_values)
        return real_views(pixel_values, *args, source_pixel_values=source_pixel_values, **kwargs)

    def recording_calibration(*args, source_pixel_values=None, **kwargs):
        seen["calibration"] = source_pixel_values
        return real_calibration(*args, source_pixel_values=source_pixel_values, **kwargs)

    monkeypatch.setattr(finetune_module, "ShotViews", recording_views)
    monkeypatch.setattr(finetune_module, "calibrate_threshold", recording_calibration)
    config = FinetuneConfig(**{**TINY, "calibration_views_per_shot": 2, **overrides})
    finetune(tiny_checkpoint, shots, tmp_path / "out", config)
    pixel_values, source = seen["views"]
    assert pixel_values.shape == (3, 3, 32, 32)
    assert seen["calibration"] is source
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["recipe"]["view_supersampling"] == config.view_supersampling
    assert log["view_source_size"] == (None if source_side is None else [source_side, source_side])
    if source_side is None:
        assert source is None
        return
    assert source.shape == (3, 3, source_side, source_side)
    # Each shot processed as a query is, only at the larger size.
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_checkpoint)
    expected = processor(images=shots, size={"height": source_side, "width": source_side}, return_tensors="pt")
    assert np.array_equal(source.numpy(), expected["pixel_values"].numpy())


def test_replacing_full_finetune_gives_the_other_modes_defaults(tiny_checkpoint, tmp_path):
    lora = dataclasses.replace(FinetuneConfig(full_finetune=True), full_finetune=False)
    assert _optimizer_learning_rate(lora, tmp_path) == 1e-2  # not the full fine-tune's 1e-4
    assert (lora.recipe()["learning_rate"], lora.recipe()["lora_rank"], lora.recipe()["lora_alpha"]) == (
        1e-2, 32, 32.0)
    full = dataclasses.replace(FinetuneConfig(), full_finetune=True)  # the LoRA defaults were never set by the user
    assert _optimizer_learning_rate(full, tmp_path) == 1e-4 and full.recipe()["lora_rank"] is None
    # Explicit values stay, and the protocol records the values a run uses.
    assert dataclasses.replace(FinetuneConfig(learning_rate=0.5), full_finetune=True).recipe()["learning_rate"] == 0.5
    from maeday_hf.protocol import ProtocolConfig

    settings = ProtocolConfig(tiny_checkpoint, "unused", "unused", device="cpu",
                              finetune=FinetuneConfig(full_finetune=True)).settings()
    assert settings["finetune"]["learning_rate"] == 1e-4 and settings["finetune"]["lora_rank"] is None
    assert ProtocolConfig(tiny_checkpoint, "unused", "unused", device="cpu").settings()["finetune"]["lora_rank"] == 32


@pytest.mark.parametrize("native", [False, True])
def test_precision_defaults_to_bf16_where_native_and_the_log_records_what_ran(
    monkeypatch, tiny_checkpoint, shot_files, tmp_path, native
):
    import maeday_hf.finetune as finetune_module

    monkeypatch.setattr(finetune_module, "runs_bfloat16_natively", lambda device: native)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    ran_in = []
    original_train = MaedayTrainer.train

    def train(self, *args, **kwargs):
        ran_in.append(self.args.mixed_precision)
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(MaedayTrainer, "train", train)
    for bf16, expected in ((None, native), (False, False), (True, True)):
        out = tmp_path / f"out-{bf16}"
        finetune(tiny_checkpoint, shot_files[:1], out, FinetuneConfig(**TINY, bf16=bf16))
        assert ran_in[-1] == ("bf16" if expected else "no")
        log = json.loads((out / "training_log.json").read_text())
        assert log["recipe"]["bf16"] is expected and log["mixed_precision"] == ran_in[-1]
        assert log["step_loop"] == "trainer"  # (CUDA graph replays need a GPU)


@pytest.mark.parametrize(
    "launcher, bf16, native, expected",
    [
        (None, None, True, "bf16"), (None, None, False, "no"),  # no launcher: the hardware decides
        ("no", None, True, "no"), ("bf16", None, False, "bf16"),  # accelerate launch --mixed_precision decides
        ("bf16", False, True, "no"), ("no", True, False, "bf16"),  # an explicit bf16 wins over both
        (None, True, False, "bf16"),  # also on a machine without a GPU and without use_cpu
        ("fp16", None, False, "no"),  # on the CPU accelerate ignores fp16: recorded as what runs (float32); on a GPU
                                      # it stays fp16 (below)
    ],
)
def test_precision_comes_from_the_config_then_the_launcher_then_the_hardware(
    monkeypatch, caplog, tmp_path, launcher, bf16, native, expected
):
    import torch

    import maeday_hf.finetune as finetune_module
    from conftest import make_tiny_model
    from maeday_hf.lora import add_lora, make_lora_config
    from maeday_hf.shot_views import ShotViews

    if launcher == "fp16" and torch.cuda.is_available():
        expected = "fp16"  # the Trainer loop's fp16 autocast with loss scaling
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    monkeypatch.setattr(finetune_module, "runs_bfloat16_natively", lambda device: native)
    model = make_tiny_model()
    views = ShotViews(torch.randn(1, 3, 32, 32), num_views=4, num_patches=16)
    config = FinetuneConfig(num_steps=2, batch_size=2, disable_tqdm=True, bf16=bf16)
    caplog.set_level("INFO", logger="maeday_hf.finetune")
    trainer = finetune_module.build_trainer(add_lora(model, make_lora_config(model)), model, views, config, tmp_path)
    assert trainer.args.mixed_precision == expected and trainer.accelerator.mixed_precision == expected
    assert finetune_module.trains_in_bf16(trainer) is (expected == "bf16")
    overridden = bf16 is not None and launcher is not None and launcher != expected
    notes = [record for record in caplog.records if "overrides the launcher" in record.getMessage()]
    assert bool(notes) is overridden
    assert all(record.levelname == ("INFO" if launcher == "no" else "WARNING") for record in notes)


def test_bad_input_fails_before_training(tiny_checkpoint, shot_files, tmp_path, no_training):
    out = tmp_path / "out"
    fast = FinetuneConfig(**TINY)
    with pytest.raises(ValueError, match="at least one"):
        finetune(tiny_checkpoint, [], out, fast)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"No shot images .* in folder '[^']*empty'\.$"):
        finetune(tiny_checkpoint, [empty], out, fast)
    (tmp_path / "category" / "train" / "good").mkdir(parents=True)  # images one level further down
    (tmp_path / "category" / "test").mkdir()
    with pytest.raises(ValueError, match=r"its subfolders test, train are not searched"):
        finetune(tiny_checkpoint, [tmp_path / "category"], out, fast)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        finetune(tiny_checkpoint, [shot_files[0], broken], out, fast)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        finetune(tiny_checkpoint, [tmp_path / "missing.png"], out, fast)
    split = datasets.Dataset.from_dict({"image": [str(p) for p in shot_files]}, features=datasets.Features(
        {"image": datasets.Image()}))
    with pytest.raises(ValueError, match="k=4"):
        finetune(tiny_checkpoint, split, out, fast, num_shots=4)
    with pytest.raises(ValueError, match="num_shots"):
        finetune(tiny_checkpoint, shot_files, out, fast, num_shots=2)
    not_mae = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(not_mae)
    with pytest.raises(ValueError, match="'bert'"):
        finetune(not_mae, shot_files, out, fast)
    with pytest.raises(ValueError, match="hub_model_id"):
        finetune(tiny_checkpoint, shot_files, out, fast, push_to_hub=True)
    with pytest.raises(ValueError, match="push_to_hub"):
        finetune(tiny_checkpoint, shot_files, out, fast, hub_model_id="org/name")
    with pytest.raises(ValueError, match="hub_private given without push_to_hub"):
        finetune(tiny_checkpoint, shot_files, out, fast, hub_private=True)
    with pytest.raises(ValueError, match="Cannot push to 'org/name'.*nothing was trained") as refused:  # offline
        finetune(tiny_checkpoint, shot_files, out, fast, push_to_hub=True, hub_model_id="org/name")
    assert ".." not in str(refused.value)  # (the Hub's sentence ends with its own period)
    with pytest.raises(ValueError, match=r"base_model_id must be a Hub model id .*, got '/abs/copy'"):
        finetune(tiny_checkpoint, shot_files, out, fast, base_model_id="/abs/copy")
    with pytest.raises(ValueError, match=r"but the base 'org/other' is a Hub id itself: drop base_model_id"):
        finetune("org/other", shot_files, out, fast, base_model_id="org/name")
    with pytest.raises(FileNotFoundError, match=r"Base model folder not found: '/data/vit-mae-base'"):  # (mistyped)
        finetune("/data/vit-mae-base", shot_files, out, fast, base_model_id="org/name")
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        finetune(tiny_checkpoint, shot_files, out, fast)


def test_a_base_whose_processor_center_crops_is_refused_before_training(tiny_checkpoint, shot_files, tmp_path):
    import shutil

    base = tmp_path / "cropping-base"
    shutil.copytree(tiny_checkpoint, base)
    processor = json.loads((base / "preprocessor_config.json").read_text())
    (base / "preprocessor_config.json").write_text(json.dumps({**processor, "do_center_crop": True}))
    with pytest.raises(ValueError, match="center-crops"):
        finetune(base, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY))
    assert not (tmp_path / "out").exists()


def test_a_single_array_or_image_is_one_shot():
    import torch

    from maeday_hf.shot_views import load_shot_images

    array = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    images, names = load_shot_images(array)  # not 20 one-row images
    assert names == ["<image 0>"] and images[0].size == (30, 20)
    np.testing.assert_array_equal(np.asarray(images[0]), array)
    images, names = load_shot_images(Image.fromarray(array))
    assert names == ["<image 0>"] and images[0].size == (30, 20)
    stack = np.stack([array, array[::-1]])  # (N, H, W, C): N shots, as PatchCore and the pipeline read it
    images, names = load_shot_images(stack)
    assert names == ["<image 0>", "<image 1>"] and np.array_equal(np.asarray(images[1]), array[::-1])
    with pytest.raises(TypeError, match="Tensor"):  # one unsupported shot, named, not its rows
        load_shot_images(torch.zeros(3, 20, 30))
    with pytest.raises(TypeError, match="int"):
        load_shot_images(3)


def test_a_shot_file_given_twice_is_one_shot(shot_files, tmp_path, caplog):
    from maeday_hf.shot_views import load_shot_images

    folder = shot_files[0].parent
    relative = os.path.relpath(shot_files[0])  # the same file, spelled otherwise
    (tmp_path / "link.png").symlink_to(shot_files[1])
    images, names = load_shot_images([shot_files[0], relative, folder, tmp_path / "link.png"])
    assert names == [os.fspath(path) for path in shot_files]  # each file once, where first given
    assert len(images) == 3
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 3 and all("given again: used once" in warning for warning in warnings)


def test_more_shots_than_training_views_is_refused(tiny_checkpoint, shot_files, tmp_path, no_training):
    # 3 shots, 1 step of 2 views: shot 3 would never be trained on, yet calibrated as normal.
    with pytest.raises(ValueError, match="3 shots .* 2 training views"):
        finetune(tiny_checkpoint, shot_files, tmp_path / "out", FinetuneConfig(**{**TINY, "num_steps": 1}))


@pytest.mark.parametrize("full_finetune", [False, True])
def test_an_output_folder_that_is_or_holds_the_base_is_refused(
    tiny_checkpoint, shot_files, tmp_path, no_training, full_finetune
):
    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_checkpoint, base)
    config = FinetuneConfig(full_finetune=full_finetune, **TINY)
    for output_dir in (base, base / ".." / "base", tmp_path / "models", tmp_path):
        with pytest.raises(ValueError, match="base model folder"):
            finetune(base, shot_files[:1], output_dir, config, overwrite=True)
    assert (base / "model.safetensors").is_file()


def test_a_mask_ratio_that_hides_every_patch_is_refused_before_training(tiny_checkpoint, shot_files, tmp_path,
                                                                         no_training):
    with pytest.raises(ValueError, match="0 of the model's 16 patches"):
        finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**{**TINY, "mask_ratio": 0.95}))
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_an_earlier_runs_folder(tiny_checkpoint, shot_files, tmp_path, monkeypatch):
    work = tmp_path / "project"
    (work / "src").mkdir(parents=True)
    (work / "notes.txt").write_text("kept")
    monkeypatch.chdir(work)
    with pytest.raises(FileExistsError, match="no fine-tune wrote"):
        finetune(tiny_checkpoint, shot_files[:1], ".", FinetuneConfig(**TINY), overwrite=True)
    assert (work / "notes.txt").read_text() == "kept" and (work / "src").is_dir()
    # An earlier run's folder (and an empty one) is replaced.
    first = finetune(tiny_checkpoint, shot_files[:1], tmp_path / "run", FinetuneConfig(**TINY))
    finetune(tiny_checkpoint, shot_files[:1], tmp_path / "run", FinetuneConfig(**{**TINY, "seed": 1}), overwrite=True)
    assert json.loads((first.output_dir / "training_log.json").read_text())["recipe"]["seed"] == 1
    (tmp_path / "empty").mkdir()
    finetune(tiny_checkpoint, shot_files[:1], tmp_path / "empty", FinetuneConfig(**TINY), overwrite=True)
    # Hidden metadata (Finder's .DS_Store, a Hub snapshot's .gitattributes) does not make a run's folder foreign.
    for name in (".DS_Store", ".gitattributes"):
        (first.output_dir / name).write_text("metadata")
    finetune(tiny_checkpoint, shot_files[:1], tmp_path / "run", FinetuneConfig(**TINY), overwrite=True)
    # An earlier run's folder that someone added their own files to is theirs now.
    (first.output_dir / "eval").mkdir()
    (first.output_dir / "eval" / "results.csv").write_text("kept")
    with pytest.raises(FileExistsError, match=r"no fine-tune wrote \(eval\)"):
        finetune(tiny_checkpoint, shot_files[:1], tmp_path / "run", FinetuneConfig(**TINY), overwrite=True)
    assert (first.output_dir / "eval" / "results.csv").read_text() == "kept"
    shutil.rmtree(first.output_dir / "eval")
    # Files of kinds a run writes, but not a run's: a JSON of the user's, a note in adapter/, a script of their own.
    for name in ("eval_results.json", "adapter/NOTES.txt", "train.py", "report.py"):  # (report.py: a maeday_hf
        # module's name, but not one a run ships)
        (first.output_dir / name).write_text("kept")
        with pytest.raises(FileExistsError, match=f"no fine-tune wrote \\({name}\\)"):
            finetune(tiny_checkpoint, shot_files[:1], tmp_path / "run", FinetuneConfig(**TINY), overwrite=True)
        assert (first.output_dir / name).read_text() == "kept"
        (first.output_dir / name).unlink()
    # Someone's model folder, with a training log of another tool: not a fine-tune's folder.
    model = tmp_path / "my-model"
    shutil.copytree(tiny_checkpoint, model)
    (model / "training_log.json").write_text('[{"epoch": 1}]')
    (model / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match="no fine-tune wrote \\(no training_log.json of a fine-tune\\)"):
        finetune(tiny_checkpoint, shot_files[:1], model, FinetuneConfig(**TINY), overwrite=True)
    assert (model / "tokenizer.json").is_file() and (model / "model.safetensors").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_appears_during_training_is_left_alone(tiny_checkpoint, shot_files, tmp_path, monkeypatch,
                                                            overwrite):
    out = tmp_path / "out"
    original_train = MaedayTrainer.train

    def train_while_someone_writes_the_folder(self, *args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("kept")
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(MaedayTrainer, "train", train_while_someone_writes_the_folder)
    with pytest.raises(FileExistsError, match="appeared while training") as raised:
        finetune(tiny_checkpoint, shot_files[:1], out, FinetuneConfig(**TINY), overwrite=overwrite)
    assert sorted(path.name for path in out.iterdir()) == ["theirs.txt"]
    kept = Path(str(raised.value).rsplit("'", 2)[-2])
    assert (kept / "training_log.json").is_file() and kept.parent == tmp_path


def test_two_runs_into_the_same_output_at_once_do_not_touch_each_others_work(tiny_checkpoint, shot_files, tmp_path,
                                                                              monkeypatch):
    import maeday_hf.finetune

    out = tmp_path / "out"
    original_calibrate = maeday_hf.finetune.calibrate_threshold
    second_started = []

    def calibrate_while_a_second_run_finishes(*args, **kwargs):
        # The first run has written its adapter into its unfinished folder; the second starts and finishes now.
        if not second_started:
            second_started.append(True)
            finetune(tiny_checkpoint, shot_files[:1], out, FinetuneConfig(**{**TINY, "seed": 1}))
        return original_calibrate(*args, **kwargs)

    monkeypatch.setattr(maeday_hf.finetune, "calibrate_threshold", calibrate_while_a_second_run_finishes)
    with pytest.raises(FileExistsError, match="appeared while training") as raised:
        finetune(tiny_checkpoint, shot_files[:1], out, FinetuneConfig(**TINY))
    assert json.loads((out / "training_log.json").read_text())["recipe"]["seed"] == 1  # the second run's, whole
    kept = Path(str(raised.value).rsplit("'", 2)[-2])  # the first run's, complete, beside it
    assert json.loads((kept / "training_log.json").read_text())["recipe"]["seed"] == 0
    assert load_detector(kept, device="cpu") and load_detector(out, device="cpu")
    assert not list(tmp_path.glob(".out.partial*"))


def test_shots_given_as_a_set_or_a_generator_are_read_once_and_checked(tiny_checkpoint, shot_files, tmp_path,
                                                                        no_training):
    shots = tmp_path / "data"
    shots.mkdir()
    shutil.copy(shot_files[0], shots / "a.png")
    for given in ({shots / "a.png"}, (path for path in [shots / "a.png"])):
        with pytest.raises(ValueError, match="the shot"):
            finetune(tiny_checkpoint, given, shots, FinetuneConfig(**TINY), overwrite=True)
    assert (shots / "a.png").is_file()


def test_a_hub_model_id_is_checked_before_training(tiny_checkpoint, shot_files, tmp_path, no_training):
    for repo_id in ("org/", "my org/x", "org/a..b", "org/-x"):
        with pytest.raises(ValueError, match="not a valid Hub repo id"):
            finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY), push_to_hub=True,
                     hub_model_id=repo_id)


def test_an_output_folder_that_is_or_holds_the_shots_is_refused(tiny_checkpoint, shot_files, tmp_path, no_training):
    shots = tmp_path / "data" / "good"
    shots.mkdir(parents=True)
    for path in shot_files[:2]:
        shutil.copy(path, shots)
    (shots / "notes.txt").write_text("kept")
    for given in ([shots], sorted(shots.glob("*.png"))):
        for output_dir in (shots, tmp_path / "data"):
            with pytest.raises(ValueError, match="the shot"):
                finetune(tiny_checkpoint, given, output_dir, FinetuneConfig(**TINY), overwrite=True)
    assert (shots / "notes.txt").read_text() == "kept" and len(list(shots.glob("*.png"))) == 2


def test_a_base_folder_given_with_a_tilde_is_expanded(tiny_checkpoint, shot_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_checkpoint, tmp_path / "base")
    result = finetune("~/base", shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY))
    adapter_config = json.loads((result.output_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "base")


@pytest.mark.parametrize("full_finetune", [False, True])
def test_a_half_precision_base_trains_in_float32_and_its_result_loads(shot_files, tmp_path, full_finetune):
    import torch

    from conftest import make_tiny_model, save_tiny_checkpoint

    base = save_tiny_checkpoint(tmp_path / "fp16-base")
    make_tiny_model().half().save_pretrained(base)  # the same weights, saved in fp16
    result = finetune(base, shot_files[:1], tmp_path / "out", FinetuneConfig(full_finetune=full_finetune, **TINY))
    # Loaded in float32, as trained and calibrated (not merged into fp16 weights): the shot scores as calibrated.
    detector = load_detector(result.output_dir, device="cpu")
    assert next(detector.model.parameters()).dtype == torch.float32
    score = detector(str(shot_files[0]), num_masks=TINY["calibration_num_masks"])["score"]
    assert score == pytest.approx(result.calibration.scores[0], rel=1e-5)


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_a_diverging_run_is_one_error_and_writes_nothing(tiny_checkpoint, shot_files, tmp_path, capsys, logging_steps):
    out = tmp_path / "out"
    # Logged step by step, the first non-finite loss is named; in windows, a NaN after the last one shows in the
    # threshold. Either way nothing is written (not a perfect 0.0 loss and a NaN threshold in config.json).
    named = r"loss logged at step \d of 3 is (nan|inf)" if logging_steps == 1 else "diverged"
    with pytest.raises(ValueError, match=f"{named}.*learning_rate"):
        finetune(tiny_checkpoint, shot_files[:1], out, FinetuneConfig(
            **{**TINY, "num_steps": 3}, learning_rate=1e6, logging_steps=logging_steps))
    assert sorted(os.listdir(tmp_path)) == ["shots"]
    capsys.readouterr()
    status = cli_main(["finetune", "--model", tiny_checkpoint, "--shots", str(shot_files[0]), "--output-dir", str(out),
                       "--steps", "3", "--batch-size", "2", "--learning-rate", "1e6", "--calibration-views", "1",
                       "--calibration-masks", "2", "--cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "diverged" in err[0] and "learning_rate" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["shots"]


def test_cli_conflicting_flags_give_one_line(tiny_checkpoint, shot_files, tmp_path, capsys, no_training):
    status = cli_main(["finetune", "--model", tiny_checkpoint, "--shots", str(shot_files[0]), "--output-dir",
                       str(tmp_path / "out"), "--full-finetune", "--lora-rank", "8"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("maeday: error:") and "--full-finetune" in err[0]
    assert "--lora-rank" in err[0] and "lora_rank" not in err[0]  # the command's options, not the Python fields
    status = cli_main(["finetune", "--model", tiny_checkpoint, "--output-dir", str(tmp_path / "out")])
    assert status == 2 and "--shots" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--steps", "0"], "--steps must be"),
        (["--max-rotation", "400"], "--max-rotation must be in [0, 180]"),
        (["--calibration-views", "0"], "--calibration-views must be"),
        (["--view-supersampling", "0.5"], "--view-supersampling must be in [1, 8]"),
        # The field's name where it is the setting, not the same word in the prose around it:
        (["--seed", "-1"], "--seed must be in [0, 2**32) (random generators keep 32 bits of a seed), got -1."),
        (["--full-finetune", "--lora-rank", "8", "--lora-alpha", "2"],
         "--lora-rank, --lora-alpha set together with --full-finetune=True"),
    ],
)
def test_cli_errors_name_the_options(options, message, tiny_checkpoint, shot_files, tmp_path, capsys, no_training):
    status = cli_main(["finetune", "--model", tiny_checkpoint, "--shots", str(shot_files[0]), "--output-dir",
                       str(tmp_path / "out"), *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err


def test_cli_refuses_zero_shots_from_a_dataset_naming_the_option(tmp_path, capsys, no_training):
    status = cli_main(["finetune", "--dataset-root", str(tmp_path), "--category", "c", "--num-shots", "0",
                       "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--num-shots must be >= 1, got 0" in err[0]


def test_cli_refuses_more_shots_than_the_category_has(tiny_checkpoint, tmp_path, capsys, no_training):
    from maeday_hf.synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(tmp_path / "data", categories=("disc",), num_train=2, num_test_good=1,
                                 num_test_per_defect=1, image_size=32)
    status = cli_main(["finetune", "--model", tiny_checkpoint, "--dataset-root", str(root), "--category", "disc",
                       "--num-shots", "5", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["maeday: error: --num-shots 5 is more than the 2 normal training images of 'disc'"]


def test_shots_labelled_anomalous_are_refused(tiny_checkpoint, shot_files, tmp_path, no_training):
    # A test split passed for the train split: its anomalous rows would be trained on as normal.
    split = datasets.Dataset.from_dict(
        {"image": [str(p) for p in shot_files], "label": [0, 1, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["good", "anomaly"])}),
    )
    with pytest.raises(ValueError, match=r"2 of the 3 shots are labelled anomalous \(rows 1, 2\)"):
        finetune(tiny_checkpoint, split, tmp_path / "out", FinetuneConfig(**TINY))
    with pytest.raises(ValueError, match="labelled anomalous"):  # picked with num_shots: every row, so both
        finetune(tiny_checkpoint, split, tmp_path / "out", FinetuneConfig(**TINY), num_shots=3)
    normal_only = split.filter(lambda row: row["label"] == 0)
    assert shots_from_split(normal_only, 1, seed=0)[1] == ["train[0] (shot seed 0)"]


def test_cli_options_reach_the_config_and_unset_ones_keep_its_defaults(tiny_checkpoint, shot_files, tmp_path,
                                                                       monkeypatch, capsys):
    import maeday_hf.finetune as finetune_module

    seen = []
    monkeypatch.setattr(finetune_module, "finetune",
                        lambda base, shots, out, config, **kwargs: seen.append((config, kwargs))
                        or mock.Mock(calibration=None))
    base = ["finetune", "--model", tiny_checkpoint, "--shots", str(shot_files[0]), "--output-dir", str(tmp_path / "o")]
    assert cli_main(base) == 0
    assert cli_main([*base, "--calibration-std", "2.5", "--min-crop-scale", "0.9", "--max-rotation", "5",
                     "--view-supersampling", "1.5", "--trainer-loop", "--base-model-id", "facebook/vit-mae-base"]) == 0
    (default, default_kwargs), (chosen, chosen_kwargs) = seen
    assert (default_kwargs["base_model_id"], chosen_kwargs["base_model_id"]) == (None, "facebook/vit-mae-base")
    assert default == FinetuneConfig(bf16=default.bf16, use_cpu=default.use_cpu)  # the paper's recipe
    assert (chosen.calibration_num_std, chosen.min_crop_scale, chosen.max_rotation_degrees, chosen.view_supersampling,
            chosen.cuda_graph) == (2.5, 0.9, 5.0, 1.5, False)
    assert cli_main([*base, "--shot-seed", "2"]) == 2  # picks nothing with --shots: refused, not ignored
    assert "--shot-seed" in capsys.readouterr().err


def test_interrupted_run_leaves_no_folder(tiny_checkpoint, shot_files, tmp_path, monkeypatch):
    monkeypatch.setattr(MaedayTrainer, "train", mock.Mock(side_effect=KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_checkpoint, shot_files, tmp_path / "out", FinetuneConfig(**TINY))
    assert sorted(os.listdir(tmp_path)) == ["shots"]


def _no_remote_card(*args, **kwargs):
    from huggingface_hub.errors import EntryNotFoundError

    raise EntryNotFoundError("README.md")  # (a new repo: no card yet)


def test_push_uploads_the_finished_folder(tiny_checkpoint, shot_files, tmp_path):
    uploaded = {}
    pushed_logs = []

    def upload_folder(repo_id, folder_path, **kwargs):
        uploaded[repo_id] = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*")
                                   if p.is_file())
        pushed_logs.append(json.loads((Path(folder_path) / "training_log.json").read_text()))
        pushed, local = (Path(root, "adapter", "adapter_model.safetensors") for root in (folder_path, tmp_path / "out"))
        assert pushed.read_bytes() == local.read_bytes()
        assert os.stat(pushed).st_ino == os.stat(local).st_ino  # hard-linked beside the run, not copied
        assert Path(folder_path).parent.parent == tmp_path
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.hf_hub_download.side_effect = _no_remote_card
        api_class.return_value.upload_folder.side_effect = upload_folder
        finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY), push_to_hub=True,
                 hub_model_id="my-org/tiny-1shot")
    # (private=None: an organisation whose repos are private by default keeps them so; False made them public)
    api_class.return_value.create_repo.assert_called_once_with("my-org/tiny-1shot", private=None, exist_ok=True)
    assert {"config.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "README.md",
            "calibration.json", "pipeline.py", "adapter_model.py", "preprocessor_config.json"} <= set(
        uploaded["my-org/tiny-1shot"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# MAEDAY few-shot LoRA adapter: my-org/tiny-1shot" in card
    # The pushed log names the shot as the card does; the local one keeps where it lies; nothing is left beside it.
    (pushed_log,) = pushed_logs
    local_log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert local_log["shots"] == [str(shot_files[0])] and pushed_log["shots"] == [shot_files[0].name]
    assert {key: value for key, value in pushed_log.items() if key != "shots"} == {
        key: value for key, value in local_log.items() if key != "shots"}
    assert str(tmp_path) not in json.dumps(pushed_log["shots"])
    assert not list(tmp_path.glob(".out.push-*"))
    # The base is a local folder: no path as Hub metadata (the Hub rejects it), no link to huggingface.co/<path>.
    assert "base_model:" not in card.split("---")[1] and "huggingface.co//" not in card


def test_a_push_names_a_local_copy_of_the_hub_base_by_its_folder_name_only(tiny_checkpoint, shot_files, tmp_path):
    pushed_logs = []

    def upload_folder(repo_id, folder_path, **kwargs):
        pushed_logs.append(json.loads((Path(folder_path) / "training_log.json").read_text()))
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.hf_hub_download.side_effect = _no_remote_card
        api_class.return_value.upload_folder.side_effect = upload_folder
        finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY), push_to_hub=True,
                 hub_model_id="my-org/tiny-1shot", base_model_id="my-org/tiny-base")
    (pushed_log,) = pushed_logs
    local_log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert local_log["base_model_folder"] == os.path.abspath(tiny_checkpoint)
    assert pushed_log["base_model_folder"] == os.path.basename(tiny_checkpoint)
    assert pushed_log["base_model"] == local_log["base_model"] == "my-org/tiny-base"


def test_a_killed_pushs_copy_is_removed_by_the_next_push(tiny_checkpoint, shot_files, tmp_path):
    from maeday_hf.atomic_io import let_go, make_held_partial_dir

    finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY))
    abandoned, held = make_held_partial_dir(tmp_path, ".out.push-")  # as a push killed outright leaves it
    let_go(held)
    os.utime(abandoned, (time.time() - 3600, time.time() - 3600))
    from maeday_hf.finetune import push_folder_to_hub

    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.hf_hub_download.side_effect = _no_remote_card
        api_class.return_value.upload_folder.return_value = mock.Mock(commit_url="u")
        push_folder_to_hub(tmp_path / "out", "my-org/x")
    assert not abandoned.exists() and not list(tmp_path.glob(".out.push-*"))


def test_a_push_leaves_the_repo_holding_exactly_the_folder(tiny_checkpoint, shot_files, tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    repo = {".gitattributes", "model.safetensors", "config.json", "README.md"}  # an earlier full fine-tune

    def upload_folder(repo_id, folder_path, delete_patterns=None, **kwargs):
        # One commit as the Hub applies it: remote files matching delete_patterns go (never .gitattributes), the
        # folder's files come.
        deleted = set(filter_repo_objects(sorted(repo), allow_patterns=delete_patterns)) if delete_patterns else set()
        repo.difference_update(deleted - {".gitattributes"})
        repo.update(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.hf_hub_download.side_effect = _no_remote_card
        api_class.return_value.upload_folder.side_effect = upload_folder
        finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY), push_to_hub=True,
                 hub_model_id="my-org/tiny-1shot")
    folder = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert "model.safetensors" not in folder and repo == folder | {".gitattributes"}


def test_a_push_keeps_the_owners_card_and_files_of_their_own(tiny_checkpoint, shot_files, tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    from maeday_hf.finetune import push_folder_to_hub

    finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY))
    from maeday_hf.detector_card import is_generated_text, marked_as_generated

    assert is_generated_text((tmp_path / "out" / "README.md").read_text())  # (a run's card is marked as maeday_hf's)
    earlier = marked_as_generated("# An earlier push's card\n")  # (maeday_hf's, unedited: replaced)
    # A fine-tune card of before the marker (its heading and threshold section): maeday_hf's too, replaced.
    unmarked = "\n".join(line for line in (tmp_path / "out" / "README.md").read_text().splitlines()
                         if "written by maeday_hf" not in line) + "\n"
    for remote_card, kept in (("# Our bottle inspector\n", True), (earlier, False), (earlier + "An edit.\n", True),
                              (unmarked, False)):
        repo = {".gitattributes": "", "README.md": remote_card, "eval_results.txt": "theirs", "model.safetensors": "",
                "visualize.py": "theirs", "adapter/NOTES.md": "theirs"}  # (a module name maeday_hf does not ship)
        (tmp_path / "remote-README.md").write_text(remote_card)

        def upload_folder(repo_id, folder_path, delete_patterns=None, ignore_patterns=None, **kwargs):
            local = {p.relative_to(folder_path).as_posix(): p for p in Path(folder_path).rglob("*") if p.is_file()}
            uploaded = set(filter_repo_objects(sorted(local), ignore_patterns=ignore_patterns))
            for name in set(filter_repo_objects(sorted(repo), allow_patterns=delete_patterns)) - uploaded:
                del repo[name]
            repo.update({name: local[name].read_text(errors="replace") for name in uploaded})
            return mock.Mock(commit_url="u")

        with mock.patch("huggingface_hub.HfApi") as api_class:
            api_class.return_value.hf_hub_download.return_value = str(tmp_path / "remote-README.md")
            api_class.return_value.upload_folder.side_effect = upload_folder
            push_folder_to_hub(tmp_path / "out", "my-org/x")
        assert repo["eval_results.txt"] == repo["visualize.py"] == repo["adapter/NOTES.md"] == "theirs"
        assert "model.safetensors" not in repo  # (an earlier full fine-tune's weights: would be loaded with this run)
        assert (repo["README.md"] == remote_card) == kept and "adapter/adapter_model.safetensors" in repo
    # The Hub could not be asked for the card (a 5xx, a timeout): the push fails, the owner's card is not replaced.
    from huggingface_hub.errors import LocalEntryNotFoundError

    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.hf_hub_download.side_effect = LocalEntryNotFoundError("503: cannot reach the Hub")
        with pytest.raises(LocalEntryNotFoundError):
            push_folder_to_hub(tmp_path / "out", "my-org/x")
        api_class.return_value.upload_folder.assert_not_called()


@pytest.mark.parametrize("failure", ["connection", "bad request"])
def test_a_failed_push_says_where_the_run_is(tiny_checkpoint, shot_files, tmp_path, failure):
    from huggingface_hub.errors import BadRequestError

    error = (ConnectionError("Connection reset by peer") if failure == "connection"
             else BadRequestError("Bad request: invalid file", response=mock.Mock(status_code=400, headers={})))
    assert failure == "connection" or isinstance(error, ValueError)  # (the Hub's 400 is a ValueError too)
    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.hf_hub_download.side_effect = _no_remote_card
        api_class.return_value.upload_folder.side_effect = error
        with pytest.raises(OSError, match=r"written to '.*out', but pushing it to 'my-org/x' failed") as failed:
            finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY), push_to_hub=True,
                     hub_model_id="my-org/x")
    assert (tmp_path / "out" / "training_log.json").is_file()
    # The command it suggests pushes the same folder, shots named as the card names them.
    command = str(failed.value).split('python -c "', 1)[1].split('"`', 1)[0]
    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.hf_hub_download.side_effect = _no_remote_card
        def upload_folder(repo_id, folder_path, **kwargs):
            assert json.loads((Path(folder_path) / "training_log.json").read_text())["shots"] == [shot_files[0].name]
            return mock.Mock(commit_url="https://huggingface.co/my-org/x/commit/1")

        api_class.return_value.upload_folder.side_effect = upload_folder
        exec(command, {})
    assert api_class.return_value.upload_folder.call_args.kwargs["repo_id"] == "my-org/x"


def test_a_private_push_into_an_existing_public_repo_uploads_nothing(tiny_checkpoint, shot_files, tmp_path):
    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.hf_hub_download.side_effect = _no_remote_card
        api_class.return_value.repo_info.return_value = mock.Mock(private=False)
        with pytest.raises(ValueError, match="already exists as a public repository"):
            finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY), push_to_hub=True,
                     hub_model_id="my-org/public", hub_private=True)
    api_class.return_value.upload_folder.assert_not_called()
    assert (tmp_path / "out" / "config.json").exists()  # the run itself is kept


def test_shots_from_a_split_are_select_shots_choice(tiny_checkpoint, shot_files, tmp_path):
    split = datasets.Dataset.from_dict({"image": [str(p) for p in shot_files]}, features=datasets.Features(
        {"image": datasets.Image()}))
    images, names = shots_from_split(split, 2, seed=1)
    expected = select_shots(split, 2, seed=1)
    assert [np.asarray(i).tolist() for i in images] == [np.asarray(e["image"]).tolist() for e in expected]
    result = finetune(tiny_checkpoint, split, tmp_path / "out", FinetuneConfig(**TINY), num_shots=2, shot_seed=1)
    assert json.loads((result.output_dir / "training_log.json").read_text())["shots"] == names
    from maeday_hf.data import shot_indices

    indices = shot_indices(len(split), 2, 1)
    assert names == [f"train[{index}] (shot seed 1)" for index in indices]  # enough to pick them again
    with_category = split.add_column("category", ["bottle"] * len(split))
    assert shots_from_split(with_category, 2, seed=1)[1] == [f"bottle {name}" for name in names]


def test_the_rows_select_shots_returns_train_as_those_shots(tiny_checkpoint, shot_files, tmp_path):
    # The two documented ways meet: `finetune(..., select_shots(split, k, seed))` is the same run as
    # `finetune(..., split, num_shots=k, shot_seed=seed)`, every row of the selection a shot.
    from safetensors.torch import load_file

    split = datasets.Dataset.from_dict(
        {"image": [str(p) for p in shot_files], "category": ["bottle"] * 3},
        features=datasets.Features({"image": datasets.Image(), "category": datasets.Value("string")}),
    )
    picked = finetune(tiny_checkpoint, split, tmp_path / "picked", FinetuneConfig(**TINY), num_shots=2, shot_seed=1)
    given = finetune(tiny_checkpoint, select_shots(split, 2, seed=1), tmp_path / "given", FinetuneConfig(**TINY))
    weights = [load_file(result.output_dir / "adapter" / "adapter_model.safetensors") for result in (picked, given)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][key].numpy(), weights[1][key].numpy()) for key in weights[0])
    log = json.loads((given.output_dir / "training_log.json").read_text())
    assert log["shots"] == ["bottle row 0", "bottle row 1"]
    with pytest.raises(ValueError, match="has no rows"):
        finetune(tiny_checkpoint, split.select([]), tmp_path / "none", FinetuneConfig(**TINY))
    with pytest.raises(ValueError, match="no 'image' column"):
        finetune(tiny_checkpoint, split.rename_column("image", "picture"), tmp_path / "none", FinetuneConfig(**TINY))


def test_a_whole_dataset_dict_or_a_streamed_split_is_refused_with_the_split_to_pass(tiny_checkpoint, shot_files,
                                                                                     tmp_path, no_training):
    split = datasets.Dataset.from_dict({"image": [str(p) for p in shot_files]}, features=datasets.Features(
        {"image": datasets.Image()}))
    # (a DatasetDict used to be iterated as its split names: "Shot image not found: 'train'")
    for num_shots in (None, 2):
        with pytest.raises(TypeError, match=r"shots is a DatasetDict \(splits \['train'\]\); pass its split .*"
                                            r"shots=dataset\['train'\]"):
            finetune(tiny_checkpoint, datasets.DatasetDict({"train": split}), tmp_path / "out", FinetuneConfig(**TINY),
                     num_shots=num_shots)
    with pytest.raises(TypeError, match="shots is an IterableDataset"):
        finetune(tiny_checkpoint, split.to_iterable_dataset(), tmp_path / "out", FinetuneConfig(**TINY), num_shots=2)
    assert not (tmp_path / "out").exists()


def test_full_finetune_writes_a_plain_checkpoint_that_loads(tiny_checkpoint, shot_files, tmp_path):
    result = finetune(tiny_checkpoint, shot_files[:1], tmp_path / "full", FinetuneConfig(full_finetune=True, **TINY))
    names = set(os.listdir(result.output_dir))
    assert "model.safetensors" in names and "adapter" not in names
    config = json.loads((result.output_dir / "config.json").read_text())
    assert "maeday_adapter" not in config and config["anomaly_threshold"] == result.calibration.threshold
    detector = load_detector(result.output_dir, device="cpu")
    assert "label" in detector(str(shot_files[1]), num_masks=2)


def _launch(
    num_processes: int, checkpoint: str, shot: Path, out: Path, tmp_path: Path, quiet: bool = True
) -> list[float]:
    # (`accelerate launch --cpu` starts one process whatever --num_processes says; --multi_gpu starts them, and on a
    # machine without a GPU they run on the CPU over gloo.)
    import socket

    with socket.socket() as probe:  # a free port for the processes' rendezvous (29500 may be taken by another run)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu" if num_processes > 1 else "--cpu",
        "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(port),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "scripts" / "finetune.py"), "--model", checkpoint, "--shots", str(shot), "--output-dir",
        str(out), "--steps", "2", "--batch-size", "4", "--learning-rate", "0.2", "--calibration-views", "1",
        "--calibration-masks", "2", *(["--quiet"] if quiet else []),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_CONFIG_FILE=str(tmp_path / "no-accelerate-config.yaml"))
    if not quiet:
        env["TRANSFORMERS_VERBOSITY"] = "warning"  # (the tests' default is "error")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # (The probe for the training device is made before `use_cpu` is known: transformers' warning that it is not a
    # distributed run was about the probe alone, printed by every process.)
    assert quiet or "parallel_mode != ParallelMode.DISTRIBUTED" not in completed.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    log = json.loads((out / "training_log.json").read_text())
    assert log["num_processes"] == num_processes  # one distributed run, not num_processes runs of their own
    return [entry["loss"] for entry in log["losses"]]


def test_accelerate_launch_of_the_script_writes_an_adapter(tiny_checkpoint, shot_files, tmp_path):
    losses = _launch(1, tiny_checkpoint, shot_files[0], tmp_path / "launched", tmp_path)
    assert len(losses) == 2
    # The same run in-process: same seed, same views, same LoRA init -> same losses (float32: the launch passed
    # --mixed_precision no, which the launched run follows).
    result = finetune(tiny_checkpoint, shot_files[:1], tmp_path / "in-process", FinetuneConfig(
        num_steps=2, batch_size=4, learning_rate=0.2, use_cpu=True, disable_tqdm=True, calibration_views_per_shot=1,
        calibration_num_masks=2, bf16=False))
    assert json.loads((tmp_path / "launched" / "training_log.json").read_text())["mixed_precision"] == "no"
    assert losses == pytest.approx([loss for _, loss in result.losses], rel=1e-6)


def test_two_process_ddp_keeps_the_effective_batch(tiny_checkpoint, shot_files, tmp_path):
    """2 CPU processes (gloo) with per-process batch 2 train exactly like 1 process with batch 4."""
    one = _launch(1, tiny_checkpoint, shot_files[0], tmp_path / "one", tmp_path)
    two = _launch(2, tiny_checkpoint, shot_files[0], tmp_path / "two", tmp_path, quiet=False)
    assert two == pytest.approx(one, rel=1e-5)


def test_a_base_folder_that_does_not_exist_is_named_as_a_folder(shot_files, tmp_path, capsys):
    for missing in (str(tmp_path / "no-base"), "./no-base", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="Base model folder not found"):
            finetune(missing, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY))
    assert cli_main(["finetune", "--model", str(tmp_path / "no-base"), "--shots", str(shot_files[0]), "--output-dir",
                     str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maeday: error: Base model folder not found") and "Repo id" not in err


def test_an_output_path_that_is_a_file_is_named_as_one_with_or_without_overwrite(tiny_checkpoint, shot_files,
                                                                                 tmp_path, no_training):
    output = tmp_path / "notes.txt"
    output.write_text("kept")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is a file, not a folder"):
            finetune(tiny_checkpoint, shot_files[:1], output, FinetuneConfig(**TINY), overwrite=overwrite)
    assert output.read_text() == "kept"


def test_a_mount_that_refuses_chmod_keeps_the_run(tiny_checkpoint, shot_files, tmp_path, monkeypatch, caplog):
    import maeday_hf.finetune

    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(maeday_hf.finetune.os, "chmod", refuse)
    result = finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY))
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "Could not give" in caplog.text


def test_a_run_removes_what_a_killed_run_left_beside_its_output(tiny_checkpoint, shot_files, tmp_path):
    from maeday_hf.atomic_io import let_go, make_held_partial_dir

    left, handle = make_held_partial_dir(tmp_path, ".out.partial-")
    let_go(handle)  # a run killed with SIGKILL: no clean-up, its lock gone with it
    (left / "model.safetensors").write_bytes(b"0" * 1000)
    os.utime(left, (0, 0))
    finetune(tiny_checkpoint, shot_files[:1], tmp_path / "out", FinetuneConfig(**TINY))
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".out")) == []


def test_a_base_hub_id_that_cannot_be_had_is_named(shot_files, tmp_path, capsys):
    # transformers' own message ("We couldn't connect to 'https://huggingface.co'...") named neither the model nor a
    # way out.
    assert cli_main(["finetune", "--model", "nosuch-org/no-model", "--shots", str(shot_files[0]), "--output-dir",
                     str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maeday: error: Cannot load the base model 'nosuch-org/no-model'") and err.count("\n") == 0
    assert "hf download nosuch-org/no-model" in err and not (tmp_path / "out").exists()
