"""Memory, measured: bytes per parameter of the weights (fp32 / bf16 / int8 / nf4) at several sizes, and
the cost of the PPO reference model (adapters switched off vs a second frozen copy).

    .venv/bin/python benchmarks/memory.py            # writes its section of benchmarks/RESULTS.md
    .venv/bin/python benchmarks/memory.py --quick    # two small sizes, no SmolLM2
    .venv/bin/python benchmarks/memory.py --weights-only  # the weights table alone, its own section

1. Weights: random GPT-NeoX models built from a config (and SmolLM2-135M, the embedded model),
   footprint = bytes of parameters + buffers (+ the int8 layers' fp32 row scales), counted by
   `minippo.app.memory_plan.model_footprint_bytes`; next to it the planner's prediction (`minippo.app.memory_plan`).
   int8 = bitsandbytes `Linear8bitLt` for every Linear except the LM head; the embedding, norms and
   LM head stay in fp32, as minippo trains them (`prepare_model_for_kbit_training`).  nf4 = bitsandbytes
   `Linear4bit` (NF4, double-quantised block scales: QLoRA) for the same layers.
2. Reference model: in a fresh process each, (a) a LoRA policy whose reference log-probs come from
   the same model under `disable_adapters`, (b) the same policy plus a frozen deep copy of the base
   as the reference. Reported: weight footprint, process peak RSS after a policy forward and a
   reference forward, and the reference forward's peak tensor memory (`TensorMemoryTracker`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _common import NEOX_SIZES  # noqa: E402

BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"
WEIGHTS_BEGIN, WEIGHTS_END = "<!-- memory:weights:begin -->", "<!-- memory:weights:end -->"
DTYPES = ("fp32", "bf16", "int8", "nf4")
MiB = 2**20


def neox(sizes: dict, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        GPTNeoXConfig(max_position_embeddings=2048, **sizes)
    ).eval()


def smollm2():
    from minippo.app.model_folders import embedded_model_dir
    from minippo.quant import load_model

    return load_model(str(embedded_model_dir()))


def linear_params(model) -> int:
    """Parameters of the nn.Linear layers that int8 quantises (all but the LM head)."""
    head = model.get_output_embeddings()
    return sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )


def weights_table(names: list[str]) -> list[dict]:
    """Footprint per dtype for each model, with the planner's prediction beside it."""
    from minippo.app.memory_plan import PlanConfig, model_footprint_bytes, plan_memory
    from minippo.quant import quantize_model

    rows = []
    for name in names:
        model = smollm2() if name == "smollm2-135m" else neox(NEOX_SIZES[name])
        cfg = model.config
        n_params = sum(p.numel() for p in model.parameters())
        n_linear = linear_params(model)
        config_dir = tempfile.mkdtemp(prefix="minippo-mem-")
        cfg.save_pretrained(config_dir)  # the planner reads the shapes from config.json
        plan_kw = dict(model=config_dir, reserve_gib=0)
        row = dict(model=name, params=n_params, linear=n_linear)
        for dtype in DTYPES:
            m = copy.deepcopy(model)  # fp32
            if dtype in ("int8", "nf4"):
                quantize_model(m, bits=8 if dtype == "int8" else 4)  # the rest stays fp32
                plan = plan_memory(PlanConfig(dtype=dtype, compute_dtype="fp32", **plan_kw))
            else:
                m.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
                plan = plan_memory(PlanConfig(dtype=dtype, **plan_kw))
            row[dtype] = model_footprint_bytes(m)
            row[f"plan_{dtype}"] = plan.parts["weights"]
            del m
        # bytes per parameter of the linear layers alone under int8: (total - non-linear fp32) / linear
        for dtype in ("int8", "nf4"):
            row[f"{dtype}_linear_bpp"] = (row[dtype] - 4 * (n_params - n_linear)) / n_linear
        rows.append(row)
        shutil.rmtree(config_dir, ignore_errors=True)
        del model
    return rows


# ------------------------------------------------------------------------- reference model cost


def reference_worker(model_name: str, mode: str, dtype: str) -> dict:
    """Run in a fresh process: policy (+ frozen copy when mode == 'copy'), a policy forward and a
    reference forward; returns footprints, peak RSS and the reference forward's tensor peak."""
    from _common import rss_mib

    from minippo.app.memory_plan import TensorMemoryTracker, model_footprint_bytes
    from minippo.lora import LoRAConfig, add_lora, disable_adapters
    from minippo.quant import prepare_model_for_kbit_training, quantize_model

    torch.set_num_threads(2)
    before = rss_mib()
    model = smollm2() if model_name == "smollm2-135m" else neox(NEOX_SIZES[model_name])
    if dtype == "int8":
        quantize_model(model)
        prepare_model_for_kbit_training(model)
    ref = None
    if mode == "copy":  # the classic second frozen model, made before the adapters go on
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    targets = (
        ["query_key_value", "dense"]
        if model.config.model_type == "gpt_neox"
        else ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    add_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=targets))
    ids = torch.randint(
        3, model.config.vocab_size, (16, 32)
    )  # (B, L): a PPO batch of 8 + 24 tokens
    with torch.no_grad():
        model(input_ids=ids)
        with TensorMemoryTracker() as mem:
            if ref is None:
                with disable_adapters(model):
                    model(input_ids=ids)
            else:
                ref(input_ids=ids)
    footprint = model_footprint_bytes(model) + (
        model_footprint_bytes(ref) if ref is not None else 0
    )
    return dict(footprint=footprint, rss_growth_mib=rss_mib() - before, ref_forward_peak=mem.peak)


