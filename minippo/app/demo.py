"""`minippo demo`: the blog's three steps on IMDB in one run folder, with plots and a report.

    reward  -> TF-IDF + logistic regression sentiment model (or a HF classifier you name)
    sft     -> LoRA fine-tune of the 8-bit base on review text          (step 1)
    merge   -> base + SFT adapter -> plain model folder                  (step 2)
    [pairwise reward model on the merged model: --reward pairwise]
    ppo     -> a new LoRA adapter on the merged model, loaded in 8-bit   (step 3)

With `--reward pairwise` the reward PPO optimises is a pairwise reward model trained after the merge,
on the merged model itself, so that PPO runs it as a second adapter on the policy's base; the TF-IDF
reward is trained too and scores the same held-out samples (each reward's view of the other's gains).
    report  -> report.md, sft_loss.png, ppo_progress.png

Presets size the run: "cpu" is the default and is sized for a 2-core CPU (its times: the README);
"long" trains longer; "smoke" runs every stage for a few steps (CI's check of the real model).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..checks import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    check,
    check_device,
    check_fields,
    one_of,
    optional,
)
from ..fileio import write_text
from ..lora import LoRAConfig
from ..ppo import ADVANTAGE_ESTIMATORS, PPOConfig
from .model_folders import DEFAULT_MODEL, FAST_MODES, quant_load_kwargs, resolve_model
from .pairwise import PairwiseConfig
from .pipeline import MergeConfig, PPORunConfig, run_merge, run_ppo
from .report import MetricsLog, machine_description, markdown_table, plot_lines, write_json
from .reward import RewardConfig, load_reward, train_reward
from .sft import SFTConfig, run_sft
from .tasks import get_task

# Each preset: settings of the SFT, PPO and reward stages (anything not named keeps its default);
# "lora" is the SFT adapter's, and the PPO adapter's too unless "ppo_lora" names its own.
CPU_PPO = dict(
    batch_size=16,
    mini_batch_size=8,
    ppo_epochs=2,
    learning_rate=1.5e-3,
    init_kl_coef=0.1,
    adap_kl_ctrl=False,
    max_grad_norm=1.0,
    score_clip=3.0,
    min_new_tokens=12,
    max_new_tokens=16,
)
# A KL ceiling of 12 nats per review: beta stays at CPU_PPO's until a batch's KL passes 12, then rises
# (by up to 1.2 ** (64 / 200) a step of 64 samples: fast enough to act within the preset's run).
KL_CEILING_12 = dict(
    adap_kl_ctrl=True, target=12.0, horizon=200, min_kl_coef=CPU_PPO["init_kl_coef"]
)
# `minippo demo --task NAME`: GRPO on the embedded instruct model, no SFT: 4 prompts x 8 samples a step,
# one update per step, no KL (no reference forward), sampled at 0.7, answers up to 8 tokens or EOS
# ("The answer is 12." is 7). Sized for a 2-core CPU: a step's cost is its B x (P + T) tokens.
TASK_PPO = dict(
    advantage_estimator="grpo",
    num_generations=8,
    batch_size=32,
    mini_batch_size=32,
    ppo_epochs=1,
    learning_rate=1e-3,
    init_kl_coef=0.0,
    adap_kl_ctrl=False,
    max_grad_norm=1.0,
    temperature=0.7,
    min_new_tokens=8,
    max_new_tokens=8,
    stop_at_eos=True,
    gradient_checkpointing=False,  # on a CPU memory is plenty; recomputing costs a forward
)
TASK_PRESET = {
    "ppo": dict(steps=30, eval_prompts=160, save_every=10),
    "ppo_config": TASK_PPO,
    "ppo_lora": dict(r=8, alpha=16),
}
PRESETS: dict[str, dict] = {
    "cpu": {
        # Sized for 2 CPU cores (times: the README). A small KL coefficient and a high LoRA learning
        # rate (with gradient clipping) let PPO move within a few thousand samples (trl's adaptive
        # controller, horizon 10,000 samples, would hardly move: hence KL_CEILING_12). The reward is the
        # classifier's logit clipped at 4 (P(positive) 0.98): past that, more "great great great" earns
        # nothing.
        "sft": dict(
            max_steps=60,
            batch_size=4,
            block_size=128,
            learning_rate=3e-4,
            warmup_steps=5,
            num_train_texts=600,
            num_eval_blocks=16,
        ),
        # PPO: 60 steps of 64 samples, one update per epoch on all 64 and a rank-4 adapter: less noise
        # per update, so less of the KL is drift; a penalty of 3 on the bigrams a step repeats, the
        # logit clipped at 4, and a KL ceiling of 12 nats (beta never below 0.1, above it when the KL
        # is over 12) keep the samples diverse and the KL bounded (how they were found: docs/experiments.md).
        "ppo": dict(steps=60, eval_prompts=64, diversity_coef=3.0),
        "ppo_config": dict(
            CPU_PPO, batch_size=64, mini_batch_size=64, score_clip=4.0, **KL_CEILING_12
        ),
        "lora": dict(r=16, alpha=32),
        "ppo_lora": dict(r=4, alpha=8),
        "reward": dict(),
        # --reward pairwise: the reward model's settings (RewardConfig's, "pairwise" PairwiseConfig's)
        "pairwise": dict(num_train=1920, num_eval=300, pairwise=dict(steps=120, batch_size=16)),
        # Off on a CPU, where memory is plenty and recomputing costs an extra forward per micro-batch.
        "gradient_checkpointing": False,
    },
    "long": {
        "sft": dict(
            max_steps=200, batch_size=8, block_size=128, learning_rate=2e-4, num_train_texts=2000
        ),
        "ppo": dict(steps=200, eval_prompts=128),
        # CPU_PPO with 32 samples a step (4 updates an epoch), a lower learning rate and an adaptive KL
        "ppo_config": dict(
            CPU_PPO, batch_size=32, learning_rate=1e-3, adap_kl_ctrl=True, target=12.0, horizon=2000
        ),
        "lora": dict(r=16, alpha=32),
        "reward": dict(),
        "pairwise": dict(num_train=4800, num_eval=500, pairwise=dict(steps=300, batch_size=16)),
    },
    "smoke": {
        "sft": dict(
            max_steps=2,
            batch_size=2,
            block_size=64,
            num_train_texts=20,
            num_eval_blocks=2,
            warmup_steps=0,
        ),
        "ppo": dict(steps=2, eval_prompts=4, save_every=1),
        "ppo_config": dict(
            batch_size=4,
            mini_batch_size=2,
            ppo_epochs=1,
            learning_rate=1e-4,
            min_new_tokens=4,
            max_new_tokens=6,
        ),
        "lora": dict(r=4, alpha=8),
        "reward": dict(num_train=400, num_eval=200),
        "pairwise": dict(
            num_train=16, num_eval=8, pairwise=dict(steps=2, batch_size=4, num_calibration=16)
        ),
    },
}


@dataclass
class DemoConfig:
    """Run the whole pipeline (reward, sft, merge, ppo) on the embedded defaults and write a report."""

    preset: str = "cpu"
    """Size of the run: "cpu" (sized for 2 CPU cores), "long" (longer PPO), or "smoke" (a few steps)."""
    output_dir: str = "runs/demo"
    """Run folder: config, metrics, adapters, plots and report.md."""
    model: str = DEFAULT_MODEL
    """Base model: the embedded "smollm2-135m", a local folder, or a hub name."""
    data_dir: str | None = None
    """IMDB parquet folder (None: $MINIPPO_IMDB_DIR, else the hub's stanfordnlp/imdb)."""
    reward: str | None = None
    """A reward to use instead of training the TF-IDF one: a reward folder or a HF classifier name; or
    "pairwise": a pairwise reward model trained on the merged model (PPO runs it on the same base)."""
    device: str = "cpu"
    """Device for every stage: cpu, cuda or cuda:N."""
    sft_steps: int | None = None
    """Override the preset's SFT steps."""
    ppo_steps: int | None = None
    """Override the preset's PPO steps."""
    diversity_coef: float | None = None
    """Override the preset's `minippo ppo --diversity-coef` (a penalty on the bigrams a step repeats)."""
    score_clip: float | None = None
    """Override the preset's `PPOConfig.score_clip` (the clip on the reward's logit)."""
    seed: int = 0
    """Seed of every stage."""
    quant: str = "8bit"
    """Base model's Linear layers in SFT and PPO: "8bit" (the blog's), "4bit" (NF4, QLoRA) or "none"."""
    fast: str = "auto"
    """`minippo.fast` in SFT and PPO (faster modules, each tested against the plain ones): "on", "off", or
    "auto" (on a CPU with native bf16 or int8 matmuls, or CUDA)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in SFT and PPO backward passes; None: the preset's choice (off for cpu),
    else on for the 8-bit models."""
    resume: bool = False
    """Continue the SFT and PPO stages from their checkpoints exactly (reward and merge run again)."""
    task: str | None = None
    """Run a task whose reward a program checks instead of IMDB (`minippo.app.tasks`: "add"): GRPO on the
    model itself (no reward, SFT or merge stage), reporting held-out accuracy before and after."""
    estimator: str | None = None
    """Override the advantage estimator: "gae" (PPO), "grpo" or "rloo" (None: the preset's)."""
    num_generations: int | None = None
    """Override the samples per prompt (None: the preset's; 4 for grpo/rloo on IMDB)."""

    def __post_init__(self):
        quant_load_kwargs(self.quant)
        check_fields(self, one_of(*FAST_MODES), "fast")
        check_fields(self, optional(one_of(*ADVANTAGE_ESTIMATORS)), "estimator")
        check_fields(self, optional(POSITIVE_INT), "num_generations")
        if self.task is not None:
            get_task(self.task)
        check(
            self,
            self.preset in PRESETS,
            f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}",
        )
        check_fields(self, optional(POSITIVE_INT), "sft_steps", "ppo_steps")
        check_fields(self, optional(NON_NEGATIVE), "diversity_coef")
        check_fields(self, optional(POSITIVE), "score_clip")
        check_device(self)


