"""One PPO step, minippo vs the peer (trl 0.4.7 + peft 0.4.0), same models, same work, one command.

    .venv/bin/python benchmarks/ppo_step.py            # all models, writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/ppo_step.py --quick    # smallest model, one timed step each

The work (both sides): LoRA r=16, alpha 32, dropout 0.05 on the attention projections; batch 16,
mini-batch 4, 4 PPO epochs; prompts of 8 random tokens; 24 new tokens sampled (top_k 0, top_p 1,
fixed length); a deterministic token-level reward (`_common.token_reward`, no classifier).
Models: a ~7M random GPT-NeoX, a ~100M random GPT-NeoX (built here from a config and saved to a
temporary folder both stacks load) and SmolLM2-135M (the embedded model, `minippo.app.model_folders`; the
peer's transformers 4.31 gets its RoPE base 100000 set by hand).

Each side runs in its own process and virtual environment (the peer in .venv-peer, made by
benchmarks/setup_peer.sh), one after the other and in alternating order each round, so both see
the same machine load. Each process loads, runs `--warmup` untimed steps, then `--steps` timed ones.
Reported: medians of seconds per step split into generation / forward passes (rollout + reference
log-probs, no grad) / optimisation (the PPO epochs) / other; response tokens per second
(batch x new tokens / step time); peak RSS of the process; minippo / peer ratios; and the step's
model FLOPs over the machine's measured matmul peak (see `model_flops`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
from _common import NEOX_SIZES, Spec  # noqa: E402

from minippo.app.demo import DemoConfig, demo_stage_configs  # noqa: E402
from minippo.app.report import cpu_flags, cpu_name  # noqa: E402

PEER_PYTHON = REPO / ".venv-peer" / "bin" / "python"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- ppo_step:begin -->", "<!-- ppo_step:end -->"

# name -> GPT-NeoX sizes (random weights), or None for the embedded SmolLM2.
MODELS = {name: NEOX_SIZES[name] for name in ("neox-7m", "neox-100m")} | {"smollm2-135m": None}
INPUT_EMBEDDINGS = (
    "embed_in",
    "embed_tokens",
    "wte",
    "wpe",
    "embed_positions",
)  # lookups, not matmuls
TARGETS = {
    "gpt_neox": ["query_key_value", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


# ---------------------------------------------------------------------------------------- models


def build_model(name: str, root: Path) -> Path:
    """A model folder both stacks load, with bench.json (vocab, pad/eos ids, rope theta) beside it."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    sizes = MODELS[name]
    if sizes is None:  # the embedded model: link its files, add bench.json
        from minippo.app.model_folders import embedded_model_dir

        src = Path(embedded_model_dir())
        for f in src.iterdir():
            if not (out / f.name).exists():
                (out / f.name).symlink_to(f)
        config = json.loads((src / "config.json").read_text())
        theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    else:
        torch.manual_seed(0)
        config = GPTNeoXConfig(
            max_position_embeddings=2048, bos_token_id=0, eos_token_id=2, pad_token_id=1, **sizes
        )
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(out)
        config = json.loads((out / "config.json").read_text())
        # transformers 4.31 reads the rotary settings under their old names.
        rope = config.get("rope_parameters") or {}
        config.update(
            rotary_pct=rope.get("partial_rotary_factor", 0.25),
            rotary_emb_base=rope.get("rope_theta", 10000.0),
            torch_dtype="float32",
        )
        (out / "config.json").write_text(json.dumps(config, indent=2))
        theta = None
    info = dict(
        model_type=config["model_type"],
        vocab_size=config["vocab_size"],
        pad_token_id=config.get("pad_token_id") or 0,
        eos_token_id=config["eos_token_id"],
        rope_theta=theta,
        targets=TARGETS[config["model_type"]],
    )
    (out / "bench.json").write_text(json.dumps(info, indent=2))
    return out


