"""Atomic writes: a failed write leaves the old file; a folder swap leaves the old or the new folder, never a mix."""

from __future__ import annotations

import pytest

from maeday_hf.atomic_io import replace_folder, write_atomically


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
