"""What the benchmarks share: the work spec, prompts, the reward, timing and memory probes, model sizes.

Imported by `_peer_step.py` (trl 0.4.7 stack in .venv-peer) and `_minippo_step.py` (.venv), so it
uses only the standard library and torch: same prompts, same reward, same measurement on both sides.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

# GPT-NeoX sizes of the benchmarks' random-weight models, by name: (hidden size, layers, attention
# heads, vocabulary); the MLP is 4x the hidden size.
NEOX_SIZES = {
    name: dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        vocab_size=vocab,
    )
    for name, (hidden, layers, heads, vocab) in {
        "neox-7m": (256, 4, 4, 8192),
        "neox-30m": (512, 6, 8, 8192),
        "neox-100m": (768, 11, 12, 16384),
        "neox-350m": (1024, 24, 16, 16384),
    }.items()
}


@dataclass
class Spec:
    """One worker run: the model, the PPO work per step, and how many steps to time."""

    model_dir: str
    """model folder (config.json + safetensors) that both stacks load; bench.json beside it."""
    batch_size: int = 16
    """samples per PPO step."""
    mini_batch_size: int = 4
    """samples per optimiser update (and per forward chunk in the peer)."""
    ppo_epochs: int = 4
    """passes over the batch per step."""
    prompt_len: int = 8
    """tokens per prompt (P), all the same length."""
    new_tokens: int = 24
    """tokens sampled per response (T), fixed length: top_k 0, top_p 1, no EOS stop."""
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    targets: list = field(default_factory=list)
    """LoRA target module names (the attention projections of the architecture)."""
    dtype: str = "float32"
    """minippo's compute dtype ("float32" or "bfloat16" autocast); the peer always runs float32."""
    warmup: int = 1
    """untimed steps first (allocator, caches, lazy inits)."""
    steps: int = 2
    """timed steps."""
    seed: int = 0
    threads: int = 2
    learning_rate: float = 1.41e-5
    device: str = "cpu"
    """where minippo runs: "cpu" or "cuda" (the peer always runs on the CPU here)."""
    gradient_checkpointing: bool | None = None
    """minippo's PPOConfig.gradient_checkpointing (None: its default, on for 8-bit and 4-bit bases)."""

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def model_info(model_dir: str) -> dict:
    """bench.json written by ppo_step.py beside the model: vocab size, pad/eos ids, rope theta."""
    with open(os.path.join(model_dir, "bench.json")) as f:
        return json.load(f)


def make_queries(spec: Spec, vocab_size: int, avoid: set[int]):
    """batch_size prompts of prompt_len random token ids (no special ids), same on both sides."""
    import torch

    g = torch.Generator().manual_seed(1234)
    queries = []
    for _ in range(spec.batch_size):
        ids = torch.randint(0, vocab_size, (spec.prompt_len * 2,), generator=g)
        ids = ids[~torch.isin(ids, torch.tensor(sorted(avoid)))][: spec.prompt_len]
        queries.append(ids)
    return queries  # B x (P,)


def token_reward(response) -> float:
    """A deterministic token-level score: the share of even token ids in the response, centred.

    No classifier is timed; the score only has to be the same function on both sides.
    """
    return float((response % 2 == 0).float().mean()) - 0.5


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Timer:
    """`with Timer() as t: ...` then t.seconds."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def emit(result: dict) -> None:
    """The worker's one machine-readable line (the orchestrator reads the last RESULT line)."""
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_steps(spec: Spec, generate, step, queries, sync=None) -> list[dict]:
    """warmup + steps PPO steps: generate (timed), score, step (the trainer's own time split).

    `generate(queries) -> responses` (lists of 1-D tensors); `step(queries, responses, scores) ->
    (forward_s, optimise_s, total_s)`. `sync` (e.g. torch.cuda.synchronize) runs before each
    clock read of the generation. Returns one timing dict per timed step.
    """
    sync = sync or (lambda: None)
    records = []
    for i in range(spec.warmup + spec.steps):
        sync()
        with Timer() as t_gen:
            responses = generate(queries)
            sync()
        assert all(len(r) == spec.new_tokens for r in responses), [len(r) for r in responses]
        scores = [token_reward(r) for r in responses]
        with Timer() as t_step:
            forward_s, optimise_s, _ = step(queries, responses, scores)
        if i >= spec.warmup:
            total = t_gen.seconds + t_step.seconds
            records.append(
                dict(
                    total=total,
                    generation=t_gen.seconds,
                    forward=forward_s,
                    optimisation=optimise_s,
                    other=total - t_gen.seconds - forward_s - optimise_s,
                )
            )
    return records


def stand_in_tokenizer(pad_id: int, eos_id: int):
    """A word-level tokenizer whose pad and eos ids are the model's: trl only pads with it (no text
    is decoded in the benchmark), and the model's own tokenizer.json may be too new for the
    peer's tokenizers library."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    n = max(pad_id, eos_id) + 1
    vocab = {f"<t{i}>": i for i in range(n)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"<t{pad_id}>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=f"<t{pad_id}>",
        eos_token=f"<t{eos_id}>",
        unk_token=f"<t{pad_id}>",
    )
