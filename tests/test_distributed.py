"""minippo.distributed: data-parallel PPO and SFT over 2 CPU processes (gloo), launched by torchrun.

A multi-process test runs this file as torchrun's script: ``python -m torch.distributed.run
--standalone --nproc_per_node 2 tests/test_distributed.py WORKER ARGS...`` (``--standalone`` picks a free
port); the ``__main__`` block at the end calls the worker function named WORKER on every rank.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model, tiny_tokenizer

from minippo import distributed
from minippo.lora import LoRAConfig, add_lora
from minippo.ppo import PPOConfig, PPOTrainer
from minippo.rollout import RolloutBuffer

REPO = Path(__file__).resolve().parents[1]
BATCH, MINI = 16, 8


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: float = 300):
    """Run this file under torchrun with ``nproc`` CPU processes; returns the CompletedProcess."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    return subprocess.run(
        [*command, __file__, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


# -- PPO: 1 process x 16 samples == 2 processes x 8 --------------------------------------------------


def fixed_epoch_order(buffer: RolloutBuffer, epoch: int, generator=None) -> torch.Tensor:
    """A fixed minibatch order under which 1 process x 16 samples and 2 processes x 8 see the same
    global minibatches: in chunks of 4 samples, process r holds global chunks 2r, 2r + 1, and global
    minibatch k is the union of every process's local minibatch k (local chunk k). One process visits
    chunks [k, k + 2] for minibatch k; every epoch runs the minibatches in a different order."""
    chunks = torch.arange(len(buffer), device=buffer.query_ids.device).view(-1, MINI // 2)
    ks = [0, 1] if epoch % 2 == 0 else [1, 0]
    return torch.cat([chunks[k :: BATCH // MINI].reshape(-1) for k in ks])


def ppo_samples(tokenizer):
    """16 fixed (query, response, score) triples of varied lengths: no sampling involved."""
    gen = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    queries = [
        torch.randint(3, vocab, (int(n),), generator=gen)
        for n in torch.randint(2, 7, (BATCH,), generator=gen)
    ]
    responses = [
        torch.randint(3, vocab, (int(n),), generator=gen)
        for n in torch.randint(2, 9, (BATCH,), generator=gen)
    ]
    scores = torch.randn(BATCH, generator=gen)
    return queries, responses, scores


def ppo_steps(out_dir: str, steps: int = 2) -> None:
    """Two PPO steps on this process's share of `ppo_samples`; writes its trainable weights and stats."""
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    torch.manual_seed(
        100 + rank
    )  # different LoRA A on each rank: the trainer must broadcast rank 0's
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    config = PPOConfig(
        batch_size=BATCH,
        mini_batch_size=MINI,
        gradient_accumulation_steps=2,
        ppo_epochs=2,
        learning_rate=1e-3,
        whiten_rewards=True,
        use_score_scaling=True,
        use_score_norm=True,
        adap_kl_ctrl=True,
        horizon=100.0,
        compute_dtype="float32",  # on every CPU kind: "auto" is bf16 where native, and rounds apart
    )
    trainer = PPOTrainer(config, model, tokenizer)
    queries, responses, scores = ppo_samples(tokenizer)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for _ in range(steps):
        stats = trainer.step(queries[share], responses[share], scores[share])
    weights = {
        name: p.detach().clone() for name, p in trainer.policy.named_parameters() if p.requires_grad
    }
    torch.save({"weights": weights, "stats": stats}, Path(out_dir) / f"ppo-rank{rank}-of{world}.pt")


def test_ppo_two_processes_equal_one(tmp_path, monkeypatch):
    """2 processes x 8 samples give the adapter and value head of 1 process x 16 after 2 steps.

    Orders: `RolloutBuffer.epoch_order` is replaced by `fixed_epoch_order` in both runs, so the global
    minibatches are the same samples (2 minibatches of 8 per epoch, 2 micro-batches each). Dropout is
    off (the trainer runs in eval mode, LoRA dropout 0). Reward whitening, running score
    normalisation, the adaptive KL coefficient and gradient accumulation are all on."""
    run = torchrun(2, "ppo_steps_fixed_order", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    monkeypatch.setattr(RolloutBuffer, "epoch_order", fixed_epoch_order)
    ppo_steps(str(tmp_path))
    one = torch.load(tmp_path / "ppo-rank0-of1.pt")
    ranks = [torch.load(tmp_path / f"ppo-rank{r}-of2.pt") for r in range(2)]
    for name in one["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), (
            name
        )  # ranks agree
    diff = max((ranks[0]["weights"][k] - w).abs().max().item() for k, w in one["weights"].items())
    change = max(w.abs().max().item() for k, w in one["weights"].items() if "lora_B" in k)
    print(
        f"max |weight difference| 1 vs 2 processes: {diff:.2e} (largest lora_B weight {change:.2e})"
    )
    assert change > 1e-4  # the adapters did move
    assert diff < 1e-5
    for key in (
        "objective/kl_coef",
        "env/reward_mean",
        "env/reward_std",
        "ppo/loss/total",
        "ppo/val/mean",
    ):
        assert ranks[0]["stats"][key] == pytest.approx(one["stats"][key], rel=1e-4, abs=1e-6), key


def ppo_steps_fixed_order(out_dir: str) -> None:
    RolloutBuffer.epoch_order = fixed_epoch_order
    ppo_steps(out_dir)


# -- GRPO: 1 process x 16 samples == 2 processes x 8, whole groups of 4 on each ---------------------------


def grpo_steps(out_dir: str, steps: int = 2) -> None:
    """Two GRPO steps (4 prompts x 4 samples, GRPO's KL in the loss, sequence-mean loss) on this
    process's share of `ppo_samples`: rank r holds groups 2r and 2r + 1, whole."""
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    RolloutBuffer.epoch_order = fixed_epoch_order
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    torch.manual_seed(100 + rank)
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    config = PPOConfig(
        advantage_estimator="grpo",
        num_generations=4,
        beta=0.1,
        loss_type="grpo",
        init_kl_coef=0.0,
        adap_kl_ctrl=False,
        batch_size=BATCH,
        mini_batch_size=MINI,
        gradient_accumulation_steps=2,
        ppo_epochs=2,
        learning_rate=1e-3,
        compute_dtype="float32",
    )
    trainer = PPOTrainer(config, model, tokenizer)
    queries, responses, scores = ppo_samples(tokenizer)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for _ in range(steps):
        stats = trainer.step(queries[share], responses[share], scores[share])
    weights = {
        name: p.detach().clone() for name, p in trainer.policy.named_parameters() if p.requires_grad
    }
    torch.save(
        {"weights": weights, "stats": stats}, Path(out_dir) / f"grpo-rank{rank}-of{world}.pt"
    )


def test_grpo_two_processes_equal_one(tmp_path, monkeypatch):
    """2 processes x 8 samples (2 whole groups each) give the adapters of 1 process x 16 after 2 GRPO
    steps: the group advantages need no exchange, the loss's weights are global."""
    run = torchrun(2, "grpo_steps", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    monkeypatch.setattr(RolloutBuffer, "epoch_order", fixed_epoch_order)
    grpo_steps(str(tmp_path))
    one = torch.load(tmp_path / "grpo-rank0-of1.pt")
    ranks = [torch.load(tmp_path / f"grpo-rank{r}-of2.pt") for r in range(2)]
    assert not any("value_head" in name for name in one["weights"])  # critic-free
    for name in one["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    diff = max((ranks[0]["weights"][k] - w).abs().max().item() for k, w in one["weights"].items())
    change = max(w.abs().max().item() for k, w in one["weights"].items() if "lora_B" in k)
    assert change > 1e-4
    assert diff < 1e-5
    # the losses (weighted per response, as loss_type "grpo"); per-token stats such as clipfrac are token
    # means of micro-batches weighted per response, so they depend on the micro-batch size
    for key in ("env/reward_mean", "ppo/loss/total", "ppo/loss/kl", "ppo/loss/policy"):
        assert ranks[0]["stats"][key] == pytest.approx(one["stats"][key], rel=1e-4, abs=1e-6), key


# -- SFT: 1 process x 4 blocks == 2 processes x 2 -------------------------------------------------------


def sft_run(out_dir: str, model_dir: str, data_dir: str) -> None:
    """Two SFT steps of 4 blocks (LoRA dropout off), written to out_dir/sft-<world size>."""
    from minippo import LoRAConfig
    from minippo.app.sft import SFTConfig, run_sft

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    config = SFTConfig(
        model=model_dir,
        data_dir=data_dir,
        output_dir=str(Path(out_dir) / f"sft-{world}"),
        load_in_8bit=False,
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
        block_size=32,
        batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        warmup_steps=0,
        num_train_texts=20,
        num_eval_blocks=6,
        eval_batch_size=2,
        save_every=1,  # a checkpoint at each step: saved by every process, written by rank 0
    )
    run_sft(config)


def test_sft_two_processes_equal_one(tmp_path, tiny_model_dir, imdb_dir):
    """2 processes x 2 blocks give the adapter, losses and validation loss of 1 process x 4 blocks.

    Orders: both runs draw the same block order (same seed); each step's 4 blocks are split 2 + 2.
    Every block has block_size tokens, so averaging the processes' gradients is the global mean's."""
    run = torchrun(2, "sft_run", str(tmp_path), tiny_model_dir, str(imdb_dir))
    assert run.returncode == 0, run.stderr[-3000:]
    sft_run(str(tmp_path), tiny_model_dir, str(imdb_dir))
    one, two = tmp_path / "sft-1", tmp_path / "sft-2"
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"SFT: max |adapter difference| 1 vs 2 processes: {diff:.2e}")
    assert diff < 1e-5
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["eval_loss_after"] == pytest.approx(m1["eval_loss_after"], rel=1e-5)
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], rel=1e-5)
    losses = [
        [loss for _, loss in json.loads((d / "loss_log.json").read_text())] for d in (one, two)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for folder, world in ((one, 1), (two, 2)):  # one checkpoint each, no debris beside it
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
        generators = torch.load(folder / "checkpoint" / "rng_state.pt", weights_only=True)
        assert len(generators) == world


# -- checkpoints: every rank's generators, saves from every rank --------------------------------------


def resumable_trainer():
    """A trainer whose steps sample (each rank from its own generators) and normalise scores."""
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    torch.manual_seed(100 + rank)
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    config = PPOConfig(
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        learning_rate=1e-2,
        min_new_tokens=2,
        max_new_tokens=6,
        use_score_scaling=True,
        use_score_norm=True,
        compute_dtype="float32",
    )
    return PPOTrainer(config, model, tokenizer), tokenizer


def sampled_steps(trainer, tokenizer, n: int) -> None:
    """n steps of generate -> score (a point per token id divisible by 3) -> step, on this rank's share."""
    queries = ppo_samples(tokenizer)[0]
    share = queries[trainer.rank * trainer.batch_size_per_rank :][: trainer.batch_size_per_rank]
    for _ in range(n):
        responses = trainer.generate(share)
        trainer.step(share, responses, [float((r % 3 == 0).sum()) for r in responses])


def checkpoint_worker(out_dir: str) -> None:
    """On every rank: (1) 3 steps straight, and 1 step, save, 1 more step (the generators move on), a
    fresh trainer loads, 2 steps; (2) 30 saves into one folder; (3) a save given another folder on each
    rank; (4) a save that rank 0 fails to write. Writes what each rank saw to checkpoint-rank<r>.json.
    In (2) and (3) every `os.rename` takes 20 ms longer, as on a slow file system, so that two writers
    would collide reliably."""
    out = Path(out_dir)
    straight, tokenizer = resumable_trainer()
    sampled_steps(straight, tokenizer, 3)
    first, _ = resumable_trainer()
    sampled_steps(first, tokenizer, 1)
    first.save(out / "resume" / "checkpoint")
    sampled_steps(first, tokenizer, 1)
    resumed, _ = resumable_trainer()
    resumed.load(out / "resume" / "checkpoint")
    sampled_steps(resumed, tokenizer, 2)
    pairs = zip(straight.trainable, resumed.trainable)
    result = {"max_difference": max((a - b).abs().max().item() for a, b in pairs)}
    result["bit_identical"] = all(map(torch.equal, straight.trainable, resumed.trainable))
    result["save_errors"] = []
    rename = os.rename

    def slow_rename(
        *args, **kwargs
    ):  # as on a slow (network) file system: a wider window for a race
        time.sleep(0.02)
        return rename(*args, **kwargs)

    os.rename = slow_rename
    for _ in range(30):
        distributed.barrier()  # both ranks start each save together: the most overlap
        try:
            resumed.save(out / "race" / "checkpoint")
        except Exception as error:  # what a race gives: FileNotFoundError, ...
            result["save_errors"].append(repr(error))
    try:
        resumed.save(out / f"rank{resumed.rank}")
    except ValueError as error:
        result["different_folders"] = str(error)
    os.rename = rename
    (out / "a-file").touch()  # (4) rank 0 cannot write (a file where the folder should go)
    try:
        resumed.save(out / "a-file" / "checkpoint")
    except Exception as error:
        result["failed_write"] = f"{type(error).__name__}: {error}"
    (out / f"checkpoint-rank{resumed.rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints")
    run = torchrun(2, "checkpoint_worker", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return out, [json.loads((out / f"checkpoint-rank{r}.json").read_text()) for r in range(2)]


def test_a_resume_on_two_processes_is_bit_identical_on_both(checkpoint_run):
    """3 steps straight == 1 step, save, load into a fresh trainer, 2 steps: every trainable tensor bit
    for bit on both ranks, as each rank restores its own generators (sampling and minibatch orders)."""
    out, ranks = checkpoint_run
    for rank in ranks:
        assert rank["bit_identical"], rank["max_difference"]
    generators = torch.load(out / "resume" / "checkpoint" / "rng_state.pt", weights_only=True)
    assert len(generators) == 2  # every rank's, in rank order, and they differ
    assert not torch.equal(generators[0]["torch"], generators[1]["torch"])


def test_save_from_every_rank_gives_one_checkpoint_and_no_debris(checkpoint_run):
    """30 saves called on both ranks into one folder: no error on either rank, one complete checkpoint
    (rank 0 wrote it, rank 1 waited), nothing beside it. Different folders on the ranks: the same
    ValueError on both, and nothing written."""
    out, ranks = checkpoint_run
    assert [rank["save_errors"] for rank in ranks] == [[], []]
    assert os.listdir(out / "race") == ["checkpoint"]
    for rank in ranks:
        assert "different folders on the 2 processes" in rank["different_folders"]
    assert json.loads((out / "race" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert not (out / "rank0").exists() and not (out / "rank1").exists()


def test_a_save_that_fails_on_rank_0_fails_on_every_rank(checkpoint_run):
    """Rank 0's error is raised on rank 0, and on rank 1 (which waited) as a RuntimeError naming it."""
    _, ranks = checkpoint_run
    assert ranks[0]["failed_write"].startswith(("FileExistsError", "NotADirectoryError"))
    assert ranks[1]["failed_write"].startswith(
        "RuntimeError: rank 0 failed while the others waited"
    )
    assert ranks[0]["failed_write"].split(": ", 1)[1] in ranks[1]["failed_write"]


def test_resume_needs_the_same_number_of_processes(tmp_path, tokenizer):
    """A checkpoint records how many processes wrote it; loading it with another number is an error."""
    model = add_lora(tiny_model("llama", vocab_size=len(tokenizer)), LoRAConfig(r=2))
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), model, tokenizer)
    trainer.save(tmp_path / "ckpt")
    state_file = tmp_path / "ckpt" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    trainer.load(tmp_path / "ckpt")  # the same number: fine
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(
        ValueError, match="saved by 2 processes, and 1 load it: resume with the same number"
    ):
        trainer.load(tmp_path / "ckpt")


# -- failures end the run, never hang ------------------------------------------------------------------


def bad_input_on_rank1(out_dir: str) -> None:
    """Rank 1 passes a token id outside the vocabulary to step(); rank 0 passes good input."""
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = add_lora(tiny_model("llama", vocab_size=len(tokenizer)), LoRAConfig(r=2))
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1), model, tokenizer)
    queries, responses, scores = ppo_samples(tokenizer)
    if trainer.rank == 1:
        responses = [torch.tensor([1, 2, 10**6])] + responses[1:]
    trainer.step(queries[:2], responses[:2], scores[:2])


def test_one_rank_raising_fails_the_whole_run_with_its_message(tmp_path):
    """torchrun ends the group when one rank exits non-zero: rank 0, left waiting in a collective, is
    stopped too. (The subprocess timeout only guards the test suite against a hang.)"""
    run = torchrun(2, "bad_input_on_rank1", str(tmp_path), timeout=240)
    assert run.returncode != 0
    assert "[rank1]: ValueError: response 0 has token ids outside [0, 384)" in run.stderr
    assert re.search(
        r"Root Cause.*?rank\s*: 1 ", run.stderr, re.S
    )  # torchrun's report names rank 1


def stalled_peer(out_dir: str) -> None:
    """Rank 1 is alive but never joins rank 0's all-reduce."""
    distributed.init_from_env()
    if distributed.rank() == 1:
        time.sleep(600)
    distributed.all_reduce(torch.ones(1))


def test_process_group_timeout_fails_a_rank_left_waiting(tmp_path):
    """MINIPPO_DIST_TIMEOUT bounds every collective: rank 0 fails instead of waiting for a stalled
    peer, and torchrun then ends the peer. (The subprocess timeout only guards against a hang.)"""
    run = torchrun(2, "stalled_peer", str(tmp_path), env={"MINIPPO_DIST_TIMEOUT": "5"}, timeout=240)
    assert run.returncode != 0
    assert re.search(r"Root Cause.*?rank\s*: 0 ", run.stderr, re.S), run.stderr[-3000:]
    assert re.search(r"\[rank0\]:.*(timed out|timeout)", run.stderr, re.I), run.stderr[-3000:]


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
    distributed.shutdown()  # on success only: a rank that failed stays in, so torchrun names it