def demo_stage_configs(config: DemoConfig, model_dir: str) -> dict:
    """The resolved configs of every stage (preset + overrides), all pointing into the run folder."""
    run = Path(config.output_dir)
    preset = PRESETS[config.preset]
    checkpointing = config.gradient_checkpointing
    checkpointing = preset.get("gradient_checkpointing") if checkpointing is None else checkpointing
    sft = dict(
        preset["sft"],
        model=model_dir,
        data_dir=config.data_dir,
        output_dir=str(run / "sft"),
        device=config.device,
        quant=config.quant,
        fast=config.fast,
        seed=config.seed,
        lora=dataclasses.replace(SFTConfig().lora, **preset["lora"]),
        gradient_checkpointing=checkpointing,
        resume=config.resume,
    )
    if config.sft_steps:
        sft["max_steps"] = config.sft_steps
    settings = dict(
        preset["ppo_config"],
        seed=config.seed,
        device=config.device,
        gradient_checkpointing=checkpointing,
    )
    if config.score_clip is not None:
        settings["score_clip"] = config.score_clip
    settings |= estimator_overrides(config)
    ppo_config = PPOConfig(**settings)
    ppo = dict(
        preset["ppo"],
        model=str(run / "merged"),
        data_dir=config.data_dir,
        reward=_ppo_reward(config, run),
        output_dir=str(run / "ppo"),
        quant=config.quant,
        fast=config.fast,
        lora=LoRAConfig(**preset.get("ppo_lora", preset["lora"])),
        ppo=ppo_config,
        resume=config.resume,
    )
    if config.ppo_steps:
        ppo["steps"] = config.ppo_steps
    stages = {}
    if config.reward == "pairwise":
        settings = dict(preset["pairwise"])
        pairwise = PairwiseConfig(
            **dict(
                settings.pop("pairwise"),
                base_model=str(run / "merged"),
                quant=config.quant,
                tfidf=str(run / "reward"),
            )
        )
        stages["pairwise"] = RewardConfig(
            **settings,
            model="pairwise",
            data_dir=config.data_dir,
            output_dir=str(run / "reward_pairwise"),
            seed=config.seed,
            device=config.device,
            pairwise=pairwise,
        )
    if config.diversity_coef is not None:
        ppo["diversity_coef"] = config.diversity_coef
    return {
        "reward": RewardConfig(
            **dict(
                preset["reward"],
                data_dir=config.data_dir,
                output_dir=str(run / "reward"),
                kind="logit",
                seed=config.seed,
            )
        ),
        "sft": SFTConfig(**sft),
        "merge": MergeConfig(
            base_model=model_dir,
            adapter=str(run / "sft" / "adapter"),
            output_dir=str(run / "merged"),
            device=config.device,
            data_dir=config.data_dir,
        ),
        "ppo": PPORunConfig(**ppo),
        **stages,
    }


