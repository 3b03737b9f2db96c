"""PPO for language models: `PPOConfig` and `PPOTrainer` (``generate``, ``step``, ``save``, ``load``).

A training loop is: prompts -> ``trainer.generate`` -> score the responses -> ``trainer.step``.
``step`` is written as numbered steps, each a call to a tested function of `minippo.core`;
docs/ppo_step.md walks through it. The trainable parameters are the LoRA adapters and the value
head; the reference policy is the same model with its adapters disabled (no second model).

Refs: Schulman et al. 2017 (PPO, arXiv:1707.06347); Ziegler et al. 2019 (PPO for LMs with a KL
penalty, arXiv:1909.08593); trl v0.4.7's PPOTrainer (names, defaults, stats).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .checks import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    UNIT_INTERVAL,
    check,
    check_device,
    check_fields,
    one_of,
    optional,
)
from .core import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    kl_penalized_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)
from .fileio import atomic_directory
from .lora import disable_adapters, lora_layers
from .policy import PolicyWithValueHead, left_pad, maybe_autocast, right_pad
from .quant import resolve_dtype
from .rollout import RolloutBuffer

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


@dataclass
class PPOConfig:
    """PPO settings. Names and defaults follow trl v0.4.7 (the blog era) where trl has the setting."""

    learning_rate: float = 1.41e-5
    """Adam(W) learning rate for the LoRA adapters and the value head (trl's examples: 1.41e-5)."""
    batch_size: int = 256
    """samples per PPO step: step() takes exactly this many (query, response, score) triples."""
    mini_batch_size: int = 16
    """samples per optimiser update; must divide batch_size (trl 0.4 default 1; its 20B example 16)."""
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
    kl_penalty: str = "kl"
    """KL estimator, penalised and logged: "kl" (= "k1", logp - ref), "abs", "mse", "k3" (never < 0)."""
    whiten_rewards: bool = False
    """scale the per-token rewards to unit variance over the batch (no mean shift) before GAE."""
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
    score_clip: float | None = None
    """clip scaled scores to [-score_clip, score_clip] (None: no clipping)."""
    weight_decay: float = 0.0
    """AdamW weight decay (0: plain Adam, as trl)."""
    generation_batch_size: int | None = None
    """queries sampled at once by generate() (None: all of them in one batch)."""
    compute_dtype: str = "float32"
    """matmul dtype: "float32", or "bfloat16" (autocast; stored weights, logits, values and Adam are
    unchanged). With 8-bit layers on a CPU keep float32: under autocast bitsandbytes' int8 path runs
    float16 element-wise work that CPUs do much more slowly (benchmarks/RESULTS.md)."""
    device: str | None = None
    """device to train on, e.g. "cuda" (None: wherever the model's parameters are)."""

    def __post_init__(self):
        check_fields(
            self,
            POSITIVE_INT,
            "batch_size",
            "mini_batch_size",
            "gradient_accumulation_steps",
            "ppo_epochs",
            "min_new_tokens",
            "max_new_tokens",
        )
        check(
            self,
            self.batch_size % self.mini_batch_size == 0,
            f"batch_size ({self.batch_size}) must be divisible by mini_batch_size ({self.mini_batch_size}); "
            f"e.g. set mini_batch_size to a divisor of {self.batch_size}",
        )
        check(
            self,
            self.mini_batch_size % self.gradient_accumulation_steps == 0,
            f"mini_batch_size ({self.mini_batch_size}) must be divisible by gradient_accumulation_steps "
            f"({self.gradient_accumulation_steps})",
        )
        check(
            self,
            self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})",
        )
        positive = "learning_rate", "target", "horizon", "cliprange", "cliprange_value", "target_kl"
        check_fields(self, POSITIVE, *positive, "ratio_threshold", "temperature", "score_scale")
        check_fields(self, NON_NEGATIVE, "init_kl_coef", "vf_coef", "weight_decay")
        check_fields(self, UNIT_INTERVAL, "gamma", "lam")
        check_fields(self, one_of(*KL_ESTIMATORS), "kl_penalty")
        check_fields(self, optional(POSITIVE), "max_grad_norm", "score_clip")
        check_fields(self, optional(POSITIVE_INT), "generation_batch_size")
        matmul_dtype = (
            lambda d: resolve_dtype(d) in (torch.float32, torch.bfloat16, torch.float16),
            "float32, bfloat16 or float16",
        )
        check_fields(self, matmul_dtype, "compute_dtype")
        check_device(self)

    @property
    def micro_batch_size(self) -> int:
        """Samples per forward/backward pass: mini_batch_size / gradient_accumulation_steps."""
        return self.mini_batch_size // self.gradient_accumulation_steps


