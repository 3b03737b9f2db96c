"""Sampling a token per row by the inverse of its cumulative distribution.

`torch.multinomial` (the plain path, `policy._multinomial`) draws V exponentials per row; this draws one
uniform u per row and returns the first token whose cumulative probability exceeds u * total. Both draw
from the same distribution (a chi-square test in tests/fast/test_sampling.py); the tokens drawn for one
seed differ, as the two consume the generator differently."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_inverse_cdf(probs: Tensor) -> Tensor:
    """One token per row from probabilities (B, V) -> (B,), by inverse-CDF sampling in float64."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V)
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(cdf.shape[1] - 1)  # (B,)
