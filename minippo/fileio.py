"""Crash-safe writes, through which every file minippo writes goes: a file or folder is written to a
temporary sibling and renamed into place (atomic within one filesystem), so a crash mid-write leaves
the previous version intact; a log line is on disk once `append_line` returns."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and flush it to disk: an interrupted log keeps every line it finished."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder beside `directory` that replaces it on success (removed on an exception):
    old folder renamed aside, new one into place, old one deleted; an interrupt leaves the old intact."""
    directory = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    try:
        yield tmp
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
            os.rename(directory, os.path.join(old, name))
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
