"""The blog's three steps on IMDB as library calls: sft -> merge -> reward -> ppo, plus generate.

Each step is a config dataclass and a `run_*` function; the CLI (`minippo <step>`) is generated
from the dataclasses, and `minippo.app.demo` chains the steps into one run folder with a report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import tyro

from .. import distributed
from ..adapter_files import load_adapter
from ..checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check,
    check_device,
    check_fields,
    one_of,
)
from ..fileio import atomic_directory, atomic_write, committed_directory
from ..lora import LoRAConfig, add_lora, disable_adapters, merge_lora
from ..ppo import PPOConfig, PPOTrainer, check_config
from ..quant import load_model, resolve_dtype
from ..rewards import WeightedRewards
from .data import cycle_batches, load_imdb, make_prompts
from .model_folders import (
    DEFAULT_MODEL,
    FAST_MODES,
    check_context,
    fast_is_on,
    load_tokenizer,
    quant_load_kwargs,
    resolve_model,
)
from .report import MetricsLog, distinct_n, markdown_table, repeated_ngram_share, write_json
from .reward import (
    RewardConfig,
    SentimentReward,
    is_pairwise_reward,
    load_reward,
    load_reward_fn,
    train_reward,
)
from .tasks import encode_prompts, get_task

__all__ = [
    "RewardConfig",
    "run_reward",
    "MergeConfig",
    "run_merge",
    "PPORunConfig",
    "run_ppo",
    "GenerateConfig",
    "run_generate",
    "evaluate_policy",
]


def run_reward(config: RewardConfig) -> dict:
    """`minippo reward`: train the TF-IDF sentiment reward (or check a HF classifier); print accuracy."""
    result = train_reward(config)
    m = result["metrics"]
    if config.model == "pairwise":
        agreement = ""
        if "heldout_label_accuracy" in m:
            agreement = (
                f"; on {m['num_heldout_reviews']} held-out review starts: label accuracy "
                f"{m['heldout_label_accuracy']:.4f}, agreement with TF-IDF "
                f"{m['heldout_tfidf_agreement']:.4f} (TF-IDF's label accuracy "
                f"{m['heldout_tfidf_label_accuracy']:.4f})"
            )
        print(
            f"reward: validation pair accuracy {m['validation_pair_accuracy']:.4f}{agreement} "
            f"-> {result['path']}"
        )
        return result
    print(f"reward: validation accuracy {m['validation_accuracy']:.4f} -> {result['path']}")
    return result


# ----------------------------------------------------------------------------- step 2: merge


@dataclass
class MergeConfig:
    """Merge a LoRA adapter into its base model and save a plain transformers model folder."""

    base_model: str = DEFAULT_MODEL
    """Base model: a local folder, the embedded default "smollm2-135m", or a hub name."""
    adapter: str = "runs/sft/adapter"
    """Folder of the adapter to merge (adapter_config.json + adapter_model.safetensors)."""
    output_dir: str = "runs/merged"
    """Where the merged model (safetensors + tokenizer) is written."""
    dtype: str = "float32"
    """dtype of the saved weights: float32, bfloat16 or float16."""
    from_8bit: bool = False
    """Merge into the 8-bit base (dequantised first; adds rounding error) instead of a float copy."""
    device: str = "cpu"
    """Device for loading and merging."""
    probe_tokens: int = 64
    """Length of each probe text used to check the merge (logits of merged vs adapted model)."""
    data_dir: str | None = None
    """IMDB folder for the probe texts (None: $MINIPPO_IMDB_DIR, else built-in sentences)."""

    def __post_init__(self):
        resolve_dtype(self.dtype)
        check_fields(self, (lambda v: v >= 2, "at least 2"), "probe_tokens")
        check_device(self)


_PROBE_SENTENCES = [
    "I watched this film last night and I have to say the acting was",
    "The worst part of the movie was the ending, which made no sense at all, but",
    "A charming, funny story about a family that",
    "If you like slow science fiction with long silences, this one",
]


def _probe_batch(tokenizer, data_dir, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    texts = _PROBE_SENTENCES
    try:
        texts = list(load_imdb("validation", data_dir, limit=4, seed=1)["text"])
    except (OSError, ValueError):
        pass  # offline without IMDB: the built-in sentences still probe the merge
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=n_tokens)
    return enc["input_ids"], enc["attention_mask"]


def _save_pretrained(model, tokenizer, out: Path) -> None:
    """save_pretrained of model and tokenizer into `out`, crash-safe (`atomic_directory`)."""
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def run_merge(config: MergeConfig) -> dict:
    """`minippo merge`: base + adapter -> plain model folder, verified on a probe batch."""
    from transformers import AutoModelForCausalLM

    base = resolve_model(config.base_model)
    tokenizer = load_tokenizer(base, padding_side="right")
    model = load_model(
        base, load_in_8bit=config.from_8bit, dtype=config.dtype, device=config.device
    )
    load_adapter(model, config.adapter)
    ids, attn = (
        t.to(config.device) for t in _probe_batch(tokenizer, config.data_dir, config.probe_tokens)
    )
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=attn).logits.float()  # (B, L, V)

    merged = merge_lora(model, dtype=config.dtype)
    out = Path(config.output_dir)
    _save_pretrained(merged, tokenizer, out)

    # Verify: the folder reloads in bare transformers and gives the adapted model's logits.
    reloaded = (
        AutoModelForCausalLM.from_pretrained(out, dtype=resolve_dtype(config.dtype))
        .to(config.device)
        .eval()
    )
    with torch.no_grad():
        logits = reloaded(input_ids=ids, attention_mask=attn).logits.float()
    keep = attn.bool()
    diff = (logits - adapted)[keep].abs()
    check = {
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "logit_scale": adapted[keep].abs().mean().item(),
        "same_argmax": (logits.argmax(-1) == adapted.argmax(-1))[keep].float().mean().item(),
        "base_model_folder": base,
        "config": dataclasses.asdict(config),
    }
    write_json(out / "merge_check.json", check)
    print(
        f"merge: {out} (plain transformers model, {config.dtype}); merged vs adapted logits on "
        f"{ids.shape[0]}x{ids.shape[1]} probe tokens: max |diff| {check['max_abs_logit_diff']:.2e}, "
        f"mean |diff| {check['mean_abs_logit_diff']:.2e}, same top-1 token {check['same_argmax']:.1%}"
    )
    return {"path": str(out), **check}


# ----------------------------------------------------------------------------- step 3: ppo


@dataclass
class PPORunConfig:
    """PPO-train a new LoRA adapter (and value head) so the model's reviews score as positive."""

    model: str = "runs/merged"
    """Starting model (the merged SFT model, the embedded "smollm2-135m", or any causal LM)."""
    reward: str = "runs/reward"
    """Reward: a folder from `minippo reward`, or a HF sentiment classifier (e.g. lvwerra/distilbert-imdb)."""
    reward_kind: str = "logit"
    """What the reward returns: "logit" (log-odds / raw positive logit, as the blog) or "prob"."""
    data_dir: str | None = None
    """IMDB folder for prompts (None: $MINIPPO_IMDB_DIR, else the hub's stanfordnlp/imdb)."""
    output_dir: str = "runs/ppo"
    """Run folder: metrics.jsonl, checkpoint/ (periodic), adapter/ (final), config.json."""
    steps: int = 40
    """PPO steps (each: batch_size prompts -> generate -> score -> step)."""
    load_in_8bit: bool = True
    """Load the starting model's Linear layers in 8-bit (frozen); False: --quant none."""
    quant: str = "8bit"
    """Starting model's Linear layers (frozen): "8bit" (LLM.int8(), the blog's), "4bit" (NF4, QLoRA) or
    "none"."""
    dtype: str = "auto"
    """dtype of the model's float parameters (embeddings, norms, LM head); "auto": the compute dtype
    that `minippo.quant.auto_compute_dtype` picks for this device and quantisation."""
    fast: str = "auto"
    """`minippo.fast` (faster modules, each tested against the plain ones): "on", "off", or "auto" (on a
    CPU with native bf16 or int8 matmuls, or CUDA)."""
    prompt_min_tokens: int = 2
    """Prompts are train reviews cut to k tokens, k drawn from [prompt_min_tokens, prompt_max_tokens)."""
    prompt_max_tokens: int = 8
    """See prompt_min_tokens (the blog's LengthSampler(2, 8))."""
    save_every: int = 10
    """Save a checkpoint every this many steps (0: only at the end)."""
    eval_prompts: int = 32
    """Held-out prompts (IMDB test split) scored before and after training (0: skip)."""
    eval_seed: int = 1234
    """Sampling seed of the before/after evaluation (same prompts, same seed)."""
    log_samples: int = 2
    """Print this many sample reviews every save_every steps."""
    resume: bool = False
    """Continue the run in output_dir from its checkpoint/ exactly (RNG, optimiser, scheduler, prompt
    position), appending to metrics.jsonl; without a checkpoint, start from step 0."""
    task: str | None = None
    """A task whose reward a program checks (`minippo.app.tasks`: "add"): prompts, reward and held-out
    accuracy come from it instead of IMDB and --reward."""
    reward_fn: list[str] = field(default_factory=list)
    """Reward functions to train on, summed: each "path.py:name" (a callable (prompts, completions) ->
    scores), "sentiment" (--reward on prompt + completion) or "task" (the task's checker). Empty: "task"
    with --task, else "sentiment". The held-out evaluation keeps the plain --reward or checker."""
    reward_weights: list[float] | None = None
    """One weight per --reward-fn (trl's reward_weights); None: all 1."""
    diversity_coef: float = 0.0
    """Lower each training score, after the trainer's scale and clip, by this times the share of the
    sample's bigrams that the step's batch repeats (what distinct-2 counts; under torchrun, each
    process's share of the batch): among samples at the clip, the ones phrased like no other keep the
    whole score. 0: off. The held-out evaluation scores with the plain reward."""
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=16, alpha=32, dropout=0.0))
    """LoRA settings of the new adapter."""
    ppo: Annotated[PPOConfig, tyro.conf.OmitArgPrefixes] = field(
        default_factory=lambda: PPOConfig(batch_size=16, mini_batch_size=4)
    )
    """PPO settings (flags with trl's names: --learning-rate, --batch-size, ...)."""

    @property
    def device(self) -> str:
        """Where the model, the trainer and the reward run: ``ppo.device``, else the CPU."""
        return self.ppo.device or "cpu"

    def __post_init__(self):
        if not self.load_in_8bit and self.quant == "8bit":  # the older spelling of --quant none
            self.quant = "none"
        quant_load_kwargs(self.quant)
        self.load_in_8bit = self.quant == "8bit"
        check_fields(self, one_of(*FAST_MODES), "fast")
        check_fields(self, one_of("logit", "prob"), "reward_kind")
        check_fields(self, POSITIVE_INT, "steps", "prompt_min_tokens")
        check_fields(self, NON_NEGATIVE_INT, "save_every", "eval_prompts", "log_samples")
        check_fields(self, NON_NEGATIVE, "diversity_coef")
        check(
            self,
            not (self.diversity_coef and self.ppo.use_score_scaling),
            "diversity_coef is subtracted from the clipped raw scores, which use_score_scaling would then "
            "rescale: use one or the other",
        )
        check(
            self,
            self.prompt_min_tokens < self.prompt_max_tokens,
            f"prompt_min_tokens ({self.prompt_min_tokens}) must be < "
            f"prompt_max_tokens ({self.prompt_max_tokens})",
        )
        if self.dtype != "auto":
            resolve_dtype(self.dtype)
        if self.task is not None:
            get_task(self.task)
        n, weights = len(self.reward_fn), self.reward_weights
        check(
            self,
            weights is None or len(weights) == n,
            f"{len(weights or [])} reward_weights for {n} reward_fn: give one weight per function",
        )
        check(
            self,
            self.task is not None or "task" not in self.reward_fn,
            'reward_fn "task" needs a --task',
        )


