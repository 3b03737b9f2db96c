"""The PPO math: reference equivalence, hand-computed cases and invariants."""

import math

import pytest
import torch

from minippo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    entropy_from_logits,
    kl_penalized_rewards,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)


def right_padded_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


# -- logprobs / entropy -------------------------------------------------------------------------


def test_logprobs_from_logits_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    ours = logprobs_from_logits(logits, labels)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref)


def test_entropy_from_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    uniform = torch.zeros(1, 1, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((1, 1), math.log(8)))


# -- masked statistics --------------------------------------------------------------------------


def test_masked_mean_and_var():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(masked_mean(x, mask), kept.mean())
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.5]))
    torch.testing.assert_close(masked_var(x, mask), kept.var(unbiased=True))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), kept.var(unbiased=False))
    # one element: the biased variance (0), not a division by zero
    assert masked_var(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])) == 0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_equals_whiten_of_unmasked_slice(shift_mean):
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64) * 3 + 2
    mask = right_padded_mask([6, 3, 1, 4], 6)
    kept = x[mask.bool()]
    expected = (kept - kept.mean()) / torch.sqrt(kept.var(unbiased=True) + 1e-8)
    if not shift_mean:
        expected = expected + kept.mean()
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(out[mask.bool()], expected)
    assert (out[~mask.bool()] == 0).all()


# -- GAE ----------------------------------------------------------------------------------------


def gae_reference(values, rewards, length, gamma, lam):
    """A plain per-step loop over one sequence of `length` real tokens (python floats)."""
    advantages = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    returns = [a + v for a, v in zip(advantages, values)]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_compute_gae_matches_plain_loop(gamma, lam):
    torch.manual_seed(0)
    lengths, T = [7, 3, 1, 5], 7
    values = torch.randn(4, T, dtype=torch.float64)
    rewards = torch.randn(4, T, dtype=torch.float64)
    mask = right_padded_mask(lengths, T)
    advantages, returns = compute_gae(values, rewards, mask, gamma, lam)
    for i, n in enumerate(lengths):
        adv_ref, ret_ref = gae_reference(values[i].tolist(), rewards[i].tolist(), n, gamma, lam)
        torch.testing.assert_close(advantages[i, :n], torch.tensor(adv_ref, dtype=torch.float64))
        torch.testing.assert_close(returns[i, :n], torch.tensor(ret_ref, dtype=torch.float64))
        # padding after the last token neither receives nor passes value
        assert (advantages[i, n:] == 0).all() and (returns[i, n:] == 0).all()


def test_compute_gae_ignores_garbage_in_padding():
    torch.manual_seed(0)
    values, rewards = torch.randn(2, 5), torch.randn(2, 5)
    mask = right_padded_mask([3, 5], 5)
    noisy_values, noisy_rewards = values.clone(), rewards.clone()
    noisy_values[0, 3:] = 1e6
    noisy_rewards[0, 3:] = -1e6
    a1, r1 = compute_gae(values, rewards, mask, 1.0, 0.95)
    a2, r2 = compute_gae(noisy_values, noisy_rewards, mask, 1.0, 0.95)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)


# -- KL -----------------------------------------------------------------------------------------


def test_kl_penalty_estimators_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    d = torch.tensor([[math.log(2.0), math.log(0.5)]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "kl"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), d.abs())
    torch.testing.assert_close(kl_penalty(logp, ref, "mse"), 0.5 * d**2)
    # k3: r = p_ref / p = 0.5 -> (0.5 - 1) - log 0.5 = 0.19315; r = 2 -> 1 - log 2 = 0.30685
    torch.testing.assert_close(
        kl_penalty(logp, ref, "k3"), torch.tensor([[0.5 - 1 - math.log(0.5), 1 - math.log(2.0)]])
    )
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k2")


def test_k3_is_never_negative_and_k1_k3_are_unbiased():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(50), torch.randn(50)
    p, q = torch.softmax(p_logits, 0), torch.softmax(q_logits, 0)
    true_kl = (p * (p.log() - q.log())).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    k3 = kl_penalty(logp, logq, "k3")
    assert (k3 >= 0).all()
    assert abs(k3.mean() - true_kl) < 0.01
    assert abs(kl_penalty(logp, logq, "k1").mean() - true_kl) < 0.01
    assert (kl_penalty(torch.zeros(3), torch.zeros(3), "k3") == 0).all()


