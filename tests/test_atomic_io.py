"""Atomic writes: a failed write leaves the old file; a folder swap leaves the old or the new folder, never a mix;
results get the permissions a plain write would give them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from maeday_hf.atomic_io import (
    let_go,
    make_held_partial_dir,
    make_held_partial_file,
    remove_abandoned,
    replace_folder,
    write_atomically,
)
from maeday_hf.synthetic import write_synthetic_mvtec


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("old")

    def write_half(temp_path):
        with open(temp_path, "w") as handle:
            handle.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, write_half)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]
    write_atomically(path, lambda temp: open(temp, "w").write("new"))
    assert path.read_text() == "new"


def test_replace_folder_swaps_whole_folders(tmp_path):
    target = tmp_path / "adapter"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "old.txt").write_text("old")
    finished = tmp_path / ".adapter.partial"
    finished.mkdir()
    (finished / "new.txt").write_text("new")
    replace_folder(finished, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    fresh = tmp_path / ".other.partial"
    fresh.mkdir()
    replace_folder(fresh, tmp_path / "other")  # no previous folder
    assert (tmp_path / "other").is_dir() and not fresh.exists()


@pytest.fixture()
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_written_files_and_folders_get_the_permissions_of_a_plain_write(tmp_path, umask_027):
    path = write_atomically(tmp_path / "results.json", lambda temp: Path(temp).write_text("{}"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 & ~umask, as open(path, "w") gives
    root = write_synthetic_mvtec(tmp_path / "synthetic", categories=["stripes"], num_train=1, num_test_good=1,
                                 num_test_per_defect=1, image_size=24)
    assert stat.S_IMODE((root / "stripes").stat().st_mode) == 0o750  # 0o777 & ~umask, as mkdir gives
    assert stat.S_IMODE((root / "stripes" / "train" / "good" / "000.png").stat().st_mode) == 0o640


def test_a_failed_swap_leaves_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_folder(tmp_path / ".adapter.partial-never-written", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (target / "old.txt").read_text() == "old"


def test_a_swap_killed_halfway_does_not_block_the_next(tmp_path):
    # A killed swap can leave the old folder aside under this process's name (PIDs recur, e.g. in containers).
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    stale = tmp_path / f".adapter.replaced-{os.getpid()}"
    stale.mkdir()
    (stale / "older.txt").write_text("older")
    finished = tmp_path / ".adapter.partial-1"
    finished.mkdir()
    (finished / "new.txt").write_text("new")
    replace_folder(finished, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_file_or_a_link_in_the_way_is_replaced_without_leftovers(tmp_path, kind):
    target, elsewhere = tmp_path / "heatmaps", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept.txt").write_text("kept")
    if kind == "file":
        target.write_text("in the way")
    else:
        target.symlink_to(elsewhere, target_is_directory=True)
    finished = tmp_path / ".finished"
    finished.mkdir()
    (finished / "new.png").write_bytes(b"png")
    replace_folder(finished, target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere", "heatmaps"]  # no .heatmaps.replaced-*
    assert target.is_dir() and not target.is_symlink() and (target / "new.png").read_bytes() == b"png"
    assert (elsewhere / "kept.txt").read_text() == "kept"  # what a link pointed to is not the link's to delete


def _aged(path: Path, seconds: float = 3600) -> Path:
    os.utime(path, (os.stat(path).st_atime - seconds, os.stat(path).st_mtime - seconds))
    return path


def _killed(made: tuple[Path, int | None]) -> Path:
    """A partial as a run killed outright leaves it: its lock gone with its process."""
    path, handle = made
    let_go(handle)
    return path


@pytest.mark.skipif(os.name != "posix", reason="partials are locked with flock")
def test_only_partials_of_killed_runs_are_removed(tmp_path):
    import subprocess
    import sys

    # A run killed outright: its partial (old, locked by no one) goes, folder or file.
    abandoned = _killed(make_held_partial_dir(tmp_path, ".out.partial-"))
    (abandoned / "weights.safetensors").write_text("x")
    abandoned_file = _aged(_killed(make_held_partial_file(tmp_path, ".out.partial-")))
    _aged(abandoned)
    # A run still writing, in another process: its partial is locked and stays, however old.
    holder = subprocess.Popen(
        [sys.executable, "-c", "from maeday_hf.atomic_io import make_held_partial_dir; import sys, time; "
                               f"path, handle = make_held_partial_dir({str(tmp_path)!r}, '.out.partial-'); "
                               "print(path, handle is not None, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        running_name, locked = holder.stdout.readline().split()
        running = _aged(Path(running_name))
        assert locked == "True"
        young = _killed(make_held_partial_dir(tmp_path, ".out.partial-"))  # a moment old: perhaps not locked yet
        held_here, handle = make_held_partial_dir(tmp_path, ".out.partial-")
        _aged(held_here)
        other = _aged(_killed(make_held_partial_dir(tmp_path, ".other.partial-")))
        # Not partials, though their names start alike: a user's files, another host's partial.
        users = [tmp_path / name for name in (".out.partial-notes", ".out.partial-0123456789ab")]
        for path in users:
            path.mkdir()
            _aged(path)
        assert sorted(remove_abandoned(tmp_path, ".out.partial-")) == sorted([abandoned, abandoned_file])
        assert all(path.exists() for path in (running, young, held_here, other, *users))
        let_go(handle)
        assert remove_abandoned(tmp_path, ".out.partial-") == [held_here]  # let go of: abandoned now
    finally:
        holder.kill()
        holder.wait()
    assert remove_abandoned(tmp_path, ".out.partial-") == [running]  # its process is gone
    assert remove_abandoned(tmp_path / "missing", ".out.partial-") == []


def test_a_saved_detectors_weights_get_the_permissions_of_its_config(tmp_path, umask_027, tiny_checkpoint):
    from maeday_hf.modeling import load_detector

    load_detector(tiny_checkpoint, device="cpu").save_pretrained(tmp_path / "saved")
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "saved").iterdir()}
    assert modes["config.json"] == 0o640 and modes["README.md"] == 0o640
    assert modes["model.safetensors"] == 0o640  # safetensors alone writes 0o600
    load_detector(tiny_checkpoint, device="cpu").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and {stat.S_IMODE(shard.stat().st_mode) for shard in shards} == {0o640}


def test_saving_a_detector_into_a_folder_leaves_other_weights_there_alone(tmp_path, tiny_checkpoint):
    from maeday_hf.modeling import load_detector

    private = tmp_path / "here" / "private_models" / "secret.safetensors"
    private.parent.mkdir(parents=True)
    private.write_bytes(b"x")
    os.chmod(private, 0o600)
    load_detector(tiny_checkpoint, device="cpu").save_pretrained(tmp_path / "here")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
