"""The policy: a causal LM (LoRA-adapted, possibly 8-bit) plus a value head (`PolicyWithValueHead`:
float32 logits and values in one forward), and batched sampling with a KV cache (``generate``).

Layout of a (query, response) batch, the one every forward here uses:
    input_ids (B, L) = [pad ... pad, query tokens | response tokens, pad ... pad],  L = P + T
i.e. queries left-padded to P and responses right-padded to T, so every response starts at column P
and the logits that predict response tokens are those at columns P-1 .. L-2. Masks always come from
lengths, never from comparing token ids with the pad id, so the pad id may equal EOS without harm."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import compat
from .adapter_files import load_adapter, save_adapter
from .core import entropy_from_logits, logprobs_from_logits
from .fileio import atomic_write

VALUE_HEAD_FILE = "value_head.safetensors"


# -- padding ------------------------------------------------------------------------------------
def right_pad(seqs: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack 1-D token tensors into (B, T) ids and mask, padding on the right."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def left_pad(seqs: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack 1-D token tensors into (B, P) ids and mask, padding on the left (right_pad, mirrored)."""
    ids, mask = right_pad([s.flip(0) for s in seqs], pad_id)
    return ids.flip(1), mask.flip(1)  # (B, P)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens: (B, L) mask -> (B, L) ids, 0 on left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# -- value head ---------------------------------------------------------------------------------
