"""Tiny random causal LMs and a tiny tokenizer, built offline in a fraction of a second.

Used by the test fixtures (`conftest.py`) and by tests that need a model *folder* on disk
(the CLI end-to-end test): `save_tiny_model(dir, arch)` writes config, weights and tokenizer.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

# A small corpus so the tokenizer has real sub-words; enough for the tests' prompts.
CORPUS = [
    "This movie was great, I loved the acting and the story.",
    "This film was terrible, the plot made no sense at all.",
    "A wonderful, moving picture with a brilliant cast.",
    "Boring and too long. I would not watch it again.",
    "The best film of the year: funny, sharp and beautifully shot.",
    "Awful dialogue, bad acting, a waste of time and money.",
] * 4

HIDDEN = 32


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on CORPUS, with distinct pad / eos / bos tokens."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|endoftext|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>", bos_token="<|bos|>"
    )


def tiny_config(arch: str, vocab_size: int):
    """A 2-layer config of the given architecture ("gpt_neox", "llama" or "gpt2")."""
    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
    if arch == "llama":
        return LlamaConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def tiny_model(arch: str, vocab_size: int = 384, seed: int = 0):
    """A tiny random causal LM in eval mode (dropout off), fp32, on CPU."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size))
    return model.eval()


def save_tiny_model(path, arch: str = "llama", seed: int = 0) -> str:
    """Write a tiny model + tokenizer folder that `from_pretrained(path)` loads; returns the path."""
    tok = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def logits(model, batch):
    """The model's logits on a tokenised batch, without gradients."""
    with torch.no_grad():
        return model(**batch).logits


def randomise_adapters(model, seed=1, std=0.1):
    """Non-zero LoRA weights (B too) so the adapters change the outputs, as after training."""
    from minippo.lora import lora_state_dict

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def field_docs(cls) -> dict[str, str]:
    """Each dataclass field -> the docstring written under it (as tyro reads them)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: " ".join(nxt.value.value.split())
        for node, nxt in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign)
        and isinstance(nxt, ast.Expr)
        and isinstance(nxt.value, ast.Constant)
        and isinstance(nxt.value.value, str)
    }
