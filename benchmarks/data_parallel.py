"""PPO step throughput on one CPU: 1 process x 2 threads against 2 processes x 1 thread (torchrun, gloo),
with 1 process x 1 thread as the yardstick.

    .venv/bin/python benchmarks/data_parallel.py             # writes its section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/data_parallel.py --rounds 1  # quicker

The work, the same in both layouts: a random ~7M GPT-NeoX (benchmarks/ppo_step.py's neox-7m), LoRA
r=16 on the attention projections, float32; a global batch of 16 prompts of 8 random tokens, 24 new
tokens sampled, a deterministic token reward, then `PPOTrainer.step` (mini-batch 4, 4 PPO epochs).
With 2 processes each generates, scores and trains on 8 samples and the gradients are all-reduced.
Each launch runs `--warmup` untimed steps, then `--steps` timed ones (a barrier before each, so rank
0's clock covers the slowest rank); the layouts alternate each round; medians are reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
BATCH, PROMPT, NEW = 16, 8, 24
BEGIN, END = "<!-- data_parallel:begin -->", "<!-- data_parallel:end -->"


def worker(model_dir: str, warmup: int, steps: int, device: str = "cpu") -> None:
    """One process of a launch (torchrun sets RANK / WORLD_SIZE; OMP_NUM_THREADS sets the threads).
    On CUDA each process takes GPU LOCAL_RANK and loads the base in 8-bit."""
    import torch

    from minippo import LoRAConfig, PPOConfig, PPOTrainer, add_lora, distributed
    from minippo.quant import load_model

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    base = load_model(model_dir, load_in_8bit=device != "cpu", device=device)
    model = add_lora(base, LoRAConfig(r=16, alpha=32, dropout=0.0))
    config = PPOConfig(
        batch_size=BATCH,
        mini_batch_size=4,
        ppo_epochs=4,
        min_new_tokens=NEW,
        max_new_tokens=NEW,
        device=device,
    )
    trainer = PPOTrainer(config, model)
    n = trainer.batch_size_per_rank
    prompts = torch.randint(3, 8192, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    queries = list(prompts[trainer.rank * n : (trainer.rank + 1) * n])
    times = []
    for i in range(warmup + steps):
        distributed.barrier()
        start = time.perf_counter()
        responses = trainer.generate(queries)
        scores = [float((r % 2 == 0).float().mean()) for r in responses]  # share of even token ids
        trainer.step(queries, responses, scores)
        distributed.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if trainer.rank == 0:
        print("RESULT " + json.dumps({"seconds": times}))
    distributed.shutdown()


def launch(
    model_dir: Path, processes: int, threads: int, warmup: int, steps: int, device: str
) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    command += [__file__, "--device", device, "--worker", str(model_dir), str(warmup), str(steps)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode:
        raise RuntimeError(f"{processes} x {threads} failed:\n{run.stderr[-3000:]}")
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--device", default="cpu", help="cuda: 1 GPU against 2 GPUs, printed, not written"
    )
    parser.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "WARMUP", "STEPS"))
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.device)

    from ppo_step import build_model, cpu_name, write_section

    layouts = [
        (1, 2),
        (2, 1),
        (1, 1),
    ]  # (processes, threads per process); 1 x 1 shows the contention
    if args.device == "cuda":
        layouts = [(1, 2), (2, 1)]  # 1 GPU against 2 GPUs (the threads matter little there)
    seconds: dict[tuple[int, int], list[float]] = {layout: [] for layout in layouts}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model("neox-7m", Path(tmp))
        for round_ in range(args.rounds):
            for layout in layouts if round_ % 2 == 0 else layouts[::-1]:
                seconds[layout] += launch(model_dir, *layout, args.warmup, args.steps, args.device)
                print(f"{layout[0]} x {layout[1]}: {seconds[layout][-args.steps :]}", flush=True)
    load.append(os.getloadavg()[0])

    median = {layout: statistics.median(s) for layout, s in seconds.items()}
    rows = [
        f"| {p} process{'es' if p > 1 else ''} x {t} thread{'s' if t > 1 else ''} | {median[(p, t)]:.2f} "
        f"| {BATCH / median[(p, t)]:.1f} | {median[(1, 2)] / median[(p, t)]:.2f}x |"
        for p, t in layouts
    ]
    text = "\n".join(
        [
            BEGIN,
            f"## Data parallel on one CPU ({datetime.date.today()}, `benchmarks/data_parallel.py`)",
            "",
            f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load[0]:.1f} at the start, "
            f"{load[1]:.1f} at the end; {args.rounds} rounds x {args.steps} timed steps per layout, medians.",
            f"Work per step: {BATCH} samples (neox-7m, float32, LoRA r=16), generation of {NEW} tokens + "
            "`PPOTrainer.step` (mini-batch 4, 4 epochs).",
            "",
            "| layout | s/step | samples/s | throughput vs 1 x 2 |",
            "|---|---:|---:|---:|",
            *rows,
            END,
        ]
    )
    print(text)
    if args.device == "cpu":
        write_section(text, BEGIN, END)


if __name__ == "__main__":
    main()
