"""Tasks whose reward a program checks, for `minippo demo --task NAME` and `minippo ppo --task NAME`.

A task's problems are generated here (every pair of numbers in its ranges: no download), shuffled with a
fixed seed and split into training and held-out problems that share no question. Its reward function,
`ArithmeticTask.correct`, reads the question back from the prompt and the answer from the completion:

    task = TASKS["add"]
    train, held_out = task.split(seed=0)                # lists of Problem, disjoint
    text = chat_prompt(tokenizer, train[0].question)    # the model's chat template, assistant turn open
    task.correct([text], ["The answer is 7."])          # [1.0] if the sum is 7, else [0.0]

The held-out accuracy is the share of held-out questions whose sampled answer is right (`evaluate_task`).
"""

from __future__ import annotations

import operator
import random
import re
from dataclasses import dataclass

import torch

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    question: str
    """the user's message, e.g. "What is 3 + 4? Answer with a number only." """
    answer: int
    """the right answer"""


@dataclass(frozen=True)
class ArithmeticTask:
    """``What is a <op> b?`` for every a in ``first`` and b in ``second`` (inclusive ranges); the reward is 1
    when the completion's last integer is the answer (so "3 + 4 = 7" and "The answer is 7." both count)."""

    name: str
    """the task's name (`minippo demo --task NAME`)"""
    op: str
    """the operator: "+", "-" or "*" """
    first: tuple[int, int]
    """the first number's range, inclusive"""
    second: tuple[int, int]
    """the second number's range, inclusive"""
    instruction: str = "Answer with a number only."
    """what follows each question"""
    held_out: int = 100
    """questions held out of training, for the held-out accuracy"""

    def question(self, a: int, b: int) -> str:
        return f"What is {a} {self.op} {b}? {self.instruction}"

    def problems(self) -> list[Problem]:
        """Every question of the task, in a fixed order."""
        return [
            Problem(self.question(a, b), OPERATORS[self.op](a, b))
            for a in range(self.first[0], self.first[1] + 1)
            for b in range(self.second[0], self.second[1] + 1)
        ]

    def split(self, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
        """(training problems, ``held_out`` held-out ones): one shuffle by ``seed``, no question in both."""
        problems = self.problems()
        random.Random(seed).shuffle(problems)
        if len(problems) <= self.held_out:
            raise ValueError(
                f"task {self.name} has {len(problems)} problems: too few to hold {self.held_out} out"
            )
        return problems[self.held_out :], problems[: self.held_out]

    def answer_of(self, prompt: str) -> int:
        """The answer to the (last) question in a prompt text, chat template and all."""
        pattern = rf"What is (-?\d+) {re.escape(self.op)} (-?\d+)\?"
        found = re.findall(pattern, prompt)
        if not found:
            raise ValueError(
                f"no {self.name} question ('What is a {self.op} b?') in the prompt {prompt!r}"
            )
        a, b = found[-1]
        return OPERATORS[self.op](int(a), int(b))

    def correct(self, prompts: list[str], completions: list[str]) -> list[float]:
        """The reward function (`minippo.rewards`): 1.0 where the completion's last integer is the answer
        to its prompt's question, else 0.0."""
        return [float(given_answer(c) == self.answer_of(p)) for p, c in zip(prompts, completions)]


def given_answer(completion: str) -> int | None:
    """The completion's last integer (None without one)."""
    numbers = INTEGER.findall(completion)
    return int(numbers[-1]) if numbers else None


# One-digit sums, "What is 3 + 4? Answer with a number only.": SmolLM2-135M-Instruct gets some right, so
# there is something to learn (its accuracy before training: the README). 60 training, 40 held-out questions.
TASKS = {"add": ArithmeticTask("add", "+", (0, 9), (0, 9), held_out=40)}


def get_task(name: str) -> ArithmeticTask:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def chat_prompt(tokenizer, question: str) -> str:
    """The question as the model's chat template writes a user turn, the assistant's turn opened; a model
    without a chat template (a base model) sees "Question: ...\nAnswer:"."""
    if not getattr(tokenizer, "chat_template", None):
        return f"Question: {question}\nAnswer:"
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, problems: list[Problem]) -> list[torch.Tensor]:
    """Each problem's chat prompt as 1-D token ids (the template holds its own special tokens)."""
    texts = [chat_prompt(tokenizer, p.question) for p in problems]
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