def training_reward(config: PPORunConfig, sentiment) -> WeightedRewards | None:
    """The reward functions of --reward-fn, loaded (each file imported) and summed with their weights;
    None where the run trains on the plain sentiment score (IMDB without --reward-fn)."""
    names = config.reward_fn or (["task"] if config.task else [])
    if not names:
        return None
    functions = []
    for name in names:
        if name == "task":
            functions.append(get_task(config.task).correct)
        elif name == "sentiment":
            functions.append(SentimentReward(sentiment))
        else:
            functions.append(load_reward_fn(name))
    return WeightedRewards(functions, config.reward_weights)


def _decode_pairs(tokenizer, queries, responses) -> tuple[list[str], list[str]]:
    q = tokenizer.batch_decode(queries, skip_special_tokens=True)
    r = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return q, r


def evaluate_samples(
    trainer: PPOTrainer,
    tokenizer,
    prompts: list[torch.Tensor],
    seed: int,
    adapters: bool = True,
    reward=None,
) -> dict:
    """Sample one response per prompt (fixed seed) with the adapters on or off; optionally score
    the reviews (prompt + response) with the reward's P(positive). The sampling seeds torch's global
    generator inside `own_rng`: the training stream is left where it was."""
    with own_rng(seed):
        if adapters:
            responses = trainer.generate(prompts)
        else:
            with disable_adapters(trainer.policy.model):
                responses = trainer.generate(prompts)
    q, r = _decode_pairs(tokenizer, prompts, responses)
    probs = reward.probability([a + b for a, b in zip(q, r)]).float().tolist() if reward else None
    return {"prompts": q, "responses": r, "probs": probs, "response_ids": responses}


