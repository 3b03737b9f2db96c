"""The LM head of the fast path: log-probs and entropies straight from the hidden states, no logits kept.

`FastLMHead` is an `nn.Linear` (the model's own weight, possibly stored in bf16: storage.py) whose forward
is the plain head's, plus what the policy computes from its output, found by duck typing
(`PolicyWithValueHead.response_logprobs` and `.generate`):
- ``logprobs_and_entropy(hidden, labels, scale)``: `head_logprobs` below;
- ``logprobs_from_logits`` / ``entropy_from_logits``: the row-blocked forms (rows.py);
- ``sample(probs)``: inverse-CDF sampling (sampling.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rows, sampling

# logits one matmul makes (GPU, CPU), and rows one element-wise pass takes (cache-sized)
HEAD_BLOCK = 2**26
HEAD_BLOCK_CPU = 2**24
HEAD_ROWS = 16


def head_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """`core.logprobs_from_logits` and `core.entropy_from_logits` (detached) of the logits
    ``scale * hidden @ weight.T``, (B, T, H), (V, H), (B, T) -> (B, T), (B, T), a block of rows at a time,
    so no (B, T, V) tensor is kept. The gradient is made in the forward,
    ``d logp / dh = scale * (W[label] - softmax @ W)`` per row (a fused linear cross-entropy, as
    Liger-Kernel's, arXiv:2410.10989), so the backward is a product; W gets none."""
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadLogprobs.apply(hidden, weight, labels, scale, with_grad)


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, with_grad):
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
        y = labels.reshape(-1)  # (N,)
        logp = torch.empty(len(y), device=h.device)  # (N,)
        ent = torch.empty(len(y), device=h.device)  # (N,)
        grad = torch.empty(h.shape, device=h.device) if with_grad else None  # float32 (N, H)
        step = max(1, (HEAD_BLOCK_CPU if h.is_cpu else HEAD_BLOCK) // weight.shape[0])
        for i in range(0, len(y), step):
            z = h[i : i + step] @ weight.T  # (n, V) in the weight's dtype
            p = torch.empty_like(z) if with_grad else None  # softmax(z)
            for j in range(0, len(z), HEAD_ROWS):
                n = min(HEAD_ROWS, len(z) - j)
                rows_ = slice(i + j, i + j + n)
                zj = z[j : j + n].float()
                zj = zj if scale == 1.0 else zj.mul_(scale)
                e = zj.sub_(zj.amax(-1, keepdim=True)).exp()  # z - max(z), and its exp
                s = e.sum(-1)
                log_s = s.log()
                logp[rows_] = zj.gather(1, y[rows_, None])[:, 0] - log_s
                ent[rows_] = log_s - torch.linalg.vecdot(e, zj) / s
                if with_grad:
                    p[j : j + n] = e.div_(s[:, None])
            if with_grad:
                grad[i : i + step] = (weight[y[i : i + step]].float() - p @ weight) * scale
        logp = logp.view(labels.shape)
        ent = ent.view(labels.shape)
        ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(grad)
        ctx.dtype = hidden.dtype
        ctx.shape = hidden.shape
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        (grad,) = ctx.saved_tensors
        grad_hidden = (grad_logp.reshape(-1, 1) * grad).to(ctx.dtype).view(ctx.shape)
        return grad_hidden, None, None, None, None


class FastLMHead(nn.Linear):
    """A bias-free LM head: ``hidden.to(weight.dtype) @ weight.T``, returned in ``hidden_dtype`` (the
    hidden states' dtype where the weight is stored in another, else the weight's), and the methods of
    the module docstring."""

    minippo_fast = True

    def __init__(self, head: nn.Linear, weight: nn.Parameter, hidden_dtype: torch.dtype | None):
        super().__init__(head.in_features, head.out_features, bias=False, device="meta")
        self.weight = weight
        self.hidden_dtype = hidden_dtype
        if hidden_dtype is not None and hidden_dtype != weight.dtype:
            self.minippo_stored_dtype = weight.dtype  # `prepare_model_for_kbit_training` keeps it

    def forward(self, hidden: Tensor) -> Tensor:
        logits = F.linear(hidden.to(self.weight.dtype), self.weight)
        return logits if self.hidden_dtype is None else logits.to(self.hidden_dtype)

    def logprobs_and_entropy(self, hidden: Tensor, labels: Tensor, scale: float = 1.0):
        """Log-probs (with gradient for ``hidden``) and entropies (B, T) of ``scale * self(hidden)``."""
        return head_logprobs(hidden.to(self.weight.dtype), self.weight, labels, scale)

    def logprobs_from_logits(self, logits: Tensor, labels: Tensor) -> Tensor:
        return rows.logprobs_from_logits(logits, labels)

    def entropy_from_logits(self, logits: Tensor) -> Tensor:
        return rows.entropy_from_logits(logits)

    def sample(self, probs: Tensor) -> Tensor:
        return sampling.sample_inverse_cdf(probs)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, weight_dtype={self.weight.dtype}, "
            "logprobs=fused, rows=blocked, sampler=inverse_cdf"
        )
