"""The peer's classic PPO loop, timed: trl 0.4.7 + peft 0.4.0 (run in .venv-peer by ppo_step.py).

`AutoModelForCausalLMWithValueHead` over a peft LoRA model, `PPOTrainer.generate` (batched, the
whole batch at once) and `PPOTrainer.step` with the reference policy taken by switching the
adapter off (`ref_model=None`). Float32 on CPU: the blog-era 8-bit path does not run on CPU
with this stack (peft 0.4.0 and trl 0.4.7 predate bitsandbytes' CPU int8), so 8-bit is
compared against this float path.

    .venv-peer/bin/python benchmarks/_peer_step.py '<Spec JSON>'
"""

import sys
import warnings

import torch
from _common import (
    Spec,
    Timer,
    emit,
    make_queries,
    model_info,
    peak_rss_mib,
    rss_mib,
    run_steps,
    stand_in_tokenizer,
)

warnings.filterwarnings("ignore")


def set_rope_theta(model, theta: float) -> int:
    """transformers 4.31 builds Llama's rotary embedding with base 10000 whatever the config says;
    SmolLM2 uses 100000. Rebuild inv_freq and the cos/sin cache of every rotary module."""
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            dim = module.dim
            module.base = theta
            module.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
            module._set_cos_sin_cache(
                module.max_seq_len_cached, module.inv_freq.device, torch.get_default_dtype()
            )
            n += 1
    return n


def main(spec: Spec) -> None:
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    from peft import LoraConfig
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    info = model_info(spec.model_dir)
    tokenizer = stand_in_tokenizer(info["pad_token_id"], info["eos_token_id"])
    lora = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with Timer() as t_load:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(spec.model_dir, peft_config=lora)
        if info.get("rope_theta") and info["model_type"] == "llama":
            assert set_rope_theta(model, float(info["rope_theta"])) > 0
    loaded_rss = rss_mib()
    config = PPOConfig(
        batch_size=spec.batch_size,
        mini_batch_size=spec.mini_batch_size,
        ppo_epochs=spec.ppo_epochs,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
    )
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    queries = make_queries(spec, info["vocab_size"], {info["pad_token_id"], info["eos_token_id"]})

    # The model check: log-likelihood of the prompts under the base model (adapters off).
    with torch.no_grad(), model.pretrained_model.disable_adapter():
        ids = torch.stack(queries)  # (B, P)
        logits = model.pretrained_model(input_ids=ids).logits.float()
        check = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean().item()

    gen_kwargs = dict(
        min_new_tokens=spec.new_tokens,
        max_new_tokens=spec.new_tokens,
        top_k=0,
        top_p=1.0,
        do_sample=True,
        pad_token_id=info["pad_token_id"],
        eos_token_id=info["eos_token_id"],
    )

    def generate(qs):
        return trainer.generate(qs, batch_size=spec.batch_size, return_prompt=False, **gen_kwargs)

    def step(qs, rs, scores):
        stats = trainer.step(qs, rs, [torch.tensor(s) for s in scores])
        return (
            stats["time/ppo/forward_pass"],
            stats["time/ppo/optimize_step"],
            stats["time/ppo/total"],
        )

    records = run_steps(spec, generate, step, queries)
    emit(
        dict(
            side="peer",
            dtype="float32",
            records=records,
            peak_rss_mib=peak_rss_mib(),
            loaded_rss_mib=loaded_rss,
            load_s=t_load.seconds,
            check=check,
            trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        )
    )


if __name__ == "__main__":
    main(Spec.from_json(sys.argv[1]))
