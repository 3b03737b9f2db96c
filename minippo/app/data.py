"""Data: IMDB loading (local parquet folder or the Hugging Face hub), review cleaning, PPO prompts
and packed causal-LM blocks for SFT.

Where IMDB comes from, in order: the `data_dir` argument, the `MINIPPO_IMDB_DIR` setting, the hub
dataset `stanfordnlp/imdb`. A folder holds `train.parquet`, `validation.parquet`, `test.parquet`
with columns `text` and `label` (1 = positive). Its rows are grouped by label, so `load_imdb`
shuffles them (seeded) unless asked not to.

Shapes: N number of packed blocks, P prompt length.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

IMDB_HUB_NAME = "stanfordnlp/imdb"
IMDB_ENV = "MINIPPO_IMDB_DIR"
IMDB_SPLITS = ("train", "validation", "test")
# The hub's IMDB has only train/test: its validation split is this many train rows (seeded).
HUB_VALIDATION_ROWS = 5000
# File suffixes `load_text_dataset` reads from a folder or path, and the `datasets` builder for each.
_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".txt": "text",
}

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\r\f\v]+")
_NEWLINES = re.compile(r"\s*\n\s*")


def clean_review(text: str, keep_paragraphs: bool = False) -> str:
    """IMDB review -> plain text: `<br />` tags become spaces (or line breaks with
    `keep_paragraphs`), runs of whitespace collapse to one, ends are stripped."""
    text = _BR.sub("\n" if keep_paragraphs else " ", text)
    if keep_paragraphs:
        text = _NEWLINES.sub("\n", _SPACES.sub(" ", text))
    else:
        text = _SPACES.sub(" ", text.replace("\n", " "))
    return text.strip()


# -- loading ------------------------------------------------------------------------------------


def imdb_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local IMDB folder to use: `data_dir`, else `$MINIPPO_IMDB_DIR`, else None (the hub)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(IMDB_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


def load_imdb(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    seed: int | None = 0,
    min_chars: int = 0,
):
    """One IMDB split as a `datasets.Dataset` with columns `text` (raw, with `<br />`) and `label`.

    Rows are shuffled with `seed` (None keeps the file order, which is grouped by label), then
    cut to the first `limit`. Reads `<data_dir>/<split>.parquet` when `data_dir` or
    `$MINIPPO_IMDB_DIR` is set, else the hub's `stanfordnlp/imdb` (whose validation split is
    `HUB_VALIDATION_ROWS` rows held out of its train split with a fixed seed).
    """
    if split not in IMDB_SPLITS:
        raise ValueError(f"unknown IMDB split {split!r}; choose one of {IMDB_SPLITS}")
    folder = imdb_dir(data_dir)
    if folder is not None:
        if not (folder / f"{split}.parquet").is_file():
            raise FileNotFoundError(
                f"IMDB split {split!r} not found: {folder / (split + '.parquet')} does not exist. "
                f"Pass --data-dir (or set {IMDB_ENV}) to a folder holding "
                f"{', '.join(s + '.parquet' for s in IMDB_SPLITS)}."
            )
        ds = load_text_dataset(folder, split, min_chars=min_chars)
    else:
        ds = _load_imdb_from_hub(split)
        if min_chars:
            ds = _filter_min_chars(ds, "text", min_chars, IMDB_HUB_NAME)
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def _load_imdb_from_hub(split: str):
    hub_split = "test" if split == "test" else "train"
    try:
        ds = _load_from_hub(IMDB_HUB_NAME, hub_split, what="the IMDB dataset")
    except ConnectionError as e:
        raise ConnectionError(
            f"{e}\nOr use a local copy: pass --data-dir (or set {IMDB_ENV}) to a folder with "
            f"{', '.join(s + '.parquet' for s in IMDB_SPLITS)} (columns text, label)."
        ) from None
    if split == "test":
        return ds
    parts = ds.train_test_split(test_size=HUB_VALIDATION_ROWS, seed=0, stratify_by_column="label")
    return parts["test" if split == "validation" else "train"]


def _load_from_hub(name: str, split: str, what: str):
    """`datasets.load_dataset(name, split=split)`, failing fast with a clear message offline."""
    import datasets

    from .model_folders import hub_offline_mode, hub_reachable

    if not hub_reachable() and not hub_offline_mode():
        raise ConnectionError(
            f"cannot load {what} {name!r}: the Hugging Face hub is unreachable from this machine. "
            f"(If it is in the local datasets cache, set HF_HUB_OFFLINE=1 to use the cache.)"
        )
    try:
        return datasets.load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError) as e:
        raise ConnectionError(
            f"cannot load {what} {name!r} from the Hugging Face hub or its "
            f"local cache ({type(e).__name__}: {e})."
        ) from None


def load_text_dataset(
    path_or_name: str | os.PathLike,
    split: str = "train",
    text_column: str = "text",
    min_chars: int = 0,
):
    """Any text dataset as a `datasets.Dataset` that has `text_column`, rows with fewer than
    `min_chars` characters (or no text) removed.

    `path_or_name` is a folder holding `<split>.{parquet,jsonl,json,csv,txt}`, a single such file
    (then `split` is ignored), or a hub dataset name. Raises ValueError naming the columns when
    `text_column` is missing, and when no rows are left after filtering.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        found = [
            path / f"{split}{suffix}"
            for suffix in _BUILDERS
            if (path / f"{split}{suffix}").is_file()
        ]
        if not found:
            raise FileNotFoundError(
                f"no {split!r} split in {path}: expected one of {', '.join(split + s for s in _BUILDERS)}"
            )
        ds = _read_file(found[0])
    elif path.is_file():
        ds = _read_file(path)
    elif str(path_or_name).startswith((".", "/", "~")) or path.suffix in _BUILDERS:
        raise FileNotFoundError(f"dataset path {str(path_or_name)!r} does not exist")
    else:
        ds = _load_from_hub(str(path_or_name), split, what="the dataset")
    if text_column not in ds.column_names:
        raise ValueError(
            f"dataset {str(path_or_name)!r} has no {text_column!r} column; its columns "
            f"are {ds.column_names}. Name the text column with text_column=... "
            f"(--text-column)."
        )
    return _filter_min_chars(ds, text_column, min_chars, path_or_name)


