"""PPO checkpoints under faults: a kill at any instant of a save, damaged files, degenerate scores.

- A save killed before any one of its file-system changes leaves a checkpoint that `load` and the
  pipeline's resume restore: the previous one or the new one, never none once one was written.
- `load` reads and checks every file before it changes anything: a damaged, truncated, foreign or
  incomplete checkpoint raises one ValueError naming the folder, and the trainer is left as it was.
- Score scaling starts safely on a first batch of equal scores, and on single samples.
(Several processes: tests/test_distributed.py.)"""

import copy
import json
import os
import random
import re
import shutil

import pytest
import torch
from faults import kill_points
from tiny import tiny_model

from minippo.app.pipeline import resume_metrics
from minippo.app.report import MetricsLog
from minippo.fileio import committed_directory
from minippo.lora import LoRAConfig, add_lora
from minippo.ppo import SCORE_STD_FLOOR, PPOConfig, PPOTrainer

PROMPTS = ["This movie", "A wonderful, moving picture with a", "Boring and", "The best film of"]

# Tiny models run fastest on one thread, and far more steadily on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(tokenizer, arch="llama", seed=0, scheduler=False, **overrides):
    """A trainer on a tiny model, score scaling and normalisation on (they have state to save)."""
    model = tiny_model(arch, vocab_size=len(tokenizer), seed=seed)
    add_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    settings = dict(batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-2)
    settings |= dict(
        min_new_tokens=2, max_new_tokens=4, use_score_scaling=True, use_score_norm=True
    )
    trainer = PPOTrainer(PPOConfig(**settings | overrides), model, tokenizer)
    if scheduler:
        factor = lambda step: 1.0 / (1 + step)  # noqa: E731
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, factor)
    return trainer


def queries_for(trainer, tokenizer):
    n = trainer.config.batch_size
    return [torch.tensor(tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]) for i in range(n)]


def run_steps(trainer, tokenizer, n: int) -> None:
    """n steps of generate -> score (a point per token id divisible by 3) -> step."""
    queries = queries_for(trainer, tokenizer)
    for _ in range(n):
        responses = trainer.generate(queries)
        trainer.step(queries, responses, [float((r % 3 == 0).sum()) for r in responses])


def parameters(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.trainable]


def everything(trainer) -> dict:
    """Copies of all that `load` may change: parameters, optimiser state and learning rates, scheduler,
    step, generators, KL coefficient, score moments."""
    scheduler = trainer.lr_scheduler
    return dict(
        parameters=parameters(trainer),
        optimizer=copy.deepcopy(trainer.optimizer.state_dict()),
        scheduler=None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
        step=trainer.current_step,
        torch_generator=torch.get_rng_state(),
        python_generator=random.getstate(),
        kl_coef=trainer.kl_ctl.value,
        score_moments=trainer.score_moments.state_dict(),
    )


