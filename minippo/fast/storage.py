"""The input embeddings stored in bf16 while the hidden states stay float32.

The embedding matrix is the largest float matrix of a small model, and read whole by the LM head at every
position; in bf16 it takes half the memory and, on a CPU with native bf16, the head's matmul runs at
bf16 speed. The lookups are cast back to the hidden states' dtype (the LM head's output too:
`head.FastLMHead`), so only the embedding values are rounded: the logits within bf16 rounding of the
weights (tests/fast/test_storage.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StoredEmbedding(nn.Embedding):
    """An `nn.Embedding` whose weight is stored in its own dtype, its lookups returned in ``hidden_dtype``."""

    minippo_fast = True

    def __init__(self, embedding: nn.Embedding, weight: nn.Parameter, hidden_dtype: torch.dtype):
        super().__init__(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            device="meta",
        )
        self.weight = weight
        self.hidden_dtype = hidden_dtype
        self.minippo_stored_dtype = weight.dtype  # `prepare_model_for_kbit_training` keeps it

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.hidden_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_dtype={self.weight.dtype}, out={self.hidden_dtype}"