class ValueHead(nn.Module):
    """A scalar value per position: Linear(H, 1) over the last hidden state, computed in float32.

    Dropout is off by default: with it on, the rollout's and the first PPO minibatch's log-probabilities
    differ and the first ratio is no longer 1 (trl issue #454). The weight starts at zero unless
    ``init_std > 0`` (the bias always does), so every value starts at 0 and the first value-loss
    gradients do not disturb the LM (Huang et al., "value head zero init")."""

    def __init__(self, hidden_size: int, dropout: float = 0.0, init_std: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        weight = self.summary.weight
        nn.init.normal_(weight, std=init_std) if init_std > 0 else nn.init.zeros_(weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states -> (B, T) float32 values (autocast off: always float32)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.summary(self.dropout(hidden.float())).squeeze(-1)


def save_value_head(value_head: ValueHead, directory: str | os.PathLike) -> None:
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}
    atomic_write(os.path.join(directory, VALUE_HEAD_FILE), lambda path: save_file(state, path))


def load_value_head(value_head: ValueHead, directory: str | os.PathLike) -> None:
    """Load ``directory/value_head.safetensors`` into ``value_head`` (in place, strict)."""
    path = os.path.join(directory, VALUE_HEAD_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no value head in {directory}: expected {VALUE_HEAD_FILE}")
    value_head.load_state_dict(load_file(path, device=str(value_head.summary.weight.device)))


# -- generation output --------------------------------------------------------------------------
@dataclass
class Generation:
    """The result of `PolicyWithValueHead.generate`: query_ids, query_mask (B, P) left-padded;
    response_ids, response_mask (B, T) right-padded (an EOS that stopped a response is part of it: an
    action the policy took); logprobs (B, T) of the sampled tokens (temperature applied), 0 at padding."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor

    def queries(self) -> list[torch.Tensor]:
        """The prompts as a list of 1-D tensors without padding."""
        return [ids[m.bool()] for ids, m in zip(self.query_ids, self.query_mask)]

    def responses(self) -> list[torch.Tensor]:
        """The responses as a list of 1-D tensors without padding."""
        return [ids[m.bool()] for ids, m in zip(self.response_ids, self.response_mask)]


# -- the policy ---------------------------------------------------------------------------------
class PolicyWithValueHead(nn.Module):
    """A causal LM (LoRA-adapted, possibly k-bit) and a value head on its last hidden state.

    ``forward`` runs the backbone once; with ``response_length=T`` only the T positions that predict the
    last T tokens go through the LM head. The reference is this module, adapters disabled. The LM head runs
    in its weights' dtype even under autocast (bf16 logits would put noise on every log-probability), with
    Cohere's, Granite's and Gemma2's logit scales and softcap; `check_logits` checks at wrap time that the
    logits are the model's own. ``gradient_checkpointing`` recomputes each decoder layer in backward when
    gradients are on (transformers' own acts only in train mode; PPO runs in eval mode, dropout off)."""

    def __init__(
        self, model: nn.Module, value_head: ValueHead | None = None, value_head_dropout: float = 0.0
    ):
        super().__init__()
        self.model = model
        config = model.config.get_text_config()
        if value_head is None:
            value_head = ValueHead(config.hidden_size, dropout=value_head_dropout)
        self.value_head = value_head.to(self.device)
        self._cache_arg = compat.kv_cache_arg(self.backbone)
        # logits = softcap(lm_head(h) * logit_scale / logits_scaling), as those models' forwards
        scale, divisor = (
            getattr(config, "logit_scale", None),
            getattr(config, "logits_scaling", None),
        )
        self._logit_scale = (scale or 1.0) / (divisor or 1.0)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._checkpointing = False
        self.check_logits()

    @property
    def backbone(self) -> nn.Module:
        """The transformer without its LM head (``model.model``, ``model.transformer``, ...)."""
        return self.model.base_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits_from_hidden(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(B, T, H) hidden states -> (B, T, V) float32 logits, as the model computes them, / temperature."""
        weight = self.lm_head.weight
        with torch.autocast(hidden.device.type, enabled=False):
            dtype = weight.dtype if weight.is_floating_point() else hidden.dtype
            # contiguous: a strided (sliced) 3-D input sends nn.Linear down a slower bmm path
            logits = self.lm_head(hidden.to(dtype).contiguous()).float()  # (B, T, V)
        if self._logit_scale != 1.0:
            logits = logits * self._logit_scale
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits if temperature == 1.0 else logits / temperature

    @torch.no_grad()
    def check_logits(self, rtol: float = 1e-2) -> None:
        """Raise a ValueError unless this policy's logits equal ``model(ids).logits`` on a probe batch
        (up to ``rtol`` of their largest magnitude: bf16 models round differently)."""
        vocab = self.lm_head.weight.shape[0]
        ids = (torch.arange(16, device=self.device) * 7919 % vocab).view(2, 8)  # (2, 8)
        mask = torch.ones_like(ids)
        training = self.model.training
        self.model.eval()
        try:
            theirs = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            hidden = self._response_hidden(ids, mask, None)  # (2, 8, H), `forward`'s
            ours = self.logits_from_hidden(hidden)  # (2, 8, V)
            self.fused_head = self._fused_head_agrees(hidden, ids, ours)
        finally:
            self.model.train(training)
        error = (ours - theirs).abs().max().item()
        scale = theirs.abs().max().item()
        if not error <= rtol * scale + 1e-5:
            raise ValueError(
                f"{type(self.model).__name__}'s logits differ from minippo's (max |diff| {error:.3g}, max "
                f"|logit| {scale:.3g}): its forward post-processes them in a way minippo does not know, so "
                "PPO would train another distribution. Use a model whose logits are lm_head(hidden)."
            )

    def _fused_head_agrees(self, hidden: Tensor, ids: Tensor, logits: Tensor) -> bool:
        """Whether the LM head offers ``logprobs_and_entropy`` (`minippo.fast`'s head) and it gives this
        policy's log-probs on the probe batch (a hook that changes the head's output makes it disagree)."""
        fused = getattr(self.lm_head, "logprobs_and_entropy", None)
        if fused is None or self._softcap:
            return False
        with torch.autocast(hidden.device.type, enabled=False):
            logp = fused(hidden[:, :-1], ids[:, 1:], self._logit_scale)[0]  # (2, 7)
        error = logp - logprobs_from_logits(logits[:, :-1], ids[:, 1:])
        return error.abs().max().item() < 1e-3

    @property
    def gradient_checkpointing(self) -> bool:
        return self._checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        layers = self.decoder_layers()
        if on and layers is None:
            raise ValueError(
                f"gradient checkpointing: no decoder layers in {type(self.model).__name__}"
            )
        for layer in layers or []:
            layer.__dict__.pop("forward", None)  # back to the class's forward
            if on:
                layer.forward = functools.partial(_checkpointed, layer.forward)
        self._checkpointing = bool(on)

    def decoder_layers(self) -> nn.ModuleList | None:
        """The backbone's list of decoder layers (the ModuleList of num_hidden_layers blocks)."""
        n = self.model.config.get_text_config().num_hidden_layers
        lists = (m for m in self.backbone.modules() if isinstance(m, nn.ModuleList) and len(m) == n)
        return next(lists, None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_length: int | None = None,
        temperature: float = 1.0,
        with_values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float32 logits / ``temperature`` and values (None without ``with_values``) of a (B, L) batch:
        (B, T, V) and (B, T) at positions L-T-1 .. L-2 (t predicts response token t) with
        ``response_length=T``, else (B, L, V) and (B, L)."""
        hidden = self._response_hidden(input_ids, attention_mask, response_length)
        values = self.value_head(hidden) if with_values else None
        return self.logits_from_hidden(hidden, temperature), values

    def response_logprobs(
        self,
        input_ids,
        attention_mask,
        response_ids,
        temperature=1.0,
        with_values=True,
        entropy_grad=False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Log-probs and entropies (B, T) of the T response tokens that end a (B, L) batch, as `forward`'s
        logits give them, and values (None without ``with_values``); the entropy without gradient unless
        ``entropy_grad``. An LM head that offers ``logprobs_and_entropy`` (`minippo.fast`'s; `check_logits`
        sets ``fused_head`` where it agrees with the logits) computes both from the hidden states without
        keeping the logits, where it can: no gradient for the head's weight or the entropy."""
        hidden = self._response_hidden(input_ids, attention_mask, response_ids.shape[1])
        values = self.value_head(hidden) if with_values else None
        head = self.lm_head
        head_grad = torch.is_grad_enabled() and head.weight.requires_grad
        if self.fused_head and not (entropy_grad or head_grad):
            scale = self._logit_scale / temperature
            with torch.autocast(hidden.device.type, enabled=False):
                logprobs, entropy = head.logprobs_and_entropy(hidden, response_ids, scale)
            return logprobs, entropy, values
        logits = self.logits_from_hidden(hidden, temperature)  # (B, T, V)
        # the plain functions, or the LM head's own forms of them (`minippo.fast`'s: in row blocks)
        logprobs_of = getattr(head, "logprobs_from_logits", logprobs_from_logits)
        entropy_of = getattr(head, "entropy_from_logits", entropy_from_logits)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_of(logits)
        return logprobs_of(logits, response_ids), entropy, values

    def _response_hidden(self, input_ids, attention_mask, response_length):
        """The last hidden state (B, L, H), or (B, T, H) at the positions that predict the last T tokens."""
        hidden, _ = self._hidden(input_ids, attention_mask, position_ids_from_mask(attention_mask))
        return hidden if response_length is None else hidden[:, -response_length - 1 : -1]

    def _hidden(self, ids, mask, pos, use_cache=False, cache=None):
        """The backbone's last hidden state (B, L, H) and, with ``use_cache``, its updated KV cache."""
        kv = {self._cache_arg: cache} if use_cache else {}
        out = self.backbone(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache, **kv
        )
        return out.last_hidden_state, getattr(out, self._cache_arg) if use_cache else None

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        queries: list[torch.Tensor],
        *,
        pad_token_id: int,
        eos_token_id: int | None = None,
        min_new_tokens: int = 4,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        stop_at_eos: bool = False,
        batch_size: int | None = None,
    ) -> Generation:
        """Sample one response per query (1-D token tensors), ``batch_size`` at once, with a KV cache: lengths
        uniform in ``[min_new_tokens, max_new_tokens]``, tokens from ``softmax(logits / temperature)`` over
        the whole vocabulary (top_k 0, top_p 1: PPO's log-probs are this distribution's); with ``stop_at_eos``
        up to and including the first EOS. Torch's global generator; returns a CPU `Generation`."""
        queries = [torch.as_tensor(q) for q in queries]
        vocab = self.lm_head.weight.shape[0]
        if not queries or any(
            q.dim() != 1 or not len(q) or q.min() < 0 or q.max() >= vocab for q in queries
        ):
            raise ValueError(
                f"generate() needs queries: non-empty 1-D tensors or lists of ids < {vocab}"
            )
        lo, hi = min_new_tokens, max_new_tokens
        if not 1 <= lo <= hi:
            raise ValueError(f"need 1 <= min_new_tokens <= max_new_tokens, got {lo}, {hi}")
        if stop_at_eos and eos_token_id is None:
            raise ValueError("stop_at_eos=True needs an eos_token_id")
        lengths = torch.randint(lo, hi + 1, (len(queries),))
        n = batch_size or len(queries)
        eos = eos_token_id if stop_at_eos else None
        chunks = [(queries[i : i + n], lengths[i : i + n]) for i in range(0, len(queries), n)]
        parts = [self._sample(q, k, pad_token_id, eos, temperature) for q, k in chunks]
        if len(parts) == 1:
            return parts[0]  # else re-pad the chunks to common widths
        query_ids, query_mask = left_pad([q for p in parts for q in p.queries()], pad_token_id)
        response_ids, response_mask = right_pad(
            [r for p in parts for r in p.responses()], pad_token_id
        )
        T = response_ids.shape[1]
        logprobs = torch.cat(
            [nn.functional.pad(p.logprobs, (0, T - p.logprobs.shape[1])) for p in parts]
        )
        return Generation(query_ids, query_mask, response_ids, response_mask, logprobs)

    def _sample(self, queries, lengths, pad_token_id, eos_token_id, temperature) -> Generation:
        """One batch of `generate`: prefill the prompts, then one cached forward per new token."""
        device = self.device
        # a token per row from probabilities (B, V): torch.multinomial, or the LM head's own sampler
        sample = getattr(self.lm_head, "sample", _multinomial)
        query_ids, query_mask = left_pad(queries, pad_token_id)  # (B, P)
        B = len(queries)
        T = int(lengths.max())
        lengths = lengths.to(device)
        tokens = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)  # (B, T)
        logprobs = torch.zeros((B, T), device=device)  # (B, T)
        finished = torch.zeros(B, dtype=torch.bool, device=device)  # stopped at EOS
        attention_mask = query_mask.to(device)  # (B, P + t), grows by one column per step
        position_ids = position_ids_from_mask(attention_mask)  # (B, P) for the prefill
        step_ids = query_ids.to(device)
        cache = None
        for t in range(T):
            hidden, cache = self._hidden(
                step_ids, attention_mask, position_ids, use_cache=True, cache=cache
            )
            logits = self.logits_from_hidden(hidden[:, -1:], temperature)[:, 0]  # (B, V)
            logp_all = torch.log_softmax(logits, dim=-1)  # (B, V)
            next_token = sample(logp_all.exp())  # (B,)
            alive = ~finished & (t < lengths)
            tokens[:, t] = torch.where(alive, next_token, pad_token_id)
            logprobs[:, t] = torch.where(alive, logp_all.gather(1, next_token[:, None])[:, 0], 0.0)
            if eos_token_id is not None:
                finished |= alive & (next_token == eos_token_id)
                if finished.all():
                    break
            if t + 1 < T:  # feed the new token (next step's input)
                step_ids = tokens[:, t : t + 1]
                position_ids = position_ids[:, -1:] + 1  # (B, 1)
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        ends = lengths  # (B,) a response ends at its sampled length, or just after its first EOS
        if eos_token_id is not None:
            is_eos = tokens == eos_token_id
            ends = torch.minimum(ends, torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, T))
        mask = (torch.arange(T, device=device)[None, :] < ends[:, None]).long()  # (B, T)
        tokens = tokens.masked_fill(mask == 0, pad_token_id)
        return Generation(query_ids, query_mask, tokens.cpu(), mask.cpu(), (logprobs * mask).cpu())

    # -- files ----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, value_head: bool = True) -> None:
        """Write the LoRA adapter (peft layout) and, unless ``value_head=False`` (a critic-free trainer's),
        ``value_head.safetensors`` into ``directory``."""
        save_adapter(self.model, directory)
        if value_head:
            save_value_head(self.value_head, directory)

    def load_pretrained(self, directory: str | os.PathLike, value_head: bool = True) -> None:
        """Load an adapter and (``value_head=True``) value head written by `save_pretrained` (in place)."""
        load_adapter(self.model, directory)
        if value_head:
            load_value_head(self.value_head, directory)


def _multinomial(probs: Tensor) -> Tensor:
    """One token per row drawn from probabilities (B, V) -> (B,)."""
    return torch.multinomial(probs, 1)[:, 0]


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def maybe_autocast(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    on = dtype not in (None, torch.float32)
    return torch.autocast(device_type, dtype=dtype if on else torch.bfloat16, enabled=on)