def same(a, b) -> bool:
    """Equal, bit for bit, through dicts, lists and tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


# -- a kill at every file-system change of a save ------------------------------------------------------


@pytest.mark.parametrize("start", ["none", "complete", "mid-swap"])
def test_a_kill_at_every_change_of_a_save_leaves_a_checkpoint_that_resumes(
    tmp_path, tokenizer, start
):
    """The run's step-2 save is killed (a forked child `os._exit`s) before its 1st, 2nd, ... file-system
    change in turn. After each kill the pipeline's resume (`committed_directory`, then `resume_metrics`:
    `load` and metrics.jsonl cut back) restores step 1 (the previous checkpoint) or step 2 (the new
    one), bit for bit, with metrics.jsonl cut to the step loaded; the next save leaves no debris.

    Starting states: no checkpoint yet ("none": a kill may leave none, as before the save); the step-1
    checkpoint ("complete"); the step-1 checkpoint beside a missing folder, as a save killed between its
    two renames leaves it ("mid-swap")."""
    trainer = make_trainer(tokenizer)
    run_steps(trainer, tokenizer, 1)
    saved = tmp_path / "saved"
    trainer.save(saved / "checkpoint")
    weights = {1: parameters(trainer)}
    run_steps(trainer, tokenizer, 1)
    weights[2] = parameters(trainer)
    run, loader, outcomes = tmp_path / "run", make_trainer(tokenizer, seed=1), []
    checkpoint = run / "checkpoint"

    def before():  # the run folder as the save finds it: metrics of steps 1 and 2 already written
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(saved, run) if start != "none" else run.mkdir()
        if start == "mid-swap":
            os.rename(checkpoint, run / ".checkpoint.previous")
        for step in (1, 2):
            MetricsLog(run / "metrics.jsonl").write({"step": step})

    def after(killed: bool):
        if committed_directory(checkpoint) is None:  # `minippo ppo --resume` starts afresh
            assert start == "none" and killed
            with pytest.raises(ValueError, match="no checkpoint in"):
                loader.load(checkpoint)
            outcomes.append(0)
        else:
            step = resume_metrics(loader, checkpoint, MetricsLog(run / "metrics.jsonl"))
            assert step == 2 if not killed or start == "none" else step in (1, 2)
            assert same(parameters(loader), weights[step])
            assert [row["step"] for row in MetricsLog(run / "metrics.jsonl").read()] == [1, 2][
                :step
            ]
            outcomes.append(step)
        trainer.save(checkpoint)  # the next save clears what the kill left
        assert sorted(os.listdir(run)) == ["checkpoint", "metrics.jsonl"]
        assert loader.load(checkpoint) == str(checkpoint) and loader.current_step == 2

    points = kill_points(trainer.save, checkpoint, before=before, after=after)
    print(f"save from {start!r}: {points} kill points; steps restored {outcomes}")
    assert points == len(outcomes) - 1 and points >= 12
    assert set(outcomes) == ({0, 2} if start == "none" else {1, 2})


# -- a damaged checkpoint changes nothing --------------------------------------------------------------

CHECKPOINT_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "value_head.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pt",
    "trainer_state.json",
]


@pytest.fixture(scope="module")
def saved_and_target(tmp_path_factory, tokenizer):
    """A checkpoint after 2 steps (with an LR scheduler), and another trainer, 1 step in, to load it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = make_trainer(tokenizer, scheduler=True)
    run_steps(source, tokenizer, 2)
    folder = tmp_path_factory.mktemp("saved") / "checkpoint"
    source.save(folder)
    target = make_trainer(tokenizer, seed=1, scheduler=True)
    run_steps(target, tokenizer, 1)
    torch.set_num_threads(threads)
    return folder, target


def test_the_damage_cases_cover_every_file_of_a_checkpoint(saved_and_target):
    folder, _ = saved_and_target
    assert sorted(os.listdir(folder)) == sorted(CHECKPOINT_FILES)


def damage(path, fault: str) -> None:
    data = path.read_bytes()
    if fault == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "garbage":
        path.write_bytes(random.Random(len(data)).randbytes(len(data)))
    else:
        path.unlink()


def assert_load_refuses_and_changes_nothing(trainer, folder, match: str = "") -> None:
    before = everything(trainer)
    with pytest.raises(ValueError, match=re.escape(str(folder)) + match) as error:
        trainer.load(folder)
    assert not isinstance(error.value.__cause__, KeyError) or "lacks" in str(error.value)
    assert same(everything(trainer), before)


