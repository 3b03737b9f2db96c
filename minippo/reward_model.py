"""A pairwise reward model on the policy's own base: a reward adapter and a score head (`RewardModel`).

score(text) = w . h + b, with h (H,) the last hidden state at the text's last real token, computed by the
base with only the reward adapter on (`use_adapter`).  It is trained on pairs of texts, one preferred, by
`core.bradley_terry_loss`.  The same class scores on a model of its own or on the policy's model, where
the reward adapter is a second named adapter beside the policy's: one copy of the k-bit weights then
serves the policy (its adapter), the reference (adapters off), the value head and the reward.
Ref: Ouyang et al. 2022, arXiv:2203.02155, section 3.5; trl's RewardTrainer and multi-adapter RL.

A reward folder holds `reward_model.json`, `score_head.safetensors` and the adapter in peft's layout for a
named adapter (`<folder>/<adapter name>/adapter_config.json`, `adapter_model.safetensors`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_files import load_adapter, save_adapter
from .fileio import atomic_write, write_json
from .lora import adapter_names, adapter_parameters, use_adapter
from .policy import position_ids_from_mask, right_pad

REWARD_MODEL_TYPE = "minippo-pairwise-reward"
REWARD_MODEL_FILE = "reward_model.json"
SCORE_HEAD_FILE = "score_head.safetensors"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask -> (B,) column of each row's last real token, for left or right padding."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (L,)
    return (columns * attention_mask.long()).argmax(-1)


class ScoreHead(nn.Module):
    """One scalar per text: Linear(H, 1) on the hidden state of its last real token, in float32."""

    def __init__(self, hidden_size: int, device: torch.device | str | None = None):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32, device=device)
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) hidden states, (B, L) mask -> (B,) float32 scores."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]  # (B, H)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.summary(last.float()).squeeze(-1)


class RewardModel(nn.Module):
    """A causal LM's backbone with the reward adapter `adapter_name` on, and a `ScoreHead`.

    ``model`` may carry other adapters (the policy's): every forward here runs under
    ``use_adapter(model, adapter_name)``, which restores their flags afterwards.  ``tokenizer`` turns texts
    into ids for `score` (right padding, at most ``max_length`` tokens)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        adapter_name: str = "reward",
        score_head: ScoreHead | None = None,
        max_length: int = 512,
    ):
        super().__init__()
        if adapter_name not in adapter_names(model):
            raise ValueError(
                f"the model has no adapter named {adapter_name!r} (its adapters: "
                f"{adapter_names(model)}): add_lora(model, config, adapter_name={adapter_name!r}) first"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.adapter_name = adapter_name
        self.max_length = max_length
        hidden_size = model.config.get_text_config().hidden_size
        device = next(model.parameters()).device
        self.score_head = score_head or ScoreHead(hidden_size, device=device)

    @property
    def device(self) -> torch.device:
        return self.score_head.summary.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask (left or right padded) -> (B,) float32 scores, reward adapter on."""
        position_ids = position_ids_from_mask(attention_mask)  # (B, L)
        with use_adapter(self.model, self.adapter_name):
            out = self.model.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        return self.score_head(out.last_hidden_state, attention_mask)  # (B,)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> {"input_ids", "attention_mask"} (B, L) on this model's device, right-padded."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        tok = self.tokenizer
        ids = tok(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids, attention_mask = right_pad([torch.tensor(i, dtype=torch.long) for i in ids], pad)
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
        }

    @torch.no_grad()
    def score(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Scores (B,) float32 on the CPU, ``batch_size`` texts per forward, in eval mode."""
        training = self.model.training
        self.model.eval()
        try:
            scores = [
                self(**self.tokenize(texts[i : i + batch_size])).cpu()
                for i in range(0, len(texts), batch_size)
            ]
        finally:
            self.model.train(training)
        return torch.cat(scores) if scores else torch.zeros(0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The reward adapter's A and B matrices and the score head: what training the reward updates."""
        return adapter_parameters(self.model, self.adapter_name) + list(
            self.score_head.parameters()
        )

    # -- files ----------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, metadata: dict | None = None) -> str:
        """Write the reward adapter (peft's named layout), `score_head.safetensors` and
        `reward_model.json` (with ``metadata``) into ``directory``; returns it."""
        directory = os.fspath(directory)
        save_adapter(self.model, directory, adapter_name=self.adapter_name)
        state = {k: v.detach().cpu().contiguous() for k, v in self.score_head.state_dict().items()}
        atomic_write(os.path.join(directory, SCORE_HEAD_FILE), lambda path: save_file(state, path))
        config = {
            "type": REWARD_MODEL_TYPE,
            "adapter_name": self.adapter_name,
            "max_length": self.max_length,
            "hidden_size": self.score_head.summary.in_features,
            **(metadata or {}),
        }
        write_json(os.path.join(directory, REWARD_MODEL_FILE), config)
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike, model: nn.Module, tokenizer, check_base: bool = True
    ) -> RewardModel:
        """The reward model saved in ``directory``, on ``model``: its adapter is added to the model's
        (frozen, inactive outside `use_adapter`), its score head loaded (frozen)."""
        config = read_reward_config(directory)
        name = config["adapter_name"]
        load_adapter(model, directory, check_base=check_base, adapter_name=name)
        for p in adapter_parameters(model, name):
            p.requires_grad_(False)
        reward = cls(model, tokenizer, adapter_name=name, max_length=config["max_length"])
        path = os.path.join(os.fspath(directory), SCORE_HEAD_FILE)
        reward.score_head.load_state_dict(load_file(path, device=str(reward.device)))
        reward.score_head.requires_grad_(False)
        return reward


def read_reward_config(directory: str | os.PathLike) -> dict:
    """`reward_model.json` of a reward folder; FileNotFoundError / ValueError saying what is missing."""
    directory = os.fspath(directory)
    path = os.path.join(directory, REWARD_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {REWARD_MODEL_FILE} in {directory}: not a pairwise reward model"
        )
    with open(path) as f:
        config = json.load(f)
    if config.get("type") != REWARD_MODEL_TYPE:
        raise ValueError(f"{path}: type {config.get('type')!r} is not {REWARD_MODEL_TYPE!r}")
    if not os.path.isfile(os.path.join(directory, SCORE_HEAD_FILE)):
        raise FileNotFoundError(f"{directory} has {REWARD_MODEL_FILE} but no {SCORE_HEAD_FILE}")
    return config