def keep_best(rounds: list[dict]) -> dict:
    """Best-of-n over n rounds of per-prompt samples (dicts of lists indexed by prompt, with "probs"):
    for each prompt, every key's entry from the round of highest P(positive) (the first of equals)."""
    pick = [
        max(range(len(rounds)), key=lambda k: rounds[k]["probs"][i])
        for i in range(len(rounds[0]["probs"]))
    ]
    return {key: [rounds[k][key][i] for i, k in enumerate(pick)] for key in rounds[0]}


def best_of_samples(
    trainer, tokenizer, prompts, seed: int, n: int, reward, adapters: bool = True
) -> dict:
    """Best-of-n: `evaluate_samples` with seeds seed ... seed + n - 1, kept by `keep_best`; n = 1 is
    `evaluate_samples` itself (no reward needed)."""
    rounds = [
        evaluate_samples(trainer, tokenizer, prompts, seed + k, adapters, reward) for k in range(n)
    ]
    return keep_best(rounds) if n > 1 else rounds[0]


def evaluate_policy(
    trainer: PPOTrainer,
    tokenizer,
    reward,
    prompts: list[torch.Tensor],
    seed: int,
    adapters: bool = True,
) -> dict:
    """Mean P(positive) of sampled reviews and mean KL to the starting model (adapters off; 0 when
    sampling from it), with the samples themselves."""
    samples = evaluate_samples(trainer, tokenizer, prompts, seed, adapters, reward)
    responses = samples.pop("response_ids")
    base_logp, mask = trainer.response_logprobs(prompts, responses, reference=True)  # (B, T)
    kl = torch.zeros(len(prompts))  # sampled from the starting model itself: no KL to it
    if adapters:  # (B,) sum over response tokens of log pi - log pi_ref: a sample of KL(pi || ref)
        logp, _ = trainer.response_logprobs(prompts, responses)
        kl = ((logp - base_logp) * mask).sum(1).cpu()
    probs = torch.tensor(samples["probs"])
    return {
        "reward_prob_mean": probs.mean().item(),
        "reward_prob_std": probs.std().item(),
        "kl_mean": kl.mean().item(),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "base_logp_per_token": (base_logp.sum() / mask.sum()).item(),
        **samples,
    }