@pytest.mark.parametrize("fault", ["truncated", "garbage", "missing"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_file_gives_one_error_and_changes_nothing(
    tmp_path, saved_and_target, name, fault
):
    """Each file of a checkpoint cut to half, overwritten with random bytes, or missing: one ValueError
    naming the folder; parameters, optimiser, scheduler, step, generators, KL coefficient and score
    moments as they were (the trainer is reused by every case: a change would show in the next)."""
    folder, trainer = saved_and_target
    damaged = tmp_path / "checkpoint"
    shutil.copytree(folder, damaged)
    damage(damaged / name, fault)
    assert_load_refuses_and_changes_nothing(trainer, damaged)


def without_kl_coef(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    del state["kl_coef"]
    (folder / "trainer_state.json").write_text(json.dumps(state))


def with_step_as_text(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps(state | {"step": "2"}))


def from_another_model(folder, tokenizer):
    shutil.rmtree(folder)
    other = make_trainer(tokenizer, arch="gpt2", scheduler=True)
    other.save(folder)


def emptied(folder):
    for path in folder.iterdir():
        path.unlink()


@pytest.mark.parametrize(
    "fault, match",
    [
        (without_kl_coef, r".*trainer_state.json lacks kl_coef"),
        (with_step_as_text, r".*step is '2'"),
        (from_another_model, r".*does not fit this model"),
        (emptied, r".*No such file"),
    ],
)
def test_a_foreign_or_incomplete_checkpoint_gives_one_error_and_changes_nothing(
    tmp_path, saved_and_target, tokenizer, fault, match
):
    folder, trainer = saved_and_target
    damaged = tmp_path / "checkpoint"
    shutil.copytree(folder, damaged)
    fault(damaged, tokenizer) if fault is from_another_model else fault(damaged)
    assert_load_refuses_and_changes_nothing(trainer, damaged, match)


def test_the_trainer_loads_the_undamaged_checkpoint(tmp_path, tokenizer, saved_and_target):
    """The control: the same checkpoint, undamaged, loads (into a fresh trainer) and changes it."""
    folder, _ = saved_and_target
    trainer = make_trainer(tokenizer, seed=1, scheduler=True)
    before = everything(trainer)
    assert trainer.load(folder) == str(folder)
    after = everything(trainer)
    assert after["step"] == 2 and not same(after["parameters"], before["parameters"])


# -- score scaling on degenerate batches -----------------------------------------------------------


@pytest.mark.parametrize("norm", [False, True])
def test_a_first_batch_of_equal_scores_is_not_scaled(tokenizer, norm):
    """Equal scores have no spread to divide by: they pass unscaled (centred, with use_score_norm), and
    the value error stays of the scores' size. Once two distinct scores were seen, the std is floored at
    SCORE_STD_FLOOR x the running root-mean-square: almost equal scores scale to at most ~100."""
    trainer = make_trainer(tokenizer, use_score_norm=norm)
    queries = queries_for(trainer, tokenizer)
    stats = trainer.step(queries, trainer.generate(queries), [2.0] * 4)
    assert stats["ppo/val/error"] < 10 and stats["ppo/returns/mean"] < 10, stats

    fresh = make_trainer(tokenizer, use_score_norm=norm)
    first = torch.full((4,), 2.0)
    assert torch.equal(fresh._normalise_scores(first), first - 2.0 if norm else first)
    second = torch.tensor([2.0, 2.0, 2.0, 2.03125])  # std ~0.011: under the floor, 0.02
    seen = torch.cat([first, second]).double()
    mean, var = seen.mean(), seen.var()
    std = max(var.sqrt(), SCORE_STD_FLOOR * (mean**2 + var).sqrt())
    expected = ((second.double() - mean) if norm else second.double()) / std
    scaled = fresh._normalise_scores(second)
    assert torch.allclose(scaled.double(), expected, rtol=1e-5)
    assert std > var.sqrt()  # the floor was used
    assert scaled.abs().max() < 1.02 / SCORE_STD_FLOOR  # scores about the size of their mean square


@pytest.mark.parametrize("norm", [False, True])
def test_single_sample_batches_keep_the_value_error_sane(tokenizer, norm):
    """One sample per step: the first has no spread (unscaled), the second two distinct scores."""
    trainer = make_trainer(tokenizer, batch_size=1, mini_batch_size=1, use_score_norm=norm)
    queries = queries_for(trainer, tokenizer)
    for score in (3.0, 5.0, 4.0):
        stats = trainer.step(queries, trainer.generate(queries), [score])
        assert stats["ppo/val/error"] < 50, stats
