"""Step 1 of the blog: LoRA causal-LM fine-tuning of an (8-bit) base model on IMDB review text,
so that the policy PPO starts from writes movie reviews.

    run_sft(SFTConfig(model="smollm2-135m", max_steps=100))

Reviews are cleaned (`<br />` removed), tokenised, joined with EOS separators and cut into blocks
of `block_size` tokens (`pack_blocks`); the LoRA adapter is trained with AdamW on the next-token
loss, linear warm-up then linear decay (as the blog's HF Trainer). Validation loss and perplexity
are measured before and after; the adapter (peft layout), the loss log and the metrics are written
to `output_dir`. Ctrl-C saves the adapter reached so far before stopping.

Shapes: B batch of blocks, L = block_size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..adapter_files import copy_adapter, read_checked_adapter, save_adapter
from ..checks import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    check,
    check_device,
    check_fields,
    one_of,
)
from ..fileio import atomic_directory, committed_directory, write_binary, write_json
from ..lora import LoRAConfig, add_lora, count_parameters
from ..ppo import (
    check_config,
    check_optimizer_state,
    load_torch,
    own_rng_state,
    reading_checkpoint,
    rng_state,
    set_rng_state,
)
from ..quant import load_model, prepare_model_for_kbit_training, resolve_dtype
from .data import clean_review, cycle_batches, load_imdb, pack_blocks
from .model_folders import (
    DEFAULT_MODEL,
    FAST_MODES,
    check_context,
    context_window,
    fast_is_on,
    load_tokenizer,
    quant_load_kwargs,
    resolve_model,
)


@dataclass
class SFTConfig:
    """Settings of `minippo sft` (step 1: LoRA fine-tuning on IMDB review text)."""

    model: str = DEFAULT_MODEL
    """Base causal LM: the embedded default "smollm2-135m", a local model folder, or a hub name."""
    data_dir: str | None = None
    """folder with IMDB {train,validation}.parquet;
    None: $MINIPPO_IMDB_DIR, else the hub's stanfordnlp/imdb."""
    output_dir: str = "runs/sft"
    """Where the adapter (output_dir/adapter), loss log and metrics are written."""
    load_in_8bit: bool = True
    """Load the base model's Linear layers in 8-bit (bitsandbytes LLM.int8()), as the blog; False: quant
    "none"."""
    quant: str = "8bit"
    """Base model's Linear layers: "8bit" (LLM.int8(), the blog's), "4bit" (NF4 + double quant, QLoRA) or
    "none"."""
    dtype: str = "float32"
    """dtype of the base weights that are not int8; training upcasts them to float32."""
    fast: str = "auto"
    """`minippo.fast` (faster modules, each tested against the plain ones): "on", "off", or "auto" (on a
    CPU with native bf16 or int8 matmuls, or CUDA)."""
    device: str = "cpu"
    """Device to train on: cpu, cuda or cuda:N."""
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=16, alpha=32.0, dropout=0.05))
    """LoRA settings of the adapter (target_modules None: the architecture's default layers)."""
    block_size: int = 256
    """Tokens per packed training block (the blog used 1024)."""
    max_steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Blocks per optimizer step (split into batch_size / grad_accum_steps per forward)."""
    grad_accum_steps: int = 1
    """Forward/backward passes per optimizer step; must divide batch_size."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate of the LoRA weights."""
    warmup_steps: int = 10
    """Linear warm-up steps; then the rate decays linearly to 0 at max_steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    num_train_texts: int = 2000
    """Train reviews (shuffled) to pack into blocks; steps cycle over the blocks."""
    num_eval_blocks: int = 32
    """Validation blocks for the loss/perplexity before and after (0 = skip)."""
    eval_batch_size: int = 8
    """Blocks per forward pass during evaluation."""
    seed: int = 0
    """Seed for data shuffling, LoRA initialisation and dropout."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass: less memory, more compute; None: on for a k-bit base."""
    log_every: int = 10
    """Show the running loss on the progress bar every this many steps."""
    save_every: int = 50
    """Write output_dir/checkpoint (adapter, optimiser, scheduler, RNG) every this many steps (0: never)."""
    resume: bool = False
    """Continue from output_dir/checkpoint exactly; without a checkpoint, start from step 0."""

    def __post_init__(self):
        if not self.load_in_8bit and self.quant == "8bit":  # the older spelling of --quant none
            self.quant = "none"
        quant_load_kwargs(self.quant)
        self.load_in_8bit = self.quant == "8bit"
        check_fields(self, one_of(*FAST_MODES), "fast")
        positive = (
            "max_steps",
            "batch_size",
            "grad_accum_steps",
            "num_train_texts",
            "eval_batch_size",
        )
        check_fields(self, POSITIVE_INT, *positive, "log_every")
        check_fields(self, (lambda v: v >= 2, "at least 2"), "block_size")
        check_fields(
            self, NON_NEGATIVE, "warmup_steps", "num_eval_blocks", "weight_decay", "max_grad_norm"
        )
        check_fields(self, NON_NEGATIVE, "save_every")
        check_fields(self, POSITIVE, "learning_rate")
        check(
            self,
            self.batch_size % self.grad_accum_steps == 0,
            f"grad_accum_steps ({self.grad_accum_steps}) must divide batch_size ({self.batch_size})",
        )
        resolve_dtype(self.dtype)
        check_device(self)