def _ppo_reward(config: DemoConfig, run: Path) -> str:
    """The reward PPO runs with: the one named, the pairwise model, or the TF-IDF one trained here."""
    if config.reward == "pairwise":
        return str(run / "reward_pairwise")
    return config.reward or str(run / "reward")


def estimator_overrides(config: DemoConfig) -> dict:
    """The PPOConfig settings of --estimator and --num-generations; a critic-free estimator on IMDB
    takes 4 samples per prompt unless told otherwise."""
    settings = {}
    if config.estimator is not None:
        settings["advantage_estimator"] = config.estimator
        if config.estimator != "gae" and config.task is None:
            settings["num_generations"] = 4
    if config.num_generations is not None:
        settings["num_generations"] = config.num_generations
    return settings


def task_stage_config(config: DemoConfig, model_dir: str) -> PPORunConfig:
    """The task demo's one stage: `minippo ppo --task NAME` on the model itself, in the run folder."""
    settings = dict(TASK_PPO, seed=config.seed, device=config.device)
    if config.gradient_checkpointing is not None:
        settings["gradient_checkpointing"] = config.gradient_checkpointing
    settings |= estimator_overrides(config)
    ppo = dict(
        TASK_PRESET["ppo"],
        model=model_dir,
        task=config.task,
        output_dir=str(Path(config.output_dir) / "ppo"),
        quant=config.quant,
        fast=config.fast,
        lora=LoRAConfig(**TASK_PRESET["ppo_lora"]),
        ppo=PPOConfig(**settings),
        resume=config.resume,
    )
    if config.ppo_steps:
        ppo["steps"] = config.ppo_steps
    return PPORunConfig(**ppo)


