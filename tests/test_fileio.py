"""Crash-safe writes: an interrupted write leaves the previous file or folder as it was."""

import json
import os
import shutil
from pathlib import Path

import pytest
from faults import kill_points

from minippo.fileio import (
    atomic_directory,
    atomic_write,
    committed_directory,
    write_binary,
    write_json,
)


def test_atomic_directory_replaces_on_success_and_keeps_old_on_interrupt(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_directory(target) as tmp:
        open(f"{tmp}/state.txt", "w").write("v1")
    assert (target / "state.txt").read_text() == "v1"

    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            open(f"{tmp}/state.txt", "w").write("v2, half written")
            raise KeyboardInterrupt
    assert (target / "state.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary leftovers


def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"step": 1})

    def failing(tmp):
        open(tmp, "w").write("{broken")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# -- atomic_directory's invariant under a kill at any instant -----------------------------------------


def write_version(target, version: str, files: int = 3) -> None:
    """A folder of `files` files, each holding `version`: complete iff every file says the same."""
    with atomic_directory(target) as tmp:
        for i in range(files):
            with open(os.path.join(tmp, f"part{i}.txt"), "w") as f:
                f.write(version)


def read_version(folder) -> str:
    """The version a complete folder holds (fails on an incomplete or mixed one)."""
    texts = {p.read_text() for p in sorted(Path(folder).iterdir())}
    assert len(list(Path(folder).iterdir())) == 3 and len(texts) == 1, texts
    return texts.pop()


@pytest.mark.parametrize("start", ["none", "complete", "mid-swap"])
def test_a_kill_at_every_change_leaves_the_previous_or_the_new_folder(tmp_path, start):
    """Kill a write of version "new" before each of its file-system changes in turn (a forked child
    `os._exit`s there); after each, `committed_directory` gives a complete folder: the previous version
    ("old") or the new one, never none once one was written; and the next write leaves no debris.

    Starting states: no folder yet; a complete folder; a write killed between its two renames (the
    folder absent, its previous version beside it)."""
    target = tmp_path / "run" / "checkpoint"
    seen = set()

    def before():
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        (tmp_path / "run").mkdir()
        if start != "none":
            write_version(target, "old")
        if start == "mid-swap":
            os.rename(target, tmp_path / "run" / ".checkpoint.previous")

    def after(killed):
        folder = committed_directory(target)
        version = "none" if folder is None else read_version(folder)
        assert version in (("none", "new") if start == "none" else ("old", "new"))
        assert killed or version == "new"
        seen.add(version)
        write_version(target, "newer")  # the next save clears whatever the kill left
        assert os.listdir(tmp_path / "run") == ["checkpoint"]
        assert read_version(committed_directory(target)) == "newer"

    points = kill_points(write_version, target, "new", before=before, after=after)
    print(f"atomic_directory from {start!r}: {points} kill points, versions seen {sorted(seen)}")
    assert points >= (5 if start == "none" else 8)
    assert seen == ({"none", "new"} if start == "none" else {"old", "new"})


def test_committed_directory_finds_the_folder_or_its_previous_version(tmp_path):
    target = tmp_path / "ckpt"
    assert committed_directory(target) is None
    (tmp_path / ".ckpt.partial").mkdir()  # a write killed while writing: never read
    assert committed_directory(target) is None
    (tmp_path / ".ckpt.previous").mkdir()  # killed between the two renames
    assert committed_directory(target) == str(tmp_path / ".ckpt.previous")
    target.mkdir()
    assert committed_directory(target) == str(target)


def test_write_binary_writes_through_a_python_file(tmp_path):
    path = tmp_path / "blob.bin"
    write_binary(path, lambda f: f.write(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01"