# -- data ------------------------------------------------------------------------------------------


def review_blocks(texts, tokenizer, block_size: int) -> torch.Tensor:
    """Clean, tokenise (no special tokens) and pack reviews: LongTensor (N, block_size)."""
    cleaned = [clean_review(t) for t in texts]
    ids = tokenizer(cleaned, add_special_tokens=False)["input_ids"]
    return pack_blocks(ids, block_size, tokenizer.eos_token_id)


def eval_blocks(tokenizer, config: SFTConfig) -> torch.Tensor:
    """The first `num_eval_blocks` packed validation blocks (N, L), loading more reviews until enough."""
    n_texts = max(8, config.num_eval_blocks * config.block_size // 200 + 8)  # ~300 tokens a review
    while True:
        ds = load_imdb("validation", config.data_dir, limit=n_texts, seed=config.seed)
        blocks = review_blocks(ds["text"], tokenizer, config.block_size)
        if len(blocks) >= config.num_eval_blocks or len(ds) < n_texts:
            return blocks[: config.num_eval_blocks]
        n_texts *= 2


# -- training --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_lm(model, blocks: torch.Tensor, batch_size: int, device) -> float:
    """Mean next-token cross-entropy (nats per token) of `model` over blocks (N, L); with several
    processes each takes every N-th block and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    blocks = blocks[distributed.rank() :: distributed.world_size()]
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size].to(device)  # (B, L)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        n = batch.numel() - batch.shape[0]  # predicted tokens: L - 1 per block
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    total, count = distributed.all_reduce(
        torch.tensor([total, count], dtype=torch.float64, device=device)
    )
    return (total / count.clamp(min=1)).item()


def lr_lambda(warmup_steps: int, max_steps: int):
    """Multiplier of the peak rate at a step: linear warm-up, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))

    return factor


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def run_sft(config: SFTConfig) -> dict:
    """Train a LoRA adapter on packed IMDB review blocks; returns the metrics (also written to
    `output_dir/metrics.json`; the adapter goes to `output_dir/adapter`, the (step, loss) log to
    `output_dir/loss_log.json`)."""
    device = _available(config.device)
    distributed.init_from_env()  # data parallel under torchrun: each process takes a share of each batch
    rank, world = distributed.rank(), distributed.world_size()
    if config.batch_size % (world * config.grad_accum_steps):
        raise ValueError(
            f"SFTConfig.batch_size ({config.batch_size}) must be divisible by the {world} processes x "
            f"grad_accum_steps ({config.grad_accum_steps})"
        )
    out = Path(config.output_dir)
    if rank == 0:  # rank 0 alone writes files
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "sft_config.json", dataclasses.asdict(config))
    torch.manual_seed(config.seed)

    # 1. Model: base (8-bit) + LoRA, tokenizer with a pad token distinct from EOS.
    model, tokenizer, model_dir = load_sft_model(config, device)
    trainable, total = count_parameters(model)

    # 2. Data: packed train and validation blocks.
    train_texts = load_imdb(
        "train", config.data_dir, limit=config.num_train_texts, seed=config.seed
    )["text"]
    train = review_blocks(train_texts, tokenizer, config.block_size)  # (N, L)
    val = eval_blocks(tokenizer, config) if config.num_eval_blocks else None  # (N_val, L)
    metrics = dict(
        model=model_dir, trainable_params=trainable, total_params=total, train_blocks=len(train)
    )
    metrics["block_size"] = config.block_size

    # 3. Validation loss before training (LoRA B = 0: the base model).
    if val is not None:
        metrics.update(eval_blocks=len(val), **_eval_metrics(model, val, config, device, "before"))

    # 4. Train; Ctrl-C saves the adapter reached so far.
    loss_log: list[tuple[int, float]] = []
    try:
        seconds = train_lm(model, train, config, device, loss_log, out / "checkpoint")
    except KeyboardInterrupt:
        if rank == 0:
            _save(model, out, model_dir, loss_log)
        print(f"sft: interrupted at step {len(loss_log)}; adapter saved to {out / 'adapter'}")
        raise

    # 5. Validation loss after; save the adapter, the loss log and the metrics.
    if val is not None:
        metrics.update(_eval_metrics(model, val, config, device, "after"))
    tokens = config.max_steps * config.batch_size * config.block_size
    metrics.update(
        steps=config.max_steps,
        train_seconds=round(seconds, 2),
        tokens_per_second=round(tokens / max(seconds, 1e-9), 1),
        train_loss_first=loss_log[0][1],
        train_loss_last=loss_log[-1][1],
    )
    if rank == 0:
        metrics.update(_save(model, out, model_dir, loss_log))
        write_json(out / "metrics.json", metrics)
    distributed.barrier()  # the others wait until the adapter is written
    if val is not None and rank == 0:
        print(
            f"sft: validation loss {metrics['eval_loss_before']:.3f} -> {metrics['eval_loss_after']:.3f} "
            f"(perplexity {metrics['eval_ppl_before']:.1f} -> {metrics['eval_ppl_after']:.1f}); "
            f"adapter -> {metrics['adapter']}"
        )
    return metrics


