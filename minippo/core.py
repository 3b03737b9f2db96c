"""The PPO math, as pure functions: tensors in, tensors out, no hidden state.

Every function here is small, documented with its shapes and a paper reference, and tested on its own
(tests/test_core.py). The trainer (ppo.py) is a sequence of calls to these functions;
docs/ppo_step.md walks through one PPO step line by line.

Shapes: B batch, T response length (positions that predict response tokens), V vocabulary.
Masks are float or bool tensors of the same shape as the values they mask; 1 marks a real token.

Refs:
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
        Estimation", arXiv:1506.02438.
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593.
    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
    Huang et al. 2024, "The N Implementation Details of RLHF with PPO" (ICLR blog track).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "kl", "abs", "mse", "k3")

# -- log-probabilities and entropy ------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under the softmax of its logits.

    logits (B, T, V), labels (B, T) int64 -> (B, T), in the logits' dtype.

    Computed as ``logits[label] - logsumexp(logits)`` instead of ``log_softmax(logits).gather``: the
    result is the same, but no second (B, T, V) tensor is kept for the backward pass (logsumexp saves
    only its input, which autograd already holds, and its (B, T) output).
    """
    label_logits = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return label_logits - torch.logsumexp(logits, dim=-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position.

    logits (B, T, V) -> (B, T): ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``.
    """
    probs = torch.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


# -- masked statistics --------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``).

    x, mask (B, T) (or any matching shape) -> a scalar, or x with ``dim`` reduced.
    An all-zero mask gives NaN, as ``torch.mean`` of an empty tensor does.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the positions where ``mask`` is 1; a scalar.

    The choice of estimator is explicit: ``unbiased=True`` (the default, as in trl and OpenAI's
    lm-human-preferences) applies Bessel's correction n / (n - 1) to the biased (population) variance.
    With a single masked element the correction is undefined; then the biased variance (0) is returned.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)  # biased: divides by n
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, moments=None) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) using only the masked positions.

    x, mask (B, T) -> (B, T); masked-out positions are set to 0. The variance is the unbiased
    ``masked_var``, and 1e-8 is added before the square root; ``moments`` = (mean, var) replaces
    both (e.g. over all processes: `minippo.distributed.masked_moments`).
    ``shift_mean=False`` keeps the mean (only scales): used to whiten rewards without shifting them, so
    a constant reward per token keeps its sign (Huang et al., detail "reward whitening").

    Ref: OpenAI lm-human-preferences ``whiten``; Schulman et al. 2017 normalise advantages per batch.
    """
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# -- advantages ---------------------------------------------------------------------------------


def compute_gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    values, rewards, mask (B, T) -> (advantages, returns), both (B, T), with
    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``returns = advantages + values`` (the value targets).

    The episode ends at the last real token: a position whose mask is 0 neither receives value
    (its advantage and return are 0) nor passes any on (V_{t+1} and A_{t+1} count as 0 when position
    t+1 is masked), so right padding after a response changes nothing. Computed in float32 or wider.

    Ref: Schulman et al. 2016 (arXiv:1506.02438), eq. 16; loop as in trl and CleanRL.
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    values, rewards, mask = values.to(dtype), rewards.to(dtype), mask.to(dtype)
    values, rewards = values * mask, rewards * mask
    B, T = values.shape
    advantages = torch.zeros_like(values)  # (B, T)
    next_value = torch.zeros(B, dtype=dtype, device=values.device)  # V_{t+1}, 0 past the end
    next_advantage = torch.zeros_like(next_value)  # A_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]  # both 0 where mask[:, t] is 0
    returns = advantages + values
    return advantages, returns


# -- KL penalty and rewards ---------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    logprobs, ref_logprobs (B, T) -> (B, T). With ``d = logp - ref`` (tokens sampled from the policy):
    - ``"k1"`` (alias ``"kl"``, trl's name): ``d``; unbiased, but single tokens can be negative.
    - ``"abs"``: ``|d|``.
    - ``"mse"``: ``0.5 * d**2`` (the k2 estimator).
    - ``"k3"``: ``(r - 1) - log r`` with ``r = exp(-d) = p_ref / p``; unbiased and never negative.

    Ref: Schulman 2020, "Approximating KL Divergence"; Ziegler et al. 2019 (k1 penalty).
    Note: "abs" and "mse" are not unbiased estimators of KL; they are the trl v0.4.7 options.
    """
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
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty at every response token plus the score at the last one.

    scores (B,), logprobs, ref_logprobs, mask (B, T) -> (rewards, kl), both (B, T):
    ``kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask``,
    ``rewards = -kl_coef * kl``, and ``rewards[i, last_i] += scores[i]`` where ``last_i`` is the last
    position with mask 1 in row i. ``kl`` is returned so that the KL that is logged is the KL that is
    penalised.

    Ref: Ziegler et al. 2019 (arXiv:1909.08593), section 2.2: R(x, y) = r(x, y) - beta * log(pi / rho).
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    T = mask.shape[1]
    last = (T - 1) - mask.flip(1).argmax(dim=1)  # (B,) index of each row's last real token
    at_last = F.one_hot(last, T).to(rewards.dtype)  # (B, T)
    rewards = rewards + at_last * scores.to(rewards.dtype).unsqueeze(1)
    return rewards, kl


# -- losses -------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective, as a loss to minimise.

    logprobs (new, with grad), old_logprobs, advantages, mask (B, T) -> (loss, stats):
    ``ratio = exp(logp - old)``,
    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.
    Where the clipped branch is the larger one (the ratio has left [1-eps, 1+eps] in the direction the
    advantage rewards) the token's gradient is zero.

    Stats (detached scalars): ``clipfrac`` (share of tokens on the clipped branch), ``approxkl``
    (``0.5 * mean((logp - old)^2)``), ``policykl`` (``mean(old - logp)``), ``ratio`` (mean ratio),
    ``advantages_mean``.

    Ref: Schulman et al. 2017 (arXiv:1707.06347), eq. 7.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
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
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``.

    values (new, with grad), old_values, returns, mask (B, T) -> (loss, stats), with
    ``V_clip = old + clip(V - old, -eps_v, eps_v)``.
    Stats (detached scalars): ``clipfrac`` (share of tokens on the clipped branch), ``error``
    (``mean((V - R)^2)``), ``vpred`` (mean V), ``var_explained`` (``1 - var(R - V) / var(R)``).

    Ref: Schulman et al. 2017 / OpenAI baselines ppo2.
    Note: value clipping is not in the paper; it is in OpenAI's baselines and lm-human-preferences and
    in trl, and is kept here for parity (Huang et al. discuss it as an implementation detail).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
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

    ``error = clip(current_kl / target - 1, -0.2, 0.2)``; ``beta *= 1 + error * n_steps / horizon``,
    where ``current_kl`` is the mean per-sequence KL of the last batch and ``n_steps`` its number of
    sequences. ``target`` is in nats per sequence.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing (same interface as the adaptive one)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class RunningMoments:
    """Running mean and standard deviation of a stream of scalars (batches merged by Chan et al.'s
    parallel update, so the result equals the moments of everything seen).

    ``update(x)`` adds a (B,) batch and returns the new (mean, std) as floats; std is unbiased
    (Bessel) and at least ``eps``. Ref: Chan, Golub, LeVeque 1979 (pairwise variance update).
    """

    def __init__(self, eps: float = 1e-8):
        self.mean, self.var, self.count, self.eps = 0.0, 1.0, 0, eps

    def update(self, x: torch.Tensor) -> tuple[float, float]:
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
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