def run_task_demo(config: DemoConfig) -> dict:
    """`minippo demo --task NAME`: the task's PPO stage (GRPO by default) and its report.md."""
    t = time.perf_counter()
    model_dir = resolve_model(config.model)
    stage = task_stage_config(config, model_dir)
    run = Path(config.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    write_json(
        run / "config.json",
        {"demo": dataclasses.asdict(config), "ppo": dataclasses.asdict(stage)},
    )
    summary: dict = {
        "model": model_dir,
        "task": config.task,
        "machine": machine_description(config.device),
    }
    summary["ppo"] = run_ppo(stage)
    summary["total_seconds"] = time.perf_counter() - t
    metrics = MetricsLog(run / "ppo" / "metrics.jsonl").read()
    steps = [m["step"] for m in metrics]
    lines = [
        ("mean reward (share right) of samples", steps, [m["env/reward_mean"] for m in metrics])
    ]
    lines += [("distinct-2 of samples", steps, [m["env/distinct_2"] for m in metrics])]
    if metrics and "objective/kl" in metrics[0]:
        lines += [("KL to the starting model (nats)", steps, [m["objective/kl"] for m in metrics])]
    title = f"{stage.ppo.advantage_estimator} on the {config.task} task"
    plot_lines(run / "ppo_progress.png", lines, "step", title)
    write_text(run / "report.md", render_task_report(config, stage, summary))
    brief = {k: v for k, v in summary.items() if k != "ppo"}
    for name in ("before", "after"):
        if name in summary["ppo"]:
            brief[name] = {
                k: summary["ppo"][name][k] for k in ("accuracy", "kl_mean", "distinct_2")
            }
    write_json(run / "summary.json", brief | {"train_seconds": summary["ppo"]["train_seconds"]})
    before, after = brief.get("before"), brief.get("after")
    if before and after:
        print(
            f"demo: held-out {config.task} accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
            f"KL to the starting model {after['kl_mean']:.2f} nats; "
            f"{summary['total_seconds'] / 60:.1f} min; report: {run / 'report.md'}"
        )
    return summary


def render_task_report(config: DemoConfig, stage: PPORunConfig, summary: dict) -> str:
    """The task demo's report.md: the settings, held-out accuracy before and after, samples."""
    ppo = summary["ppo"]
    settings = stage.ppo
    lines = [
        f"# minippo demo report (task `{config.task}`)",
        "",
        f"Model: `{summary['model']}` ({config.quant} base, LoRA r={stage.lora.r}). Estimator "
        f"`{settings.advantage_estimator}`, {stage.steps} steps of {settings.batch_size} samples "
        f"({settings.batch_size // settings.num_generations} prompts x {settings.num_generations}), "
        f"temperature {settings.temperature}. Total time {summary['total_seconds'] / 60:.1f} min "
        f"(training {ppo['train_seconds']:.0f} s) on {summary['machine']}.",
        "",
    ]
    if "before" in ppo and "after" in ppo:
        b, a = ppo["before"], ppo["after"]
        lines += [
            f"Held-out: {len(b['prompts'])} samples of held-out questions (none seen in training), "
            "sampled at the training temperature with the same seed before and after:",
            "",
            markdown_table(
                ["", "held-out accuracy", "KL to starting model (nats/sample)", "distinct-2"],
                [
                    ["before (the model itself)", b["accuracy"], 0.0, b["distinct_2"]],
                    ["after", a["accuracy"], a["kl_mean"], a["distinct_2"]],
                ],
            ),
            "",
            "![progress](ppo_progress.png)",
            "",
            "## Samples (same question, same seed)",
            "",
            markdown_table(
                ["question", "before", "right", "after", "right"],
                [
                    [question_of(p), rb, ob, ra, oa]
                    for p, rb, ob, ra, oa in list(
                        zip(b["prompts"], b["responses"], b["right"], a["responses"], a["right"])
                    )[:12]
                ],
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


def question_of(prompt: str) -> str:
    """The user's question in a decoded chat prompt (the line that asks)."""
    asks = [line for line in prompt.splitlines() if line.startswith("What is")]
    return asks[-1] if asks else prompt


def run_demo(config: DemoConfig) -> dict:
    """Run every stage into `config.output_dir`; returns the summary written to summary.json.

    Under torchrun, sft and ppo run data parallel; rank 0 alone converts the model, trains the reward,
    merges and writes the report, while the others wait at a barrier (then find its files)."""
    if config.task is not None:
        return run_task_demo(config)
    distributed.init_from_env()
    main = distributed.rank() == 0
    run = Path(config.output_dir)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if not main:
        distributed.barrier()  # until rank 0 has converted the model
    model_dir = resolve_model(config.model)  # converts the embedded GGUF once, then reuses it
    if main:
        distributed.barrier()
    seconds["model"] = time.perf_counter() - t
    stages = demo_stage_configs(config, model_dir)
    if not main:
        return _run_sft_ppo_on_other_rank(stages)
    run.mkdir(parents=True, exist_ok=True)
    write_json(
        run / "config.json",
        {
            "demo": dataclasses.asdict(config),
            **{k: dataclasses.asdict(v) for k, v in stages.items()},
        },
    )

    summary: dict = {
        "model": model_dir,
        "preset": config.preset,
        "machine": machine_description(config.device),
    }
    print(f"demo: run folder {run}, preset {config.preset!r}, model {model_dir}")
    if config.reward in (None, "pairwise"):
        t = time.perf_counter()
        summary["reward"] = train_reward(stages["reward"])["metrics"]
        seconds["reward"] = time.perf_counter() - t
        print(
            f"demo: reward model validation accuracy {summary['reward']['validation_accuracy']:.3f}"
        )
    for name, run_stage in (("sft", run_sft), ("merge", run_merge), ("ppo", run_ppo)):
        t = time.perf_counter()
        summary[name] = run_stage(stages[name])
        seconds[name] = time.perf_counter() - t
        if name == "merge" and "pairwise" in stages:  # trained on the merged model, rank 0 alone
            t = time.perf_counter()
            summary["pairwise"] = train_reward(stages["pairwise"])["metrics"]
            seconds["pairwise"] = time.perf_counter() - t
        if name == "merge":
            distributed.barrier()  # the merged model is on disk for the other ranks' ppo
    summary["seconds"] = seconds
    summary["total_seconds"] = sum(seconds.values())
    if "pairwise" in stages:
        summary["tfidf_view"] = tfidf_view(run / "reward", summary["ppo"])

    write_plots(run, summary)
    write_text(run / "report.md", render_report(config, summary))
    write_json(
        run / "summary.json",
        {k: v for k, v in summary.items() if k != "ppo"} | {"ppo": _brief_ppo(summary["ppo"])},
    )
    before, after = summary["ppo"].get("before"), summary["ppo"].get("after")
    if before and after:
        print(
            f"demo: held-out P(positive) {before['reward_prob_mean']:.3f} -> {after['reward_prob_mean']:.3f}, "
            f"KL to the starting model {after['kl_mean']:.2f} nats; "
            f"{summary['total_seconds'] / 60:.1f} min; report: {run / 'report.md'}"
        )
    return summary


def tfidf_view(reward_dir: Path, ppo: dict) -> dict:
    """Mean TF-IDF P(positive) of the held-out samples before and after PPO (prompt + response): how
    the other reward sees the gains PPO made on the pairwise one."""
    tfidf = load_reward(reward_dir)
    view = {}
    for name in ("before", "after"):
        if name in ppo:
            texts = [p + r for p, r in zip(ppo[name]["prompts"], ppo[name]["responses"])]
            view[f"tfidf_prob_{name}"] = tfidf.probability(texts).mean().item()
    return view


def _run_sft_ppo_on_other_rank(stages: dict) -> dict:
    """A rank other than 0: its share of sft and ppo, waiting for rank 0's merge in between."""
    sft = run_sft(stages["sft"])
    distributed.barrier()
    return {"sft": sft, "ppo": run_ppo(stages["ppo"])}


def _brief_ppo(result: dict) -> dict:
    keep = (
        "reward_prob_mean",
        "reward_prob_std",
        "kl_mean",
        "distinct_1",
        "distinct_2",
        "base_logp_per_token",
    )
    brief = {k: v for k, v in result.items() if k not in ("before", "after")}
    for name in ("before", "after"):
        if name in result:
            brief[name] = {k: result[name][k] for k in keep}
    return brief


def write_plots(run: Path, summary: dict) -> None:
    """sft_loss.png (training loss per step) and ppo_progress.png (reward and KL per PPO step)."""
    loss_log = json.loads(Path(summary["sft"]["loss_log"]).read_text())
    plot_lines(
        run / "sft_loss.png",
        [("training loss", [s for s, _ in loss_log], [l for _, l in loss_log])],
        "SFT step",
        "Step 1: LoRA fine-tuning on IMDB reviews",
    )
    metrics = MetricsLog(run / "ppo" / "metrics.jsonl").read()
    steps = [m["step"] for m in metrics]
    plot_lines(
        run / "ppo_progress.png",
        [
            ("mean P(positive) of samples", steps, [m["env/reward_prob_mean"] for m in metrics]),
            ("KL to the starting model (nats)", steps, [m["objective/kl"] for m in metrics]),
            ("distinct-2 of samples", steps, [m["env/distinct_2"] for m in metrics]),
        ],
        "PPO step",
        "Step 3: PPO towards positive reviews",
    )


def render_report(config: DemoConfig, summary: dict) -> str:
    """The run's report.md: what ran, how long, and what changed, with samples before and after."""
    sft = summary["sft"]
    merge = summary["merge"]
    ppo = summary["ppo"]
    sec = summary["seconds"]
    lines = [
        f"# minippo demo report (preset `{config.preset}`)",
        "",
        f"Base model: `{summary['model']}`. Total time {summary['total_seconds'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in sec.items())}) on {summary['machine']}.",
        "",
    ]
    if "reward" in summary:
        r = summary["reward"]
        lines += [
            f"**Reward model**: TF-IDF + logistic regression on {r['num_train']} IMDB train reviews, "
            f"validation accuracy {r['validation_accuracy']:.3f}.",
            "",
        ]
    if "pairwise" in summary:
        p = summary["pairwise"]
        view = summary.get("tfidf_view", {})
        lines += [
            f"**Pairwise reward model** (PPO's reward; Bradley-Terry on {p['num_train_pairs']} pairs of "
            f"same-length IMDB review starts, trained on the merged model): validation pair accuracy "
            f"{p['validation_pair_accuracy']:.3f}, held-out label accuracy "
            f"{p.get('heldout_label_accuracy', float('nan')):.3f}, agreement with TF-IDF "
            f"{p.get('heldout_tfidf_agreement', float('nan')):.3f}. The TF-IDF reward's P(positive) of "
            f"the held-out samples: {view.get('tfidf_prob_before', float('nan')):.3f} before PPO, "
            f"{view.get('tfidf_prob_after', float('nan')):.3f} after.",
            "",
        ]
    if "eval_loss_before" in sft:
        lines += [
            f"**Step 1, SFT** ({sft['steps']} steps, {config.quant} base + LoRA): validation loss "
            f"{sft['eval_loss_before']:.3f} -> {sft['eval_loss_after']:.3f} (perplexity "
            f"{sft['eval_ppl_before']:.1f} -> {sft['eval_ppl_after']:.1f}). ![sft loss](sft_loss.png)",
            "",
        ]
    lines += [
        f"**Step 2, merge**: merged vs adapted logits, max |diff| {merge['max_abs_logit_diff']:.2e} "
        f"(mean logit magnitude {merge['logit_scale']:.2f}); the folder loads in bare transformers.",
        "",
    ]
    if "before" in ppo and "after" in ppo:
        b, a = ppo["before"], ppo["after"]
        lines += [
            "**Step 3, PPO** on held-out prompts (IMDB test reviews cut to a few tokens; same prompts "
            "and sampling seed before and after):",
            "",
            markdown_table(
                [
                    "",
                    "mean P(positive)",
                    "std",
                    "KL to starting model (nats/review)",
                    "distinct-1",
                    "distinct-2",
                    "starting model log-lik./token",
                ],
                [
                    [
                        name,
                        r["reward_prob_mean"],
                        r["reward_prob_std"],
                        kl,
                        r["distinct_1"],
                        r["distinct_2"],
                        r["base_logp_per_token"],
                    ]
                    for name, r, kl in (
                        ("before (merged SFT model)", b, 0.0),
                        ("after PPO", a, a["kl_mean"]),
                    )
                ],
            ),
            "",
            "![ppo progress](ppo_progress.png)",
            "",
            "## Samples (same prompt, same seed)",
            "",
            markdown_table(
                ["prompt", "before", "P(pos)", "after", "P(pos)"],
                [
                    [p, rb, pb, ra, pa]
                    for p, rb, pb, ra, pa in list(
                        zip(b["prompts"], b["responses"], b["probs"], a["responses"], a["probs"])
                    )[:12]
                ],
            ),
            "",
        ]
    return "\n".join(lines) + "\n"
