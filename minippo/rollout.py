"""The rollout buffer: one PPO batch of samples and everything computed about them.

`RolloutBuffer`: tensors with the batch on dim 0, filled in stages by the trainer; `minibatches` yields
buffers of a given size, trimmed of all-padding columns, for the updates and their micro-batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import Generator, Tensor


@dataclasses.dataclass
class RolloutBuffer:
    """One batch of B (query, response) samples with their log-probabilities, values and targets.

    query_ids, query_mask (B, P): prompts, left-padded; response_ids, response_mask (B, T): right-padded.
    old_logprobs, ref_logprobs (B, T): the response tokens' log-probabilities under the sampling policy
    and the reference (adapters disabled); values (B, T): value estimates at the positions predicting them.
    scores (B,), rewards (B, T): the scores, scaled and clipped; per-token rewards (KL penalty, score last).
    advantages (B, T): GAE advantages (whitened); returns (B, T): value targets.

    Each PPO epoch visits the samples in its random `epoch_order`, drawn once and kept; the rollout forward
    runs on the first epoch's micro-batches: the first minibatch recomputes it bit for bit, or reuses it."""

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    scores: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    def __post_init__(self):
        self._epoch_orders: list[Tensor] = []  # not a field: select() makes fresh buffers

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def epoch_order(self, epoch: int, generator: Generator | None = None) -> Tensor:
        """The (B,) sample order of PPO epoch ``epoch``: a random permutation drawn on first use, kept."""
        while len(self._epoch_orders) <= epoch:
            order = torch.randperm(len(self), generator=generator)
            self._epoch_orders.append(order.to(self.query_ids.device))
        return self._epoch_orders[epoch]

    def epochs(self, n_epochs: int, size: int) -> Iterator[RolloutBuffer]:
        """Minibatches of ``size`` samples for ``n_epochs`` passes, each pass in its `epoch_order`."""
        for epoch in range(n_epochs):
            yield from self.minibatches(size, order=self.epoch_order(epoch))

    @property
    def input_ids(self) -> Tensor:
        """(B, L) queries then responses: [pad.., query | response, ..pad]."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(B, L) 1 on the real query and response tokens."""
        return torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)

    def select(self, index: Tensor) -> RolloutBuffer:
        """The samples at ``index`` (1-D), with columns that are padding in all of them removed
        (leading query columns, trailing response columns), so a minibatch of short samples costs less."""
        picked = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        picked = {name: None if value is None else value[index] for name, value in picked.items()}
        query_cols = picked["query_mask"].any(0).nonzero()
        response_cols = picked["response_mask"].any(0).nonzero()
        p0 = int(query_cols[0]) if len(query_cols) else 0
        t1 = int(response_cols[-1]) + 1 if len(response_cols) else picked["response_mask"].shape[1]
        for name, value in picked.items():
            if value is not None and name.startswith("query_"):
                picked[name] = value[:, p0:]
            elif value is not None and value.dim() == 2:  # every (B, T) field
                picked[name] = value[:, :t1]
        return RolloutBuffer(**picked)

    def minibatches(
        self,
        size: int,
        shuffle: bool = True,
        generator: Generator | None = None,
        order: Tensor | None = None,
    ) -> Iterator[RolloutBuffer]:
        """Yield ``len(self) // size`` buffers of ``size`` samples each: in a random order if ``shuffle``
        (a fresh permutation per call; ``generator`` makes it reproducible), in the given ``order``
        (a permutation of 0..B-1) if one is passed, else in order. ``size`` must divide B."""
        if size < 1 or len(self) % size:
            raise ValueError(
                f"minibatch size {size} must be positive and divide the batch size {len(self)}"
            )
        if order is None:
            order = (
                torch.randperm(len(self), generator=generator)
                if shuffle
                else torch.arange(len(self))
            )
        elif sorted(order.tolist()) != list(range(len(self))):
            raise ValueError(f"order must be a permutation of 0..{len(self) - 1}")
        order = order.to(self.query_ids.device)
        for start in range(0, len(self), size):
            yield self.select(order[start : start + size])
