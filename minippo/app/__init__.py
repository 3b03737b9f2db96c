"""The blog's IMDB application on top of the minippo core: data, sentiment rewards, the embedded
model's cache, SFT (step 1), merge (step 2), PPO runs (step 3), the demo, the memory planner,
reports and the ``minippo`` command line. Nothing in the core imports this package.
"""

from .data import (
    LengthSampler,
    clean_review,
    load_imdb,
    load_text_dataset,
    make_prompts,
    pack_blocks,
)
from .memory_plan import Plan, PlanConfig, format_plan, plan_memory
from .model_folders import (
    DEFAULT_MODEL,
    convert_gguf,
    embedded_model_dir,
    load_tokenizer,
    resolve_model,
)
from .reward import HFSentiment, RewardConfig, TfidfSentiment, load_reward, train_reward
from .sft import SFTConfig, run_sft

__all__ = [
    "LengthSampler",
    "clean_review",
    "load_imdb",
    "load_text_dataset",
    "make_prompts",
    "pack_blocks",
    "Plan",
    "PlanConfig",
    "format_plan",
    "plan_memory",
    "DEFAULT_MODEL",
    "convert_gguf",
    "embedded_model_dir",
    "load_tokenizer",
    "resolve_model",
    "HFSentiment",
    "RewardConfig",
    "TfidfSentiment",
    "load_reward",
    "train_reward",
    "SFTConfig",
    "run_sft",
]
