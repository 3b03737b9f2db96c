"""The checked-reward task: problems generated locally, a fixed split, the checker as a reward function;
`minippo ppo --task` and `--reward-fn` end to end on a tiny model, and the reward-function errors."""

import json

import pytest

from minippo.app.cli import main
from minippo.app.reward import SentimentReward, load_reward_fn
from minippo.app.tasks import TASKS, chat_prompt, get_task, given_answer
from minippo.rewards import WeightedRewards

ADD = TASKS["add"]


def test_the_split_is_fixed_by_the_seed_and_disjoint():
    train, held_out = ADD.split(seed=0)
    assert (train, held_out) == ADD.split(seed=0)
    assert len(train) == 60 and len(held_out) == 40
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert ADD.split(seed=1)[1] != held_out
    assert held_out[0].answer == eval(held_out[0].question.split("What is ")[1].split("?")[0])


def test_the_checker_reads_the_question_from_the_prompt(tokenizer):
    prompt = chat_prompt(
        tokenizer, ADD.question(3, 4)
    )  # no chat template: "Question: ...\nAnswer:"
    completions = ["The answer is 7.", "3 + 4 = 7", "7", "seven", "The answer is 8.", "-7", ""]
    assert ADD.correct([prompt] * 7, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert given_answer("no number") is None


def test_a_prompt_without_a_question_is_an_error():
    with pytest.raises(ValueError, match="no add question"):
        ADD.correct(["Tell me a story"], ["7"])


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'sub'; choose one of"):
        get_task("sub")


def test_the_sentiment_scorer_is_a_reward_function():
    class Scorer:
        def __call__(self, texts):
            import torch

            return torch.tensor([float(len(t)) for t in texts])

    reward = WeightedRewards([SentimentReward(Scorer())])
    assert reward.scores(["ab"], ["cde"]).tolist() == [5.0]  # scores prompt + completion
    assert reward.__name__ == "sentiment"


# -- --reward-fn path.py:name ------------------------------------------------------------------------


def write(tmp_path, text):
    path = tmp_path / "rewards.py"
    path.write_text(text)
    return path


def test_load_reward_fn_loads_a_function(tmp_path):
    path = write(
        tmp_path, "def brevity(prompts, completions):\n    return [-len(c) for c in completions]\n"
    )
    function = load_reward_fn(f"{path}:brevity")
    assert function(["p"], ["abc"]) == [-3]


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("{path}", ValueError, "takes path.py:name"),
        ("{missing}:f", FileNotFoundError, "does not exist"),
        ("{path}:nothing", ValueError, r"defines no 'nothing'.*\['brevity'\]"),
        ("{path}:NUMBER", ValueError, "is a int, not a function"),
        ("{broken}:f", ValueError, "importing .* failed: ZeroDivisionError"),
    ],
)
def test_load_reward_fn_errors(tmp_path, spec, error, message):
    path = write(tmp_path, "NUMBER = 3\ndef brevity(prompts, completions):\n    return [0.0]\n")
    broken = tmp_path / "broken.py"
    broken.write_text("1 / 0\n")
    spec = spec.format(path=path, missing=tmp_path / "nowhere.py", broken=broken)
    with pytest.raises(error, match=message):
        load_reward_fn(spec)


TINY_RUN = [
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--mini-batch-size",
    "4",
    "--ppo-epochs",
    "1",
    "--min-new-tokens",
    "3",
    "--max-new-tokens",
    "3",
    "--lora.r",
    "4",
]


@pytest.mark.parametrize(
    "body, message",
    [
        ("return [1.0]", "returned 1 values for 2 completions"),
        ("return [float('nan')] * len(completions)", "non-finite values"),
        ("return None", "returned NoneType"),
    ],
)
def test_a_bad_reward_function_fails_before_any_training_step(
    tmp_path, capsys, monkeypatch, tiny_model_dir, body, message
):
    path = write(tmp_path, f"def bad(prompts, completions):\n    {body}\n")
    monkeypatch.setattr(
        "minippo.app.pipeline.build_trainer", lambda config: pytest.fail("model loaded")
    )
    argv = ["ppo", "--model", tiny_model_dir, "--task", "add", "--reward-fn", f"{path}:bad"]
    assert main([*argv, "--output-dir", str(tmp_path / "run"), *TINY_RUN]) == 2
    err = capsys.readouterr().err
    assert "reward function bad" in err and message in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_missing_reward_function_file_is_a_message(tmp_path, capsys, tiny_model_dir):
    argv = ["ppo", "--model", tiny_model_dir, "--task", "add", "--reward-fn", "nowhere.py:f"]
    assert main([*argv, "--output-dir", str(tmp_path / "run"), *TINY_RUN]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ppo_on_the_task_with_grpo_and_an_extra_reward_function(tmp_path, tiny_model_dir):
    """`minippo ppo --task add` with GRPO, the checker plus a reward function from a file, weighted."""
    path = write(
        tmp_path,
        "def short(prompts, completions):\n    return [-0.01 * len(c) for c in completions]\n",
    )
    out = tmp_path / "run"
    argv = ["ppo", "--model", tiny_model_dir, "--task", "add", "--output-dir", str(out)]
    argv += ["--reward-fn", "task", f"{path}:short", "--reward-weights", "1", "0.5"]
    argv += ["--advantage-estimator", "grpo", "--num-generations", "2", "--eval-prompts", "4"]
    argv += ["--init-kl-coef", "0", "--no-adap-kl-ctrl"]
    assert main([*argv, *TINY_RUN]) == 0
    result = json.loads((out / "result.json").read_text())
    assert 0 <= result["before"]["accuracy"] <= 1 and "accuracy" in result["after"]
    assert not (out / "adapter" / "value_head.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "ppo/loss/value" not in rows[0]
