"""Where does minippo's PPO step spend its time? cProfile (Python) and torch.profiler (ops).

    .venv/bin/python benchmarks/profile_step.py                  # neox-7m, float32
    .venv/bin/python benchmarks/profile_step.py --model neox-100m --dtype bfloat16

Builds the model as ppo_step.py does, runs one warm-up step, then profiles one generate + step
and prints the top functions by cumulative time and the top torch ops by self CPU time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import Spec, make_queries, model_info, token_reward  # noqa: E402
from _minippo_step import build_trainer  # noqa: E402
from ppo_step import build_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="neox-7m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="minippo-prof-"))
    try:
        folder = build_model(args.model, root)
        info = json.loads((folder / "bench.json").read_text())
        spec = Spec(model_dir=str(folder), targets=info["targets"], dtype=args.dtype)
        info = model_info(spec.model_dir)
        _, trainer = build_trainer(spec, info)
        queries = make_queries(
            spec, info["vocab_size"], {info["pad_token_id"], info["eos_token_id"]}
        )

        def one_step():
            responses = trainer.generate(queries)
            return trainer.step(queries, responses, [token_reward(r) for r in responses])

        one_step()  # warm-up
        prof = cProfile.Profile()
        prof.enable()
        stats = one_step()
        prof.disable()
        print({k: round(v, 3) for k, v in stats.items() if k.startswith("time/")})
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            one_step()
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