def evaluate_accuracy(
    trainer: PPOTrainer, tokenizer, task, prompts: list[torch.Tensor], seed: int, adapters=True
) -> dict:
    """A task's held-out accuracy: the share of sampled answers (fixed seed, the training temperature)
    that its checker finds right, with the mean KL to the starting model and the samples."""
    samples = evaluate_samples(trainer, tokenizer, prompts, seed, adapters)
    responses = samples.pop("response_ids")
    right = task.correct(samples["prompts"], samples["responses"])
    kl = torch.zeros(len(prompts))
    if adapters:  # (B,) a sample of KL(pi || ref) per response, as evaluate_policy
        base_logp, mask = trainer.response_logprobs(prompts, responses, reference=True)
        logp, _ = trainer.response_logprobs(prompts, responses)
        kl = ((logp - base_logp) * mask).sum(1).cpu()
    return {
        "accuracy": sum(right) / len(right),
        "kl_mean": kl.mean().item(),
        "distinct_2": distinct_n(responses, 2),
        "right": right,
        **samples,
    }


@contextlib.contextmanager
def own_rng(seed: int):
    """Run the block on torch's generators seeded with `seed`, then put back their earlier states."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build_trainer(config: PPORunConfig):
    """Load the starting model (8-bit, 4-bit or float: `quant`), add a fresh adapter, and make the trainer."""
    model_dir = resolve_model(config.model)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(
        model_dir,
        **quant_load_kwargs(config.quant),
        dtype=config.dtype,
        device=config.device,
        fast=fast_is_on(config.fast, config.device),
    )
    torch.manual_seed(config.ppo.seed)  # the adapters' A matrices follow --seed
    add_lora(model, config.lora)
    ppo = config.ppo
    if ppo.log_with == "tensorboard" and ppo.logging_dir is None:  # event files in the run folder
        ppo = dataclasses.replace(ppo, logging_dir=str(Path(config.output_dir) / "tensorboard"))
    trainer = PPOTrainer(ppo, model, tokenizer)
    return trainer, tokenizer, model_dir


# PPORunConfig fields a run may be resumed under with another value (the PPO settings: RESUMABLE_CHANGES).
# With another `steps` the prompt pool differs in size: a valid continuation, not a bit-identical run.
RESUMABLE_RUN_CHANGES = (
    "resume",
    "steps",
    "save_every",
    "log_samples",
    "eval_prompts",
    "eval_seed",
    "data_dir",
    "ppo",
)


def resume_metrics(trainer: PPOTrainer, checkpoint: Path, log: MetricsLog | None) -> int:
    """Load the checkpoint into the trainer and cut metrics.jsonl back to the step of the one loaded (its
    previous version where a save was killed mid-swap; rows written after it would otherwise come twice);
    returns the step to continue from."""
    loaded = trainer.load(checkpoint)
    if log is None:  # not rank 0: only rank 0 writes metrics.jsonl
        return trainer.current_step
    lines = log.path.read_text().splitlines(keepends=True) if log.path.exists() else []
    keep = [
        line
        for line in lines
        if line.endswith("\n") and json.loads(line)["step"] <= trainer.current_step
    ]
    atomic_write(
        log.path, lambda tmp: Path(tmp).write_text("".join(keep))
    )  # a torn last line goes too
    print(f"ppo: resuming {loaded} at step {trainer.current_step}")
    return trainer.current_step


def run_ppo(config: PPORunConfig, progress: bool = True) -> dict:
    """`minippo ppo`: prompts -> generate -> score -> step, `steps` times; logs, checkpoints, evaluation.

    Under torchrun each process generates and scores its share of every batch; rank 0 alone evaluates
    and writes files while the others wait at a barrier."""
    from tqdm.auto import tqdm

    distributed.init_from_env()
    main = distributed.rank() == 0
    out = Path(config.output_dir)
    checkpoint = out / "checkpoint"
    resume = start_run_folder(config, out, checkpoint, main)
    # the rewards first (on the trainer's device): a wrong path, or a folder that holds no trained
    # reward, fails before a large model loads; a pairwise reward model joins the policy's model below
    pairwise = is_pairwise_reward(config.reward)
    reward = None  # the sentiment scorer (IMDB runs)
    if not pairwise and (config.task is None or "sentiment" in config.reward_fn):
        reward = load_reward(config.reward, kind=config.reward_kind, device=config.device)
    reward_fn = None if pairwise else training_reward(config, reward)
    tokenizer = load_tokenizer(resolve_model(config.model))
    prompts, eval_prompts = ppo_prompts(config, tokenizer)
    if reward_fn is not None:  # one call on two prompts: a wrong length or a NaN fails here
        probe = tokenizer.batch_decode(prompts[:2], skip_special_tokens=True)
        reward_fn.scores(probe, ["", "1"][: len(probe)])
    trainer, tokenizer, model_dir = build_trainer(config)
    if pairwise:
        reward = shared_reward(config, trainer, model_dir)
        reward_fn = training_reward(config, reward)
    share = slice(
        trainer.rank * trainer.batch_size_per_rank, (trainer.rank + 1) * trainer.batch_size_per_rank
    )

    result = {"model": model_dir, "output_dir": str(out)}
    evaluate = functools.partial(evaluate_run, config, trainer, tokenizer, reward, eval_prompts)
    if eval_prompts and main:
        result["before"] = evaluate(adapters=False)

    distributed.barrier()
    log = MetricsLog(out / "metrics.jsonl")
    start = resume_metrics(trainer, checkpoint, log if main else None) if resume else 0
    if not resume and main:
        log.path.unlink(missing_ok=True)  # a fresh run; checkpoints below are replaced atomically
    group = config.ppo.num_generations  # each prompt's samples, consecutive (whole groups per rank)
    batches = cycle_batches(len(prompts), config.ppo.batch_size // group, config.ppo.seed)
    for _ in range(start):  # the prompt position: the batches the checkpoint's steps consumed
        next(batches)
    bar = tqdm(
        range(start + 1, config.steps + 1),
        desc="ppo",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    for step in bar:
        batch = [prompts[i] for i in next(batches) for _ in range(group)]
        queries = batch[share]  # every process takes its share of the batch
        stats, samples = ppo_step(
            trainer, tokenizer, reward, queries, config.diversity_coef, reward_fn
        )
        stats.update({"step": step, "time/elapsed": time.perf_counter() - t0})
        if main:
            log.write(stats)
        shown = {"reward": "env/reward_mean", "pos": "env/reward_prob_mean", "kl": "objective/kl"}
        shown["beta"] = "objective/kl_coef"
        bar.set_postfix({k: f"{stats[name]:.3f}" for k, name in shown.items() if name in stats})
        if config.save_every and step % config.save_every == 0 and step < config.steps:
            trainer.save(checkpoint)  # on every process: rank 0 writes, with all ranks' generators
            for q, r in samples[: config.log_samples if main else 0]:
                bar.write(f"  step {step}: {q!r} -> {r!r}")
    result["train_seconds"] = time.perf_counter() - t0
    trainer.save(out / "adapter")  # on every process, as the checkpoints
    if main:  # the others wait at the barrier while rank 0 evaluates
        finish_run(config, trainer, evaluate, result)
    distributed.barrier()
    return result


def shared_reward(config: PPORunConfig, trainer: PPOTrainer, model_dir: str):
    """The pairwise reward model in `config.reward`, as a second adapter on the policy's model (one copy
    of the base serves policy, reference, value head and reward) when it was trained on that model. Its
    adapter's initialisation runs on its own generator: the training's sampling stream is unchanged."""
    with own_rng(config.ppo.seed):
        return load_reward(
            config.reward,
            kind=config.reward_kind,
            device=config.device,
            model=trainer.policy.model,
            model_dir=model_dir,
        )


def start_run_folder(config: PPORunConfig, out: Path, checkpoint: Path, main: bool) -> bool:
    """Whether the run resumes (asked, and a checkpoint exists; then the run's settings must match:
    `PPOTrainer.load` checks the PPO ones); rank 0 writes the run's config.json."""
    # a checkpoint, or its previous version where a save was killed mid-swap: `PPOTrainer.load` finds it
    resume = config.resume and committed_directory(checkpoint) is not None
    if resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        check_config(saved, dataclasses.asdict(config), RESUMABLE_RUN_CHANGES, f"the run in {out}")
    distributed.barrier()  # every process has read the old config before rank 0 rewrites it
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dataclasses.asdict(config))
    return resume


