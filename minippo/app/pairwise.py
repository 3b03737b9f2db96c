"""`minippo reward --model pairwise`: a pairwise reward model (`minippo.reward_model`) trained with the
Bradley-Terry loss, from a JSONL of trl's preference format or from IMDB, and measured.

From IMDB, each pair is the start of a positive review (chosen) and the start of a negative one
(rejected), cut to the same number of tokens: both are review starts of one length, so only their
sentiment tells them apart, and the model learns sentiment, not length or source. Its scores are
calibrated into log-odds of a positive review (a logistic fit on labelled held-out review starts), so
that it answers P(positive) as the TF-IDF reward does, and is compared with that reward and the labels.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checks import NON_NEGATIVE, POSITIVE, POSITIVE_INT, check, check_fields, optional
from ..core import bradley_terry_loss
from ..lora import LoRAConfig, add_lora
from ..quant import load_model, resolve_dtype
from ..reward_model import RewardModel
from .data import clean_review, load_imdb
from .model_folders import load_tokenizer, quant_load_kwargs, resolve_model


@dataclass
class PairwiseConfig:
    """Settings of the pairwise reward model (`minippo reward --model pairwise`)."""

    base_model: str = "runs/merged"
    """Base causal LM: PPO's starting model, so that PPO runs policy and reward on one copy of it."""
    pairs: str | None = None
    """JSONL of {"prompt", "chosen", "rejected"} texts (trl's preference format; the last tenth
    validates); None: pairs of IMDB review starts."""
    quant: str = "8bit"
    """Base model's Linear layers: "8bit", "4bit" or "none" (as PPO loads it: the scores then agree)."""
    dtype: str = "float32"
    """dtype of the base's float parameters."""
    lora: LoRAConfig = field(
        default_factory=lambda: LoRAConfig(r=8, alpha=16, target_modules="all-linear")
    )
    """LoRA settings of the reward adapter."""
    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 16
    """Pairs per step."""
    learning_rate: float = 3e-4
    """AdamW learning rate of the reward adapter and the score head."""
    center_rewards_coefficient: float | None = 0.01
    """Weight of mean((r_chosen + r_rejected)^2) in the loss (trl's; None: off): scores near 0."""
    min_tokens: int = 6
    """IMDB pairs: each pair's length k in tokens is drawn from [min_tokens, max_tokens]."""
    max_tokens: int = 40
    """See min_tokens (PPO's texts are prompt + response: 6 to 22 tokens in the demo)."""
    max_length: int = 256
    """Longest text the reward model reads, in tokens (longer ones are cut)."""
    num_calibration: int = 400
    """Labelled IMDB validation review starts for the P(positive) calibration."""
    tfidf: str | None = None
    """A TF-IDF reward folder to compare with; None: one fitted on the pairs' train reviews."""

    def __post_init__(self):
        quant_load_kwargs(self.quant)
        resolve_dtype(self.dtype)
        check_fields(self, POSITIVE_INT, "steps", "batch_size", "min_tokens", "max_length")
        check_fields(self, NON_NEGATIVE, "num_calibration")
        check_fields(self, POSITIVE, "learning_rate")
        check_fields(self, optional(NON_NEGATIVE), "center_rewards_coefficient")
        check(
            self,
            self.min_tokens <= self.max_tokens <= self.max_length,
            f"need min_tokens ({self.min_tokens}) <= max_tokens ({self.max_tokens}) <= max_length "
            f"({self.max_length})",
        )


# -- data ------------------------------------------------------------------------------------------
def review_starts(texts, tokenizer, lengths) -> list[str]:
    """Each review's first k tokens (k from `lengths`), decoded; None where a review is shorter."""
    out = []
    for text, k in zip(texts, lengths):
        ids = tokenizer(clean_review(text), add_special_tokens=False)["input_ids"]
        out.append(tokenizer.decode(ids[:k]) if len(ids) >= k else None)
    return out


def imdb_pairs(split, config: PairwiseConfig, tokenizer, n: int, data_dir, seed: int):
    """n (chosen, rejected) pairs: a positive and a negative review start of the same length k in
    tokens, k uniform in [min_tokens, max_tokens]; and the reviews they came from (a Dataset)."""
    ds = load_imdb(split, data_dir, limit=4 * n, seed=seed)
    positive = [t for t, label in zip(ds["text"], ds["label"]) if label == 1]
    negative = [t for t, label in zip(ds["text"], ds["label"]) if label == 0]
    rng = random.Random(seed)
    lengths = [rng.randint(config.min_tokens, config.max_tokens) for _ in range(len(positive))]
    chosen = review_starts(positive, tokenizer, lengths)
    rejected = review_starts(negative, tokenizer, lengths)  # the same length k as its positive one
    pairs = [(c, r) for c, r in zip(chosen, rejected) if c is not None and r is not None]
    return pairs[:n], ds


