"""Crash-safe writes: an interrupted write leaves the previous file or folder as it was."""

import json

import pytest

from minippo.fileio import atomic_directory, atomic_write, write_json


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