def evaluate_run(config: PPORunConfig, trainer, tokenizer, reward, eval_prompts, adapters=True):
    """The held-out evaluation (`evaluate_policy`, or `evaluate_accuracy` for a task), printed."""
    seed = config.eval_seed
    if config.task is None:
        metrics = evaluate_policy(trainer, tokenizer, reward, eval_prompts, seed, adapters)
        what = f"held-out reviews score P(positive) {metrics['reward_prob_mean']:.3f}"
    else:
        task = get_task(config.task)
        metrics = evaluate_accuracy(trainer, tokenizer, task, eval_prompts, seed, adapters)
        what = f"held-out {config.task} accuracy {metrics['accuracy']:.3f}"
    when = f"after {config.steps} steps" if adapters else "before training"
    kl = f", KL to the starting model {metrics['kl_mean']:.2f} nats/sample" if adapters else ""
    print(f"ppo: {when}, {what}{kl}")
    return metrics


def finish_run(config: PPORunConfig, trainer, evaluate, result: dict) -> None:
    """The held-out evaluation after training, result.json; the tracker closed."""
    out = Path(config.output_dir)
    if "before" in result:
        result["after"] = evaluate()
    write_json(out / "result.json", result)
    if trainer.tracker is not None:
        trainer.tracker.close()


