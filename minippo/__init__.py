"""minippo: PPO on LoRA adapters over 8-bit causal language models, small enough to read.

Shape letters used throughout: B batch, P prompt length, T response length, L = P + T,
V vocabulary, H hidden size, r LoRA rank.
"""
import logging as _logging

# bitsandbytes logs a float16-cast notice on every int8 matmul and a note about an optional
# package at import; neither is actionable for users of this library.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

__version__ = "0.1.0"

# -- LoRA and 8-bit loading (quant.py, lora.py) --
from .quant import (  # noqa: E402
    dequantize_8bit,
    is_8bit,
    keep_8bit_layers_in_eval,
    load_model,
    model_footprint_bytes,
    prepare_model_for_kbit_training,
    quantize_model,
)
from .lora import (  # noqa: E402
    LoRAConfig,
    LoRALayer,
    add_lora,
    count_parameters,
    disable_adapters,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

# -- PPO math (core.py) --
from .core import (
    AdaptiveKLController,
    FixedKLController,
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

# -- policy, rollouts, trainer (policy.py, rollout.py, ppo.py) --
from .policy import Generation, PolicyWithValueHead, ValueHead, load_value_head, save_value_head  # noqa: E402
from .rollout import RolloutBuffer  # noqa: E402
from .ppo import PPOConfig, PPOTrainer  # noqa: E402

# -- data, rewards, models, sft (data.py, reward.py, models.py, sft.py) --
from .data import (  # noqa: E402
    LengthSampler,
    clean_review,
    load_imdb,
    load_text_dataset,
    make_prompts,
    pack_blocks,
)
from .models import (  # noqa: E402
    DEFAULT_MODEL,
    convert_gguf,
    embedded_model_dir,
    load_tokenizer,
    resolve_model,
)
from .reward import (  # noqa: E402
    HFSentiment,
    RewardConfig,
    TfidfSentiment,
    load_reward,
    train_reward,
)
from .sft import SFTConfig, run_sft  # noqa: E402

# -- tools (plan.py) --
from .plan import Plan, PlanConfig, TensorMemoryTracker, format_plan, plan_memory  # noqa: E402
