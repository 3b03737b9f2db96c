import logging
import os
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_model, tiny_model, tiny_tokenizer

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
torch.set_num_threads(min(2, torch.get_num_threads()))

# The IMDB parquet folder: the MINIPPO_IMDB_DIR setting, else the repo's sibling shared/ folder.
REPO = Path(__file__).resolve().parents[1]
IMDB_DIR = Path(os.environ.get("MINIPPO_IMDB_DIR") or REPO.parent / "shared" / "data" / "imdb")
if not IMDB_DIR.is_absolute():
    IMDB_DIR = (REPO / IMDB_DIR).resolve()


@pytest.fixture(autouse=True)
def no_native_bf16(monkeypatch):
    """Every test sees a CPU without native bf16, so that "auto" means float32 and the numbers are the
    same on every CPU kind; the tests of the bf16 paths switch it back on (torch.cpu's own probes).
    A $MINIPPO_CPU_BF16 in the environment, which would override the probes, is removed."""
    monkeypatch.delenv("MINIPPO_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far more steadily on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=["gpt_neox", "llama", "gpt2"])
def arch(request):
    return request.param


@pytest.fixture
def model(arch, tokenizer):
    """A fresh tiny random model of each architecture (parametrised)."""
    return tiny_model(arch, vocab_size=len(tokenizer))


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model(tmp_path / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def imdb_dir():
    if not (IMDB_DIR / "train.parquet").exists():
        pytest.fail(f"IMDB parquet files not found in {IMDB_DIR}; set MINIPPO_IMDB_DIR")
    return IMDB_DIR


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
