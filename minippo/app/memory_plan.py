"""The memory planner: will this model train with PPO + LoRA on this GPU?

`plan_memory(PlanConfig(params=20e9, gpu_gib=24))` predicts the bytes a LoRA (or full) training step
holds, part by part, and `format_plan` prints them as a table:

    weights          frozen base model: linear weights in the weight dtype (int8 keeps one fp32
                     scale per output row; nf4 packs two weights a byte with one scale per block
                     of 64, see `nf4_bytes`), embeddings / norms / lm_head in the compute dtype
    LoRA parameters  r * (in + out) per adapted linear layer, fp32
    value head       Linear(H, 1), fp32
    reward adapter   with --reward-r: a learned reward as a second adapter on the same base, and its
                     score head Linear(H, 1), fp32, frozen (no gradients, no optimiser state); the
                     base is shared, so the plan also says what a second copy of it would cost
    gradients        one fp32 gradient per trainable parameter
    optimiser state  Adam: exp_avg and exp_avg_sq, fp32, per trainable parameter
    activations      what autograd keeps for the backward of one (batch_size, seq_len) mini-batch
    reserve          what the runtime keeps for itself (CUDA context, allocator slack)

This is the blog's arithmetic (Ref: "Fine-tuning 20B LLMs with RLHF on a 24GB consumer GPU",
Hugging Face blog, 2023): 20B parameters at 2 bytes (bf16) do not fit 24 GB; at 1 byte (8-bit) with
adapters (few trainable parameters, so gradients and Adam state are tiny) the step fits.  In 4-bit
NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314) a weight takes about half a byte, and the largest
model that fits grows again (`--quant 4bit`, and with no --params: `largest_fitting`).  The planner's
answers for the blog's question, and how they compare with measured footprints, are in
benchmarks/RESULTS.md.

Activations (the only part that is not a plain count) per token and per transformer block, in
elements of the compute dtype, counted from what autograd saves when the base weights are frozen
(a frozen Linear saves nothing for its weight; the tensors below are saved for the input
gradients that must flow back to the lowest adapter):

    gpt_neox   5.3 H + 1 I     (layer-norm inputs, rotary q/k, v, attention output, GELU input)
    llama      6.5 H + 3 I     (RMSNorm in fp32, rotary q/k, v, attention output, SwiGLU gate/up/act)
    gpt2       8.5 H + 3.9 I   (its dropout masks are on by default)
    + 2 * d_in for each adapted linear layer with input size d_in (the dropout output and mask)

plus the logits: four fp32 (B, L, V) tensors are alive at the peak (logits, log-softmax and two
gradient buffers) in a plain causal-LM loss. minippo's PPO trainer holds none: it takes the T response
positions' log-probs from the hidden states a block of rows at a time (`minippo.fast`'s LM head:
a block's logits and softmax, 2**26 logits on a GPU, and three fp32 temporaries of 16 rows) and
keeps a (T, H) fp32 gradient. With gradient
checkpointing only each block's input (H per token) is kept, and the peak is the larger of the
logits' buffers and one block's activations rebuilt in the backward (x 1.5 for its gradients in
flight, beside the fp32 logits the caller still holds). Attention is assumed memory-efficient
(SDPA: no (L, L) score matrix is stored). The constants are checked against measurements in
`tests/app/test_memory_plan.py`; `TensorMemoryTracker` below is the measuring tool.

Note: the step's peak is taken as everything above at once; PPO's rollout (generation with a KV
cache, no gradients) needs less than the training mini-batch and is not planned separately. Where one
micro-batch is the whole batch, the reference forward runs beside the first update's kept activations;
its temporaries (a layer's, a head block's) are fewer than the backward's that the plan counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check,
    check_fields,
    one_of,
)
from ..fast.head import HEAD_BLOCK, HEAD_ROWS
from ..quant import int8_weight_and_scales

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
WEIGHT_DTYPES = (*DTYPE_BYTES, "nf4")  # nf4 (or fp4, the same size): see nf4_bytes
QUANT_DTYPES = {"none": "bf16", "8bit": "int8", "4bit": "nf4"}  # --quant -> weight dtype
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256  # weights per absmax; absmaxes per fp32 scale (double quant)
TARGETS = ("qkv", "attention", "all-linear")
OPTIMIZERS = {"adam": 2, "adamw": 2, "sgd": 0}  # fp32 states per trainable parameter
LOGIT_COPIES = 4  # fp32 (B, L, V) tensors alive at the peak: logits, log-softmax, 2 gradients

# Activation elements per token per block: (c_H, c_I) for c_H * H + c_I * I (see the docstring).
ACTIVATION_COEFFS = {"gpt_neox": (5.3, 1.0), "llama": (6.5, 3.0), "gpt2": (8.5, 3.9)}
LORA_ACTIVATION_PER_INPUT = 2.0  # per adapted linear, per token: 2 * d_in elements
RECOMPUTE_FACTOR = 1.5  # checkpointing: a rebuilt block's tensors + its gradients in flight
# In eval mode (no dropout masks) fewer tensors are in flight; fitted to tests/app/test_memory_plan.py.
PPO_RECOMPUTE_FACTOR = {"llama": 1.2}

# Shapes of a few well-known models (their config.json values), so `--model gpt-neox-20b` works offline.
KNOWN_MODELS = {
    "gpt-neox-20b": dict(
        model_type="gpt_neox",
        hidden_size=6144,
        num_hidden_layers=44,
        vocab_size=50432,
        intermediate_size=24576,
        num_attention_heads=64,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        vocab_size=49152,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(
        model_type="gpt2",
        n_embd=768,
        n_layer=12,
        vocab_size=50257,
        n_head=12,
        tie_word_embeddings=True,
    ),
}


@dataclass
class PlanConfig:
    """Predict the memory of a PPO/LoRA training step and whether it fits a GPU."""

    params: float = 0.0
    """Parameters of the base model, e.g. 20e9; 0 means count them from --model or the sizes."""
    model: str = ""
    """A model folder with config.json, or one of gpt-neox-20b, smollm2-135m, gpt2; sets the sizes."""
    hidden_size: int = 0
    """Hidden size H; 0 means from --model, else inferred from --params (H = 128 * layers)."""
    num_layers: int = 0
    """Transformer blocks; 0 means from --model, else inferred from --params (N ~ 12 layers H^2)."""
    vocab_size: int = 0
    """Vocabulary size V; 0 means from --model, else 50432 (GPT-NeoX's tokenizer)."""
    intermediate_size: int = 0
    """MLP inner size I; 0 means from --model, else 4 H."""
    arch: str = ""
    """Block layout for counting: gpt_neox, llama or gpt2; empty means from --model, else gpt_neox."""
    gpu_gib: float = 24.0
    """Memory of the GPU (or of the machine), GiB."""
    reserve_gib: float = 1.0
    """Memory the runtime keeps for itself (CUDA context, allocator slack), GiB; 0 on a CPU."""
    dtype: str = "int8"
    """Weight dtype of the frozen base model: fp32, bf16, fp16, int8 (LLM.int8) or nf4 (QLoRA's 4-bit)."""
    quant: str = ""
    """Base precision by name, overriding --dtype: none (bf16), 8bit (int8) or 4bit (nf4); empty: --dtype."""
    double_quant: bool = True
    """nf4 only: the block scales stored in 8-bit (QLoRA's double quantisation) rather than fp32."""
    compute_dtype: str = ""
    """Dtype of activations and of the weights int8 leaves alone; empty: the weight dtype, fp16 for int8."""
    lora_r: int = 16
    """LoRA rank r; 0 means full fine-tuning (every weight trains; needs a float dtype)."""
    lora_targets: str = "qkv"
    """Adapted linear layers: qkv (query/key/value, the blog's), attention (qkv + output), all-linear."""
    batch_size: int = 4
    """Sequences in one forward + backward (the PPO mini-batch)."""
    seq_len: int = 256
    """Tokens per sequence, prompt + response (L = P + T)."""
    response_len: int = 0
    """T: plan minippo's PPO micro-step (eval mode, LM head and log-probs over the T response positions
    only); 0: a causal-LM loss over all L positions (SFT, with LoRA dropout)."""
    gradient_checkpointing: bool = True
    """Keep only each block's input and recompute the rest in the backward pass."""
    optimizer: str = "adam"
    """Optimiser: adam / adamw (two fp32 states per trainable parameter) or sgd (none)."""
    reward_r: int = 0
    """LoRA rank of a learned (pairwise) reward model kept as a second adapter on the same base, with its
    score head; 0: a reward outside the model (TF-IDF, a small classifier)."""
    reward_targets: str = "all-linear"
    """The reward adapter's layers: qkv, attention or all-linear (`minippo reward --model pairwise`'s)."""

    def __post_init__(self):
        if self.quant:
            check_fields(self, one_of(*QUANT_DTYPES), "quant")
            self.dtype = QUANT_DTYPES[self.quant]
        check_fields(self, one_of(*WEIGHT_DTYPES), "dtype")
        check_fields(self, one_of("", "fp32", "bf16", "fp16"), "compute_dtype")
        check_fields(self, one_of(*TARGETS), "lora_targets", "reward_targets")
        check_fields(self, one_of(*OPTIMIZERS), "optimizer")
        check_fields(self, one_of("", *ACTIVATION_COEFFS), "arch")
        sizes = "hidden_size", "num_layers", "vocab_size", "intermediate_size", "response_len"
        check_fields(self, NON_NEGATIVE_INT, "lora_r", "reward_r", *sizes)
        check_fields(self, POSITIVE_INT, "batch_size", "seq_len")
        check_fields(self, POSITIVE, "gpu_gib")
        check_fields(self, NON_NEGATIVE, "params", "reserve_gib")
        check(
            self,
            self.lora_r > 0 or self.dtype not in ("int8", "nf4"),
            f"{self.dtype} weights cannot be trained directly: set lora_r > 0, or a float "
            "dtype (fp32/bf16/fp16) for full fine-tuning",
        )

    @property
    def sized(self) -> bool:
        """Whether the model's size is given (--params, --model or --hidden-size + --num-layers);
        without it `minippo plan` answers "what is the largest model that fits?"."""
        return self.params > 0 or bool(self.model) or bool(self.hidden_size and self.num_layers)


@dataclass
class ModelShape:
    """The sizes the planner counts with (from a config, the fields, or inferred from params)."""

    arch: str
    hidden: int  # H
    layers: int
    vocab: int  # V
    inner: int  # I
    heads: int
    kv_heads: int
    tied: bool  # lm_head shares the embedding matrix
    source: str  # where the sizes came from, for the printout

    def linears(self) -> dict[str, tuple[int, int]]:
        """One block's linear layers: name -> (in, out). Fused qkv where the architecture fuses it."""
        H, I, kv = self.hidden, self.inner, self.hidden * self.kv_heads // self.heads
        if self.arch == "llama":
            return {
                "q": (H, H),
                "k": (H, kv),
                "v": (H, kv),
                "o": (H, H),
                "gate": (H, I),
                "up": (H, I),
                "down": (I, H),
            }
        return {"qkv": (H, H + 2 * kv), "o": (H, H), "up": (H, I), "down": (I, H)}  # neox, gpt2

    def adapted(self, targets: str) -> dict[str, tuple[int, int]]:
        """The linear layers of one block that get LoRA adapters under `targets`."""
        names = {"qkv": {"q", "k", "v", "qkv"}, "attention": {"q", "k", "v", "qkv", "o"}}
        keep = names.get(targets)
        return {n: s for n, s in self.linears().items() if keep is None or n in keep}

    def count(self) -> tuple[int, int]:
        """(linear parameters in the blocks, all other parameters: embeddings, norms, lm_head)."""
        linear = self.layers * sum(i * o for i, o in self.linears().values())
        other = (
            self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden
        )
        return linear, other


def _config_shape(cfg: dict, source: str) -> ModelShape:
    """A transformers config.json (as a dict) -> ModelShape."""
    mt = cfg.get("model_type", "gpt_neox")
    arch = {"gpt_neox": "gpt_neox", "gpt2": "gpt2"}.get(
        mt, "llama"
    )  # llama-likes: mistral, qwen2...
    H = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head", max(1, H // 64)))
    return ModelShape(
        arch=arch,
        hidden=H,
        layers=cfg.get("num_hidden_layers", cfg.get("n_layer")),
        vocab=cfg["vocab_size"],
        inner=cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * H,
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        tied=cfg.get("tie_word_embeddings", mt == "gpt2"),
        source=source,
    )


def model_shape(config: PlanConfig) -> ModelShape:
    """The sizes to count with: --model, overridden by any size given, else inferred from --params.

    Inference from a parameter count alone assumes a GPT-NeoX block (N ~ 12 layers H^2) with
    H = 128 * layers, GPT-NeoX-20B's aspect ratio: 20e9 -> 47 layers of H 6016 (the real model:
    44 of 6144).
    """
    if config.model:
        key = config.model.lower().split("/")[-1].removesuffix("-instruct")
        path = Path(config.model) / "config.json"
        if path.exists():
            shape = _config_shape(json.loads(path.read_text()), f"{path}")
        elif key in KNOWN_MODELS:
            shape = _config_shape(KNOWN_MODELS[key], f"known shape of {key}")
        else:
            raise FileNotFoundError(
                f"--model {config.model!r}: no config.json there and not one of "
                f"{sorted(KNOWN_MODELS)}; or give --hidden-size/--num-layers"
            )
    else:
        if not config.sized:
            raise ValueError(
                "say how big the model is: --params (e.g. 20e9), --model (a folder "
                "with config.json, or gpt-neox-20b), or --hidden-size and --num-layers"
            )
        layers, H = config.num_layers, config.hidden_size
        source = "the given sizes"
        if not (layers and H):
            n = config.params
            layers = layers or max(1, round((n / (12 * 128**2)) ** (1 / 3)))
            H = H or max(64, 64 * round(math.sqrt(n / (12 * layers)) / 64))
            source = f"inferred from {n:.3g} parameters"
        shape = ModelShape(
            "gpt_neox", H, layers, 50432, 4 * H, max(1, H // 128), max(1, H // 128), False, source
        )
    overrides = {
        "hidden": config.hidden_size,
        "layers": config.num_layers,
        "vocab": config.vocab_size,
        "inner": config.intermediate_size,
        "arch": config.arch,
    }
    return replace(shape, **{k: v for k, v in overrides.items() if v})


@dataclass
class Plan:
    """A memory plan: bytes per part, their total, and whether it fits."""

    config: PlanConfig
    shape: ModelShape
    params: int  # base-model parameters counted
    trainable: int  # LoRA (or all) + value head
    parts: dict[str, int]  # part -> bytes, in print order
    how: dict[str, str]  # part -> the arithmetic, for the printout
    total: int
    budget: int  # gpu_gib in bytes
    fits: bool
    alternatives: list[tuple[str, int, bool]] = field(default_factory=list)  # (label, total, fits)
    second_base: int = (
        0  # bytes a reward model on its own copy of the base would add (reward_r > 0)
    )


def _compute_dtype(config: PlanConfig) -> str:
    """The given compute dtype, else: fp16 for int8 (the blog's), bf16 for nf4 (QLoRA's), the weight dtype."""
    return config.compute_dtype or {"int8": "fp16", "nf4": "bf16"}.get(config.dtype, config.dtype)


def nf4_bytes(n: int, double_quant: bool = True) -> int:
    """Bytes of one n-weight 4-bit layer as bitsandbytes stores it: n/2 bytes of codes, one absmax
    per block of 64 (8-bit with double quantisation, then per 256 absmaxes an fp32 scale, plus an
    fp32 offset and the 256-value fp32 code book of the 8-bit absmaxes; fp32 without), and the
    16-value fp32 code book.  Per weight: 0.5 + 1/64 + 4/16384 = 0.516 bytes (4.127 bits) with
    double quantisation, 0.5625 (4.5 bits) without.
    Ref: Dettmers et al. 2023, QLoRA, arXiv:2305.14314, sec. 3 (double quantisation: 32/64 = 0.5
    bits of scales per weight become 8/64 + 32/(64 * 256) = 0.127 bits).
    """
    blocks = math.ceil(n / NF4_BLOCK)
    if double_quant:
        scales = blocks + 4 * math.ceil(blocks / NF4_SCALE_BLOCK) + 4 + 256 * 4
    else:
        scales = 4 * blocks
    return math.ceil(n / 2) + scales + 16 * 4


def activation_bytes(config: PlanConfig, shape: ModelShape) -> int:
    """Bytes autograd keeps for the backward of one (batch_size, seq_len) mini-batch (see module doc)."""
    tokens = config.batch_size * config.seq_len  # B * L
    act = DTYPE_BYTES[_compute_dtype(config)]
    c_h, c_i = ACTIVATION_COEFFS[shape.arch]
    per_block = c_h * shape.hidden + c_i * shape.inner  # elements per token
    ppo = config.response_len > 0
    if config.lora_r:  # PPO runs in eval mode: no dropout output or mask, only the adapters' input
        per_block += (1.0 if ppo else LORA_ACTIVATION_PER_INPUT) * sum(
            i for i, _ in shape.adapted(config.lora_targets).values()
        )
    else:  # full fine-tuning: every linear saves its input for the weight gradient
        per_block += sum(i for i, _ in shape.linears().values())
    logits = LOGIT_COPIES * 4 * shape.vocab + (act if act != 4 else 0) * shape.vocab  # per token
    held = 4 * shape.vocab  # the fp32 logits the caller holds through the backward, per token
    if (
        ppo
    ):  # the fused head: a block of rows' logits and softmax (+ 3 x 16 rows); the (T, H) gradient
        rows = min(config.batch_size * config.response_len, HEAD_BLOCK // shape.vocab)
        logits = (
            (rows * 2 * act + 3 * min(rows, HEAD_ROWS) * 4) * shape.vocab / tokens
        )  # per token of L
        held = 4 * shape.hidden * config.response_len / config.seq_len
    if config.gradient_checkpointing:
        # Block inputs stay; the logits' gradient buffers are freed before the backward reaches
        # the blocks, where one block's activations are rebuilt at a time, with about half as
        # much again of gradients in flight (beside the logits the caller still holds).
        factor = PPO_RECOMPUTE_FACTOR.get(shape.arch, RECOMPUTE_FACTOR) if ppo else RECOMPUTE_FACTOR
        rebuilt = factor * per_block * act + held
        peak = shape.layers * shape.hidden * act + max(logits, rebuilt)
    else:  # every block's saved tensors and the logits' buffers at the start of the backward
        peak = shape.layers * per_block * act + logits
    return int(tokens * (peak + 2 * shape.hidden * act))


def plan_memory(config: PlanConfig) -> Plan:
    """Predict the memory of a training step, part by part (see the module docstring), with the
    blog's comparison: the same step with fp32 / bf16 / int8 weights, and bf16 full fine-tuning."""
    plan = _plan_parts(config)
    r = config.lora_r or 16
    for label, change in [
        ("fp32 weights + LoRA", dict(dtype="fp32", lora_r=r)),
        ("bf16 weights + LoRA", dict(dtype="bf16", lora_r=r)),
        ("int8 weights + LoRA", dict(dtype="int8", lora_r=r)),
        ("nf4 weights + LoRA (QLoRA)", dict(dtype="nf4", lora_r=r)),
        ("bf16 full fine-tuning", dict(dtype="bf16", lora_r=0)),
    ]:
        other = _plan_parts(replace(config, compute_dtype="", quant="", **change))
        plan.alternatives.append((label, other.total, other.fits))
    return plan


def _plan_parts(config: PlanConfig) -> Plan:
    shape = model_shape(config)
    linear, other = shape.count()
    if config.params > 0:  # the given total wins; the shape only splits it
        linear = max(0, int(config.params) - other)
    compute = _compute_dtype(config)
    parts: dict[str, int] = {}
    how: dict[str, str] = {}

    # 1. Frozen weights: linear layers in the weight dtype, the rest in the compute dtype.
    if config.dtype == "nf4":
        per_layer = [nf4_bytes(i * o, config.double_quant) for i, o in shape.linears().values()]
        exact = shape.layers * sum(per_layer)  # the shape's own linear weights, packed
        shape_linear = shape.count()[0]
        packed = exact if linear == shape_linear else int(exact * linear / max(shape_linear, 1))
        parts["weights"] = packed + other * DTYPE_BYTES[compute]
        how["weights"] = (
            f"{_n(linear)} linear x {packed / max(linear, 1):.3f} B (nf4"
            + (" + double-quantised" if config.double_quant else " + fp32")
            + f" block scales) + {_n(other)} x {DTYPE_BYTES[compute]} B ({compute})"
        )
    elif config.dtype == "int8":
        rows = shape.layers * sum(o for _, o in shape.linears().values())
        parts["weights"] = linear + 4 * rows + other * DTYPE_BYTES[compute]
        how["weights"] = (
            f"{_n(linear)} linear x 1 B (int8) + fp32 row scales + "
            f"{_n(other)} x {DTYPE_BYTES[compute]} B ({compute})"
        )
    else:
        parts["weights"] = (linear + other) * DTYPE_BYTES[config.dtype]
        how["weights"] = f"{_n(linear + other)} x {DTYPE_BYTES[config.dtype]} B ({config.dtype})"

    # 2. Trainable parameters: adapters (fp32) or, for full fine-tuning, the weights themselves.
    lora = (
        config.lora_r
        * shape.layers
        * sum(i + o for i, o in shape.adapted(config.lora_targets).values())
    )
    head = shape.hidden + 1
    trainable = (lora if config.lora_r else linear + other) + head
    if config.lora_r:
        parts["LoRA parameters"] = 4 * lora
        how["LoRA parameters"] = f"{_n(lora)} x 4 B (r={config.lora_r} on {config.lora_targets})"
    parts["value head"] = 4 * head
    how["value head"] = f"Linear(H={shape.hidden}, 1), fp32"
    if config.reward_r:  # frozen: no gradients, no optimiser state; scored without autograd
        targets = shape.adapted(config.reward_targets).values()
        reward = config.reward_r * shape.layers * sum(i + o for i, o in targets) + head
        parts["reward adapter + head"] = 4 * reward
        how["reward adapter + head"] = (
            f"{_n(reward)} x 4 B (r={config.reward_r} on {config.reward_targets} + Linear(H, 1)), "
            "frozen, on the shared base"
        )

    # 3. Gradients and optimiser state, per trainable parameter (full fine-tuning in a 16-bit
    #    dtype keeps an fp32 master copy too: the classic 2 + 2 + 4 + 8 = 16 bytes per parameter).
    full16 = not config.lora_r and config.dtype in ("bf16", "fp16")
    grad_bytes = DTYPE_BYTES[config.dtype] if full16 else 4
    parts["gradients"] = grad_bytes * trainable
    how["gradients"] = f"{_n(trainable)} trainable x {grad_bytes} B"
    states = OPTIMIZERS[config.optimizer] + (1 if full16 else 0)
    parts["optimiser state"] = 4 * states * trainable
    how["optimiser state"] = f"{config.optimizer}: {states} x 4 B per trainable parameter" + (
        " (incl. fp32 master weights)" if full16 else ""
    )

    # 4. Activations of one mini-batch, and the runtime's own reserve.
    parts["activations"] = activation_bytes(config, shape)
    how["activations"] = (
        f"B={config.batch_size} x L={config.seq_len}, {compute}, "
        f"checkpointing {'on' if config.gradient_checkpointing else 'off'}"
    )
    parts["reserve"] = int(config.reserve_gib * GiB)
    how["reserve"] = "CUDA context, allocator slack"

    total = sum(parts.values())
    budget = int(config.gpu_gib * GiB)
    plan = Plan(
        config, shape, linear + other, trainable, parts, how, total, budget, total <= budget
    )
    if config.reward_r:  # a reward model of its own would hold another copy of the frozen weights
        plan.second_base = parts["weights"]
    return plan


def _n(count: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.3g}{unit}"
    return str(int(count))


def format_plan(plan: Plan) -> str:
    """The plan as a markdown table, a fits / does-not-fit verdict and the dtype comparison."""
    c, s = plan.config, plan.shape
    lines = [
        f"{_n(plan.params)} parameters ({s.arch}: {s.layers} layers, H {s.hidden}, I {s.inner}, "
        f"V {s.vocab}; {s.source}), {c.dtype} weights, "
        + (f"LoRA r={c.lora_r} on {c.lora_targets}" if c.lora_r else "full fine-tuning")
        + f", {c.optimizer}",
        "",
        "| part | GiB | GB | how |",
        "|---|---:|---:|---|",
    ]
    for name, nbytes in plan.parts.items():
        lines.append(f"| {name} | {nbytes / GiB:.2f} | {nbytes / 1e9:.2f} | {plan.how[name]} |")
    lines.append(f"| **total** | **{plan.total / GiB:.2f}** | **{plan.total / 1e9:.2f}** | |")
    room = (plan.budget - plan.total) / GiB
    lines += [
        "",
        f"fits in {c.gpu_gib:g} GiB: "
        + (f"yes ({room:.1f} GiB to spare)" if plan.fits else f"NO ({-room:.1f} GiB short)"),
        f"data parallel on N GPUs (torchrun): {plan.total / GiB:.2f} GiB per GPU; the weights (one "
        f"{c.dtype} copy per GPU), adapters, gradients and optimiser state are replicated, only the batch "
        "is split: --batch-size is then each GPU's micro-batch (mini_batch_size / N / grad. accumulation)",
    ]
    if plan.second_base:
        alone = plan.total + plan.second_base
        lines.append(
            f"learned reward on the shared base: policy, reference, value head and reward on one copy "
            f"of the weights; a reward model on a copy of its own would add {plan.second_base / GiB:.2f} "
            f"GiB ({alone / GiB:.2f} GiB in all: "
            + ("fits)" if alone <= plan.budget else f"does NOT fit {c.gpu_gib:g} GiB)")
        )
    if plan.alternatives:
        lines += ["", "| same step with | total GiB | total GB | fits |", "|---|---:|---:|---|"]
        for label, total, fits in plan.alternatives:
            lines.append(
                f"| {label} | {total / GiB:.1f} | {total / 1e9:.1f} | {'yes' if fits else 'no'} |"
            )
    return "\n".join(lines)


# How `minippo sft` and `minippo ppo` run a step by default, for "the largest model that fits":
# SFT runs without gradient checkpointing unless asked (SFTConfig.gradient_checkpointing); the PPO
# trainer checkpoints its k-bit models (on by default for 8-bit and 4-bit bases) and not float ones.
TRAINER_CHECKPOINTING = {
    "sft": {"none": False, "8bit": True, "4bit": True},
    "ppo": {"none": False, "8bit": True, "4bit": True},
}


def largest_fitting(config: PlanConfig, quant: str, step: str) -> Plan:
    """The plan of the largest model (GPT-NeoX aspect, sizes inferred from the parameter count) whose
    `step` ("sft" or "ppo") fits `config.gpu_gib` with a `quant` base, checkpointing as that trainer
    runs it; bisection on the parameter count to 0.5%.  A plan with params 0 when nothing fits."""
    checkpointing = TRAINER_CHECKPOINTING[step][quant]

    def plan(n: float) -> Plan:
        sized = replace(config, params=n, quant=quant, gradient_checkpointing=checkpointing)
        return _plan_parts(replace(sized, dtype=QUANT_DTYPES[quant], quant=""))

    lo, hi = 1e6, 1e13
    if not plan(lo).fits:
        return replace(plan(lo), params=0, fits=False)
    while hi / lo > 1.005:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if plan(mid).fits else (lo, mid)
    return plan(lo)


def format_largest(config: PlanConfig) -> str:
    """The largest model that fits, per base precision and per training step, as a markdown table."""
    lines = [
        f"Largest model that fits {config.gpu_gib:g} GiB (reserve {config.reserve_gib:g} GiB; LoRA r="
        f"{config.lora_r} on {config.lora_targets}, B={config.batch_size} x L={config.seq_len}, "
        f"{config.optimizer}; GPT-NeoX shapes inferred from the parameter count)",
        "",
        "| base | SFT step: params | weights GiB | PPO step: params | weights GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for quant, label in (("none", "none (bf16)"), ("8bit", "8bit (int8)"), ("4bit", "4bit (nf4)")):
        cells = []
        for step in ("sft", "ppo"):
            plan = largest_fitting(config, quant, step)
            cells += [
                _n(plan.params) if plan.params else "nothing fits",
                f"{plan.parts['weights'] / GiB:.1f}",
            ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "checkpointing as the trainers run it: SFT "
        + ", ".join(f"{q} {'on' if c else 'off'}" for q, c in TRAINER_CHECKPOINTING["sft"].items())
        + "; PPO "
        + ", ".join(f"{q} {'on' if c else 'off'}" for q, c in TRAINER_CHECKPOINTING["ppo"].items()),
    ]
    return "\n".join(lines)


def run_plan(config: PlanConfig) -> Plan | None:
    """`minippo plan`: print the plan (or, with no model size given, the largest model that fits)."""
    if not config.sized:
        print(format_largest(config))
        return None
    plan = plan_memory(config)
    print(format_plan(plan))
    return plan


# ---------------------------------------------------------------------------------- measuring


def model_footprint_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights), plus
    what bitsandbytes keeps outside them: 8-bit row scales and 4-bit quantisation state."""
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            tensors.append(int8_weight_and_scales(m)[1])
        elif isinstance(m, bnb.nn.Linear4bit) and (state := m.weight.quant_state) is not None:
            tensors += [
                state.absmax,
                state.code,
            ]  # block scales, code book; double quant: level 2's too
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
    sizes = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            sizes[(t.device, t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    return sum(sizes.values())


class TensorMemoryTracker(TorchDispatchMode):
    """Measure the peak bytes of tensors created inside a `with` block, on CPU or GPU.

    Every op's new output storage is counted until it is freed (checked with weak references
    after each op); views and in-place results share an input's storage and are not counted
    again, and tensors that existed before the block (weights) are not counted at all. Backward
    ops run under the mode too, so a forward + backward inside the block gives its peak.

        with TensorMemoryTracker() as mem:
            loss = model(ids).logits.sum(); loss.backward()
        mem.peak  # bytes

    Slow (it sweeps the live set after every op): for measuring, not for training.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {
            StorageWeakRef(t.untyped_storage()).cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata not in inputs and ref.cdata not in self.live:
                self.live[ref.cdata] = (ref, storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out
