"""The Makefile on a machine that is not ours: IMDB from the sibling folder only where it exists."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def make_demo_line(root: Path) -> str:
    """The command `make demo` would run in a copy of the repo's Makefile at root/repo (dry run)."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    shutil.copy(REPO / "Makefile", repo / "Makefile")
    for name in ("setup.cfg", "pyproject.toml"):  # the venv's prerequisites
        (repo / name).touch()
    out = subprocess.run(
        ["make", "-n", "demo"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    (line,) = [line for line in out.splitlines() if "minippo demo" in line]
    return line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_reads_the_sibling_folder_only_where_it_exists(tmp_path):
    assert make_demo_line(tmp_path / "plain-clone").startswith('MINIPPO_IMDB_DIR=""')
    shared = tmp_path / "ours" / "shared" / "data" / "imdb"
    shared.mkdir(parents=True)
    (shared / "train.parquet").touch()
    assert make_demo_line(tmp_path / "ours").startswith('MINIPPO_IMDB_DIR="../shared/data/imdb"')


def test_an_empty_imdb_dir_loads_the_hub_dataset(monkeypatch):
    """What `make demo` on a plain clone leads to, up to the point where it would download."""
    import datasets

    from minippo.app import data, model_folders

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        raise ConnectionError("stop before downloading")

    monkeypatch.setenv(data.IMDB_ENV, "")
    monkeypatch.setattr(model_folders, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ConnectionError, match="stop before downloading"):
        data.load_imdb("validation")
    assert calls == [
        ("stanfordnlp/imdb", "train")
    ]  # validation is held out of the hub's train split