def test_only_k1_as_a_reward_gives_the_kls_policy_gradient():
    # PPO penalises with -beta * estimator(sample) as a reward: its policy gradient is
    # E_p[grad log p(y) * estimator(y)], computed exactly here over a 20-token vocabulary.
    torch.manual_seed(0)
    theta, q = torch.randn(20, requires_grad=True), torch.softmax(torch.randn(20), 0)
    logp = torch.log_softmax(theta, 0)
    (kl_gradient,) = torch.autograd.grad(
        (logp.exp() * (logp - q.log())).sum(), theta, retain_graph=True
    )
    for estimator, exact in (("k1", True), ("k3", False)):
        values = kl_penalty(logp.detach(), q.log(), estimator)  # (20,), held fixed as a reward is
        surrogate = (logp.exp().detach() * logp * values).sum()  # E_p[log p * value], p held fixed
        (reinforce,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
        error = (reinforce - kl_gradient).abs().max()
        assert error < 1e-6 if exact else error > 0.05 * kl_gradient.abs().max(), (estimator, error)


def test_kl_penalized_rewards():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, 5.0, 5.0]])
    mask = right_padded_mask([3, 1], 3)
    scores = torch.tensor([10.0, -4.0])
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(
        rewards, torch.tensor([[-0.05, 0.0, 0.1 + 10.0], [-0.1 - 4.0, 0.0, 0.0]])
    )
    _, kl3 = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1, estimator="k3")
    torch.testing.assert_close(kl3, kl_penalty(logp, ref, "k3") * mask)


# -- losses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio,advantage,clipped",
    [
        (1.5, 1.0, True),  # ratio above 1+eps, positive advantage: clipped, no gradient
        (1.5, -1.0, False),  # ratio above 1+eps, negative advantage: unclipped (pessimistic branch)
        (0.5, 1.0, False),  # ratio below 1-eps, positive advantage: unclipped
        (0.5, -1.0, True),  # ratio below 1-eps, negative advantage: clipped, no gradient
        (1.1, 1.0, False),  # inside the trust region: unclipped
    ],
)
def test_policy_loss_clipping_by_hand(ratio, advantage, clipped):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    adv = torch.tensor([[advantage]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 1), clip_range=0.2)
    bound = min(max(ratio, 0.8), 1.2)
    expected = max(-advantage * ratio, -advantage * bound)
    assert loss.item() == pytest.approx(expected)
    assert stats["clipfrac"].item() == (1.0 if clipped else 0.0)
    assert stats["ratio"].item() == pytest.approx(ratio)
    assert stats["approxkl"].item() == pytest.approx(0.5 * math.log(ratio) ** 2)
    assert stats["policykl"].item() == pytest.approx(-math.log(ratio))
    (grad,) = torch.autograd.grad(loss, logp)
    if clipped:
        assert grad.item() == 0
    else:  # d/dlogp of -A * exp(logp - old) = -A * ratio
        assert grad.item() == pytest.approx(-advantage * ratio)


def test_policy_loss_ignores_masked_tokens():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.0, 0.1, 5.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 100.0]])
    loss, stats = policy_loss(logp, old, adv, torch.tensor([[1.0, 1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(-(1.0 + 2.0 * math.exp(0.1)) / 2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 2] == 0


def test_value_loss_clipping_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, -0.5, 0.5]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 4), clip_range_value=0.2)
    # token 0: V 0.5 -> clipped 0.2: (0.5-1)^2=0.25 < (0.2-1)^2=0.64: clipped branch (0.64), no grad
    # token 1: inside the range: 0.81 both, unclipped
    # token 2: V -0.5 -> clipped -0.2: 2.25 > 1.44: unclipped branch
    # token 3: V 0.5 -> clipped 0.2: 2.25 > 1.44: unclipped branch
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25 + 2.25) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.25)
    assert stats["error"].item() == pytest.approx((0.25 + 0.81 + 2.25 + 2.25) / 4)
    (grad,) = torch.autograd.grad(loss, values)
    assert grad[0, 0] == 0
    assert grad[0, 2].item() == pytest.approx(0.5 * 2 * (-0.5 - 1.0) / 4)


