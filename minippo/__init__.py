"""minippo: PPO, GRPO and RLOO on LoRA adapters over 8-bit / 4-bit causal language models, small enough
to read.

The core, in reading order (docs/design.md): ``fileio`` (crash-safe writes), ``checks``, ``core`` (the
math), ``distributed``, ``compat`` (version shims), ``quant`` (k-bit loading), ``lora``,
``adapter_files`` (peft's layout), ``policy`` (value head, sampling), ``reward_model``, ``rollout``,
``tracking``, ``ppo`` (the trainer), ``rewards`` (reward functions). ``minippo.fast`` holds the faster
forms, one switch away (``load_model(..., fast=True)``).  The blog's IMDB application (`minippo.app`)
uses the core as any user.
Shapes: B batch, P prompt length, T response length, L = P + T, V vocabulary, H hidden size, r LoRA rank."""

import logging as _logging

# bitsandbytes logs a float16-cast notice on every int8 matmul, and an optional-package note: not actionable.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

__version__ = "0.3.0"

from .adapter_files import load_adapter, save_adapter  # noqa: E402
from .core import (  # noqa: E402
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    compute_gae,
    entropy_from_logits,
    grpo_advantages,
    kl_penalized_rewards,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    value_loss,
)
from .lora import LoRAConfig, add_lora, disable_adapters, merge_lora, use_adapter  # noqa: E402
from .policy import PolicyWithValueHead  # noqa: E402
from .ppo import PPOCallback, PPOConfig, PPOTrainer  # noqa: E402
from .quant import load_model, prepare_model_for_kbit_training, quantize_model  # noqa: E402
from .rollout import RolloutBuffer  # noqa: E402

# fmt: off
__all__ = [
    # LoRA and k-bit loading
    "LoRAConfig", "add_lora", "disable_adapters", "use_adapter", "merge_lora", "save_adapter",
    "load_adapter",
    "load_model", "quantize_model", "prepare_model_for_kbit_training",
    # PPO math
    "logprobs_from_logits", "entropy_from_logits", "masked_mean", "masked_var", "masked_whiten",
    "compute_gae", "kl_penalty", "kl_penalized_rewards", "policy_loss", "value_loss",
    "AdaptiveKLController", "FixedKLController",
    # critic-free advantages (GRPO, RLOO) and loss aggregation
    "grpo_advantages", "rloo_advantages", "aggregate_loss",
    # policy, rollouts, trainer
    "PolicyWithValueHead", "RolloutBuffer", "PPOConfig", "PPOTrainer", "PPOCallback",
]
# fmt: on
