"""The PPO math, as pure functions: tensors in, tensors out, no hidden state, each tested on its own
(tests/test_core.py) and called in turn by the trainer (ppo.py, docs/ppo_step.md). Shapes: B batch,
T response length, V vocabulary; masks (float or bool) have their values' shape, 1 marks a real token.

Refs:
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
        Estimation", arXiv:1506.02438.
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593.
    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
    Huang et al. 2024, "The N Implementation Details of RLHF with PPO" (ICLR blog track)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

KL_ESTIMATORS = ("k1", "kl", "abs", "mse", "k3")


# -- log-probabilities and entropy ------------------------------------------------------------
def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under the softmax of its logits, (B, T, V), (B, T) -> (B, T):
    ``log_softmax(logits)[label]``."""
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax at each position, (B, T, V) -> (B, T): logsumexp(z) - sum softmax(z) * z."""
    probs = torch.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# -- masked statistics --------------------------------------------------------------------------
def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` where ``mask`` is 1, over all or along ``dim`` (all-zero mask: NaN, as torch.mean)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` where ``mask`` is 1; a scalar.  ``unbiased=True`` (as trl and lm-human-preferences)
    applies Bessel's correction n / (n - 1), skipped for a single element (variance 0)."""
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)  # biased: divides by n
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, moments=None) -> Tensor:
    """Normalise ``x`` (B, T) to zero mean, unit variance where ``mask`` is 1 (unbiased ``masked_var`` +
    1e-8, or ``moments`` = (mean, var) given, e.g. over all processes: `distributed.masked_moments`);
    masked-out positions become 0.  ``shift_mean=False`` adds the mean back, ``(x - mean) / std + mean``
    as trl's ``whiten``: rewards whitened without shifting them (Huang et al., "reward whitening").
    Ref: OpenAI lm-human-preferences ``whiten``; Schulman et al. 2017 normalise advantages per batch."""
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# -- advantages ---------------------------------------------------------------------------------
def compute_gae(
    values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: values, rewards, mask (B, T) -> (advantages, returns), (B, T).

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}`` (eq. 16), returns =
    A + V (the value targets), in float32 or wider. A masked position neither receives value (A, return 0)
    nor passes any on (V_{t+1}, A_{t+1} count as 0): padding changes nothing. Ref: Schulman et al. 2016."""
    dtype = torch.promote_types(values.dtype, torch.float32)
    values, rewards, mask = values.to(dtype), rewards.to(dtype), mask.to(dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)  # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V_{t+1}, 0 past the end
    next_advantage = torch.zeros_like(next_value)  # A_{t+1}
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]  # both 0 where mask[:, t] is 0
    return advantages, advantages + values  # returns = the value targets


# -- KL penalty and rewards ---------------------------------------------------------------------
def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    logprobs, ref_logprobs (B, T) -> (B, T). With ``d = logp - ref`` (tokens sampled from the policy):
    - ``"k1"`` (alias ``"kl"``, trl's name): ``d``; unbiased, but single tokens can be negative.
    - ``"abs"``: ``|d|``; ``"mse"``: ``0.5 * d**2`` (the k2 estimator).
    - ``"k3"``: ``(r - 1) - log r`` with ``r = exp(-d) = p_ref / p``; unbiased and never negative.
    Ref: Schulman 2020, "Approximating KL Divergence"; Ziegler et al. 2019 (k1 penalty).
    As a reward only "k1" gives the KL's policy gradient: "k3" is unbiased in value, not in gradient
    (it collapsed the demo's policy: README); "abs" and "mse" (trl v0.4.7's options) are not KL estimates."""
    d = logprobs - ref_logprobs  # (B, T)
    if estimator in ("k1", "kl"):
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "mse":
        return 0.5 * d.square()
    if estimator == "k3":
        # (r - 1) - log r with log r = -d; expm1 keeps precision when d is small. >= 0 in exact math.
        return (torch.expm1(-d) + d).clamp(min=0)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty at every response token plus the score at the last one.

    scores (B,), logprobs, ref_logprobs, mask (B, T) -> rewards, kl (B, T): ``kl = kl_penalty(...) * mask``,
    ``rewards = -kl_coef * kl`` + ``scores[i]`` at row i's last real token; the KL logged is the KL penalised.
    Ref: Ziegler et al. 2019 (arXiv:1909.08593), section 2.2: R(x, y) = r(x, y) - beta * log(pi / rho)."""
    mask = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask  # (B, T)
    T = mask.shape[1]
    last = (T - 1) - mask.flip(1).argmax(dim=1)  # (B,) index of each row's last real token
    at_last = F.one_hot(last, T).to(kl.dtype)  # (B, T)
    rewards = -kl_coef * kl + at_last * scores.to(kl.dtype).unsqueeze(1)  # (B, T)
    return rewards, kl


# -- losses -------------------------------------------------------------------------------------
def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    loss_type: str = "dapo",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate objective, as a loss: logprobs (with grad), old_logprobs, advantages,
    mask (B, T) -> (loss, stats), ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``
    with ``ratio = exp(logp - old)``.  A token on the clipped branch has zero gradient. ``loss_type``
    other than "dapo" (the masked mean) weighs the tokens as `aggregate_loss` says (GRPO, Dr. GRPO).
    Stats (detached scalars): ``clipfrac``, ``approxkl`` (``0.5 * mean((logp - old)^2)``), ``policykl``
    (``mean(old - logp)``), ``ratio`` (mean), ``advantages_mean``.
    Ref: Schulman et al. 2017 (arXiv:1707.06347), eq. 7."""
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, loss_type, max_len)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio.square(), mask),
            "policykl": masked_mean(-log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
            "advantages_mean": masked_mean(advantages, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``, with
    ``V_clip = old + clip(V - old, -eps_v, eps_v)``: values (with grad), old_values, returns, mask (B, T)
    -> (loss, stats).  Stats (detached): ``clipfrac``, ``error`` (``mean((V - R)^2)``), ``vpred``,
    ``var_explained`` (``1 - var(R - V) / var(R)``).  Ref: Schulman et al. 2017 / OpenAI baselines ppo2.
    Value clipping is not in the paper; it is in OpenAI's baselines, lm-human-preferences and trl, and
    is kept for parity (Huang et al. discuss it as an implementation detail)."""
    clipped_values = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )
    unclipped_loss = (values - returns).square()  # (B, T)
    clipped_loss = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask),
            "error": masked_mean(unclipped_loss, mask),
            "vpred": masked_mean(values, mask),
            "var_explained": 1 - masked_var(returns - values, mask) / masked_var(returns, mask),
        }
    return loss, stats


# -- KL coefficient controllers -----------------------------------------------------------------
class AdaptiveKLController:
    """The adaptive KL coefficient beta of Ziegler et al. 2019, section 2.2.

    ``error = clip(current_kl / target - 1, -0.2, 0.2)``; ``beta = max(beta * (1 + error * n / horizon),
    min_coef)`` after a batch of ``n`` sequences with mean KL ``current_kl`` (``target``: nats per sequence).
    The floor ``min_coef`` is ours: at the initial beta it turns the target into a ceiling (README, demo)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float, min_coef: float = 0.0):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.min_coef = float(min_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value = max(self.value * (1.0 + error * n_steps / self.horizon), self.min_coef)


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing (same interface as the adaptive one)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class RunningMoments:
    """Running mean and std of a stream of scalars, equal to the moments of everything seen.

    ``update(x)`` adds a (B,) batch and returns the new (mean, std) as floats; std is unbiased (Bessel)
    and at least ``eps``. ``low`` and ``high`` are the smallest and largest value seen (``spread``: two
    distinct values were seen, so the std measures something).
    Ref: Chan, Golub, LeVeque 1979 (pairwise variance update)."""

    def __init__(self, eps: float = 1e-8):
        self.mean = 0.0
        self.var = 1.0
        self.count = 0
        self.eps = eps
        self.low = math.inf
        self.high = -math.inf

    @property
    def spread(self) -> bool:
        return self.high > self.low

    def update(self, x: Tensor) -> tuple[float, float]:
        self.low = min(self.low, x.min().item())
        self.high = max(self.high, x.max().item())
        n = x.numel()
        batch_mean = x.float().mean().item()
        batch_m2 = ((x.float() - batch_mean) ** 2).sum().item()  # sum of squared deviations
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * max(self.count - 1, 0) + batch_m2 + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / max(total - 1, 1)
        self.count = total
        return self.mean, max(self.var**0.5, self.eps)

    def state_dict(self) -> dict[str, float]:
        return {
            "mean": self.mean,
            "var": self.var,
            "count": self.count,
            "low": self.low,
            "high": self.high,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        seen = int(state["count"]) > 1  # a state saved before low/high: taken to have seen a spread
        self.low = float(state.get("low", -math.inf if seen else math.inf))
        self.high = float(state.get("high", math.inf if seen else -math.inf))
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])


# -- the reward model's loss --------------------------------------------------------------------
def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, center_rewards_coefficient: float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The pairwise reward-model loss, -log sigmoid(r_chosen - r_rejected), averaged over B pairs:
    (B,), (B,) scores of the preferred and the other answer -> (loss, stats).

    With ``center_rewards_coefficient`` c it adds c * mean((r_chosen + r_rejected)^2), which keeps the
    scores near zero mean (the loss alone sees only differences: trl's RewardTrainer). Stats, detached:
    accuracy (share of pairs with r_chosen > r_rejected), margin (mean r_chosen - r_rejected), and the mean
    chosen and rejected scores.
    Ref: Christiano et al. 2017, arXiv:1706.03741, section 2.2.3; Ouyang et al. 2022, arXiv:2203.02155,
    eq. 1 (one pair per prompt); centring: Eisenstein et al. 2023, arXiv:2312.09244."""
    margin = chosen - rejected  # (B,)
    loss = -F.logsigmoid(margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected).square().mean()
    with torch.no_grad():
        stats = {
            "accuracy": (margin > 0).float().mean(),
            "margin": margin.mean(),
            "chosen": chosen.mean(),
            "rejected": rejected.mean(),
        }
    return loss, stats


# -- critic-free advantages: one baseline per group of samples of a prompt --------------------------
# Refs: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
#     Human Feedback in LLMs" (RLOO), arXiv:2402.14740; Shao et al. 2024, "DeepSeekMath" (GRPO),
#     arXiv:2402.03300; Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO), arXiv:2503.20783;
#     Yu et al. 2025, "DAPO", arXiv:2503.14476.
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


def score_groups(scores: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B / G, G): the scores of each prompt's G samples in one row. The samples of a prompt are
    consecutive, as ``prompts.repeat_interleave(G)`` lays them out. G must be >= 2 (a group of one has no
    baseline: its advantage would be 0 whatever it scored) and divide B; else a ValueError naming both."""
    B = scores.shape[0]
    if group_size < 2:
        raise ValueError(
            f"group_size is {group_size}: a critic-free advantage compares the samples of a prompt, so "
            "each prompt needs at least 2 (set num_generations >= 2)"
        )
    if B % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the batch of {B} scores: each prompt's "
            f"{group_size} samples must all be in the batch (use a batch that is a multiple of {group_size})"
        )
    return scores.reshape(B // group_size, group_size)  # (B / G, G)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out: each sample's score minus the mean score of the other G - 1 samples of its
    prompt, (B,) -> (B,): ``A_i = s_i - (sum_j s_j - s_i) / (G - 1) = G / (G - 1) * (s_i - mean_j s_j)``.
    An unbiased baseline, as it does not depend on s_i itself. A group of equal scores gives exactly 0.
    Ref: Ahmadian et al. 2024 (arXiv:2402.14740), eq. 10 (Kool et al. 2019's estimator)."""
    groups = score_groups(scores, group_size)  # (B / G, G)
    others_mean = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)  # (B / G, G)
    advantages = groups - others_mean
    return _zero_where_equal(groups, advantages).reshape(-1)  # (B,)


def grpo_advantages(
    scores: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages, (B,) -> (B,): ``A_i = (s_i - mean_j s_j) / (std_j s_j + eps)`` over the
    G samples of i's prompt, with the unbiased std (Bessel, divide by G - 1: ``torch.std``, as trl computes
    it). ``scale_by_std=False`` keeps ``s_i - mean_j s_j``: Dr. GRPO, where dividing by the std weights
    prompts that are nearly all right or all wrong up (a difficulty bias). A group of equal scores gives
    exactly 0, not NaN (its deviations are 0; with eps 0 the division would be 0 / 0).
    Ref: Shao et al. 2024 (arXiv:2402.03300), sec. 4.1.2 (outcome supervision); Liu et al. 2025
    (arXiv:2503.20783), sec. 3.1 (Dr. GRPO)."""
    groups = score_groups(scores, group_size)  # (B / G, G)
    advantages = groups - groups.mean(1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(1, keepdim=True) + eps)  # unbiased std
    return _zero_where_equal(groups, advantages).reshape(-1)  # (B,)


def _zero_where_equal(groups: Tensor, advantages: Tensor) -> Tensor:
    """0 in every group whose scores are all equal: exact, whatever the rounding of their mean."""
    spread = groups.amax(1, keepdim=True) - groups.amin(1, keepdim=True)  # (B / G, 1)
    return torch.where(spread == 0, torch.zeros_like(advantages), advantages)


def aggregate_loss(
    per_token: Tensor, mask: Tensor, loss_type: str = "dapo", max_len: int | None = None
) -> Tensor:
    """One loss from per-token losses (B, T) and their mask (B, T), by how each token is weighed:
    - ``"dapo"``: the mean over the batch's tokens, ``sum(l * m) / sum(m)``: every token weighs the same,
      so a long response weighs more than a short one (DAPO's token-level loss; PPO's masked mean).
    - ``"grpo"``: the mean over sequences of each sequence's token mean: every response weighs the same,
      so each token of a short response weighs more than one of a long response (the GRPO paper's 1/|o_i|).
    - ``"dr_grpo"``: ``sum(l * m) / (B * max_len)``, a constant normaliser: every token weighs the same and
      the loss does not depend on how long the responses came out (Dr. GRPO; ``max_len`` = the longest
      response the sampler may give, ``max_new_tokens``).
    A response without tokens adds 0 to "grpo" (its mean counts as 0). Ref: Yu et al. 2025 (DAPO,
    arXiv:2503.14476), eq. 12; Shao et al. 2024 (arXiv:2402.03300), eq. 3; Liu et al. 2025
    (arXiv:2503.20783), sec. 3.1."""
    mask = mask.to(per_token.dtype)
    if loss_type == "dapo":
        return masked_mean(per_token, mask)
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        return per_sequence.mean()
    if loss_type == "dr_grpo":
        if max_len is None or max_len < 1:
            raise ValueError(
                f"loss_type 'dr_grpo' needs max_len >= 1 (max_new_tokens), got {max_len}"
            )
        return (per_token * mask).sum() / (per_token.shape[0] * max_len)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
