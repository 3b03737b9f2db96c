"""Crash-safe writes, through which every file minippo writes goes.

A file is written to a temporary sibling, flushed to disk and renamed into place (`os.replace` is
atomic within one filesystem), so a crash mid-write leaves the previous version; a log line is on disk
once `append_line` returns.

A folder (a checkpoint) is written by `atomic_directory`, which keeps this invariant at every instant,
whatever kills the process and wherever:

    `D` exists => `D` is complete.  `D` is absent => `.D.previous`, if present, is complete
    (the version of `D` before a swap that was cut off).

`committed_directory(D)` reads it back: `D` if present, else `.D.previous` if present, else None. So
a reader sees the last complete version, never none once one was written. The steps and why each keeps
the invariant:

1. a stale `.D.partial` (a save killed while writing) is removed: no reader ever reads it;
2. the new version is written into `.D.partial` and flushed to disk; `D` is untouched;
3. if `D` exists, a stale `.D.previous` is removed (`D` is complete, the copy is not needed) and `D`
   is renamed to `.D.previous`: one atomic rename, so `D` vanishes as `.D.previous` appears;
4. `.D.partial` is renamed to `D`: `D` reappears, complete;
5. `.D.previous` is removed.

`.D.previous` is only ever deleted while `D` exists (steps 3 and 5), and `D` only appears by a rename
of a complete folder (step 4). A kill leaves at most the two dot-folders beside `D`, which the next
write of `D` clears (steps 1, 3 and 5). One writer at a time: under torch.distributed rank 0 writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call `write(tmp_path)`, fsync, then `os.replace` the temporary file onto `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(
    path: str | os.PathLike, obj: Any, default: Callable | None = None, **dumps_kwargs
) -> None:
    """JSON (indented; more `json.dumps` options in `dumps_kwargs`) written with `atomic_write`."""
    write_text(path, json.dumps(obj, indent=2, default=default, **dumps_kwargs) + "\n")


def write_binary(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(f)` on `path` opened for writing, then flush it to disk. Not atomic on its own: for a
    file inside the temporary folder of `atomic_directory` (e.g. ``lambda f: torch.save(obj, f)``)."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and flush it to disk: an interrupted log keeps every line it finished."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _siblings(directory: str | os.PathLike) -> tuple[str, str, str]:
    """(D, .D.partial, .D.previous) as absolute paths."""
    directory = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(directory)
    partial = os.path.join(parent, f".{name}.partial")
    previous = os.path.join(parent, f".{name}.previous")
    return directory, partial, previous


def committed_directory(directory: str | os.PathLike) -> str | None:
    """The last complete version of a folder written by `atomic_directory`: the folder itself, else its
    previous version (a swap cut off between its two renames), else None (never written)."""
    directory, _, previous = _siblings(directory)
    for folder in (directory, previous):
        if os.path.isdir(folder):
            return folder
    return None


def _fsync_directory(path: str) -> None:
    """Flush a folder's entries (names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: str) -> None:
    if os.path.lexists(folder):
        shutil.rmtree(folder)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[str]:
    """Yield an empty folder to write into; on success it replaces `directory`, keeping the invariant of
    this module's docstring at every instant (an exception removes it and leaves `directory` as it was)."""
    directory, partial, previous = _siblings(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    _remove(partial)  # 1. debris of a save that was killed while writing
    os.mkdir(partial)
    try:
        yield partial  # 2. the caller writes the new version
        for root, _, files in os.walk(partial):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            _fsync_directory(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.isdir(directory):  # 3. the current version steps aside, in one rename
        _remove(previous)
        os.rename(directory, previous)
    os.rename(partial, directory)  # 4. the new version in place
    _fsync_directory(parent)
    _remove(previous)  # 5.
