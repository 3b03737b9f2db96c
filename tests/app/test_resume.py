"""Exact resume after a SIGKILL (`minippo ppo --resume`, `minippo sft --resume`), and seeds that mean
what they say. Each run is a subprocess with one thread, so the straight and the interrupted run
compute alike, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

# Runs the CLI; the 4th checkpoint save stops half-way (adapter files written, optimiser not yet),
# drops a marker file and waits there to be killed.
KILLABLE = """
import sys, time, torch
real, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    if str(getattr(f, "name", f)).endswith("optimizer.pt"):
        calls.append(f)
        if len(calls) == 4:
            open(sys.argv[1], "w").close()
            time.sleep(600)
    return real(obj, f, *args, **kwargs)
torch.save = save
from minippo.app.cli import main
sys.exit(main(sys.argv[2:]))
"""


def cli(args, tmp_path, kill=False):
    """Run `minippo <args>` in a subprocess; with kill=True, SIGKILL it in the middle of its 4th save."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if not kill:
        done = subprocess.run(
            [sys.executable, "-m", "minippo", *args], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return
    marker = tmp_path / "at-kill-point"
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def tensors(folder):
    out = load_file(folder / "adapter_model.safetensors")
    if (folder / "value_head.safetensors").exists():
        out.update(
            {f"value_head.{k}": v for k, v in load_file(folder / "value_head.safetensors").items()}
        )
    return out


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def untimed(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, imdb_dir):
    from minippo.app import TfidfSentiment, load_imdb

    folder = tmp_path_factory.mktemp("reward") / "reward"
    train = load_imdb("train", imdb_dir, limit=300)
    TfidfSentiment.fit(train["text"], train["label"], kind="logit").save(folder)
    return folder


def ppo_args(model, reward, data, out):
    return [
        "ppo",
        *(
            "--model",
            model,
            "--reward",
            str(reward),
            "--data-dir",
            str(data),
            "--output-dir",
            str(out),
        ),
        *("--steps", "6", "--save-every", "1", "--eval-prompts", "2", "--batch-size", "4"),
        *(
            "--mini-batch-size",
            "2",
            "--ppo-epochs",
            "2",
            "--min-new-tokens",
            "3",
            "--max-new-tokens",
            "5",
        ),
        *("--lora-r", "4", "--learning-rate", "1e-2"),
    ]


def test_ppo_resume_after_sigkill_is_bit_identical(tmp_path, tiny_model_dir, imdb_dir, reward_dir):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    cli(ppo_args(tiny_model_dir, reward_dir, imdb_dir, straight), tmp_path)
    cli(ppo_args(tiny_model_dir, reward_dir, imdb_dir, interrupted), tmp_path, kill=True)
    # killed in the middle of step 4's save: step 4's metrics row is written, the checkpoint is step 3's
    assert json.loads((interrupted / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert len((interrupted / "metrics.jsonl").read_text().splitlines()) == 4
    assert (interrupted / ".checkpoint.partial").is_dir()  # the half-written save, left beside it
    cli([*ppo_args(tiny_model_dir, reward_dir, imdb_dir, interrupted), "--resume"], tmp_path)
    assert_bit_identical(tensors(straight / "adapter"), tensors(interrupted / "adapter"))
    rows = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [
        json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert untimed(rows) == untimed(straight_rows)


def test_ppo_resume_refuses_another_config(tmp_path, tiny_model_dir, imdb_dir, reward_dir, capsys):
    from minippo.app.cli import main

    args = ppo_args(tiny_model_dir, reward_dir, imdb_dir, tmp_path / "run")
    args[args.index("--steps") + 1] = "2"  # a checkpoint at step 1
    assert main([*args, "--no-load-in-8bit", "--eval-prompts", "0"]) == 0
    capsys.readouterr()
    assert (
        main([*args, "--no-load-in-8bit", "--eval-prompts", "0", "--cliprange", "0.3", "--resume"])
        == 2
    )
    assert "cliprange: 0.2 in the checkpoint, 0.3 now" in capsys.readouterr().err
    assert main([*args, "--eval-prompts", "0", "--prompt-max-tokens", "7", "--resume"]) == 2
    err = capsys.readouterr().err
    assert (
        "load_in_8bit: False in the checkpoint, True now" in err and "prompt_max_tokens: 8" in err
    )


def sft_args(model, data, out):
    return [
        "sft",
        *("--model", model, "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "6"),
        *(
            "--save-every",
            "1",
            "--batch-size",
            "2",
            "--block-size",
            "32",
            "--num-train-texts",
            "20",
        ),
        *(
            "--num-eval-blocks",
            "2",
            "--lora-r",
            "4",
            "--lora-dropout",
            "0.1",
            "--learning-rate",
            "1e-2",
        ),
    ]


def test_sft_resume_after_sigkill_is_bit_identical(tmp_path, tiny_model_dir, imdb_dir):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    cli(sft_args(tiny_model_dir, imdb_dir, straight), tmp_path)
    cli(sft_args(tiny_model_dir, imdb_dir, interrupted), tmp_path, kill=True)
    assert json.loads((interrupted / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    cli([*sft_args(tiny_model_dir, imdb_dir, interrupted), "--resume"], tmp_path)
    assert_bit_identical(tensors(straight / "adapter"), tensors(interrupted / "adapter"))
    log = json.loads((interrupted / "loss_log.json").read_text())
    assert [step for step, _ in log] == [1, 2, 3, 4, 5, 6]
    assert log == json.loads((straight / "loss_log.json").read_text())


# -- seeds ----------------------------------------------------------------------------------------


def seeded_run(tmp_path, name, model, reward, data, seed, eval_prompts):
    from minippo.app import pipeline

    config = pipeline.PPORunConfig(
        model=model,
        reward=str(reward),
        data_dir=str(data),
        output_dir=str(tmp_path / name),
        steps=2,
        eval_prompts=eval_prompts,
        load_in_8bit=False,
        lora=pipeline.LoRAConfig(r=4, alpha=8),
        ppo=pipeline.PPOConfig(
            batch_size=4,
            mini_batch_size=2,
            ppo_epochs=1,
            min_new_tokens=3,
            max_new_tokens=4,
            seed=seed,
        ),
    )
    pipeline.run_ppo(config, progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    return tensors(tmp_path / name / "adapter"), untimed(rows)


def test_seeds_mean_what_they_say(tmp_path, tiny_model_dir, imdb_dir, reward_dir):
    """The same seed gives the same run, with or without the held-out evaluation (it samples on its own
    seed and leaves the training stream alone); another seed gives other adapters and other samples."""
    from minippo.app import pipeline

    a, rows_a = seeded_run(
        tmp_path, "a", tiny_model_dir, reward_dir, imdb_dir, seed=0, eval_prompts=4
    )
    b, rows_b = seeded_run(
        tmp_path, "b", tiny_model_dir, reward_dir, imdb_dir, seed=0, eval_prompts=0
    )
    assert_bit_identical(a, b)
    assert rows_a == rows_b
    c, rows_c = seeded_run(
        tmp_path, "c", tiny_model_dir, reward_dir, imdb_dir, seed=1, eval_prompts=0
    )
    assert rows_c != rows_a  # other samples
    # the adapters' initial A matrices follow the seed
    config = lambda seed: pipeline.PPORunConfig(
        model=tiny_model_dir,
        load_in_8bit=False,
        ppo=pipeline.PPOConfig(batch_size=4, mini_batch_size=2, seed=seed),
    )
    initial = [
        {
            k: v
            for k, v in pipeline.build_trainer(config(seed))[0].policy.model.state_dict().items()
            if "lora_A" in k
        }
        for seed in (0, 1)
    ]
    assert not any(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])


def test_reward_prob_mean_is_the_classifiers_probability(tmp_path, tiny_model_dir, imdb_dir):
    """With a two-class HF classifier, env/reward_prob_mean is softmax P(positive), not the sigmoid of
    the positive logit: a classifier whose logits are always (2, 0) gives P(positive) = 0.119."""
    from tiny import tiny_tokenizer
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from minippo.app import pipeline

    classifier = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=384,
            dim=32,
            hidden_dim=64,
            n_layers=1,
            n_heads=2,
            id2label={0: "NEG", 1: "POS"},
        )
    )
    with torch.no_grad():
        classifier.classifier.weight.zero_()
        classifier.classifier.bias.copy_(torch.tensor([2.0, 0.0]))
    classifier.save_pretrained(tmp_path / "clf")
    tiny_tokenizer().save_pretrained(tmp_path / "clf")
    config = pipeline.PPORunConfig(
        model=tiny_model_dir,
        reward=str(tmp_path / "clf"),
        data_dir=str(imdb_dir),
        output_dir=str(tmp_path / "ppo"),
        steps=1,
        eval_prompts=0,
        load_in_8bit=False,
        lora=pipeline.LoRAConfig(r=4, alpha=8),
        ppo=pipeline.PPOConfig(
            batch_size=4, mini_batch_size=2, ppo_epochs=1, min_new_tokens=3, max_new_tokens=4
        ),
    )
    pipeline.run_ppo(config, progress=False)
    (row,) = [
        json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert row["env/reward_mean"] == pytest.approx(
        0.0, abs=1e-6
    )  # the positive logit is the reward
    assert row["env/reward_prob_mean"] == pytest.approx(1 / (1 + torch.e**2), abs=1e-6)