def load_sft_model(config: SFTConfig, device: torch.device):
    """The base model (8-bit), prepared for adapter training, with a fresh LoRA adapter; its
    tokenizer (right padding) and folder."""
    model_dir = resolve_model(config.model)
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    model = load_model(
        model_dir,
        **quant_load_kwargs(config.quant),
        dtype=config.dtype,
        device=device,
        fast=fast_is_on(config.fast, device),
    )
    checkpointing = config.gradient_checkpointing
    checkpointing = config.quant != "none" if checkpointing is None else checkpointing
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    check_context(
        model, config.block_size, "block_size", f"use --block-size {context_window(model)} or less"
    )
    add_lora(model, config.lora)
    return model, tokenizer, model_dir


def train_lm(
    model, blocks: torch.Tensor, config: SFTConfig, device, loss_log: list, checkpoint: Path
) -> float:
    """AdamW on the trainable weights over shuffled blocks (N, L): warm-up + linear decay, gradient
    accumulation and clipping. Appends (step, loss) to `loss_log` as it goes (so an interrupted run
    keeps it), writes `checkpoint` every save_every steps and, with `config.resume`, continues from it
    exactly (the batch stream is replayed up to the checkpoint's step); returns the seconds taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_parameters(params)  # every process starts from rank 0's adapter
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.warmup_steps, config.max_steps)
    )
    rank, world = distributed.rank(), distributed.world_size()
    micro = (
        config.batch_size // config.grad_accum_steps // world
    )  # blocks per forward on this process
    batches = cycle_batches(
        len(blocks), micro * world, config.seed
    )  # the same global stream everywhere
    if config.resume and committed_directory(checkpoint) is not None:
        loss_log[:] = load_checkpoint(checkpoint, config, model, optimizer, scheduler)
        for _ in range(len(loss_log) * config.grad_accum_steps):
            next(batches)
        print(f"sft: resuming {checkpoint} at step {len(loss_log)}")
    model.train()
    start = time.perf_counter()
    steps = range(len(loss_log) + 1, config.max_steps + 1)
    bar = tqdm(steps, desc="sft", unit="step", dynamic_ncols=True, disable=rank > 0)
    with bar:
        for step in bar:
            step_loss = torch.zeros((), device=device)
            for _ in range(config.grad_accum_steps):
                batch = blocks[next(batches)[rank * micro : (rank + 1) * micro]].to(
                    device
                )  # (B, L), my share
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss / config.grad_accum_steps).backward()
                step_loss += loss.detach() / config.grad_accum_steps
            distributed.all_reduce_grads(
                params, "mean"
            )  # before clipping: clip the global gradient
            step_loss = distributed.all_reduce(step_loss, "mean").item()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_log.append((step, step_loss))
            if config.save_every and step % config.save_every == 0:  # on every process
                save_checkpoint(checkpoint, config, model, optimizer, scheduler, loss_log)
            if step % config.log_every == 0 or step == config.max_steps:
                recent = [l for _, l in loss_log[-config.log_every :]]
                bar.set_postfix(
                    loss=f"{sum(recent) / len(recent):.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}"
                )
    return time.perf_counter() - start


# SFTConfig fields a run may be resumed under with another value (the new one applies).
RESUMABLE_CHANGES = (
    "resume",
    "save_every",
    "log_every",
    "max_steps",
    "num_eval_blocks",
    "eval_batch_size",
)
RESUMABLE_CHANGES += ("data_dir",)


def save_checkpoint(folder: Path, config, model, optimizer, scheduler, loss_log) -> None:
    """Everything `load_checkpoint` needs to continue exactly. Called on every process: rank 0 writes,
    with every rank's generators, crash-safe (`atomic_directory`), while the others wait."""
    generators = distributed.all_gather_object(rng_state())  # in rank order
    state = {
        "step": len(loss_log),
        "loss_log": loss_log,
        "world_size": distributed.world_size(),
        "config": dataclasses.asdict(config),
    }

    def write() -> None:
        with atomic_directory(folder) as tmp:
            save_adapter(model, tmp)
            optimizer_state = optimizer.state_dict()
            write_binary(Path(tmp) / "optimizer.pt", lambda f: torch.save(optimizer_state, f))
            scheduler_state = scheduler.state_dict()
            write_binary(Path(tmp) / "scheduler.pt", lambda f: torch.save(scheduler_state, f))
            write_binary(Path(tmp) / "rng_state.pt", lambda f: torch.save(generators, f))
            write_json(Path(tmp) / "trainer_state.json", state)

    distributed.on_rank0(write)


