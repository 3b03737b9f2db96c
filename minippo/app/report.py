"""Run artefacts: a metrics log (JSON lines), PNG plots and the demo's markdown report; and the machine
a published time was measured on."""

from __future__ import annotations

import json
import math
import os
import platform
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .. import fileio


def _plain(value: Any) -> Any:
    """Make a stats value JSON-friendly: tensors and numpy scalars become floats/lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _ngrams(sequences: Sequence[Sequence[int]], n: int) -> list[list[tuple]]:
    """The n-grams of each token sequence (lists, or tensors as generate() returns them)."""
    seqs = [seq.tolist() if hasattr(seq, "tolist") else list(seq) for seq in sequences]
    return [[tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)] for seq in seqs]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU flags that decide the compute path (bf16 / int8 kernels), torch's own report, and the
    path taken where `$MINIPPO_CPU_BF16` overrides the native-bf16 probe."""
    import torch

    from ..quant import CPU_BF16_ENV, cpu_bf16_is_native

    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    have = [f for f in wanted if f in flags] or ["(none of " + ", ".join(wanted) + ")"]
    setting = os.environ.get(CPU_BF16_ENV)
    override = (
        f" ({CPU_BF16_ENV}={setting}: native bf16 taken as {cpu_bf16_is_native()})"
        if setting
        else ""
    )
    return f"{' '.join(have)}; torch capability {torch.backends.cpu.get_cpu_capability()}{override}"


def machine_description(device: str = "cpu") -> str:
    """Where a timing was measured: CPU model, cores and torch threads, the flags behind the compute path,
    and the GPU on CUDA (house rule: every published time names its machine)."""
    import torch

    threads = torch.get_num_threads()
    where = f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch threads; flags {cpu_flags()}"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        where += f"; GPU {torch.cuda.get_device_name(torch.device(device))}"
    return where


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over a set of token sequences (1.0: no repeats).
    Ref: Li et al. 2016, "A Diversity-Promoting Objective Function", arXiv:1510.03055, sec. 4.3."""
    grams = [g for seq in _ngrams(sequences, n) for g in seq]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(sequences: Sequence[Sequence[int]], n: int = 2) -> list[float]:
    """For each sequence, the share of its n-grams that occur more than once over all the sequences (in
    another one, or twice in itself): the repeats that distinct-n counts, per sequence (0.0 for a
    sequence shorter than n)."""
    grams = _ngrams(sequences, n)
    counts = Counter(g for seq in grams for g in seq)
    return [sum(counts[g] > 1 for g in seq) / len(seq) if seq else 0.0 for seq in grams]


def kl_regularised_optimum(scores, beta: float):
    """The policy that maximises E[score] - beta * KL(policy || base) over N samples of the base per
    prompt: weights w = softmax(scores / beta) over each row of scores (prompts, N), and its KL to the
    N samples, sum(w * log(N * w)) per prompt (0 when beta is large, log N at the argmax when it is
    small). PPO's objective with a fixed KL coefficient beta has this optimum, base(y) * exp(score(y) /
    beta) normalised (Korbak et al. 2022, arXiv:2205.11275, sec. 2); over N samples it is estimated by
    these self-normalised importance weights. Returns (weights (prompts, N), KL (prompts,))."""
    import torch

    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    scores = torch.as_tensor(scores, dtype=torch.float64)
    log_w = torch.log_softmax(scores / beta, dim=-1)
    weights = log_w.exp()
    kl = (weights * (log_w + math.log(scores.shape[-1]))).sum(-1)
    return weights, kl


class MetricsLog:
    """Append-only `metrics.jsonl`: one JSON object a line (`fileio.append_line`), so an interrupted
    run keeps every step it finished."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        fileio.append_line(self.path, json.dumps({k: _plain(v) for k, v in record.items()}))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically; tensors and numpy values become plain numbers."""
    fileio.write_json(path, obj, default=_plain)


def plot_lines(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    xlabel: str,
    title: str,
) -> None:
    """One PNG with a panel per (ylabel, xs, ys) triple, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (ylabel, xs, ys) in zip(axes[0], panels):
        ax.plot(list(xs), list(ys), marker="." if len(xs) < 60 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cell text has pipes and newlines escaped."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.3f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
