"""minippo's PPO loop, timed: the same work as `_peer_step.py` (run in .venv by ppo_step.py).

`load_model` (float, or 8-bit with `--dtype int8`), `add_lora` on the attention projections,
`PPOTrainer.generate` (batched, KV cache) and `PPOTrainer.step` (reference = adapters disabled).

    .venv/bin/python benchmarks/_minippo_step.py '<Spec JSON>'

Spec.dtype: "float32" (the peer's work exactly), "bfloat16" (autocast matmuls; weights, logits,
values and Adam stay float32), "bf16-weights" (the frozen base stored in bf16, LM head included, so
autocast casts no weights; adapters, value head and Adam stay float32) or "int8" (bitsandbytes
Linear8bitLt base layers, float32 compute) or "nf4" (bitsandbytes Linear4bit NF4 base layers with
double-quantised scales, QLoRA, float32 compute).
"""

import logging
import os
import sys
import warnings
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
from _common import Spec, Timer, emit, make_queries, model_info, peak_rss_mib, rss_mib, run_steps  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def build_trainer(spec: Spec, info: dict):
    """The model (float or 8-bit) with LoRA, and a PPOTrainer with the spec's settings."""
    from minippo.lora import LoRAConfig, add_lora
    from minippo.ppo import PPOConfig, PPOTrainer
    from minippo.quant import auto_compute_dtype, load_model, prepare_model_for_kbit_training

    fast = spec.dtype.endswith(
        "-fast"
    )  # "int8-fast": load_model(fast=True), as `minippo ppo --fast on`
    kind = spec.dtype.removesuffix("-fast")
    int8 = kind == "int8"
    nf4 = kind == "nf4"
    # "auto": the compute dtype compute_dtype="auto" picks here, and the frozen base stored in it
    auto = auto_compute_dtype(spec.device) if spec.dtype == "auto" else None
    weights = (
        torch.bfloat16 if spec.dtype == "bf16-weights" or auto == torch.bfloat16 else torch.float32
    )
    if int8:  # as `minippo ppo`: "auto" (with fast: the embeddings in bf16 where that is native)
        weights = "auto"
    model = load_model(
        spec.model_dir,
        load_in_8bit=int8,
        load_in_4bit=nf4,
        dtype=weights,
        device=spec.device,
        fast=fast,
    )
    if int8 or nf4:
        prepare_model_for_kbit_training(model)
    add_lora(
        model,
        LoRAConfig(
            r=spec.lora_r,
            alpha=spec.lora_alpha,
            dropout=spec.lora_dropout,
            target_modules=list(spec.targets),
        ),
    )
    config = PPOConfig(
        batch_size=spec.batch_size,
        mini_batch_size=spec.mini_batch_size,
        ppo_epochs=spec.ppo_epochs,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        min_new_tokens=spec.new_tokens,
        max_new_tokens=spec.new_tokens,
        stop_at_eos=False,
        compute_dtype="auto"
        if auto
        else "bfloat16"
        if spec.dtype in ("bfloat16", "bf16-weights")
        else "float32",
        device=spec.device,
        gradient_checkpointing=spec.gradient_checkpointing,
    )
    ids = SimpleNamespace(pad_token_id=info["pad_token_id"], eos_token_id=info["eos_token_id"])
    return model, PPOTrainer(config, model, tokenizer=ids)


def main(spec: Spec) -> None:
    if spec.dtype.endswith("-fast"):  # as the `minippo` command does with the fast path on
        from minippo.fast.allocator import retain_freed_memory

        retain_freed_memory()
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    from minippo.lora import disable_adapters

    info = model_info(spec.model_dir)
    with Timer() as t_load:
        model, trainer = build_trainer(spec, info)
    loaded_rss = rss_mib()
    queries = make_queries(spec, info["vocab_size"], {info["pad_token_id"], info["eos_token_id"]})

    # The model check: log-likelihood of the prompts under the base model (adapters off).
    with torch.no_grad(), disable_adapters(model):
        ids = torch.stack(queries).to(spec.device)  # (B, P)
        logits = model(input_ids=ids).logits.float()
        check = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean().item()

    def generate(qs):
        return trainer.generate(qs)

    def step(qs, rs, scores):
        stats = trainer.step(qs, rs, scores)
        return (
            stats["time/ppo/forward_pass"],
            stats["time/ppo/optimize_step"],
            stats["time/ppo/total"],
        )

    cuda = spec.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    records = run_steps(
        spec, generate, step, queries, sync=torch.cuda.synchronize if cuda else None
    )
    emit(
        dict(
            side="minippo",
            dtype=spec.dtype,
            records=records,
            peak_rss_mib=peak_rss_mib(),
            gpu_peak_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            gpu=torch.cuda.get_device_name() if cuda else None,
            loaded_rss_mib=loaded_rss,
            load_s=t_load.seconds,
            check=check,
            trainable=sum(p.numel() for p in trainer.trainable),
        )
    )


if __name__ == "__main__":
    main(Spec.from_json(sys.argv[1]))
