"""`core.logprobs_from_logits` and `core.entropy_from_logits`, a few rows at a time on a CPU.

A reduction over a (B * T, V) tensor whose rows exceed the CPU's caches reads each row from memory once
per pass; a block of 8 rows stays in cache across the passes of logsumexp, softmax and the products.
Each row is reduced alone either way, so the entropy is the plain function's, bit for bit; the log-probs
are ``z[label] - logsumexp(z)`` (no second (B, T, V) tensor kept for the backward), within float32
rounding of ``log_softmax(z)[label]`` (tests/fast/test_rows.py). On a GPU all rows go at once."""

from __future__ import annotations

import torch
from torch import Tensor

ROWS_PER_BLOCK = 8


def row_blocks(x: Tensor) -> list[Tensor]:
    """x's rows of the last dim, (B * T, V): on a CPU `ROWS_PER_BLOCK` at a time, on a GPU all at once."""
    rows = x.reshape(-1, x.shape[-1])  # (B * T, V)
    return list(rows.split(ROWS_PER_BLOCK)) if rows.is_cpu else [rows]


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """(B, T, V), (B, T) -> (B, T): ``logits[label] - logsumexp(logits)``, in row blocks."""
    label_logits = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    lse = torch.cat([torch.logsumexp(z, dim=-1) for z in row_blocks(logits)])  # (B * T,)
    return label_logits - lse.view(label_logits.shape)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(B, T, V) -> (B, T): logsumexp(z) - sum softmax(z) * z, in row blocks."""
    ent = [
        torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
        for z in row_blocks(logits)
    ]
    return torch.cat(ent).view(logits.shape[:-1])
