"""The three example scripts run on a tiny model through the public API."""

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name, *args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_the_three_blog_steps_as_scripts(tmp_path, tiny_model_dir, imdb_dir, monkeypatch, capsys):
    from minippo.app import TfidfSentiment, load_imdb

    run_example(
        "01_sft_imdb.py",
        "--model",
        tiny_model_dir,
        "--data-dir",
        imdb_dir,
        "--output-dir",
        tmp_path / "sft",
        "--max-steps",
        2,
        "--batch-size",
        2,
        "--block-size",
        32,
        "--num-train-texts",
        20,
        "--num-eval-blocks",
        0,
        "--lora-r",
        4,
        monkeypatch=monkeypatch,
    )
    run_example(
        "02_merge_adapter.py",
        "--base-model",
        tiny_model_dir,
        "--adapter",
        tmp_path / "sft" / "adapter",
        "--output-dir",
        tmp_path / "merged",
        monkeypatch=monkeypatch,
    )
    assert "max |logit difference|" in capsys.readouterr().out

    train = load_imdb("train", imdb_dir, limit=300)
    TfidfSentiment.fit(train["text"], train["label"], kind="logit").save(tmp_path / "reward")
    run_example(
        "03_ppo_positive_reviews.py",
        "--model",
        tmp_path / "merged",
        "--reward",
        tmp_path / "reward",
        "--data-dir",
        imdb_dir,
        "--steps",
        1,
        "--output-dir",
        tmp_path / "ppo",
        monkeypatch=monkeypatch,
    )
    assert "step 1: reward" in capsys.readouterr().out
    assert (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").exists()
