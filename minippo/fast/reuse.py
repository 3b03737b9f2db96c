"""The rollout forward reused by the first update, where one micro-batch is the whole batch.

The plain trainer runs the rollout forward without gradient and recomputes it, on the same
micro-batch and the same parameters, for the first update: the same numbers (ratio 1), computed
twice. Where one micro-batch is the whole batch, that forward can keep its graph instead, and the
first update backpropagates through it: one policy forward fewer per step, the same update.
`PPOTrainer` uses this only on a model loaded with the fast path (``load_model(fast=True)``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Outputs = tuple[Tensor, Tensor, Tensor | None]


class RolloutReuse:
    """Holds the rollout's forward outputs, graph kept, from `rollout` until `update` takes them.

    Scoped to one step: `update` hands the outputs over once (to the first update) and forgets them,
    so their activations are freed with that update's backward."""

    def __init__(self):
        self.kept: tuple[Tensor, Outputs] | None = None

    def rollout(self, forward: Callable[..., Outputs], micro) -> Outputs:
        """The trainer's rollout forward of ``micro``, run with gradients on and kept; returned
        detached, as the plain rollout forward returns it."""
        with torch.enable_grad():
            outputs = forward(micro)
        self.kept = (micro.input_ids, outputs)
        return tuple(x if x is None else x.detach() for x in outputs)

    def update(self, forward: Callable[..., Outputs], micro) -> Outputs:
        """The kept outputs if ``micro`` is the micro-batch the rollout ran on, else a fresh forward."""
        kept = self.kept
        self.kept = None
        if kept is not None and torch.equal(kept[0], micro.input_ids):
            return kept[1]
        return forward(micro)
