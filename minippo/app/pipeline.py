"""The blog's three steps on IMDB as library calls: sft -> merge -> reward -> ppo, plus generate.

Each step is a config dataclass and a `run_*` function; the CLI (`minippo <step>`) is generated
from the dataclasses, and `minippo.app.demo` chains the steps into one run folder with a report.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed
from ..adapter_files import load_adapter
from ..fileio import atomic_directory
from ..lora import LoRAConfig, add_lora, disable_adapters, merge_lora
from ..ppo import PPOConfig, PPOTrainer
from ..quant import load_model, resolve_dtype
from .data import load_imdb, make_prompts
from .model_folders import DEFAULT_MODEL, load_tokenizer, resolve_model
from .report import MetricsLog, markdown_table, write_json
from .reward import RewardConfig, load_reward, train_reward

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
    print(f"reward: validation accuracy {result['metrics']['validation_accuracy']:.4f} -> {result['path']}")
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
        if self.probe_tokens < 2:
            raise ValueError(f"probe_tokens must be >= 2, got {self.probe_tokens}")


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
    model = load_model(base, load_in_8bit=config.from_8bit, dtype=config.dtype, device=config.device)
    load_adapter(model, config.adapter)
    ids, attn = (t.to(config.device) for t in _probe_batch(tokenizer, config.data_dir, config.probe_tokens))
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=attn).logits.float()  # (B, L, V)

    merged = merge_lora(model, dtype=config.dtype)
    out = Path(config.output_dir)
    _save_pretrained(merged, tokenizer, out)

    # Verify: the folder reloads in bare transformers and gives the adapted model's logits.
    reloaded = (
        AutoModelForCausalLM.from_pretrained(out, dtype=resolve_dtype(config.dtype)).to(config.device).eval()
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
    """Load the starting model's Linear layers in 8-bit (frozen)."""
    dtype: str = "float32"
    """dtype of the model's float parameters (embeddings, norms, LM head)."""
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
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=16, alpha=32, dropout=0.0))
    """LoRA settings of the new adapter."""
    ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(batch_size=16, mini_batch_size=4), metadata={"cli_prefix": ""}
    )
    """PPO settings (trl names)."""

    def __post_init__(self):
        if self.reward_kind not in ("logit", "prob"):
            raise ValueError(f"reward_kind must be 'logit' or 'prob', got {self.reward_kind!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 1 <= self.prompt_min_tokens < self.prompt_max_tokens:
            raise ValueError(
                "need 1 <= prompt_min_tokens < prompt_max_tokens, got "
                f"{self.prompt_min_tokens}, {self.prompt_max_tokens}"
            )
        if self.save_every < 0 or self.eval_prompts < 0:
            raise ValueError("save_every and eval_prompts must be >= 0")
        resolve_dtype(self.dtype)


def _decode_pairs(tokenizer, queries, responses) -> tuple[list[str], list[str]]:
    q = tokenizer.batch_decode(queries, skip_special_tokens=True)
    r = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return q, r


def sequence_kl(trainer: PPOTrainer, queries, responses) -> torch.Tensor:
    """(B,) sum over response tokens of log pi(y|x) - log pi_ref(y|x): a sample of KL(pi || ref)."""
    logp, mask = trainer.response_logprobs(queries, responses)  # (B, T)
    ref, _ = trainer.response_logprobs(queries, responses, reference=True)
    return ((logp - ref) * mask).sum(1).cpu()


def evaluate_samples(
    trainer: PPOTrainer, tokenizer, prompts: list[torch.Tensor], seed: int, adapters: bool = True, reward=None
) -> dict:
    """Sample one response per prompt (fixed seed) with the adapters on or off; optionally score
    the reviews (prompt + response) with the reward's P(positive)."""
    torch.manual_seed(seed)
    if adapters:
        responses = trainer.generate(prompts)
    else:
        with disable_adapters(trainer.policy.model):
            responses = trainer.generate(prompts)
    q, r = _decode_pairs(tokenizer, prompts, responses)
    probs = reward.probability([a + b for a, b in zip(q, r)]).float().tolist() if reward else None
    return {"prompts": q, "responses": r, "probs": probs, "response_ids": responses}


def evaluate_policy(
    trainer: PPOTrainer, tokenizer, reward, prompts: list[torch.Tensor], seed: int, adapters: bool = True
) -> dict:
    """Mean P(positive) of sampled reviews and mean KL to the starting model (adapters off; 0 when
    sampling from it), with the samples themselves."""
    samples = evaluate_samples(trainer, tokenizer, prompts, seed, adapters, reward)
    responses = samples.pop("response_ids")
    kl = sequence_kl(trainer, prompts, responses) if adapters else torch.zeros(len(prompts))
    probs = torch.tensor(samples["probs"])
    return {
        "reward_prob_mean": probs.mean().item(),
        "reward_prob_std": probs.std().item(),
        "kl_mean": kl.mean().item(),
        **samples,
    }


def _cycle_prompts(prompts: list[torch.Tensor], batch_size: int, seed: int):
    """Endless shuffled batches of prompts (reshuffled each pass)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        order = torch.randperm(len(prompts), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [prompts[j] for j in order[i : i + batch_size]]


def build_trainer(config: PPORunConfig):
    """Load the starting model (8-bit), add a fresh adapter, and make the trainer."""
    model_dir = resolve_model(config.model)
    tokenizer = load_tokenizer(model_dir)
    device = config.ppo.device or "cpu"
    model = load_model(model_dir, load_in_8bit=config.load_in_8bit, dtype=config.dtype, device=device)
    add_lora(model, config.lora)
    ppo = config.ppo
    if ppo.log_with == "tensorboard" and ppo.logging_dir is None:  # event files in the run folder
        ppo = dataclasses.replace(ppo, logging_dir=str(Path(config.output_dir) / "tensorboard"))
    trainer = PPOTrainer(ppo, model, tokenizer)
    return trainer, tokenizer, model_dir


def run_ppo(config: PPORunConfig, progress: bool = True) -> dict:
    """`minippo ppo`: prompts -> generate -> score -> step, `steps` times; logs, checkpoints, evaluation.

    Under torchrun each process generates and scores its share of every batch; rank 0 alone evaluates
    and writes files while the others wait at a barrier."""
    from tqdm.auto import tqdm

    distributed.init_from_env()
    main = distributed.rank() == 0
    out = Path(config.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dataclasses.asdict(config))
    trainer, tokenizer, model_dir = build_trainer(config)
    share = slice(
        trainer.rank * trainer.batch_size_per_rank, (trainer.rank + 1) * trainer.batch_size_per_rank
    )
    reward = load_reward(config.reward, kind=config.reward_kind, device=trainer.device)
    score = reward.logit if config.reward_kind == "logit" else reward.probability

    # Prompts: train reviews for training, test reviews for the held-out evaluation.
    n_train = max(config.steps * config.ppo.batch_size, 4 * config.ppo.batch_size)
    train_texts = load_imdb("train", config.data_dir, limit=2 * n_train, seed=config.ppo.seed)["text"]
    prompts, _ = make_prompts(
        train_texts,
        tokenizer,
        config.prompt_min_tokens,
        config.prompt_max_tokens,
        seed=config.ppo.seed,
        limit=n_train,
    )
    if len(prompts) < config.ppo.batch_size:
        raise ValueError(
            f"only {len(prompts)} prompts after filtering, fewer than batch_size "
            f"{config.ppo.batch_size}: use more data or a smaller batch"
        )
    eval_prompts = []
    if config.eval_prompts:
        test_texts = load_imdb("test", config.data_dir, limit=4 * config.eval_prompts, seed=config.eval_seed)[
            "text"
        ]
        eval_prompts, _ = make_prompts(
            test_texts,
            tokenizer,
            config.prompt_min_tokens,
            config.prompt_max_tokens,
            seed=config.eval_seed,
            limit=config.eval_prompts,
        )

    result = {"model": model_dir, "output_dir": str(out)}
    if eval_prompts and main:
        result["before"] = evaluate_policy(
            trainer, tokenizer, reward, eval_prompts, config.eval_seed, adapters=False
        )
        print(
            f"ppo: before training, held-out reviews score P(positive) "
            f"{result['before']['reward_prob_mean']:.3f}"
        )

    distributed.barrier()
    log = MetricsLog(out / "metrics.jsonl")
    if main and log.path.exists():
        log.path.unlink()  # a fresh run; checkpoints below are replaced atomically
    batches = _cycle_prompts(prompts, config.ppo.batch_size, config.ppo.seed)
    bar = tqdm(range(config.steps), desc="ppo", disable=not (progress and main), dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        # 1. prompts -> responses (sampled from the current policy)
        queries = next(batches)[share]  # every process draws the same global batch and takes its share
        t = time.perf_counter()
        responses = trainer.generate(queries)
        t_gen = time.perf_counter() - t
        # 2. score the whole review (prompt + response)
        q_text, r_text = _decode_pairs(tokenizer, queries, responses)
        full = [q + r for q, r in zip(q_text, r_text)]
        t = time.perf_counter()
        scores = score(full)
        probs = scores.sigmoid() if config.reward_kind == "logit" and hasattr(reward, "logit") else scores
        t_score = time.perf_counter() - t
        # 3. one PPO step
        stats = trainer.step(queries, responses, scores)
        stats.update(
            {
                "step": step + 1,
                "time/generate": t_gen,
                "time/score": t_score,
                "time/elapsed": time.perf_counter() - t0,
                "env/reward_prob_mean": distributed.all_reduce(probs.float().mean(), "mean").item(),
            }
        )
        if main:
            log.write(stats)
        bar.set_postfix(
            reward=f"{stats['env/reward_mean']:.2f}",
            pos=f"{stats['env/reward_prob_mean']:.2f}",
            kl=f"{stats['objective/kl']:.2f}",
            beta=f"{stats['objective/kl_coef']:.3f}",
        )
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps and main:
            trainer.save(out / "checkpoint")
            for q, r in list(zip(q_text, r_text))[: config.log_samples]:
                bar.write(f"  step {step + 1}: {q!r} -> {r!r}")
    result["train_seconds"] = time.perf_counter() - t0
    if not main:
        distributed.barrier()  # rank 0 saves and evaluates
        return result
    trainer.save(out / "adapter")
    if eval_prompts:
        result["after"] = evaluate_policy(trainer, tokenizer, reward, eval_prompts, config.eval_seed)
        print(
            f"ppo: after {config.steps} steps, held-out reviews score P(positive) "
            f"{result['after']['reward_prob_mean']:.3f} (before {result['before']['reward_prob_mean']:.3f}), "
            f"KL to the starting model {result['after']['kl_mean']:.2f} nats/review"
        )
    write_json(out / "result.json", result)
    if trainer.tracker is not None:
        trainer.tracker.close()
    distributed.barrier()
    return result


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
    load_in_8bit: bool = True
    """Load the model's Linear layers in 8-bit."""
    device: str = "cpu"
    """Device to sample on."""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_prompts < 1:
            raise ValueError("max_new_tokens and num_prompts must be >= 1")


def run_generate(config: GenerateConfig) -> dict:
    """`minippo generate`: a side-by-side table of base vs adapter samples."""
    model_dir = resolve_model(config.model)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, load_in_8bit=config.load_in_8bit, device=config.device)
    if config.adapter:
        load_adapter(model, config.adapter)
    else:
        add_lora(model, LoRAConfig())  # a zero adapter: identical to the base, lets the trainer sample
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
        prompts = [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in config.prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every --prompts text needs at least one token")
    else:
        texts = load_imdb("test", config.data_dir, limit=4 * config.num_prompts, seed=config.seed)["text"]
        prompts, _ = make_prompts(texts, tokenizer, seed=config.seed, limit=config.num_prompts)
    _check_context(prompts, config.max_new_tokens, model)
    reward = load_reward(config.reward) if config.reward else None
    columns = {
        "base": evaluate_samples(trainer, tokenizer, prompts, config.seed, adapters=False, reward=reward)
    }
    if config.adapter:
        columns["adapter"] = evaluate_samples(
            trainer, tokenizer, prompts, config.seed, adapters=True, reward=reward
        )
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


def _check_context(prompts, max_new_tokens: int, model) -> None:
    """A prompt plus its response must fit the model's context window."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    longest = max(len(p) for p in prompts)
    if limit and longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"context window of {limit} tokens: shorten the prompt or max_new_tokens"
        )