# -- controllers --------------------------------------------------------------------------------


def test_adaptive_kl_controller_sequence():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    expected = 0.2
    for kl, n in [(12.0, 256), (6.0, 256), (3.0, 256), (6.6, 100), (0.0, 10000)]:
        ctl.update(kl, n)
        error = min(max(kl / 6.0 - 1, -0.2), 0.2)
        expected *= 1 + error * n / 10000
        assert ctl.value == pytest.approx(expected)
    # by hand for the first step: error clipped to +0.2 -> 0.2 * (1 + 0.2 * 256 / 10000)
    first = AdaptiveKLController(0.2, 6.0, 10000)
    first.update(12.0, 256)
    assert first.value == pytest.approx(0.2 * 1.00512)
    # a KL of 5.4 (error -0.1) over a full horizon: 0.2 * 0.9
    second = AdaptiveKLController(0.2, 6.0, 10000)
    second.update(5.4, 10000)
    assert second.value == pytest.approx(0.18)


def test_adaptive_kl_controller_floor():
    # under the target beta falls, but not below min_coef; over it beta rises as Ziegler's does
    ctl = AdaptiveKLController(0.1, target=10.0, horizon=100, min_coef=0.1)
    ctl.update(2.0, 32)
    assert ctl.value == 0.1
    ctl.update(20.0, 32)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 32 / 100))
    ctl.update(9.5, 32)  # error -0.05: a step down, still above the floor
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 32 / 100) * (1 - 0.05 * 32 / 100))
    for _ in range(10):
        ctl.update(0.0, 32)
    assert ctl.value == 0.1
    free = AdaptiveKLController(0.1, target=10.0, horizon=100)  # min_coef 0: trl's controller
    free.update(2.0, 32)
    assert free.value == pytest.approx(0.1 * (1 - 0.2 * 32 / 100))


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05


def test_running_moments_equal_the_moments_of_everything_seen():
    torch.manual_seed(0)
    moments, seen = RunningMoments(), []
    for n in (1, 5, 3, 17):
        x = torch.randn(n) * 3 + 2
        seen.append(x)
        mean, std = moments.update(x)
        everything = torch.cat(seen)
        assert mean == pytest.approx(everything.mean().item(), abs=1e-5)
        if len(everything) > 1:
            assert std == pytest.approx(everything.std().item(), rel=1e-5)  # unbiased, as torch.std
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.update(torch.ones(2)) == moments.update(torch.ones(2))


# -- the reward model's loss ----------------------------------------------------------------------
@pytest.mark.parametrize("coef", [None, 0.5])
def test_bradley_terry_loss_and_gradient_by_hand(coef):
    from minippo.core import bradley_terry_loss

    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0], requires_grad=True)  # margins +1 and -1
    loss, stats = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=coef)
    # -log sigmoid(1) = log(1 + e^-1), -log sigmoid(-1) = log(1 + e); d/dm -log sigmoid(m) = -sigmoid(-m)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    grad = [-1 / (1 + math.e) / 2, -1 / (1 + math.exp(-1)) / 2]  # -sigmoid(-m) / B
    if coef:  # + c * mean((c_i + r_i)^2) = 0.5 * (9 + 1) / 2; d/dc_i = c * 2 * (c_i + r_i) / B
        expected += 0.5 * (9 + 1) / 2
        centre = [0.5 * 2 * 3 / 2, 0.5 * 2 * 1 / 2]
    else:
        centre = [0.0, 0.0]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(chosen.grad, torch.tensor(grad) + torch.tensor(centre))
    torch.testing.assert_close(rejected.grad, -torch.tensor(grad) + torch.tensor(centre))
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == 0.0
    assert (stats["chosen"].item(), stats["rejected"].item()) == (1.0, 1.0)
    assert not any(s.requires_grad for s in stats.values())