class PPOTrainer:
    """Trains a policy (LoRA adapters + value head) with PPO against a reference = adapters off.

    ``model``: a `PolicyWithValueHead`, or a causal LM with LoRA layers (``add_lora``) that is
    wrapped in one (value head dropout off, zero init). ``tokenizer`` (optional) supplies the pad and
    EOS ids; without a pad token the EOS id pads, which is harmless here because every mask is built
    from lengths, never by comparing ids with the pad id. ``optimizer`` defaults to AdamW over the
    trainable parameters only; ``lr_scheduler`` (optional) is stepped after every update.

    The policy is put in eval mode and kept there: PPO runs with dropout off, so the first minibatch
    of every step sees exactly the rollout policy (ratio 1).
    """

    def __init__(
        self,
        config: PPOConfig,
        model: PolicyWithValueHead | nn.Module,
        tokenizer=None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler=None,
    ):
        self.config = config
        policy = model if isinstance(model, PolicyWithValueHead) else PolicyWithValueHead(model)
        if not any(True for _ in lora_layers(policy.model)):
            raise ValueError(
                "the model has no LoRA layers: PPOTrainer trains adapters and takes the reference policy "
                "from the same model with its adapters disabled; call minippo.add_lora(model) first"
            )
        wanted = torch.device(config.device) if config.device is not None else None
        if wanted is not None and not (
            policy.device.type == wanted.type and wanted.index in (None, policy.device.index)
        ):
            policy.to(wanted)  # an 8-bit model should rather be loaded on its device (load_model(device=...))
        self.policy = policy.eval()
        self.device = policy.device
        self.compute_dtype = resolve_dtype(config.compute_dtype)
        policy.value_head.requires_grad_(True)
        self.trainable = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = optimizer or torch.optim.AdamW(
            self.trainable, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.lr_scheduler = lr_scheduler
        self.kl_ctl = (
            AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
            if config.adap_kl_ctrl
            else FixedKLController(config.init_kl_coef)
        )
        self.pad_token_id, self.eos_token_id = self._special_ids(tokenizer, policy.model.config)
        self.vocab_size = policy.lm_head.out_features if hasattr(policy.lm_head, "out_features") else None
        self.current_step = 0
        torch.manual_seed(config.seed)

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

    def _autocast(self):
        return maybe_autocast(self.device.type, self.compute_dtype)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, queries: Sequence[torch.Tensor], return_generation: bool = False, **overrides):
        """Sample one response per query (1-D token tensors) with the current policy.

        Uses the config's temperature, min/max_new_tokens and stop_at_eos; keyword ``overrides``
        (``min_new_tokens``, ``max_new_tokens``, ``stop_at_eos``, ``batch_size``) replace them for this
        call (the temperature cannot be overridden: step() must score tokens with the same one).
        Returns the responses as a list of 1-D CPU tensors, or the `Generation` (padded ids, masks and
        sampling log-probs) with ``return_generation=True``.
        """
        allowed = {"min_new_tokens", "max_new_tokens", "stop_at_eos", "batch_size"}
        if set(overrides) - allowed:
            raise TypeError(
                f"generate() got unexpected settings {sorted(set(overrides) - allowed)}; "
                f"allowed: {sorted(allowed)} (the temperature comes from PPOConfig)"
            )
        settings = dict(
            min_new_tokens=self.config.min_new_tokens,
            max_new_tokens=self.config.max_new_tokens,
            stop_at_eos=self.config.stop_at_eos,
            batch_size=self.config.generation_batch_size,
        )
        settings.update(overrides)
        with self._autocast():
            generation = self.policy.generate(
                list(queries),
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_id,
                temperature=self.config.temperature,
                **settings,
            )
        return generation if return_generation else generation.responses()

    # -- the PPO step ---------------------------------------------------------------------------

    def step(
        self,
        queries: Sequence[torch.Tensor],
        responses: Sequence[torch.Tensor],
        scores: Sequence[float] | torch.Tensor,
    ) -> dict[str, float]:
        """One PPO step on ``batch_size`` samples: lists of 1-D token tensors and one score each.

        Returns the step's statistics (trl / OpenAI names: ``objective/kl``, ``ppo/policy/clipfrac``, ...).
        """
        config, timing, t_start = self.config, {}, time.perf_counter()
        raw_scores = self._check_inputs(queries, responses, scores)  # (B,)

        # 1. One padded batch: queries left-padded to P, responses right-padded to T. The first PPO
        #    epoch's sample order is drawn now: the rollout forward runs on the same micro-batches, so
        #    the first minibatch recomputes exactly the same numbers (ratio 1, whatever the kernels).
        batch = self._padded_batch(queries, responses)
        mask = batch.response_mask  # (B, T)
        first_order = torch.randperm(len(batch)).to(self.device)

        # 2. Rollout log-probs, values and entropy: the current policy, adapters on, no grad.
        t = time.perf_counter()
        old_logprobs, values, entropy = self._score_tokens(batch, first_order)
        # 3. Reference log-probs: the same model and inputs with the adapters disabled.
        with disable_adapters(self.policy.model):
            ref_logprobs, _, _ = self._score_tokens(batch, first_order, with_values=False)
        timing["time/ppo/forward_pass"] = time.perf_counter() - t

        # 4. KL-penalised per-token rewards, the score added at each response's last token.
        t = time.perf_counter()
        scores = self._scale_scores(raw_scores.to(self.device))  # (B,)
        kl_coef = self.kl_ctl.value
        rewards, kl = kl_penalized_rewards(
            scores, old_logprobs, ref_logprobs, mask, kl_coef, config.kl_penalty
        )
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        timing["time/ppo/compute_rewards"] = time.perf_counter() - t

        # 5. Advantages (GAE) and value targets; advantages whitened over the batch.
        t = time.perf_counter()
        advantages, returns = compute_gae(values, rewards, mask, config.gamma, config.lam)
        advantages = masked_whiten(advantages, mask)
        buffer = dataclasses.replace(
            batch,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            scores=scores,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
        )
        timing["time/ppo/compute_advantages"] = time.perf_counter() - t

        # 6. ppo_epochs passes over shuffled minibatches: clipped losses, gradient clipping, early stop.
        t = time.perf_counter()
        train_stats = self._optimize(buffer, first_order)
        timing["time/ppo/optimize_step"] = time.perf_counter() - t

        # 7. KL controller update, with the KL that was penalised (mean per-sequence sum).
        mean_kl = kl.sum(1).mean()
        self.kl_ctl.update(mean_kl.item(), len(buffer))
        self.current_step += 1

        # 8. Statistics.
        stats = self._step_stats(buffer, raw_scores, kl, kl_coef, entropy, train_stats)
        timing["time/ppo/total"] = time.perf_counter() - t_start
        stats.update(timing)
        return stats

    def _padded_batch(
        self, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor]
    ) -> RolloutBuffer:
        """Queries left-padded to (B, P), responses right-padded to (B, T), on the trainer's device."""
        query_ids, query_mask = left_pad(list(queries), self.pad_token_id)  # (B, P)
        response_ids, response_mask = right_pad(list(responses), self.pad_token_id)  # (B, T)
        return RolloutBuffer(
            query_ids.to(self.device),
            query_mask.to(self.device),
            response_ids.to(self.device),
            response_mask.to(self.device, torch.float32),
        )

    @torch.no_grad()
    def response_logprobs(
        self, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (B, T) of each response token under the policy, or with ``reference=True``
        under the reference model (adapters off), and the response mask (B, T); 0 at padding.

        The same forward as step() uses, so ``(logp - ref_logp) * mask`` summed over T is the
        per-sequence KL sample that step() penalises (k1 estimator).
        """
        batch = self._padded_batch(queries, responses)
        order = torch.arange(len(batch), device=self.device)
        switch = disable_adapters(self.policy.model) if reference else contextlib.nullcontext()
        with switch:
            logprobs, _, _ = self._score_tokens(batch, order, with_values=False)
        return logprobs, batch.response_mask

    def _check_inputs(self, queries, responses, scores) -> torch.Tensor:
        """Raise a ValueError naming the problem; return the scores as a (B,) float32 tensor."""
        if not isinstance(queries, (list, tuple)) or not isinstance(responses, (list, tuple)):
            raise ValueError(
                "queries and responses must be lists of 1-D token tensors (as generate() returns)"
            )
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().float().reshape(-1).cpu()
        else:
            try:
                scores = torch.tensor([float(s) for s in scores], dtype=torch.float32)
            except (TypeError, ValueError):
                raise ValueError("scores must be a 1-D tensor or a list of numbers, one per sample") from None
        B = self.config.batch_size
        if not len(queries) == len(responses) == len(scores):
            raise ValueError(
                f"got {len(queries)} queries, {len(responses)} responses and {len(scores)} scores; "
                "step() needs one of each per sample"
            )
        if len(queries) != B:
            raise ValueError(
                f"step() got {len(queries)} samples but PPOConfig.batch_size is {B}; pass exactly "
                "batch_size samples (or set batch_size to match)"
            )
        for kind, seqs in (("query", queries), ("response", responses)):
            for i, s in enumerate(seqs):
                if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.is_floating_point():
                    raise ValueError(
                        f"{kind} {i} must be a 1-D tensor of token ids, got "
                        f"{type(s).__name__}{tuple(getattr(s, 'shape', ()))}"
                    )
                if len(s) == 0:
                    raise ValueError(
                        f"{kind} {i} is empty; every query and response needs at least one token"
                    )
                if self.vocab_size is not None and (int(s.min()) < 0 or int(s.max()) >= self.vocab_size):
                    raise ValueError(f"{kind} {i} has token ids outside [0, {self.vocab_size})")
        if not torch.isfinite(scores).all():
            bad = (~torch.isfinite(scores)).nonzero()[:, 0].tolist()
            raise ValueError(f"scores must be finite; samples {bad[:5]} are {scores[bad[:5]].tolist()}")
        return scores

    def _scale_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """score_scale, then score_clip (both optional): (B,) -> (B,)."""
        scores = scores * self.config.score_scale
        if self.config.score_clip is not None:
            scores = scores.clamp(-self.config.score_clip, self.config.score_clip)
        return scores

    @torch.no_grad()
    def _score_tokens(self, batch: RolloutBuffer, order: torch.Tensor, with_values: bool = True):
        """Log-probs, values and entropies (each (B, T), 0 at padding) of the batch's responses,
        computed on the micro-batches that the first PPO epoch will use (``order`` split in chunks)."""
        B, T = batch.response_ids.shape
        logprobs, values, entropy = (torch.zeros(B, T, device=self.device) for _ in range(3))
        for index in order.split(self.config.micro_batch_size):
            micro = batch.select(index)  # trimmed of all-padding columns
            t = micro.response_ids.shape[1]
            with self._autocast():
                logits, v = self.policy(
                    micro.input_ids,
                    micro.attention_mask,
                    response_length=t,
                    temperature=self.config.temperature,
                    with_values=with_values,
                )  # (b, t, V)
            logprobs[index, :t] = logprobs_from_logits(logits, micro.response_ids)
            if with_values:
                values[index, :t] = v
                entropy[index, :t] = entropy_from_logits(logits)
        mask = batch.response_mask
        if not with_values:
            return logprobs * mask, None, None
        return logprobs * mask, values * mask, entropy * mask

    def _optimize(self, buffer: RolloutBuffer, first_order: torch.Tensor) -> dict[str, torch.Tensor]:
        """ppo_epochs x (batch_size / mini_batch_size) updates; returns per-update stats stacked.

        Epoch 0 visits the samples in ``first_order``, later epochs in fresh random orders.
        """
        config = self.config
        records, updates, skipped, early_stopped = [], 0, 0, False
        for epoch in range(config.ppo_epochs):
            order = first_order if epoch == 0 else None
            for minibatch in buffer.minibatches(config.mini_batch_size, shuffle=True, order=order):
                stats = self._train_minibatch(minibatch)
                records.append(stats)
                # Skip the update (and, for early stopping, the rest of the step) on a bad minibatch.
                if not bool(torch.isfinite(stats["loss/total"])):
                    logger.warning(
                        "PPO: non-finite loss (%s); skipping this update, adapters unchanged",
                        stats["loss/total"].item(),
                    )
                    skipped += 1
                elif stats["policy/ratio"].item() > config.ratio_threshold:
                    logger.warning(
                        "PPO: mean ratio %.3g > ratio_threshold %.3g; skipping this update",
                        stats["policy/ratio"].item(),
                        config.ratio_threshold,
                    )
                    skipped += 1
                elif config.early_stopping and stats["policy/policykl"].item() > 1.5 * config.target_kl:
                    early_stopped = True
                    break
                elif not bool(torch.isfinite(stats["grad_norm"])):
                    logger.warning("PPO: non-finite gradient norm; skipping this update, adapters unchanged")
                    skipped += 1
                else:
                    self.optimizer.step()
                    if self.lr_scheduler is not None:
                        self.lr_scheduler.step()
                    updates += 1
                self.optimizer.zero_grad(set_to_none=True)
            if early_stopped:
                break
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: torch.stack([r[k] for r in records]) for k in records[0]}
        out.update(
            updates=torch.tensor(float(updates)),
            skipped=torch.tensor(float(skipped)),
            early_stopped=torch.tensor(float(early_stopped)),
        )
        return out

    def _train_minibatch(self, minibatch: RolloutBuffer) -> dict[str, torch.Tensor]:
        """Forward + backward over the minibatch in micro-batches; gradients left in .grad (not stepped).

        Each micro-batch's loss is a masked mean over its own tokens; weighting it by its share of the
        minibatch's tokens makes the accumulated gradient that of the masked mean over the whole
        minibatch, whatever gradient_accumulation_steps is.
        """
        config = self.config
        n_tokens = minibatch.response_mask.sum()
        totals: dict[str, torch.Tensor] = {}
        for micro in minibatch.minibatches(config.micro_batch_size, shuffle=False):
            weight = micro.response_mask.sum() / n_tokens
            with self._autocast():
                logits, vpred = self.policy(
                    micro.input_ids,
                    micro.attention_mask,
                    response_length=micro.response_ids.shape[1],
                    temperature=config.temperature,
                )  # (b, T, V), (b, T)
            logprobs = logprobs_from_logits(logits, micro.response_ids)  # (b, T)
            pg_loss, pg_stats = policy_loss(
                logprobs, micro.old_logprobs, micro.advantages, micro.response_mask, config.cliprange
            )
            vf_loss, vf_stats = value_loss(
                vpred, micro.values, micro.returns, micro.response_mask, config.cliprange_value
            )
            loss = pg_loss + config.vf_coef * vf_loss
            (loss * weight).backward()
            micro_stats = {
                "loss/policy": pg_loss,
                "loss/value": vf_loss,
                "loss/total": loss,
                **{f"policy/{k}": v for k, v in pg_stats.items()},
                **{f"val/{k}": v for k, v in vf_stats.items()},
            }
            for k, v in micro_stats.items():
                totals[k] = totals.get(k, 0.0) + v.detach() * weight
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        return totals

    def _step_stats(self, buffer, raw_scores, kl, kl_coef, entropy, train) -> dict[str, float]:
        """The step's statistics as floats, named as in trl (and OpenAI's lm-human-preferences)."""
        mask = buffer.response_mask
        non_score_reward = -kl_coef * kl  # (B, T)
        stats = {
            "objective/kl": kl.sum(1).mean(),
            "objective/kl_coef": kl_coef,
            "objective/entropy": (-buffer.old_logprobs).sum(1).mean(),
            "objective/logprobs": buffer.old_logprobs.sum(1).mean(),
            "objective/ref_logprobs": buffer.ref_logprobs.sum(1).mean(),
            "ppo/mean_non_score_reward": non_score_reward.sum(1).mean(),
            "ppo/mean_scores": raw_scores.mean(),
            "ppo/learning_rate": self.optimizer.param_groups[0]["lr"],
            "ppo/policy/entropy": masked_mean(entropy, mask),
            "ppo/returns/mean": masked_mean(buffer.returns, mask),
            "ppo/returns/var": masked_var(buffer.returns, mask),
            "ppo/val/mean": masked_mean(buffer.values, mask),
            "ppo/val/var": masked_var(buffer.values, mask),
            "ppo/updates": train["updates"],
            "ppo/skipped_updates": train["skipped"],
            "ppo/early_stopped": train["early_stopped"],
            "env/reward_mean": raw_scores.mean(),
            "env/reward_std": raw_scores.std() if len(raw_scores) > 1 else 0.0,
            "env/response_length": mask.sum(1).mean(),
        }
        for k, v in train.items():
            if v.dim() == 1:  # per-minibatch records: mean over the step's minibatches
                stats[f"ppo/{k}"] = v.mean()
        return {k: float(v) for k, v in stats.items()}

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> str:
        """Write a checkpoint: adapter (peft layout), ``value_head.safetensors``, optimiser and trainer state.

        Everything is written into a temporary folder beside ``directory``, which then replaces it by
        renames: an interrupted save leaves the previous checkpoint intact (at worst, for the instant
        between the two renames, under ``<directory>.old-*``). Returns the directory.
        """
        with atomic_directory(directory) as tmp:
            self.policy.save_pretrained(tmp)
            torch.save(self.optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_STATE))
            state = {
                "step": self.current_step,
                "kl_coef": self.kl_ctl.value,
                "config": dataclasses.asdict(self.config),
            }
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                json.dump(state, f, indent=2)
        return os.path.abspath(os.fspath(directory))

    def load(self, directory: str | os.PathLike) -> None:
        """Restore a checkpoint written by `save` (adapter, value head, optimiser, KL coefficient, step)."""
        directory = os.fspath(directory)
        with open(os.path.join(directory, TRAINER_STATE)) as f:
            state = json.load(f)
        self.policy.load_pretrained(directory)
        optimizer_state = torch.load(
            os.path.join(directory, OPTIMIZER_STATE), map_location=self.device, weights_only=True
        )
        self.optimizer.load_state_dict(optimizer_state)
        self.kl_ctl.value = float(state["kl_coef"])
        self.current_step = int(state["step"])