def matmul_params(model_dir: Path) -> tuple[int, int]:
    """(N, all params): N counts the weights that take part in matmuls (every Linear and the LM
    head, not the embedding lookup), from the safetensors header; all counts every tensor."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    n = total = 0
    tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", False)
    for f in files:
        with safe_open(f, "pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                total += numel
                if len(shape) == 2 and (not any(e in key for e in INPUT_EMBEDDINGS) or tied):
                    n += numel  # Linear weights and the LM head; a tied input embedding is the LM head
    return n, total


# The work of one step, by name: the benchmark's own, and the `cpu` demo preset's PPO step (the PPO
# stage config that `minippo demo` resolves, so the two cannot drift apart; its responses are fixed at
# the longest length).
_DEMO = demo_stage_configs(DemoConfig(preset="cpu"), "model")["ppo"]
WORK = {
    "bench": {},
    "demo": dict(
        batch_size=_DEMO.ppo.batch_size,
        mini_batch_size=_DEMO.ppo.mini_batch_size,
        ppo_epochs=_DEMO.ppo.ppo_epochs,
        new_tokens=_DEMO.ppo.max_new_tokens,
        learning_rate=_DEMO.ppo.learning_rate,
        gradient_checkpointing=_DEMO.ppo.gradient_checkpointing,
        lora_r=_DEMO.lora.r,
        lora_alpha=_DEMO.lora.alpha,
    ),
}


def model_flops(n: int, spec: Spec, train_per_token: int = 6) -> float:
    """Model FLOPs of one PPO step: 2 N per token forward, 6 N per token forward + backward.

    tokens = B (P + T); generation ~ one forward over them; the rollout + reference passes are two
    forwards; the PPO epochs are ppo_epochs forward + backward passes:
        FLOPs = (2 + 2 * 2 + 6 * ppo_epochs) * N * B * (P + T)
    Note: with a frozen base the backward computes no weight gradients, so the hardware does
    about 4 N (not 6 N) per trained token; 6 N is the usual model-FLOPs convention, and
    `train_per_token=4` gives the estimate of the work actually done. Attention's
    own FLOPs are left out (L = 32 is tiny next to H).
    """
    tokens = spec.batch_size * (spec.prompt_len + spec.new_tokens)
    return (2 + 2 * 2 + train_per_token * spec.ppo_epochs) * n * tokens


def optimisation_flops(n: int, spec: Spec, stack: str = "minippo") -> float:
    """FLOPs the optimisation phase really does: ppo_epochs x (forward 2N + input gradients 2N) per
    token, less minippo's first forward where one mini-batch is the whole batch (the rollout phase's
    forward keeps its graph and the first update reuses it; the peer recomputes it); the adapters' and
    the value head's own FLOPs are left out (r << H)."""
    reused = stack == "minippo" and spec.mini_batch_size == spec.batch_size
    return (
        (4 * spec.ppo_epochs - 2 * reused)
        * n
        * spec.batch_size
        * (spec.prompt_len + spec.new_tokens)
    )


