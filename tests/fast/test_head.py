"""minippo.fast.head, rows and sampling against the plain functions of minippo.core and torch."""

import pytest
import torch
from torch import nn

from minippo.core import entropy_from_logits, logprobs_from_logits
from minippo.fast import rows
from minippo.fast.head import FastLMHead, head_logprobs
from minippo.fast.sampling import sample_inverse_cdf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_logprobs_are_the_logits_ones_without_the_logits(dtype):
    """Log-probs, entropies and the hidden states' gradient of ``scale * h @ W.T`` as the float32 logits
    give them, over several blocks of rows (400 rows, 2**24 // V = 335 a block on a CPU, sub-blocks of 16),
    within 1e-4 (absolute; float32 sums in another order); no gradient for W; none made under no_grad."""
    torch.manual_seed(0)
    V, H, scale = 50_000, 24, 0.7
    weight = (torch.randn(V, H) * 0.3).to(dtype)
    hidden = torch.randn(4, 100, H).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (4, 100))
    g = torch.randn(4, 100)
    logits = (hidden @ weight.T).float() * scale  # the logits way, as PolicyWithValueHead's
    want_logp = logprobs_from_logits(logits, labels)
    want_ent = entropy_from_logits(logits)
    (want_grad,) = torch.autograd.grad((want_logp * g).sum(), hidden)
    logp, ent = head_logprobs(hidden, weight, labels, scale)
    assert logp.requires_grad and not ent.requires_grad
    torch.testing.assert_close(logp, want_logp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent, atol=1e-4, rtol=1e-5)
    (grad,) = torch.autograd.grad((logp * g).sum(), hidden)
    assert grad.dtype == dtype
    # bf16: both ways round their (N, V) softmax-sized factor to bf16 for the matmul, differently
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (grad.float() - want_grad.float()).abs().max() <= tol * want_grad.float().abs().max()
    with torch.no_grad():
        assert torch.equal(head_logprobs(hidden, weight, labels, scale)[0], logp.detach())


def test_fast_head_forward_is_the_linear_one_bit_for_bit():
    torch.manual_seed(0)
    head = nn.Linear(24, 300, bias=False)
    fast = FastLMHead(head, head.weight, None)
    h = torch.randn(2, 5, 24)
    assert torch.equal(fast(h), head(h)) and fast.weight is head.weight
    logp, ent = fast.logprobs_and_entropy(h, torch.randint(0, 300, (2, 5)), 1.0)
    assert logp.shape == ent.shape == (2, 5)


def test_row_blocks_give_the_plain_entropy_bit_for_bit_and_the_logprobs_within_rounding():
    """21 rows (the last block short). Entropy: the same formula, each row reduced alone: bit for bit.
    Log-probs: z[y] - logsumexp(z) against log_softmax(z)[y]: within 2e-6 (float32 rounding of |logp| ~ 9),
    and so their gradient."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 5000, requires_grad=True)
    labels = torch.randint(0, 5000, (3, 7))
    assert torch.equal(rows.entropy_from_logits(logits), entropy_from_logits(logits))
    ours = rows.logprobs_from_logits(logits, labels)
    plain = logprobs_from_logits(logits, labels)
    torch.testing.assert_close(ours, plain, atol=2e-6, rtol=0)
    grads = [torch.autograd.grad(x.sum(), logits)[0] for x in (ours, plain)]
    torch.testing.assert_close(*grads, atol=1e-7, rtol=0)


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return ((counts - expected) ** 2 / expected).sum().item()


def test_inverse_cdf_sampling_draws_the_multinomial_distribution():
    """Both samplers on 8 tokens, 40 rows x 500 draws, a fixed seed: chi-square below 24.3 (7 degrees of
    freedom, p = 0.001) for each, and the two histograms agree with each other."""
    probs = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.04, 0.01])
    batch = probs.expand(40, 8)
    torch.manual_seed(0)
    fast = torch.cat([sample_inverse_cdf(batch) for _ in range(500)])
    plain = torch.cat([torch.multinomial(batch, 1)[:, 0] for _ in range(500)])
    assert chi_square(fast, probs) < 24.3
    assert chi_square(plain, probs) < 24.3
    assert fast.min() >= 0 and fast.max() < 8
    # a token of probability zero is never drawn
    zero = torch.tensor([[0.5, 0.0, 0.5]]).expand(1000, 3)
    assert (sample_inverse_cdf(zero) != 1).all()
