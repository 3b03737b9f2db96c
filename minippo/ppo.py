"""PPO for language models: `PPOConfig` and `PPOTrainer` (``generate``, ``step``, ``save``, ``load``).

A training loop: prompts -> ``trainer.generate`` -> score the responses -> ``trainer.step``, whose numbered
steps call tested functions of `minippo.core` (docs/ppo_step.md walks through them). Only the LoRA
adapters and the value head train; the reference policy is the same model, adapters disabled.
Refs: Schulman et al. 2017 (PPO, arXiv:1707.06347); Ziegler et al. 2019 (PPO for LMs with a KL penalty,
arXiv:1909.08593); trl v0.4.7's PPOTrainer (names, defaults, stats)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch import Tensor

from . import checks, core, distributed
from .adapter_files import copy_adapter, read_checked_adapter
from .fileio import atomic_directory, committed_directory, write_binary, write_json
from .lora import disable_adapters, lora_layers
from .policy import VALUE_HEAD_FILE, PolicyWithValueHead, left_pad, maybe_autocast, right_pad
from .quant import is_4bit, is_8bit, resolve_compute_dtype
from .rollout import RolloutBuffer
from .tracking import TRACKERS, Tracker, check_installed

logger = logging.getLogger(__name__)

# set on a model by `minippo.fast.enable` (load_model(fast=True)): the trainer then reuses the rollout forward
FAST_MARKER = "minippo_fast"

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
SCHEDULER_STATE = "scheduler.pt"
RNG_STATE = "rng_state.pt"  # every rank's generators, in rank order
# use_score_scaling divides by max(running std, SCORE_STD_FLOOR x running root-mean-square of the scores):
# however alike the scores, one of typical size is scaled to at most 1 / SCORE_STD_FLOOR = 100.
SCORE_STD_FLOOR = 0.01
RESUMABLE_CHANGES = (
    "learning_rate",
    "device",
    "generation_batch_size",
    "log_with",
    "tracker_project_name",
)
RESUMABLE_CHANGES += ("logging_dir",)
ADVANTAGE_ESTIMATORS = (
    "gae",
    "grpo",
    "rloo",
)  # PPOConfig fields a resume may change; `load` refuses others


@dataclasses.dataclass
class PPOConfig:
    """PPO settings. Names and defaults follow trl v0.4.7 (the blog era) where trl has the setting."""

    learning_rate: float = 1.41e-5
    """Adam(W) learning rate for the LoRA adapters and the value head (trl's examples: 1.41e-5)."""
    batch_size: int = 256
    """samples per PPO step over all processes; each of N processes' step() takes batch_size / N."""
    mini_batch_size: int = 16
    """samples per optimiser update over all processes (trl: per process); divides batch_size."""
    gradient_accumulation_steps: int = 1
    """split each minibatch into this many micro-batches (saves memory; the update is unchanged)."""
    ppo_epochs: int = 4
    """passes over the batch per step, each in a fresh random minibatch order."""
    init_kl_coef: float = 0.2
    """initial coefficient beta of the per-token KL penalty (the fixed one if adap_kl_ctrl is off)."""
    adap_kl_ctrl: bool = True
    """adapt beta towards `target` (Ziegler et al. 2019); False keeps beta = init_kl_coef."""
    target: float = 6.0
    """target KL per sequence (nats) of the adaptive controller."""
    horizon: float = 10000.0
    """horizon of the adaptive controller (samples): how slowly beta moves."""
    min_kl_coef: float = 0.0
    """the adaptive controller's floor on beta; = init_kl_coef makes `target` a ceiling (README, demo)."""
    gamma: float = 1.0
    """discount factor of GAE."""
    lam: float = 0.95
    """lambda of GAE (bias/variance trade-off of the advantages)."""
    cliprange: float = 0.2
    """PPO clip range epsilon of the probability ratio."""
    cliprange_value: float = 0.2
    """clip range of the value predictions around their rollout values."""
    vf_coef: float = 0.1
    """weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """weight of an entropy bonus, ``loss -= entropy_coef * mean token entropy`` (0: off, as trl)."""
    kl_penalty: str = "kl"
    """KL estimator, penalised and logged: "kl" (= "k1", logp - ref), "abs", "mse", "k3" (never < 0)."""
    whiten_rewards: bool = False
    """scale the per-token rewards to unit variance over the batch (no mean shift) before GAE."""
    advantage_estimator: str = "gae"
    """"gae" (PPO: value head + GAE), or critic-free "grpo" or "rloo" (docs/estimators.md)."""
    num_generations: int = 1
    """samples of each prompt in a batch (trl's name), consecutive; >= 2 for grpo and rloo, divides batch."""
    scale_rewards: bool = True
    """grpo: divide by the group's score std (trl's name); False: Dr. GRPO (arXiv:2503.20783)."""
    beta: float = 0.0
    """weight of GRPO's KL term in the loss, beta * k3(policy || reference) per token (trl's name); 0: off."""
    loss_type: str = "dapo"
    """policy loss over tokens (trl's names): "dapo" token mean, "grpo" per response, "dr_grpo" constant."""
    max_grad_norm: float | None = None
    """clip the gradient norm of the trainable parameters to this value (None: no clipping)."""
    early_stopping: bool = False
    """stop the step's PPO epochs once a minibatch's policy KL exceeds 1.5 * target_kl."""
    target_kl: float = 0.1
    """policy KL (vs the rollout policy, nats per token) that early_stopping guards."""
    ratio_threshold: float = 10.0
    """skip a minibatch's update when its mean probability ratio exceeds this (a loss spike)."""
    seed: int = 0
    """seed of torch's generators (sampling, minibatch order), set when the trainer is made."""
    temperature: float = 1.0
    """sampling temperature; log-probabilities in step() use the same one (logits / temperature)."""
    min_new_tokens: int = 4
    """shortest response generate() samples (its length is drawn in [min_new_tokens, max_new_tokens])."""
    max_new_tokens: int = 16
    """longest response generate() samples; set both equal for fixed-length responses."""
    stop_at_eos: bool = False
    """end a response at its first EOS token (False: always sample the drawn length, as the 20B example)."""
    score_scale: float = 1.0
    """multiply every score by this before it enters the rewards (reward scale matters for a fixed beta)."""
    use_score_scaling: bool = False
    """divide scores by their running standard deviation (trl's use_score_scaling, OpenAI's reward gain)."""
    use_score_norm: bool = False
    """with use_score_scaling, also subtract the running mean (trl's use_score_norm, OpenAI's reward bias)."""
    score_clip: float | None = None
    """clip scaled scores to [-score_clip, score_clip] (None: no clipping)."""
    weight_decay: float = 0.0
    """AdamW weight decay (0: plain Adam, as trl)."""
    generation_batch_size: int | None = None
    """queries sampled at once by generate() (None: all of them in one batch)."""
    compute_dtype: str = "auto"
    """autocast's matmul dtype (weights, logits, values keep theirs): "auto", "float32" or "bfloat16"."""
    device: str | None = None
    """device to train on, e.g. "cuda" (None: wherever the model's parameters are)."""
    gradient_checkpointing: bool | None = None
    """recompute decoder layers' activations in backward (less memory); None: on for 8/4-bit models."""
    log_with: str | None = None
    """also send each step's stats (from rank 0) to "tensorboard", "wandb" or "trackio" (trl's name)."""
    tracker_project_name: str = "minippo"
    """wandb / trackio project of log_with (trl's name)."""
    logging_dir: str | None = None
    """TensorBoard's event-file folder (None: SummaryWriter's default, runs/<date>_<host>)."""

    def __post_init__(self):
        ints = (
            "batch_size",
            "mini_batch_size",
            "gradient_accumulation_steps",
            "ppo_epochs",
            "min_new_tokens",
        )
        fields, check = checks.check_fields, checks.check
        fields(self, checks.POSITIVE_INT, *ints, "max_new_tokens")
        b, m, g = self.batch_size, self.mini_batch_size, self.gradient_accumulation_steps
        check(self, b % m == 0, f"batch_size ({b}) must be divisible by mini_batch_size ({m})")
        must = f"mini_batch_size ({m}) must be divisible by gradient_accumulation_steps ({g})"
        check(self, m % g == 0, must)
        lo, hi = self.min_new_tokens, self.max_new_tokens
        check(self, lo <= hi, f"min_new_tokens ({lo}) must be <= max_new_tokens ({hi})")
        positive = "learning_rate", "target", "horizon", "cliprange", "cliprange_value", "target_kl"
        fields(self, checks.POSITIVE, *positive, "ratio_threshold", "temperature", "score_scale")
        fields(self, checks.NON_NEGATIVE, "init_kl_coef", "vf_coef", "entropy_coef", "weight_decay")
        check(
            self,
            self.adap_kl_ctrl or self.min_kl_coef <= 0,
            "min_kl_coef > 0 needs adap_kl_ctrl=True",
        )
        fields(self, checks.UNIT_INTERVAL, "gamma", "lam")
        fields(self, checks.one_of(*core.KL_ESTIMATORS), "kl_penalty")
        fields(self, checks.one_of(*ADVANTAGE_ESTIMATORS), "advantage_estimator")
        fields(self, checks.one_of(*core.LOSS_TYPES), "loss_type")
        fields(self, checks.POSITIVE_INT, "num_generations")
        fields(self, checks.NON_NEGATIVE, "beta")
        fields(self, checks.BOOL, "scale_rewards")
        n = self.num_generations
        check(
            self,
            self.uses_value_head or n >= 2,
            f"advantage_estimator {self.advantage_estimator!r} compares the samples of a prompt: set "
            f"num_generations >= 2 (got {n})",
        )
        check(self, b % n == 0, f"num_generations ({n}) must divide batch_size ({b}): whole groups")
        fields(self, checks.optional(checks.POSITIVE), "max_grad_norm", "score_clip")
        fields(self, checks.optional(checks.POSITIVE_INT), "generation_batch_size")
        norm, scaling = self.use_score_norm, self.use_score_scaling
        check(self, scaling or not norm, "use_score_norm needs use_score_scaling")
        dtypes = checks.one_of("auto", "float32", "fp32", "bfloat16", "bf16")[0]
        no_fp16 = (
            "auto, float32 or bfloat16 (float16 would need loss scaling, which minippo does not do)"
        )
        fields(self, (dtypes, no_fp16), "compute_dtype")
        fields(self, checks.optional(checks.one_of(*TRACKERS)), "log_with")
        checks.check_device(self)

    @property
    def uses_value_head(self) -> bool:
        """PPO's critic: a value head trained, saved and run only for the "gae" estimator."""
        return self.advantage_estimator == "gae"

    @property
    def uses_reference(self) -> bool:
        """A KL is used, in the reward (init_kl_coef, min_kl_coef) or in the loss (beta): only then
        does a step run the reference forward."""
        return self.init_kl_coef > 0 or self.min_kl_coef > 0 or self.beta > 0

    @property
    def micro_batch_size(self) -> int:
        return self.mini_batch_size // self.gradient_accumulation_steps


class PPOCallback:
    """Hooks into `PPOTrainer.step`, for logging and tests: subclass and override.
    Each method gets the trainer; the stats are detached tensors (per minibatch) or floats (per step)."""

    def on_minibatch(
        self, trainer: PPOTrainer, minibatch: RolloutBuffer, stats: dict[str, Tensor]
    ) -> None:
        """After each minibatch's update (or skip): its buffer and its stats (``policy/ratio``, ...)."""

    def on_step_end(
        self, trainer: PPOTrainer, batch: RolloutBuffer, stats: dict[str, float]
    ) -> None:
        """After each step: the whole rollout buffer (log-probs, rewards, advantages) and the stats."""


class PPOTrainer:
    """Trains a policy (LoRA adapters + value head) with PPO against a reference = adapters off.

    ``model``: a `PolicyWithValueHead`, or a causal LM with LoRA layers (``add_lora``) to wrap in one.
    ``tokenizer`` gives the pad and EOS ids (EOS pads if there is no pad token: masks come from lengths).
    ``optimizer``: AdamW over the trainable parameters by default; ``lr_scheduler`` steps once per `step`,
    as in trl. ``callbacks``: `PPOCallback` objects called during each step. The policy runs in eval
    mode (dropout off): each step's first minibatch has ratio 1."""

    def __init__(
        self,
        config: PPOConfig,
        model: nn.Module,
        tokenizer=None,
        optimizer=None,
        lr_scheduler=None,
        callbacks: Sequence[PPOCallback] = (),
    ):
        self.config = config
        distributed.init_from_env()  # a no-op unless launched by torchrun with WORLD_SIZE > 1
        self.world_size = distributed.world_size()
        self.rank = distributed.rank()
        self.batch_size_per_rank, self.micro_batch_size = self._split_batch(config, self.world_size)
        policy = model if isinstance(model, PolicyWithValueHead) else PolicyWithValueHead(model)
        if not any(True for _ in lora_layers(policy.model)):
            raise ValueError(
                "the model has no LoRA layers: PPOTrainer trains adapters and takes the reference policy "
                "from the same model with its adapters disabled; call minippo.add_lora(model) first"
            )
        want = torch.device(config.device or policy.device)
        have = policy.device
        if want.type != have.type or want.index not in (None, have.index):
            # an 8-bit model should rather be loaded on its device (load_model(device=...))
            policy.to(want)
        self.policy = policy.eval()
        if config.gradient_checkpointing is None:
            policy.gradient_checkpointing = is_8bit(policy.model) or is_4bit(policy.model)
        else:
            policy.gradient_checkpointing = config.gradient_checkpointing
        if any(
            not isinstance(layer.lora_dropout, nn.Identity)
            for _, layer in lora_layers(policy.model)
        ):
            logger.warning(
                "LoRA dropout is ignored in PPO: the policy runs in eval mode (ratio 1 at first)"
            )
        self.device = policy.device
        self.compute_dtype = resolve_compute_dtype(config.compute_dtype, self.device, policy.model)
        policy.value_head.requires_grad_(config.uses_value_head)  # critic-free: not trained
        self.trainable = [p for p in policy.parameters() if p.requires_grad]
        distributed.broadcast_parameters(self.trainable)  # every rank starts from rank 0's adapters
        self.optimizer = optimizer or torch.optim.AdamW(
            self.trainable, config.learning_rate, weight_decay=config.weight_decay
        )
        self.lr_scheduler = lr_scheduler
        if config.adap_kl_ctrl:
            self.kl_ctl = core.AdaptiveKLController(
                config.init_kl_coef, config.target, config.horizon, config.min_kl_coef
            )
        else:
            self.kl_ctl = core.FixedKLController(config.init_kl_coef)
        self.pad_token_id, self.eos_token_id = self._special_ids(tokenizer, policy.model.config)
        self.vocab_size = getattr(policy.lm_head, "out_features", None)
        self.score_moments = core.RunningMoments()
        self.current_step = 0
        self.callbacks = list(callbacks)
        self.rollout_reuse = None
        if (
            getattr(policy.model, FAST_MARKER, False)
            and self.micro_batch_size == self.batch_size_per_rank
        ):
            from .fast.reuse import (
                RolloutReuse,
            )  # the fast path: only where the model was loaded so

            self.rollout_reuse = RolloutReuse()
        if config.log_with:
            check_installed(config.log_with)  # on every rank: the same error everywhere
        self.tracker = None  # rank 0 logs the (global) stats
        if config.log_with and self.rank == 0:
            self.tracker = Tracker(
                config.log_with,
                config.tracker_project_name,
                config.logging_dir,
                dataclasses.asdict(config),
            )
        torch.manual_seed(config.seed + self.rank)  # rank r samples with seed + r

    @staticmethod
    def _split_batch(config: PPOConfig, world_size: int) -> tuple[int, int]:
        """(samples per process per step, samples per micro-batch) with ``world_size`` processes."""
        n, accumulation = world_size, config.gradient_accumulation_steps
        if config.batch_size % n or config.mini_batch_size % (n * accumulation):
            raise ValueError(
                f"PPOConfig: with {n} processes, batch_size ({config.batch_size}) must be divisible by {n} "
                f"and mini_batch_size ({config.mini_batch_size}) by {n} x gradient_accumulation_steps "
                f"({accumulation}): each process takes an equal share of both"
            )
        per_rank = config.batch_size // n
        if per_rank % config.num_generations:
            raise ValueError(
                f"PPOConfig: with {n} processes each takes {per_rank} samples, which num_generations "
                f"({config.num_generations}) must divide: every process holds whole groups of a prompt's "
                f"samples (make batch_size a multiple of {n} x {config.num_generations})"
            )
        return per_rank, config.mini_batch_size // (n * accumulation)

    @staticmethod
    def _special_ids(tokenizer, model_config) -> tuple[int, int | None]:
        """(pad id, eos id) from the tokenizer, else the model config; pad falls back to eos, then 0."""
        source = tokenizer if tokenizer is not None else model_config
        eos = getattr(source, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = getattr(source, "pad_token_id", None)
        if pad is None:
            pad = eos if eos is not None else 0
            logger.warning(
                "no pad token: padding with id %d. This is safe in minippo (masks come from lengths, "
                "not from pad ids), but set tokenizer.pad_token to a token other than EOS for other tools.",
                pad,
            )
        return int(pad), (None if eos is None else int(eos))

    # -- generation -----------------------------------------------------------------------------
    def generate(self, queries: Sequence[Tensor], return_generation: bool = False, **overrides):
        """Sample one response per query (1-D token tensors) with the current policy and config; keyword
        ``overrides`` replace all but the temperature (step() must score with the same one) for this call.
        Returns 1-D CPU tensors, or with ``return_generation=True`` the `Generation` (padded, masks, logp)."""
        allowed = {"min_new_tokens", "max_new_tokens", "stop_at_eos", "batch_size"}
        if set(overrides) - allowed:
            raise TypeError(
                f"generate() got unexpected settings {sorted(set(overrides) - allowed)}; "
                f"allowed: {sorted(allowed)} (the temperature comes from PPOConfig)"
            )
        config = self.config
        settings = dict(
            min_new_tokens=config.min_new_tokens,
            max_new_tokens=config.max_new_tokens,
            stop_at_eos=config.stop_at_eos,
            temperature=config.temperature,
            batch_size=config.generation_batch_size,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
        )
        settings |= overrides
        with maybe_autocast(self.device.type, self.compute_dtype):
            generation = self.policy.generate(list(queries), **settings)
        return generation if return_generation else generation.responses()

    # -- the PPO step ---------------------------------------------------------------------------
    @torch.inference_mode(False)
    @torch.enable_grad()  # it trains: also when called under no_grad or inference_mode
    def step(
        self,
        queries: Sequence[Tensor],
        responses: Sequence[Tensor],
        scores: Sequence[float] | Tensor,
    ) -> dict[str, float]:
        """One PPO step on ``batch_size`` samples: lists of 1-D token tensors and one score each.
        Returns the step's statistics (trl / OpenAI names: ``objective/kl``, ``ppo/policy/clipfrac``, ...)."""
        timing = {}
        raw_scores = self._check_inputs(queries, responses, scores)  # (B,)
        with timed(timing, "total"):
            # 1. One padded batch: queries left-padded to P, responses right-padded to T.
            batch = self._padded_batch(queries, responses)

            with timed(timing, "forward_pass"):
                # 2. Log-probs, values and entropies of the policy that sampled (adapters on).
                batch.old_logprobs, batch.values, entropy = self._rollout_forward(batch)
                # 3. Reference log-probs: the same model and inputs, adapters disabled.
                batch.ref_logprobs = self._reference_logprobs(batch)

            with timed(timing, "compute_rewards"):
                # 4. Per-token rewards: the KL penalty, and the (normalised) score at the last token.
                kl_coef = self.kl_ctl.value
                batch.scores = self._normalise_scores(raw_scores.to(self.device))  # (B,)
                batch.rewards, kl = self._kl_penalised_rewards(batch, kl_coef)

            with timed(timing, "compute_advantages"):
                # 5. Advantages and value targets: GAE whitened over the batch, or (critic-free)
                #    each response's reward against its group's (GRPO, RLOO; no value targets).
                batch.advantages, batch.returns = self._advantages(batch)

            with timed(timing, "optimize_step"):
                # 6. ppo_epochs passes over shuffled minibatches, one clipped update each.
                records, outcomes = self._train_on_minibatches(batch)

            # 7. Once per step, as trl: the KL controller, then the LR scheduler.
            self._end_step(kl)

        # 8. Statistics, global over processes, to the callbacks and the tracker.
        stats = self._step_stats(batch, raw_scores, kl, kl_coef, entropy, records, outcomes)
        stats |= timing
        self._report(batch, stats)
        return stats

    def _padded_batch(
        self, queries: Sequence[Tensor], responses: Sequence[Tensor]
    ) -> RolloutBuffer:
        pad = self.pad_token_id
        query_ids, query_mask = left_pad(list(queries), pad)  # (B, P)
        response_ids, response_mask = right_pad(list(responses), pad)  # (B, T)
        return RolloutBuffer(
            query_ids.to(self.device),
            query_mask.to(self.device),
            response_ids.to(self.device),
            response_mask.float().to(self.device),
        )

    def _forward(
        self, micro: RolloutBuffer, with_values: bool | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(b, t) log-probs, entropies (grad for the entropy bonus), values (None: as `uses_value_head`;
        critic-free estimators run no value head): `policy.response_logprobs`."""
        config = self.config
        with_values = config.uses_value_head if with_values is None else with_values
        with maybe_autocast(self.device.type, self.compute_dtype):
            return self.policy.response_logprobs(
                micro.input_ids,
                micro.attention_mask,
                micro.response_ids,
                temperature=config.temperature,
                with_values=with_values,
                entropy_grad=config.entropy_coef > 0,
            )

    @torch.no_grad()
    def _forward_in_micro_batches(
        self, batch: RolloutBuffer, with_values: bool, order: Tensor | None = None, reuse=False
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Log-probs, values (None without ``with_values``) and entropies, (B, T) each, 0 at padding, no
        gradient. The micro-batches are the first epoch's (or ``order``'s), so that the first update
        recomputes these very numbers: its probability ratio is exactly 1."""
        B, T = batch.response_ids.shape
        order = batch.epoch_order(0) if order is None else order
        logprobs = torch.zeros(B, T, device=self.device)
        values = torch.zeros(B, T, device=self.device)
        entropy = torch.zeros(B, T, device=self.device)
        for index in order.split(self.micro_batch_size):
            micro = batch.select(index)  # trimmed of all-padding columns
            if self.rollout_reuse is not None and reuse:  # the fast path (minippo/fast/reuse.py)
                outputs = self.rollout_reuse.rollout(self._forward, micro)
            else:
                outputs = self._forward(micro, with_values)
            micro_logprobs, micro_entropy, micro_values = outputs  # (b, t) each
            t = micro.response_ids.shape[1]
            logprobs[index, :t] = micro_logprobs
            entropy[index, :t] = micro_entropy
            if micro_values is not None:
                values[index, :t] = micro_values
        mask = batch.response_mask
        return logprobs * mask, (values * mask if with_values else None), entropy * mask

    def _rollout_forward(self, batch: RolloutBuffer) -> tuple[Tensor, Tensor, Tensor]:
        """(old log-probs, values, entropies), (B, T) each: the policy that sampled, adapters on; values
        None for a critic-free estimator (no value head runs)."""
        with_values = self.config.uses_value_head
        return self._forward_in_micro_batches(batch, with_values, reuse=True)

    def _reference_logprobs(self, batch: RolloutBuffer) -> Tensor | None:
        """(B, T) log-probs of the reference policy: the same model with its adapters disabled; None,
        without a forward, where no KL is used (`PPOConfig.uses_reference`)."""
        if not self.config.uses_reference:
            return None
        with disable_adapters(self.policy.model):
            logprobs, _, _ = self._forward_in_micro_batches(batch, with_values=False)
        return logprobs

    def _kl_penalised_rewards(self, batch: RolloutBuffer, kl_coef: float) -> tuple[Tensor, Tensor]:
        """(rewards, kl), (B, T) each: `core.kl_penalized_rewards`, then optionally whitened without a
        mean shift, with the statistics of all processes' rewards (``whiten_rewards``)."""
        config = self.config
        mask = batch.response_mask
        # without a reference (no KL used) the policy is its own reference: every KL is 0
        ref_logprobs = batch.old_logprobs if batch.ref_logprobs is None else batch.ref_logprobs
        rewards, kl = core.kl_penalized_rewards(
            batch.scores,
            batch.old_logprobs,
            ref_logprobs,
            mask,
            kl_coef,
            config.kl_penalty,
        )
        if config.whiten_rewards:
            moments = distributed.masked_moments(rewards, mask)
            rewards = core.masked_whiten(rewards, mask, shift_mean=False, moments=moments)
        return rewards, kl

    def _advantages(self, batch: RolloutBuffer) -> tuple[Tensor, Tensor | None]:
        """(advantages, returns), (B, T) each; the one place where the estimators differ
        (docs/estimators.md). "gae": GAE over the per-token rewards and the rollout's values, whitened
        with the statistics of the whole batch over all processes; returns are the value targets.
        "grpo", "rloo": each response's reward (its score minus its KL penalty, the per-token rewards
        summed) against the other samples of its prompt, at every token of the response; no returns."""
        config = self.config
        mask = batch.response_mask
        if config.advantage_estimator == "gae":
            advantages, returns = core.compute_gae(
                batch.values, batch.rewards, mask, config.gamma, config.lam
            )
            moments = distributed.masked_moments(advantages, mask)
            return core.masked_whiten(advantages, mask, moments=moments), returns
        sequence_rewards = batch.rewards.sum(1)  # (B,) score - kl_coef * KL of the response
        group = config.num_generations  # whole groups on every process: no exchange needed
        if config.advantage_estimator == "grpo":
            advantages = core.grpo_advantages(sequence_rewards, group, config.scale_rewards)
        else:
            advantages = core.rloo_advantages(sequence_rewards, group)
        return advantages[:, None] * mask, None  # (B, T)

    def _train_on_minibatches(self, batch: RolloutBuffer) -> tuple[list[dict], list[str]]:
        """``ppo_epochs`` passes over the batch, each in its shuffled order of minibatches: one clipped
        loss and optimiser update per minibatch. Returns each minibatch's stats and outcome ("update",
        "skip" or "stop": `_apply_update`), and calls the callbacks' ``on_minibatch``."""
        config = self.config
        records = []
        outcomes = []
        size = config.mini_batch_size // self.world_size  # this process's share of a minibatch
        for minibatch in batch.epochs(config.ppo_epochs, size):
            stats = self._clipped_loss_backward(minibatch)  # gradients into .grad
            outcome = self._apply_update(stats)
            records.append(stats)
            outcomes.append(outcome)
            for callback in self.callbacks:
                callback.on_minibatch(self, minibatch, stats)
            if outcome == "stop":
                break
        self.optimizer.zero_grad(set_to_none=True)
        return records, outcomes

    def _end_step(self, kl: Tensor) -> None:
        """The KL controller (the penalised KL, nats per sequence, mean over processes), the LR
        scheduler, the step counter."""
        mean_kl = distributed.all_reduce(kl.sum(1).mean(), "mean").item()
        self.kl_ctl.update(mean_kl, self.config.batch_size)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.current_step += 1

    def _report(self, batch: RolloutBuffer, stats: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_step_end(self, batch, stats)
        if self.tracker is not None:
            self.tracker.log(stats, self.current_step)

    @torch.no_grad()
    def response_logprobs(
        self,
        queries: Sequence[Tensor],
        responses: Sequence[Tensor],
        reference: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Log-probabilities (B, T) of each response token under the policy (``reference=True``: adapters
        off), 0 at padding, and the mask (B, T): step()'s forward, so ``(logp - ref_logp) * mask`` summed
        over T is the per-sequence KL sample that step() penalises (k1 estimator)."""
        batch = self._padded_batch(queries, responses)
        order = torch.arange(len(batch), device=self.device)
        with disable_adapters(self.policy.model) if reference else contextlib.nullcontext():
            logprobs, _, _ = self._forward_in_micro_batches(batch, with_values=False, order=order)
        return logprobs, batch.response_mask

    def _check_inputs(self, queries, responses, scores) -> Tensor:
        """Raise a ValueError naming the problem; return the scores as a (B,) float32 tensor."""
        if not isinstance(queries, (list, tuple)) or not isinstance(responses, (list, tuple)):
            raise ValueError(
                "queries and responses must be lists of 1-D token tensors (generate()'s output)"
            )
        try:
            listed = scores if isinstance(scores, Tensor) else [float(s) for s in scores]
            scores = torch.as_tensor(listed).detach().float().reshape(-1).cpu()
        except (TypeError, ValueError):
            raise ValueError(
                "scores must be a 1-D tensor or a list of numbers, one per sample"
            ) from None
        B = self.batch_size_per_rank
        if not len(queries) == len(responses) == len(scores):
            raise ValueError(
                f"got {len(queries)} queries, {len(responses)} responses and {len(scores)} scores; "
                "step() needs one of each per sample"
            )
        if len(queries) != B:
            share = f" / {self.world_size} processes = {B}" if self.world_size > 1 else ""
            raise ValueError(
                f"step() got {len(queries)} samples but PPOConfig.batch_size is {self.config.batch_size}"
                f"{share}; pass exactly that many samples (or set batch_size to match)"
            )
        for kind, seqs in (("query", queries), ("response", responses)):
            for i, s in enumerate(seqs):
                if not isinstance(s, Tensor) or s.dim() != 1 or s.is_floating_point():
                    got = f"{type(s).__name__}{tuple(getattr(s, 'shape', ()))}"
                    raise ValueError(f"{kind} {i} must be a 1-D tensor of token ids, got {got}")
                if len(s) == 0:
                    raise ValueError(
                        f"{kind} {i} is empty: queries and responses need at least one token"
                    )
                if self.vocab_size is not None and (
                    int(s.min()) < 0 or int(s.max()) >= self.vocab_size
                ):
                    raise ValueError(f"{kind} {i} has token ids outside [0, {self.vocab_size})")
        if not torch.isfinite(scores).all():
            bad = (~torch.isfinite(scores)).nonzero()[:, 0].tolist()
            raise ValueError(
                f"scores must be finite; samples {bad[:5]} are {scores[bad[:5]].tolist()}"
            )
        return scores

    def _normalise_scores(self, scores: Tensor) -> Tensor:
        """(B,) -> (B,): score_scale, then optionally trl's use_score_scaling (divide by the running std of
        all scores so far, this batch included), use_score_norm (also centre on the running mean), score_clip.
        OpenAI's reward gain and bias do it once, at the start. Ref: Ziegler et al. 2019, sec. 2.2.
        Note: no division until two distinct scores were seen (before, the std measures nothing), and
        the std is floored at SCORE_STD_FLOOR x the scores' running root-mean-square."""
        config = self.config
        scores = scores * config.score_scale
        if config.use_score_scaling:
            moments = self.score_moments
            mean, std = moments.update(distributed.all_gather(scores))  # every process's scores
            if config.use_score_norm:
                scores = scores - mean
            if moments.spread:
                scores = scores / max(std, SCORE_STD_FLOOR * (mean**2 + moments.var) ** 0.5)
        if config.score_clip is not None:
            scores = scores.clamp(-config.score_clip, config.score_clip)
        return scores

    def _apply_update(self, stats: dict[str, Tensor]) -> str:
        """Step the optimiser: "update"; or "skip" for a non-finite loss or gradient norm or a mean ratio
        above ratio_threshold (a loss spike, trl PR #488); or "stop" (early_stopping) if the policy KL >
        1.5 * target_kl, dropping the step's other epochs. A max over processes: all take the same branch."""
        config = self.config
        ratio = stats["policy/ratio"].item()
        stop = config.early_stopping and stats["policy/policykl"].item() > 1.5 * config.target_kl
        problem = None
        if not (torch.isfinite(stats["loss/total"]) and torch.isfinite(stats["grad_norm"])):
            problem = "non-finite loss or gradient norm"
        elif ratio > config.ratio_threshold:
            problem = f"mean ratio {ratio:.3g} > ratio_threshold {config.ratio_threshold:g}"
        flags = torch.tensor([int(stop), int(problem is not None)], device=self.device)
        stop, skip = distributed.all_reduce(flags, "max").tolist()
        if stop:
            return "stop"
        if skip:
            why = problem or "a guard on another process"
            logger.warning("PPO: %s; skipping this update, adapters unchanged", why)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return "skip" if skip else "update"

    def _clipped_loss_backward(self, minibatch: RolloutBuffer) -> dict[str, Tensor]:
        """Clipped policy loss (+ PPO's value loss, + GRPO's KL term), forward and backward in micro-batches,
        each weighted by its share of the minibatch (over all processes): of its tokens for loss_type
        "dapo", of its responses for "grpo" and "dr_grpo", so the summed gradients and stats are the whole
        minibatch's loss's. Gradients stay in .grad (clipped to max_grad_norm, not stepped); returns the
        stats."""
        config = self.config
        per_token = config.loss_type == "dapo"
        whole = minibatch.response_mask.sum() if per_token else float(len(minibatch))
        whole = distributed.all_reduce(torch.as_tensor(whole, device=self.device))
        aggregate = dict(loss_type=config.loss_type, max_len=config.max_new_tokens)
        totals: dict[str, Tensor] = {}
        for micro in minibatch.minibatches(self.micro_batch_size, shuffle=False):
            mask = micro.response_mask
            weight = (mask.sum() if per_token else len(micro)) / whole
            if self.rollout_reuse is not None:  # the fast path (minippo/fast/reuse.py)
                logprobs, entropy, values = self.rollout_reuse.update(self._forward, micro)
            else:
                logprobs, entropy, values = self._forward(micro)  # (b, t) each
            pg_loss, pg_stats = core.policy_loss(
                logprobs, micro.old_logprobs, micro.advantages, mask, config.cliprange, **aggregate
            )
            ent = core.masked_mean(entropy, mask)  # exact, per token
            loss = pg_loss - config.entropy_coef * ent
            named = {"loss/policy": pg_loss, "loss/entropy": ent}
            if config.uses_value_head:  # PPO's critic
                vf_loss, vf_stats = core.value_loss(
                    values, micro.values, micro.returns, mask, config.cliprange_value
                )
                loss = loss + config.vf_coef * vf_loss
                named |= {"loss/value": vf_loss} | {f"val/{k}": v for k, v in vf_stats.items()}
            if (
                config.beta > 0
            ):  # GRPO's KL in the loss: k3 per token, aggregated as the policy loss
                kl = core.kl_penalty(logprobs, micro.ref_logprobs, "k3")  # (b, t)
                kl_loss = core.aggregate_loss(kl, mask, **aggregate)
                loss = loss + config.beta * kl_loss
                named["loss/kl"] = kl_loss
            (loss * weight).backward()
            named["loss/total"] = loss
            named |= {f"policy/{k}": v for k, v in pg_stats.items()}
            for k, v in named.items():
                totals[k] = totals.get(k, 0.0) + v.detach() * weight
        # Sum the gradients over processes before clipping: clip the global gradient.
        distributed.all_reduce_grads(self.trainable, "sum")
        totals = dict(zip(totals, distributed.all_reduce(torch.stack(list(totals.values())))))
        max_norm = config.max_grad_norm or float("inf")
        totals["grad_norm"] = nn.utils.clip_grad_norm_(self.trainable, max_norm)
        return totals

    def _step_stats(
        self, buffer, raw_scores, kl, kl_coef, entropy, records, outcomes
    ) -> dict[str, float]:
        """The step's statistics as floats, named as in trl (and OpenAI's lm-human-preferences), global
        over processes. Two entropies, as trl: ``objective/entropy`` is the sampled responses' summed
        negative log-probability (nats per sequence), ``ppo/policy/entropy`` the exact one per token."""
        mask = buffer.response_mask
        raw_scores = distributed.all_gather(raw_scores.to(self.device))
        stats = {
            "objective/kl_coef": kl_coef,
            # per sequence, over the sampled tokens
            "objective/entropy": (-buffer.old_logprobs).sum(1).mean(),
            "objective/logprobs": buffer.old_logprobs.sum(1).mean(),
            "ppo/mean_scores": raw_scores.mean(),
            "ppo/learning_rate": self.optimizer.param_groups[0]["lr"],
            # per token, exact
            "ppo/policy/entropy": distributed.masked_moments(entropy, mask)[0],
            "ppo/updates": outcomes.count("update"),
            "ppo/skipped_updates": outcomes.count("skip"),
            "ppo/early_stopped": float("stop" in outcomes),
            "env/reward_mean": raw_scores.mean(),
            "env/reward_std": raw_scores.std() if len(raw_scores) > 1 else 0.0,
            "env/response_length": mask.sum(1).mean(),
        }
        if buffer.ref_logprobs is not None:  # KL measured (no reference forward: no KL to log)
            stats["objective/kl"] = kl.sum(1).mean()
            stats["objective/ref_logprobs"] = buffer.ref_logprobs.sum(1).mean()
            stats["ppo/mean_non_score_reward"] = (-kl_coef * kl).sum(1).mean()
        if buffer.returns is not None:  # PPO's value targets and values
            stats["ppo/returns/mean"], stats["ppo/returns/var"] = distributed.masked_moments(
                buffer.returns, mask
            )
            stats["ppo/val/mean"], stats["ppo/val/var"] = distributed.masked_moments(
                buffer.values, mask
            )
        for k in records[0]:  # per-minibatch records: mean over the step's minibatches
            stats[f"ppo/{k}"] = torch.stack([r[k] for r in records]).mean()
        values = torch.tensor(
            [float(v) for v in stats.values()], dtype=torch.float64, device=self.device
        )
        return dict(zip(stats, distributed.all_reduce(values, "mean").tolist()))

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> str:
        """Write a checkpoint from which `load` continues exactly (adapter in peft's layout, value head,
        optimiser, LR scheduler, every rank's generators, trainer state: step, KL coefficient, score
        moments, config); returns its path. Under torch.distributed it is a collective, called on every
        rank with the same folder: rank 0 writes, with all ranks' generators, while the others wait.
        Written by `fileio.atomic_directory`: a kill at any instant leaves this checkpoint or the
        previous one, and `load` finds it."""
        directory = os.path.abspath(os.fspath(directory))
        gathered = distributed.all_gather_object((directory, rng_state()))  # [(folder, generators)]
        folders = sorted({folder for folder, _ in gathered})
        if len(folders) > 1:
            raise ValueError(
                f"save() got {len(folders)} different folders on the {self.world_size} processes "
                f"({', '.join(folders)}): pass every process the same folder"
            )
        generators = [state for _, state in gathered]  # in rank order
        distributed.on_rank0(lambda: self._write_checkpoint(directory, generators))
        return directory

    def _write_checkpoint(self, directory: str, generators: list[dict]) -> None:
        with atomic_directory(directory) as tmp:
            self.policy.save_pretrained(tmp, value_head=self.config.uses_value_head)
            optimizer = self.optimizer.state_dict()
            write_binary(os.path.join(tmp, OPTIMIZER_STATE), lambda f: torch.save(optimizer, f))
            if self.lr_scheduler is not None:
                scheduler = self.lr_scheduler.state_dict()
                write_binary(os.path.join(tmp, SCHEDULER_STATE), lambda f: torch.save(scheduler, f))
            write_binary(os.path.join(tmp, RNG_STATE), lambda f: torch.save(generators, f))
            state = dict(
                step=self.current_step, kl_coef=self.kl_ctl.value, world_size=self.world_size
            )
            state["score_moments"] = self.score_moments.state_dict()
            state["config"] = dataclasses.asdict(self.config)
            write_json(os.path.join(tmp, TRAINER_STATE), state)

    def load(self, directory: str | os.PathLike) -> str:
        """Restore a checkpoint of `save`: training continues exactly; returns the folder read (``directory``,
        or its previous version where a save was killed mid-swap: `fileio.committed_directory`).

        1. Read and check every file: a damaged, truncated, foreign or incomplete checkpoint raises one
           ValueError naming the folder, and the trainer is left exactly as it was.
        2. Only then change the trainer: nothing is left that can fail.

        The config must equal this trainer's except in `RESUMABLE_CHANGES` (this trainer's value applies,
        with a warning; other differences raise a ValueError listing them), and the number of processes
        must be the saving run's: each rank restores its own generators. The learning rate is the
        configured one times the scheduler's factor."""
        folder = committed_directory(directory)
        if folder is None:
            raise ValueError(f"no checkpoint in {os.fspath(directory)}: the folder does not exist")
        with reading_checkpoint(folder):
            state = read_trainer_state(folder)
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"{folder} was saved by {state['world_size']} processes, and {self.world_size} load it: "
                "resume with the same number (each one's share of the batch and seed depend on it)"
            )
        check_config(
            state["config"], dataclasses.asdict(self.config), RESUMABLE_CHANGES, "PPO checkpoint"
        )
        if (self.lr_scheduler is None) == os.path.exists(os.path.join(folder, SCHEDULER_STATE)):
            raise ValueError(
                f"{folder} was saved {'with' if self.lr_scheduler is None else 'without'} an LR "
                "scheduler and this trainer has the other: make the trainer as the run that saved it"
            )
        with reading_checkpoint(folder):
            files = self._read_checkpoint(folder, state)
        self._restore(state, files)
        return folder

    def _read_checkpoint(self, folder: str, state: dict) -> dict:
        """Step 1 of `load`: every file read and checked against this trainer; nothing changes."""
        _, adapter = read_checked_adapter(self.policy.model, folder)
        value_head = None  # critic-free estimators train and save none
        if self.config.uses_value_head:
            value_head = load_file(os.path.join(folder, VALUE_HEAD_FILE))
            check_tensors(value_head, self.policy.value_head.state_dict(), VALUE_HEAD_FILE)
        optimizer = load_torch(folder, OPTIMIZER_STATE, self.device)
        check_optimizer_state(optimizer, self.optimizer)
        scheduler = None
        if self.lr_scheduler is not None:
            scheduler = load_torch(folder, SCHEDULER_STATE)
            if not isinstance(scheduler, dict) or set(scheduler) != set(
                self.lr_scheduler.state_dict()
            ):
                raise ValueError(f"{SCHEDULER_STATE} holds another LR scheduler's state")
        generators = own_rng_state(load_torch(folder, RNG_STATE), self.rank, self.world_size)
        moments = core.RunningMoments()
        moments.load_state_dict(state["score_moments"])
        return dict(
            adapter=adapter,
            value_head=value_head,
            optimizer=optimizer,
            scheduler=scheduler,
            generators=generators,
            moments=moments,
        )

    def _restore(self, state: dict, files: dict) -> None:
        """Step 2 of `load`: the checked state into the trainer."""
        copy_adapter(self.policy.model, files["adapter"])
        if files["value_head"] is not None:
            self.policy.value_head.load_state_dict(files["value_head"])
        configured = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(files["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(files["scheduler"])
            self.lr_scheduler.base_lrs = configured
        for group, lr in zip(self.optimizer.param_groups, configured):
            # the saved schedule's factor times the configured rate
            group["lr"] = group["lr"] * lr / group.get("initial_lr", group["lr"])
            group.update({"initial_lr": lr} if "initial_lr" in group else {})
        if files["generators"] is not None:
            set_rng_state(files["generators"])
        else:  # a checkpoint holding rank 0's generators only (minippo 0.2): the others draw their own
            torch.manual_seed(self.config.seed + self.rank + 7919 * state["step"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.score_moments = files["moments"]
        self.current_step = state["step"]


@contextlib.contextmanager
def reading_checkpoint(directory: str):
    """Turn any failure to read a checkpoint's files into one ValueError that names the folder."""
    try:
        yield
    except Exception as err:
        raise ValueError(
            f"checkpoint {directory} is incomplete, corrupt or not from this model ({type(err).__name__}: "
            f"{str(err)[:300]}); resume from another checkpoint, or start again"
        ) from err


def read_trainer_state(directory: str) -> dict:
    """``trainer_state.json`` of a checkpoint, with its fields checked (ValueError naming a missing or
    malformed one); ``world_size`` is 1 where absent (a checkpoint of minippo 0.1)."""
    with open(os.path.join(directory, TRAINER_STATE)) as f:
        state = json.load(f)
    if not isinstance(state, dict):
        raise ValueError(f"{TRAINER_STATE} holds a {type(state).__name__}, not an object")
    state = {"world_size": 1} | state
    fields = dict(step=int, kl_coef=(int, float), world_size=int, score_moments=dict, config=dict)
    if missing := [name for name in fields if name not in state]:
        raise ValueError(f"{TRAINER_STATE} lacks {', '.join(missing)}")
    for name, kind in fields.items():
        if not isinstance(state[name], kind) or isinstance(state[name], bool):
            raise ValueError(f"{TRAINER_STATE}: {name} is {state[name]!r}")
    moments = state["score_moments"]
    numbers = [moments.get(k) for k in ("mean", "var", "count")]
    if not all(isinstance(x, (int, float)) and x == x and abs(x) < float("inf") for x in numbers):
        raise ValueError(f"{TRAINER_STATE}: score_moments is {moments!r}")
    if state["step"] < 0 or state["world_size"] < 1 or not 0 <= state["kl_coef"] < float("inf"):
        raise ValueError(f"{TRAINER_STATE}: step, world_size or kl_coef out of range")
    return state


def check_tensors(tensors: dict[str, Tensor], expected: dict[str, Tensor], name: str) -> None:
    """Raise unless ``tensors`` has exactly the keys and shapes of ``expected`` (a state_dict)."""
    if set(tensors) != set(expected):
        raise ValueError(f"{name} has keys {sorted(tensors)}, this model {sorted(expected)}")
    for key, want in expected.items():
        if tensors[key].shape != want.shape:
            raise ValueError(
                f"{name}: size mismatch for {key}: {tuple(tensors[key].shape)} in the file, "
                f"{tuple(want.shape)} in this model"
            )


def check_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> None:
    """Raise unless ``optimizer.load_state_dict(state)`` fits: the same parameter groups, and for every
    parameter state tensors of its shape (torch itself checks the group sizes only)."""
    groups = state["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"{OPTIMIZER_STATE} has parameter groups of sizes {sizes}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in zip([i for g in groups for i in g["params"]], params):
        for key, value in state["state"].get(index, {}).items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(
                    f"{OPTIMIZER_STATE}: {key} of parameter {index} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )


def load_torch(directory: str | os.PathLike, name: str, device: torch.device | str = "cpu"):
    """``torch.load`` of ``directory/name`` onto ``device``, tensors and containers only (weights_only)."""
    return torch.load(os.path.join(directory, name), map_location=device, weights_only=True)


def rng_state() -> dict:
    """This process's generators: torch's CPU one, Python's `random`, every CUDA device's (minippo draws
    from no other: numpy's global generator is neither used nor saved)."""
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"torch": torch.get_rng_state(), "python": random.getstate()} | cuda


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def own_rng_state(saved, rank: int, world_size: int) -> dict | None:
    """This rank's entry of a checkpoint's ``rng_state.pt`` (every rank's `rng_state`, in rank order),
    checked by setting it on spare generators. A single dict is rank 0's alone (minippo 0.2): None on
    the other ranks."""
    if isinstance(saved, dict):
        saved = [saved] + [None] * (world_size - 1)
    if not isinstance(saved, (list, tuple)) or len(saved) != world_size:
        raise ValueError(f"{RNG_STATE} does not hold one state per process ({world_size})")
    state = saved[rank]
    if state is not None:
        torch.Generator().set_state(state["torch"])
        random.Random().setstate(state["python"])
        cuda = state.get("cuda", []) if torch.cuda.is_available() else []
        if cuda and len(cuda) != torch.cuda.device_count():
            raise ValueError(
                f"{RNG_STATE} holds {len(cuda)} CUDA generators, this machine has more or less"
            )
        for device, cuda_state in enumerate(cuda):
            torch.Generator(f"cuda:{device}").set_state(cuda_state)
    return state


def check_config(saved: dict, current: dict, allowed: Sequence[str], what: str) -> None:
    """Compare a checkpoint's config with the current one (both as ``dataclasses.asdict``): raise a
    ValueError listing the differing fields not in ``allowed``; warn about those in it. A field newer
    than the checkpoint (absent from it) is taken as unchanged, so checkpoints outlive new options."""
    current = json.loads(json.dumps(current))  # tuples -> lists, as the saved JSON has them
    diffs = {k: (saved[k], v) for k, v in current.items() if saved.get(k, v) != v}
    lines = {k: f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in diffs.items()}
    if refused := [line for k, line in lines.items() if k not in allowed]:
        raise ValueError(
            f"{what} was saved with another config; resuming would not continue that run:\n  "
            + "\n  ".join(refused)
            + f"\nUse the checkpoint's values (only {', '.join(allowed)} may change)."
        )
    if lines:
        changed = "; ".join(lines.values())
        logger.warning(
            "%s: resuming with changed settings (the new values apply): %s", what, changed
        )


@contextlib.contextmanager
def timed(timing: dict[str, float], name: str):
    """Record the wall time of the block as ``timing["time/ppo/<name>"]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[f"time/ppo/{name}"] = time.perf_counter() - start