def matmul_peak(threads: int, device: str = "cpu") -> dict[str, float]:
    """Measured matmul throughput (GFLOP/s; GOP/s for int8) of this machine, fp32, bf16 and int8 (the int8
    GEMM the 8-bit layers run, `torch._int_mm`): the best of 5 products of two n x n random matrices
    (n = 2048 on a CPU at `threads` threads, 8192 on a GPU)."""
    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    size, reps = (8192, 10) if cuda else (2048, 5)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {}

    def product(a, b):
        return torch._int_mm(a, b) if a.dtype == torch.int8 else a @ b

    def matrix(n, dtype):
        if dtype == torch.int8:
            return torch.randint(-127, 128, (n, n), dtype=dtype, device=device)
        return torch.randn(n, n, dtype=dtype, device=device)

    for name, dtype in (
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("int8", torch.int8),
    ):
        if dtype != torch.float32 and not cuda:
            # a CPU without native bf16 (or VNNI) runs it tens of times slower: time a 4x smaller product
            quick = matrix(size // 4, dtype)
            t = time.perf_counter()
            product(quick, quick)
            if time.perf_counter() - t > 0.1:
                out[name] = 2 * (size // 4) ** 3 / (time.perf_counter() - t) / 1e9
                continue
        a, b = matrix(size, dtype), matrix(size, dtype)
        product(a, b)  # warm up
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            product(a, b)
            sync()
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * size**3 / best / 1e9
    return out


# -------------------------------------------------------------------------------------- running


def run_worker(side: str, spec: Spec, timeout: float) -> dict:
    """Run one worker process; its RESULT line as a dict, or {"error": ...}."""
    if side == "peer":
        cmd = [str(PEER_PYTHON), str(HERE / "_peer_step.py"), spec.to_json()]
    else:
        cmd = [sys.executable, str(HERE / "_minippo_step.py"), spec.to_json()]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(spec.threads),
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    )
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT ") :])


def summarise(runs: list[dict]) -> dict:
    """Medians over every timed step of every run of one (model, side, dtype)."""
    records = [r for run in runs for r in run["records"]]
    med = {k: statistics.median(r[k] for r in records) for k in records[0]}
    gpu = [r["gpu_peak_mib"] for r in runs if r.get("gpu_peak_mib") is not None]
    return dict(
        **med,
        n=len(records),
        peak_rss_mib=max(r["peak_rss_mib"] for r in runs),
        gpu_peak_mib=max(gpu) if gpu else None,
        gpu=runs[0].get("gpu"),
        loaded_rss_mib=max(r["loaded_rss_mib"] for r in runs),
        check=runs[0]["check"],
        trainable=runs[0]["trainable"],
    )


def versions() -> dict[str, str]:
    import transformers

    import minippo

    ours = f"minippo {minippo.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import bitsandbytes

        ours += f", bitsandbytes {bitsandbytes.__version__}"
    except ImportError:
        pass
    peer = "not installed (run benchmarks/setup_peer.sh)"
    if PEER_PYTHON.exists():
        code = (
            "import torch, transformers, peft, trl; print(f'trl {trl.__version__}, peft {peft.__version__}, "
            "transformers {transformers.__version__}, torch {torch.__version__}')"
        )
        peer = subprocess.run(
            [str(PEER_PYTHON), "-c", code], capture_output=True, text=True
        ).stdout.strip()
    return {"minippo": ours, "peer": peer}


def auto_dtype(device: str) -> str:
    """What compute_dtype="auto" picks here for a float model ("float32" or "bfloat16")."""
    from minippo.quant import auto_compute_dtype

    return str(auto_compute_dtype(device)).removeprefix("torch.")


def auto_choice(device: str) -> str:
    """What compute_dtype="auto" picks here for a float model and for an 8-bit one."""
    float_model = auto_dtype(device)
    return f"float model {float_model}, 8-bit model {'float32' if device == 'cpu' else float_model}"


# -------------------------------------------------------------------------------------- report


def markers(section: str = "") -> tuple[str, str]:
    """The RESULTS.md markers of the main table, or of a named extra section."""
    name = f"ppo_step:{section}" if section else "ppo_step"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def report(results: dict, peak: dict, meta: dict, spec: Spec, section: str = "") -> str:
    begin, end = markers(section)
    title = "## PPO step: minippo vs trl 0.4.7 + peft 0.4.0" + (f" ({section})" if section else "")
    lines = [
        begin,
        title,
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}; torch threads: {spec.threads}",
        f"- minippo: {meta['versions']['minippo']}",
        f"- peer: {meta['versions']['peer']}",
        f"- work per step: batch {spec.batch_size}, mini-batch {spec.mini_batch_size}, "
        f"{spec.ppo_epochs} PPO epochs, learning rate {spec.learning_rate:g}, prompts {spec.prompt_len} tokens, "
        f"{spec.new_tokens} new tokens "
        f"(top_k 0, top_p 1, fixed length), LoRA r={spec.lora_r} alpha {spec.lora_alpha:g} dropout "
        f"{spec.lora_dropout} on the attention projections, token-level reward; minippo's gradient "
        f"checkpointing: {'trainer default (on for 8-bit)' if spec.gradient_checkpointing is None else spec.gradient_checkpointing}",
        f"- timing: {meta['rounds']} round(s) x {spec.steps} timed step(s) per process after "
        f"{spec.warmup} warm-up step(s), sides alternating; medians. Peer: float32 (its 8-bit path "
        "does not run on CPU). minippo: float32 (same work), auto (compute_dtype auto, base stored in what it "
        "picks), bfloat16 autocast, bf16-weights (base stored in bf16, LM head too), int8 and nf4 "
        "(bitsandbytes; int8 loaded with dtype auto, as `minippo ppo`: embeddings in bf16 where it is native). "
        "minippo's worker keeps freed memory for reuse, as the `minippo` command does (`retain_freed_memory`; "
        "the peer keeps glibc's defaults, as a trl script does).",
        f"- device: {meta['device']}; matmul peak measured there ({spec.threads} CPU threads; "
        f"{'8192' if meta['device'] != 'cpu' else '2048'}^3): "
        + ", ".join(
            f"{k} {v:.0f} {'GOP/s' if k == 'int8' else 'GFLOP/s'}" for k, v in peak.items()
        ),
        "- model FLOPs per step = (2 + 2*2 + 6*epochs) * N * B * (P + T): generation ~1 forward, "
        "rollout + reference 2 forwards, each PPO epoch a forward + backward (6N convention; "
        "a frozen base really costs ~4N: the (4N) column); N = matmul weights (Linears + LM head). The % column divides "
        "by the bf16 peak for bfloat16 rows (auto too, where it picked bfloat16) and by the fp32 peak "
        "otherwise (int8 too: over 100% means faster than fp32 matmuls could be). The optimisation column divides that phase's "
        "4N FLOPs (`optimisation_flops`; less minippo's first forward where one mini-batch is the batch: "
        "it reuses the rollout's) by its time and the same peak.",
        "- tokens/s = batch x new tokens / step time. Peak RSS: the worker process's maximum "
        "(imports + model + step); 'loaded' is its RSS once the model is loaded. On a GPU, "
        "'GPU peak' is torch.cuda.max_memory_allocated over the timed steps.",
        f"- machine load (1-minute load average) at start / end: {meta['load']}",
        "",
    ]
    for model, rows in results.items():
        info = meta["models"][model]
        lines += [
            f"### {model} ({info['params'] / 1e6:.1f}M parameters, N = {info['n'] / 1e6:.1f}M in matmuls)",
            "",
            "| stack | s/step | generation | forward passes | optimisation | other | tokens/s | "
            "peak RSS MiB (loaded) | GPU peak MiB | time vs peer | RSS vs peer | % of matmul peak (6N) | (4N) | "
            "optimisation % of peak (4N) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        peer, every_peak = rows.get("peer/float32"), []
        for key, r in rows.items():
            if "error" in r:
                lines.append(f"| {key} | failed: {r['error'][:150]} | | | | | | | | | | | | |")
                continue
            flops = model_flops(info["n"], spec)
            bf16 = (
                "bfloat16" in key
                or "bf16" in key
                or (key.endswith("/auto") and meta.get("auto") == "bfloat16")
            )
            pk = peak["bfloat16" if bf16 else "float32"]
            frac = flops / r["total"] / (pk * 1e9) * 100
            frac4 = model_flops(info["n"], spec, train_per_token=4) / r["total"] / (pk * 1e9) * 100
            tps = spec.batch_size * spec.new_tokens / r["total"]
            rate = (
                optimisation_flops(info["n"], spec, stack=key.split("/")[0])
                / r["optimisation"]
                / 1e9
            )
            opt = rate / pk * 100
            if key.endswith(
                "/int8"
            ):  # the 8-bit step's optimisation phase against every peak measured
                every_peak += [
                    "",
                    f"{key}'s optimisation phase: {rate:.0f} GFLOP/s of the 4N model FLOPs, "
                    + ", ".join(f"{rate / v * 100:.0f}% of the {k} peak" for k, v in peak.items())
                    + " (its base layers run the int8 GEMM; the LM head, attention and adapters run in float)",
                ]
            vs = vr = "1.00"
            if key != "peer/float32":
                vs = f"{r['total'] / peer['total']:.2f}" if peer and "error" not in peer else "-"
                vr = (
                    f"{r['peak_rss_mib'] / peer['peak_rss_mib']:.2f}"
                    if peer and "error" not in peer
                    else "-"
                )
            lines.append(
                f"| {key} | {r['total']:.2f} | {r['generation']:.2f} | {r['forward']:.2f} | "
                f"{r['optimisation']:.2f} | {r['other']:.2f} | {tps:.0f} | "
                f"{r['peak_rss_mib']:.0f} ({r['loaded_rss_mib']:.0f}) | "
                f"{'-' if r.get('gpu_peak_mib') is None else format(r['gpu_peak_mib'], '.0f')} | "
                f"{vs} | {vr} | {frac:.1f} | {frac4:.1f} | {opt:.1f} |"
            )
        lines += every_peak
        checks = {k: r["check"] for k, r in rows.items() if "error" not in r}
        if len(checks) > 1:
            lines += [
                "",
                "Same model on both sides: mean log-likelihood of the prompts under the base model: "
                + ", ".join(f"{k} {v:.5f}" for k, v in checks.items()),
            ]
        lines.append("")
    lines.append(end)
    return "\n".join(lines)


def write_section(text: str, begin: str = BEGIN, end: str = END, path: Path = RESULTS) -> None:
    """Replace the marked section of RESULTS.md (or append it), leaving the rest of the file alone."""
    old = path.read_text() if path.exists() else "# minippo benchmark results\n\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smallest model, 1 round, 1 timed step, float32 only"
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument(
        "--variants",
        default="float32,auto",
        help="minippo dtypes: float32,auto (compute_dtype auto, base stored in what it picks),bfloat16,"
        "bf16-weights,int8,nf4; a -fast suffix (int8-fast) loads with load_model(fast=True)",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="alternating rounds (a process per side per round)"
    )
    p.add_argument("--steps", type=int, default=2, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--work",
        choices=sorted(WORK),
        default="bench",
        help='work per step: "bench" (batch 16, mini-batch 4, 4 epochs, 24 new tokens) or "demo" '
        "(read from the `cpu` demo preset: its batch, mini-batch, epochs, longest response, learning "
        "rate, PPO adapter size and gradient checkpointing)",
    )
    p.add_argument(
        "--no-peer", action="store_true", help="minippo only (e.g. a GPU machine without trl)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help='minippo\'s device: "cpu" or "cuda" (the peer runs on the CPU)',
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per worker process")
    p.add_argument(
        "--out", default=str(RESULTS), help="markdown file to update (section between markers)"
    )
    p.add_argument("--json", default=None, help="also dump the raw results here")
    p.add_argument("--render", default=None, help="only re-write the report from a --json dump")
    p.add_argument(
        "--section",
        default="",
        help="write a named extra section of RESULTS.md instead of the main one",
    )
    args = p.parse_args(argv)
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        text = report(raw["results"], raw["peak"], raw["meta"], Spec(**raw["spec"]), args.section)
        write_section(text, *markers(args.section), path=Path(args.out))
        print(text)
        return 0
    if args.quick:
        args.models, args.variants, args.rounds, args.steps, args.warmup = (
            "neox-7m",
            "float32",
            1,
            1,
            1,
        )
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    use_peer = not args.no_peer
    if use_peer and not (PEER_PYTHON.parent.parent / ".peer-installed").exists():
        print(
            "installing the peer's environment (.venv-peer): bash benchmarks/setup_peer.sh",
            flush=True,
        )
        if subprocess.run(["bash", str(HERE / "setup_peer.sh")]).returncode != 0:
            print("could not install the peer: see above, or pass --no-peer", file=sys.stderr)
            return 2

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    peak = matmul_peak(args.threads, args.device)
    print("matmul peak:", {k: f"{v:.0f} GFLOP/s" for k, v in peak.items()}, flush=True)
    meta = dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        rounds=args.rounds,
        machine=f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}; flags {cpu_flags()}; "
        f"compute_dtype auto -> {auto_choice(args.device)}",
        auto=auto_dtype(args.device),
        device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        versions=versions(),
        models={},
    )
    root = Path(tempfile.mkdtemp(prefix="minippo-bench-"))
    results: dict[str, dict] = {}
    spec = None
    try:
        for model in models:
            folder = build_model(model, root)
            info = json.loads((folder / "bench.json").read_text())
            n, total = matmul_params(folder)
            meta["models"][model] = dict(params=total, n=n)
            spec = Spec(
                model_dir=str(folder),
                targets=info["targets"],
                warmup=args.warmup,
                steps=args.steps,
                threads=args.threads,
                device=args.device,
                **WORK[args.work],
            )
            sides = (["peer/float32"] if use_peer else []) + [f"minippo/{v}" for v in variants]
            runs: dict[str, list] = {s: [] for s in sides}
            for r in range(args.rounds):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    who, dtype = side.split("/")
                    s = Spec(**{**spec.__dict__, "dtype": dtype})
                    t = time.perf_counter()
                    res = run_worker(who, s, args.timeout)
                    print(
                        f"{model} {side} round {r}: "
                        + (
                            res["error"]
                            if "error" in res
                            else f"{statistics.median(x['total'] for x in res['records']):.2f} s/step "
                            f"(process {time.perf_counter() - t:.0f} s)"
                        ),
                        flush=True,
                    )
                    runs[side].append(res)
            results[model] = {}
            for side, rs in runs.items():
                ok = [x for x in rs if "error" not in x]
                results[model][side] = summarise(ok) if ok else rs[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    meta["load"] = f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"
    text = report(results, peak, meta, spec, args.section)
    print(text)
    write_section(text, *markers(args.section), path=Path(args.out))
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(meta=meta, peak=peak, results=results, spec=spec.__dict__), indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