def reference_table(names: list[str], dtypes: list[str]) -> list[dict]:
    rows = []
    for name in names:
        for dtype in dtypes:
            row = dict(model=name, dtype=dtype)
            for mode in ("switch", "copy"):
                cmd = [sys.executable, __file__, "--worker", json.dumps([name, mode, dtype])]
                env = dict(
                    os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2"
                )
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if not lines:
                    raise RuntimeError(f"reference worker failed: {proc.stderr[-2000:]}")
                row[mode] = json.loads(lines[-1][7:])
            rows.append(row)
            print(name, dtype, row, flush=True)
    return rows


# ---------------------------------------------------------------------------------------- report


def header(title: str, begin: str) -> list[str]:
    import datetime
    import platform

    import bitsandbytes
    import transformers

    return [
        begin,
        f"## {title}",
        "",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}; {platform.machine()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}",
        "",
    ]


def weights_report(weights: list[dict]) -> list[str]:
    lines = [
        "### Bytes per parameter of the weights (parameters + buffers, measured; planner in brackets)",
        "",
        "int8: every Linear but the LM head is a bitsandbytes `Linear8bitLt` (int8 + one fp32 scale per "
        "row); nf4: the same layers as `Linear4bit` (NF4 codes, double-quantised block scales of 64); "
        "embedding, norms and LM head stay fp32, as minippo trains them. 'linear' is the bytes per "
        "parameter of the quantised layers alone; 'plan' is the planner's error on the nf4 total.",
        "",
        "| model | params | of which Linear | "
        + " | ".join(f"{d} MiB" for d in DTYPES)
        + " | fp32 B/param | bf16 B/param | int8 B/param | nf4 B/param | int8 linear B/param "
        "| nf4 linear B/param | nf4 plan error |",
        "|---|---:|---:|" + "---:|" * (len(DTYPES) + 7),
    ]
    for r in weights:
        n = r["params"]
        cells = [f"{r[d] / MiB:.1f} ({r['plan_' + d] / MiB:.1f})" for d in DTYPES]
        per_param = [f"{r[d] / n:.3f}" for d in DTYPES]
        error = (r["plan_nf4"] - r["nf4"]) / r["nf4"] * 100
        lines.append(
            f"| {r['model']} | {n / 1e6:.1f}M | {r['linear'] / 1e6:.1f}M | "
            + " | ".join(cells + per_param)
            + f" | {r['int8_linear_bpp']:.3f} | {r['nf4_linear_bpp']:.3f} | {error:+.2f}% |"
        )
    return lines


def report(weights: list[dict], refs: list[dict]) -> str:
    lines = header("Memory", BEGIN) + weights_report(weights)
    lines += [
        "",
        "### The reference model: adapters switched off vs a second frozen copy (measured)",
        "",
        "Each in a fresh process: a LoRA policy (r=16 on the attention projections) and one "
        "no-grad forward of a 16 x 32 batch, then the reference forward. RSS growth: resident memory "
        "after the forwards minus before the model was built (imports excluded); 'ref forward' is "
        "the peak of tensors made by the reference forward.",
        "",
        "| model | weights | weights MiB: switch / copy | RSS growth MiB: switch / copy | extra for a copy | "
        "ref forward MiB: switch / copy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in refs:
        s, c = r["switch"], r["copy"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {s['footprint'] / MiB:.0f} / {c['footprint'] / MiB:.0f} | "
            f"{s['rss_growth_mib']:.0f} / {c['rss_growth_mib']:.0f} | "
            f"+{(c['footprint'] - s['footprint']) / MiB:.0f} MiB weights, "
            f"+{c['rss_growth_mib'] - s['rss_growth_mib']:.0f} MiB RSS | "
            f"{s['ref_forward_peak'] / MiB:.1f} / {c['ref_forward_peak'] / MiB:.1f} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--weights-only", action="store_true", help="the weights table alone, in its own section"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.worker:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        print("RESULT " + json.dumps(reference_worker(*json.loads(args.worker))))
        return 0
    torch.set_num_threads(2)
    if args.quick:
        names, ref_names, ref_dtypes = ["neox-7m", "neox-30m"], ["neox-30m"], ["fp32"]
    else:
        names = ["neox-7m", "neox-30m", "neox-100m", "neox-350m", "smollm2-135m"]
        ref_names, ref_dtypes = ["neox-100m", "smollm2-135m"], ["fp32", "int8"]
    weights = weights_table(names)
    from ppo_step import write_section

    if args.weights_only:
        text = "\n".join(header("Memory: the weights in fp32 / bf16 / int8 / nf4", WEIGHTS_BEGIN))
        text += "\n" + "\n".join(weights_report(weights) + ["", WEIGHTS_END])
        print(text)
        write_section(text, WEIGHTS_BEGIN, WEIGHTS_END, Path(args.out))
        return 0
    refs = reference_table(ref_names, ref_dtypes)
    text = report(weights, refs)
    print(text)
    write_section(text, BEGIN, END, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