def ppo_prompts(config: PPORunConfig, tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompts (1-D token ids) cut from IMDB train reviews for training, and from test reviews for
    the held-out evaluation (none when eval_prompts is 0); for a task, its training questions and
    eval_prompts held-out ones (each held-out question in turn, as many times as it takes)."""
    if config.task is not None:
        train, held_out = get_task(config.task).split(config.ppo.seed)
        evaluated = [held_out[i % len(held_out)] for i in range(config.eval_prompts)]
        return encode_prompts(tokenizer, train), encode_prompts(tokenizer, evaluated)
    cut = dict(min_tokens=config.prompt_min_tokens, max_tokens=config.prompt_max_tokens)
    n_train = max(config.steps * config.ppo.batch_size, 4 * config.ppo.batch_size)
    train_texts = load_imdb("train", config.data_dir, limit=2 * n_train, seed=config.ppo.seed)[
        "text"
    ]
    prompts, _ = make_prompts(train_texts, tokenizer, **cut, seed=config.ppo.seed, limit=n_train)
    if len(prompts) < config.ppo.batch_size:
        raise ValueError(
            f"only {len(prompts)} prompts after filtering, fewer than batch_size "
            f"{config.ppo.batch_size}: use more data or a smaller batch"
        )
    if not config.eval_prompts:
        return prompts, []
    n_test, seed = config.eval_prompts, config.eval_seed
    test_texts = load_imdb("test", config.data_dir, limit=4 * n_test, seed=seed)["text"]
    return prompts, make_prompts(test_texts, tokenizer, **cut, seed=seed, limit=n_test)[0]


def ppo_step(
    trainer: PPOTrainer,
    tokenizer,
    reward,
    queries,
    diversity_coef: float = 0.0,
    reward_fn: WeightedRewards | None = None,
) -> tuple[dict, list]:
    """One step of the loop: 1. sample responses, 2. score the whole reviews (prompt + response) with the
    sentiment ``reward``, or the texts with ``reward_fn`` (then ``reward``, if any, only gives the
    P(positive) stat), optionally lowered for repeated bigrams (`PPORunConfig.diversity_coef`), 3. one PPO
    step. Returns the stats (with timings and the mean P(positive)) and the (prompt, response) texts."""
    t = time.perf_counter()
    responses = trainer.generate(queries)
    t_gen = time.perf_counter() - t
    q_text, r_text = _decode_pairs(tokenizer, queries, responses)
    t = time.perf_counter()
    full = [q + r for q, r in zip(q_text, r_text)]
    if reward_fn is None:
        scores, probs = reward.scores_and_probabilities(full)
    else:
        scores = reward_fn.scores(q_text, r_text)
        probs = None if reward is None else reward.probability(full)
    repeated = torch.tensor(repeated_ngram_share(responses, 2))
    if diversity_coef:
        scores = penalise_repeats(trainer.config, scores, repeated, diversity_coef)
    t_score = time.perf_counter() - t
    stats = trainer.step(queries, responses, scores)
    stats.update({"time/generate": t_gen, "time/score": t_score})
    if probs is not None:
        mean_prob = probs.float().mean().to(trainer.device)
        stats["env/reward_prob_mean"] = distributed.all_reduce(mean_prob, "mean").item()
    stats["env/distinct_1"], stats["env/distinct_2"] = (
        distinct_n(responses, 1),
        distinct_n(responses, 2),
    )
    stats["env/repeated_bigrams"] = distributed.all_reduce(
        repeated.mean().to(trainer.device), "mean"
    ).item()
    return stats, list(zip(q_text, r_text))


def penalise_repeats(ppo: PPOConfig, scores, repeated, coef: float):
    """The scores to pass to `PPOTrainer.step` so that after its score_scale and score_clip each is
    clip(scale x score) - coef x repeated: (clip(scale x score) - coef x repeated) / scale. The trainer
    clips again, so a score at -score_clip stays there."""
    scaled = torch.as_tensor(scores, dtype=torch.float32) * ppo.score_scale
    if ppo.score_clip is not None:
        scaled = scaled.clamp(-ppo.score_clip, ppo.score_clip)
    return (scaled - coef * repeated.to(scaled.device)) / ppo.score_scale


# ----------------------------------------------------------------------------- generate


@dataclass
class GenerateConfig:
    """Sample reviews from a model with and without an adapter: same prompts, same seeds."""

    model: str = "runs/merged"
    """Model folder or name (the base the adapter was trained on)."""
    adapter: str | None = "runs/ppo/adapter"
    """Adapter folder (None: only the base model)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt texts; empty: cut num_prompts IMDB test reviews to 2-7 tokens."""
    num_prompts: int = 6
    """How many IMDB prompts when no prompts are given."""
    data_dir: str | None = None
    """IMDB folder (None: $MINIPPO_IMDB_DIR, else the hub)."""
    max_new_tokens: int = 24
    """Tokens to sample per prompt."""
    temperature: float = 1.0
    """Sampling temperature (top_k 0, top_p 1)."""
    seed: int = 0
    """Sampling seed, the same for both columns."""
    reward: str | None = None
    """Optional reward folder/name: adds each sample's P(positive)."""
    best_of: int = 1
    """Best-of-n: sample this many reviews per prompt (seeds seed, seed+1, ...) and keep the one the
    reward scores highest (needs --reward). Its KL to the sampled model is at most log n - (n-1)/n."""
    load_in_8bit: bool = True
    """Load the model's Linear layers in 8-bit."""
    device: str = "cpu"
    """Device to sample on."""

    def __post_init__(self):
        check_fields(self, POSITIVE_INT, "max_new_tokens", "num_prompts", "best_of")
        check_fields(self, POSITIVE, "temperature")
        check(
            self,
            self.best_of == 1 or self.reward is not None,
            "best_of > 1 needs a --reward to pick the best sample",
        )
        check_device(self)


def run_generate(config: GenerateConfig) -> dict:
    """`minippo generate`: a side-by-side table of base vs adapter samples."""
    model_dir = resolve_model(config.model)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, load_in_8bit=config.load_in_8bit, device=config.device)
    if config.adapter:
        load_adapter(model, config.adapter)
    else:
        add_lora(
            model, LoRAConfig()
        )  # a zero adapter: identical to the base, lets the trainer sample
    ppo_config = PPOConfig(
        batch_size=1,
        mini_batch_size=1,
        temperature=config.temperature,
        min_new_tokens=config.max_new_tokens,
        max_new_tokens=config.max_new_tokens,
        device=config.device,
    )
    trainer = PPOTrainer(ppo_config, model, tokenizer)
    if config.prompts:
        prompts = [
            torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"])
            for p in config.prompts
        ]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every --prompts text needs at least one token")
    else:
        texts = load_imdb("test", config.data_dir, limit=4 * config.num_prompts, seed=config.seed)[
            "text"
        ]
        prompts, _ = make_prompts(texts, tokenizer, seed=config.seed, limit=config.num_prompts)
    longest = max(len(p) for p in prompts)
    fix = "shorten the prompt or max_new_tokens"
    check_context(
        model, longest + config.max_new_tokens, f"a prompt of {longest} tokens + the new ones", fix
    )
    reward = load_reward(config.reward) if config.reward else None
    sample = functools.partial(
        best_of_samples, trainer, tokenizer, prompts, config.seed, config.best_of, reward
    )
    columns = {"base": sample(adapters=False)}
    if config.adapter:
        columns["adapter"] = sample(adapters=True)
    for col in columns.values():
        col.pop("response_ids")
    header, rows = ["prompt"], []
    for name in columns:
        header += [name] + ([f"P(pos) {name}"] if reward else [])
    for i, prompt in enumerate(columns["base"]["prompts"]):
        row = [prompt]
        for col in columns.values():
            row += [col["responses"][i]] + ([col["probs"][i]] if reward else [])
        rows.append(row)
    print(markdown_table(header, rows))
    return columns