def jsonl_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(prompt + chosen, prompt + rejected) texts from a JSONL of {"prompt", "chosen", "rejected"}."""
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        texts = [row.get("prompt", ""), row.get("chosen"), row.get("rejected")]
        if not all(isinstance(t, str) for t in texts) or not texts[1] or not texts[2]:
            raise ValueError(
                f"{path}, line {number}: each line needs text fields 'chosen' and 'rejected' (and an "
                f"optional 'prompt'), got keys {sorted(row)}"
            )
        pairs.append((texts[0] + texts[1], texts[0] + texts[2]))
    if len(pairs) < 2:
        raise ValueError(f"{path}: need at least 2 preference pairs, found {len(pairs)}")
    return pairs


def labelled_starts(split, config: PairwiseConfig, tokenizer, n: int, data_dir, seed: int):
    """n IMDB review starts of random lengths (as PPO's texts) and their labels (1 positive)."""
    ds = load_imdb(split, data_dir, limit=2 * n, seed=seed)
    rng = random.Random(seed)
    lengths = [rng.randint(config.min_tokens, config.max_tokens) for _ in range(len(ds))]
    rows = zip(review_starts(ds["text"], tokenizer, lengths), ds["label"])
    kept = [(text, label) for text, label in rows if text is not None][:n]
    return [t for t, _ in kept], [label for _, label in kept]


# -- training and measuring -------------------------------------------------------------------------
def train_pairs(reward: RewardModel, pairs, config: PairwiseConfig, seed: int) -> list[float]:
    """AdamW on the reward adapter and score head, `steps` batches of pairs (shuffled, cycled), with
    `bradley_terry_loss`; the backbone in eval mode (dropout off). Returns the loss of every step."""
    params = reward.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    order = random.Random(seed)
    indices: list[int] = []
    losses = []
    reward.model.eval()
    bar = tqdm(range(config.steps), desc="reward", unit="step", dynamic_ncols=True)
    for _ in bar:
        if len(indices) < config.batch_size:
            indices += order.sample(range(len(pairs)), len(pairs))
        batch = [pairs[indices.pop()] for _ in range(min(config.batch_size, len(pairs)))]
        chosen = [c for c, _ in batch]
        rejected = [r for _, r in batch]
        scores = reward(**reward.tokenize(chosen + rejected))  # (2B,)
        B = len(batch)
        loss, _ = bradley_terry_loss(scores[:B], scores[B:], config.center_rewards_coefficient)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def pair_accuracy(reward: RewardModel, pairs, batch_size: int) -> float:
    """Share of pairs whose chosen text scores above the rejected one."""
    chosen = reward.score([c for c, _ in pairs], batch_size)
    rejected = reward.score([r for _, r in pairs], batch_size)
    return (chosen > rejected).float().mean().item()


def calibrate(scores: torch.Tensor, labels) -> tuple[float, float]:
    """(a, b) of the logistic fit P(positive) = sigmoid(a * score + b) on labelled scores."""
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=100.0).fit(scores.double().view(-1, 1).numpy(), list(labels))
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def train_pairwise_reward(config, output_dir: str | Path) -> dict:
    """Train, measure and save a pairwise reward model (`config`: a `RewardConfig` whose `pairwise`
    holds this model's settings); returns its metrics."""
    from .reward import PairwiseSentiment, TfidfSentiment, load_reward

    pw = config.pairwise
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    base = resolve_model(pw.base_model)
    tokenizer = load_tokenizer(base, padding_side="right")
    model = load_model(base, **quant_load_kwargs(pw.quant), dtype=pw.dtype, device=config.device)
    add_lora(model, pw.lora, adapter_name="reward")
    reward = RewardModel(model, tokenizer, adapter_name="reward", max_length=pw.max_length)
    n_train = config.num_train or 2000
    n_eval = config.num_eval or 300

    # 1. Pairs: a JSONL's (its last tenth validates), else IMDB review starts of equal lengths.
    if pw.pairs:
        pairs = jsonl_pairs(pw.pairs)
        cut = max(1, len(pairs) // 10)
        train, val = pairs[:-cut], pairs[-cut:]
    else:
        train, reviews = imdb_pairs("train", pw, tokenizer, n_train, config.data_dir, config.seed)
        val, _ = imdb_pairs("validation", pw, tokenizer, n_eval, config.data_dir, config.seed + 1)

    # 2. Train with the Bradley-Terry loss; 3. pair accuracy on held-out pairs.
    losses = train_pairs(reward, train, pw, config.seed)
    metrics = {
        "base_model": base,
        "num_train_pairs": len(train),
        "num_validation_pairs": len(val),
        "steps": pw.steps,
        "loss_first": round(losses[0], 4),
        "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "validation_pair_accuracy": round(pair_accuracy(reward, val, config.batch_size), 4),
    }
    calibration = (1.0, 0.0)
    if not pw.pairs:
        # 4. P(positive): a logistic fit on labelled validation starts; 5. agreement on test starts.
        cal_texts, cal_labels = labelled_starts(
            "validation", pw, tokenizer, pw.num_calibration, config.data_dir, config.seed + 2
        )
        calibration = calibrate(reward.score(cal_texts, config.batch_size), cal_labels)
        texts, labels = labelled_starts("test", pw, tokenizer, n_eval, config.data_dir, config.seed)
        ours = PairwiseSentiment(reward, calibration).probability(texts)
        if pw.tfidf:
            tfidf = load_reward(pw.tfidf)
        else:
            tfidf = TfidfSentiment.fit(list(reviews["text"]), list(reviews["label"]))
        theirs = tfidf.probability(texts)
        truth = torch.tensor(labels).bool()
        metrics.update(
            num_heldout_reviews=len(texts),
            heldout_label_accuracy=round(((ours > 0.5) == truth).float().mean().item(), 4),
            heldout_tfidf_agreement=round(
                ((ours > 0.5) == (theirs > 0.5)).float().mean().item(), 4
            ),
            heldout_tfidf_label_accuracy=round(((theirs > 0.5) == truth).float().mean().item(), 4),
        )
    metrics["train_seconds"] = round(time.perf_counter() - start, 2)
    reward.save(
        output_dir,
        metadata={
            "base_model": base,
            "quant": pw.quant,
            "dtype": pw.dtype,
            "calibration": list(calibration),
            "metrics": metrics,
            "config": dataclasses.asdict(config),
        },
    )
    return metrics
