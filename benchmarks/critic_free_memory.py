"""Peak memory and time of one PPO step with and without a critic: GAE (value head) vs GRPO and RLOO.

    .venv/bin/python benchmarks/critic_free_memory.py            # the demo's step size, SmolLM2 in 8-bit
    .venv/bin/python benchmarks/critic_free_memory.py --quick    # a tiny random model

Each estimator runs in its own process (so peak RSS is its own): the demo preset's PPO work (batch, mini-batch,
epochs, response length, LoRA rank), on random prompts of 2-7 tokens; one untimed step, then `--steps`
timed ones. Reported: the peak bytes of tensors made inside a step (`TensorMemoryTracker`, measured on
its own extra step, as it slows ops down), the process's peak RSS, and seconds per step. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ESTIMATORS = ("gae", "grpo", "rloo")


def worker(estimator: str, quick: bool, steps: int, fast: bool) -> dict:
    import torch

    from minippo import LoRAConfig, PPOConfig, PPOTrainer, add_lora, load_model
    from minippo.app.demo import DemoConfig, demo_stage_configs
    from minippo.app.memory_plan import TensorMemoryTracker
    from minippo.app.model_folders import resolve_model

    torch.manual_seed(0)
    stage = demo_stage_configs(DemoConfig(preset="cpu"), "model")["ppo"]
    settings = dict(
        batch_size=stage.ppo.batch_size,
        mini_batch_size=stage.ppo.mini_batch_size,
        ppo_epochs=stage.ppo.ppo_epochs,
        learning_rate=stage.ppo.learning_rate,
        gradient_checkpointing=stage.ppo.gradient_checkpointing,
        min_new_tokens=stage.ppo.max_new_tokens,
        max_new_tokens=stage.ppo.max_new_tokens,
        advantage_estimator=estimator,
        num_generations=1 if estimator == "gae" else 4,
        init_kl_coef=stage.ppo.init_kl_coef,
        adap_kl_ctrl=False,
    )
    if quick:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import tiny_model

        model = tiny_model("llama", 384)
        settings.update(batch_size=16, mini_batch_size=16)
    else:
        model = load_model(
            resolve_model("smollm2-135m"), load_in_8bit=True, dtype="auto", fast=fast
        )
    add_lora(model, LoRAConfig(r=stage.lora.r, alpha=stage.lora.alpha))
    trainer = PPOTrainer(PPOConfig(**settings), model)
    vocab = model.config.vocab_size
    B, group = settings["batch_size"], settings["num_generations"]
    prompts = [torch.randint(3, vocab, (2 + i % 6,)) for i in range(B // group)]
    queries = [p for p in prompts for _ in range(group)]
    responses = trainer.generate(queries)
    scores = torch.randn(B)
    trainer.step(queries, responses, scores)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(queries, responses, scores)
        times.append(time.perf_counter() - start)
    with TensorMemoryTracker() as mem:
        trainer.step(queries, responses, scores)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    return dict(
        estimator=estimator,
        tensor_peak_mib=mem.peak / 2**20,
        peak_rss_mib=rss,
        seconds=statistics.median(times),
        value_head=trainer.config.uses_value_head,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny random model")
    p.add_argument("--steps", type=int, default=2, help="timed steps per estimator")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fast", action="store_true", help="load_model(fast=True)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.quick, args.steps, args.fast)))
        return 0
    rows = []
    for estimator in ESTIMATORS:
        command = [sys.executable, __file__, "--worker", estimator, "--steps", str(args.steps)]
        command += ["--threads", str(args.threads)] + ["--quick"] * args.quick
        command += ["--fast"] * args.fast
        env = dict(os.environ, PYTHONPATH=str(REPO))
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gae = rows[0]
    print("| estimator | value head | tensor peak of a step (MiB) | peak RSS (MiB) | s / step |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        ratio = r["tensor_peak_mib"] / gae["tensor_peak_mib"]
        print(
            f"| {r['estimator']} | {'yes' if r['value_head'] else 'no'} | "
            f"{r['tensor_peak_mib']:.0f} ({ratio:.2f}x) | {r['peak_rss_mib']:.0f} | {r['seconds']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
