import json

import pytest
import torch

from minippo.app import data
from minippo.app import model_folders as models
from minippo.app.data import (
    LengthSampler,
    clean_review,
    load_imdb,
    load_text_dataset,
    make_prompts,
    pack_blocks,
)

REVIEW = (
    "I loved this film.<br /><br />The acting   was great,\tthe story<br/>moving. "
    "Watch it!<BR>Ten out of ten. "
) * 3


def test_clean_review_removes_br_and_collapses_whitespace():
    assert (
        clean_review("  Good.<br /><br />Very   good.<br/>Ten\n out<BR>of ten.  ")
        == "Good. Very good. Ten out of ten."
    )
    assert (
        clean_review("Good.<br /><br />Very   good.", keep_paragraphs=True) == "Good.\nVery good."
    )
    assert "<br" not in clean_review(REVIEW).lower()


def test_load_imdb_local_parquet_is_shuffled_and_limited(imdb_dir):
    ds = load_imdb("validation", imdb_dir, limit=200, seed=1)
    assert len(ds) == 200 and {"text", "label"} <= set(ds.column_names)
    labels = ds["label"]
    assert 40 < sum(labels) < 160  # the file is grouped by label; a shuffle mixes them
    assert ds["text"] == load_imdb("validation", imdb_dir, limit=200, seed=1)["text"]
    assert ds["text"] != load_imdb("validation", imdb_dir, limit=200, seed=2)["text"]


def test_load_imdb_reads_the_env_setting(imdb_dir, monkeypatch):
    monkeypatch.setenv(data.IMDB_ENV, str(imdb_dir))
    assert len(load_imdb("validation", limit=5)) == 5


def test_load_imdb_bad_split_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown IMDB split"):
        load_imdb("dev", tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_imdb("train", tmp_path)


def test_load_imdb_offline_hub_says_how_to_provide_it(monkeypatch):
    monkeypatch.delenv(data.IMDB_ENV, raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "hub_offline_mode", lambda: False)
    with pytest.raises(ConnectionError) as err:
        load_imdb("train")
    message = str(err.value)
    assert "stanfordnlp/imdb" in message and "unreachable" in message
    assert "--data-dir" in message and data.IMDB_ENV in message


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_text_dataset_file_folder_and_filter(tmp_path):
    rows = [{"review": "short"}, {"review": "a long enough review " * 5}, {"review": ""}]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    ds = load_text_dataset(tmp_path, "train", text_column="review", min_chars=20)
    assert ds["review"] == [rows[1]["review"]]
    assert len(load_text_dataset(tmp_path / "train.jsonl", text_column="review")) == 2  # "" dropped


def test_load_text_dataset_missing_text_column_lists_columns(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"review": "x", "stars": 3}])
    with pytest.raises(ValueError, match=r"no 'text' column.*\['review', 'stars'\]"):
        load_text_dataset(path)


def test_load_text_dataset_empty_after_filtering(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"text": "tiny"}, {"text": "also tiny"}])
    with pytest.raises(ValueError, match="empty after filtering.*2 rows.*100 characters"):
        load_text_dataset(path, min_chars=100)


def test_load_text_dataset_missing_split_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'validation' split"):
        load_text_dataset(tmp_path, "validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(tmp_path / "nope.parquet")


def test_length_sampler_range_and_seed():
    sampler = LengthSampler(2, 8, seed=0)
    draws = [sampler() for _ in range(500)]
    assert set(draws) == set(range(2, 8))
    again = LengthSampler(2, 8, seed=0)
    assert draws == [again() for _ in range(500)]
    with pytest.raises(ValueError):
        LengthSampler(5, 5)


def test_make_prompts_lengths_deterministic_and_decoded(tokenizer):
    texts = [f"Review {i}: " + REVIEW for i in range(40)] + ["too short"]
    ids, decoded = make_prompts(texts, tokenizer, min_tokens=2, max_tokens=8, min_chars=200, seed=3)
    assert len(ids) == len(decoded) == 40  # the short text is filtered out
    lengths = [len(x) for x in ids]
    assert min(lengths) >= 2 and max(lengths) <= 7 and len(set(lengths)) > 2
    assert all(x.dtype == torch.long and x.dim() == 1 for x in ids)
    for x, text in zip(ids, decoded):
        assert text == tokenizer.decode(x.tolist())
        assert tokenizer.pad_token_id not in x.tolist() and tokenizer.eos_token_id not in x.tolist()
    ids2, decoded2 = make_prompts(texts, tokenizer, seed=3)
    assert decoded2 == decoded and all(torch.equal(a, b) for a, b in zip(ids, ids2))
    _, decoded3 = make_prompts(texts, tokenizer, seed=4)
    assert decoded3 != decoded
    # Each prompt is the start of a cleaned review.
    cleaned = {clean_review(t) for t in texts}
    assert all(any(c.startswith(d) for c in cleaned) for d in decoded)


def test_make_prompts_limit_and_nothing_left(tokenizer):
    ids, _ = make_prompts([REVIEW] * 10, tokenizer, limit=4)
    assert len(ids) == 4
    with pytest.raises(ValueError, match="min_chars"):
        make_prompts(["short"], tokenizer, min_chars=200)


def test_make_prompts_on_imdb(imdb_dir, tokenizer):
    ds = load_imdb("train", imdb_dir, limit=64)
    ids, decoded = make_prompts(ds["text"], tokenizer, seed=0)
    assert len(ids) > 50 and all(2 <= len(x) < 8 for x in ids)


def test_pack_blocks_hand_computed():
    blocks = pack_blocks([[5, 6, 7], [8], [9, 10, 11, 12]], block_size=4, eos_token_id=1)
    # stream: 5 6 7 1 8 1 9 10 11 12 1 -> two full blocks, tail (11 12 1) dropped
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[5, 6, 7, 1], [8, 1, 9, 10]]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_blocks([[5, 6]], block_size=8, eos_token_id=1)


def test_pack_blocks_keeps_every_token_in_order(tokenizer):
    docs = [tokenizer(clean_review(REVIEW))["input_ids"] for _ in range(5)]
    blocks = pack_blocks(docs, 16, tokenizer.eos_token_id)  # (N, 16)
    stream = [t for d in docs for t in d + [tokenizer.eos_token_id]]
    assert blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