def load_checkpoint(folder: Path, config, model, optimizer, scheduler) -> list:
    """Restore what `save_checkpoint` wrote (or its previous version, where a save was killed mid-swap),
    refusing another config or number of processes; returns the loss log. Every file is read and checked
    first: a damaged checkpoint raises one ValueError naming it, and changes nothing."""
    folder = Path(committed_directory(folder) or folder)
    with reading_checkpoint(folder):
        state = json.loads((folder / "trainer_state.json").read_text())
        loss_log = [(int(step), float(loss)) for step, loss in state["loss_log"]]
        saved_config = state["config"]
    check_config(
        saved_config, dataclasses.asdict(config), RESUMABLE_CHANGES, f"SFT checkpoint {folder}"
    )
    rank, world = distributed.rank(), distributed.world_size()
    if state.get("world_size", world) != world:
        raise ValueError(
            f"{folder} was saved by {state['world_size']} processes, and {world} load it: "
            "resume with the same number (each one's share of the batch depends on it)"
        )
    with reading_checkpoint(folder):  # 1. read and check everything
        _, adapter = read_checked_adapter(model, folder)
        optimizer_state = load_torch(folder, "optimizer.pt")
        check_optimizer_state(optimizer_state, optimizer)
        scheduler_state = load_torch(folder, "scheduler.pt")
        if not isinstance(scheduler_state, dict) or set(scheduler_state) != set(
            scheduler.state_dict()
        ):
            raise ValueError("scheduler.pt holds another LR scheduler's state")
        generators = own_rng_state(load_torch(folder, "rng_state.pt"), rank, world)
    copy_adapter(model, adapter)  # 2. then change the model and the optimiser
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if generators is not None:  # None: rank 0's generators alone were saved (minippo 0.2)
        set_rng_state(generators)
    return loss_log


def _available(device: str) -> torch.device:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} asked for, but torch sees no CUDA GPU: use --device cpu"
        )
    return torch.device(device)


def _eval_metrics(model, val: torch.Tensor, config: SFTConfig, device, when: str) -> dict:
    loss = evaluate_lm(model, val, config.eval_batch_size, device)
    return {f"eval_loss_{when}": loss, f"eval_ppl_{when}": _perplexity(loss)}


def _save(model, out: Path, base_model: str, loss_log) -> dict:
    """Write the adapter (atomically, peft layout) and the (step, loss) log; return their paths."""
    adapter = save_adapter(model, out / "adapter", base_model_name_or_path=base_model)
    log_path = out / "loss_log.json"
    write_json(log_path, [[s, l] for s, l in loss_log])
    return {"adapter": str(adapter), "loss_log": str(log_path)}