def _read_file(path: Path):
    """One local file -> an in-memory `datasets.Dataset` (parquet without a datasets cache)."""
    import datasets

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return datasets.Dataset(pq.read_table(path))
    if suffix not in _BUILDERS:
        raise ValueError(
            f"cannot read {path}: unknown file type {suffix!r}; use one of {list(_BUILDERS)}"
        )
    return datasets.load_dataset(_BUILDERS[suffix], data_files=str(path), split="train")


def _filter_min_chars(ds, text_column: str, min_chars: int, source):
    texts = ds[text_column]
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and len(t) >= max(min_chars, 1)]
    if not keep:
        raise ValueError(
            f"dataset {str(source)!r} is empty after filtering: none of its {len(texts)} "
            f"rows has a {text_column!r} of at least {max(min_chars, 1)} characters."
        )
    return ds if len(keep) == len(texts) else ds.select(keep)


# -- PPO prompts ---------------------------------------------------------------------------------


class LengthSampler:
    """Draws integers uniformly from [min_value, max_value) (trl's LengthSampler), seeded."""

    def __init__(self, min_value: int, max_value: int, seed: int | None = None):
        if not 0 <= min_value < max_value:
            raise ValueError(
                f"LengthSampler needs 0 <= min_value < max_value, got [{min_value}, {max_value})"
            )
        self.min_value = min_value
        self.max_value = max_value
        self.rng = random.Random(seed)

    def __call__(self) -> int:
        return self.rng.randrange(self.min_value, self.max_value)


def make_prompts(
    texts: Sequence[str],
    tokenizer,
    min_tokens: int = 2,
    max_tokens: int = 8,
    min_chars: int = 200,
    seed: int = 0,
    limit: int | None = None,
    clean: bool = True,
) -> tuple[list[torch.Tensor], list[str]]:
    """PPO prompts: the first k tokens of each review, k drawn from [min_tokens, max_tokens).

    Texts are cleaned (`clean_review`), those shorter than `min_chars` characters dropped, the rest
    shuffled with `seed` and cut to `limit`; tokens carry no special tokens. Deterministic for a
    seed. Returns (ids, texts): a list of 1-D LongTensors (P,) with P varying, and their decoded text.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    pool = [clean_review(t) if clean else t for t in texts]
    pool = [t for t in pool if len(t) >= min_chars]
    if not pool:
        raise ValueError(
            f"no prompts: none of the {len(texts)} texts has at least {min_chars} "
            f"characters (lower min_chars)."
        )
    rng = random.Random(seed)
    rng.shuffle(pool)
    if limit is not None:
        pool = pool[:limit]
    lengths = LengthSampler(min_tokens, max_tokens, seed=rng.randrange(2**31))
    encoded = tokenizer(pool, add_special_tokens=False, truncation=True, max_length=max_tokens - 1)
    ids, decoded = [], []
    for token_ids in encoded["input_ids"]:
        k = lengths()
        if (
            len(token_ids) < k
        ):  # a review shorter than k tokens: only possible with a tiny min_chars
            continue
        ids.append(torch.tensor(token_ids[:k], dtype=torch.long))  # (P,)
        decoded.append(tokenizer.decode(token_ids[:k]))
    return ids, decoded


# -- SFT blocks ----------------------------------------------------------------------------------


def pack_blocks(
    token_id_lists: Sequence[Sequence[int]], block_size: int, eos_token_id: int
) -> torch.Tensor:
    """Concatenate documents, each followed by `eos_token_id`, and cut the stream into full
    blocks of `block_size` tokens (the tail that does not fill a block is dropped).

    Returns a LongTensor (N, block_size). Raises ValueError when the documents do not fill one
    block.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    stream: list[int] = []
    for ids in token_id_lists:
        stream.extend(ids)
        stream.append(eos_token_id)
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(
            f"{len(token_id_lists)} documents hold {len(stream)} tokens (with EOS "
            f"separators), fewer than one block of {block_size}: use more text or a "
            f"smaller block_size."
        )
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(
        n, block_size
    )  # (N, block_size)


def cycle_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into n items: a seeded shuffle, cut into full batches (the rest
    of a pass is dropped), reshuffled for each pass."""
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"a batch of {batch_size} needs 1 to {n} items (there are {n}): use a smaller batch"
        )
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]
