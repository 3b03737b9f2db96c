"""`torchrun --nproc_per_node 2 -m minippo ppo` on a tiny model folder: one run folder, one metrics row
per step, TensorBoard events, and an adapter that loads in a fresh single process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from minippo import load_adapter
from minippo.app.cli import main
from minippo.quant import load_model

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_ppo_writes_one_run_folder(tmp_path, tiny_model_dir, imdb_dir):
    data = ["--data-dir", str(imdb_dir)]
    reward = str(tmp_path / "reward")
    assert (
        main(["reward", *data, "--output-dir", reward, "--num-train", "200", "--num-eval", "100"])
        == 0
    )
    work = tmp_path / "work"  # the launch's working folder: nothing may appear here but runs/ppo
    work.mkdir()
    ppo = ["ppo", *data, "--model", tiny_model_dir, "--reward", reward, "--output-dir", "runs/ppo"]
    ppo += ["--steps", "2", "--batch-size", "4", "--mini-batch-size", "2", "--ppo-epochs", "1"]
    ppo += ["--eval-prompts", "2", "--save-every", "1", "--max-new-tokens", "4", "--lora-r", "4"]
    ppo += ["--log-with", "tensorboard", "--no-load-in-8bit"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run(
        [*launch, "-m", "minippo", *ppo],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    assert [p.name for p in work.iterdir()] == ["runs"]
    out = work / "runs" / "ppo"
    assert [p.name for p in (work / "runs").iterdir()] == ["ppo"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert json.loads((out / "result.json").read_text())["after"]["responses"]
    assert list((out / "tensorboard").iterdir())  # rank 0's event file
    assert len(list((out / "tensorboard").iterdir())) == 1

    model = load_model(tiny_model_dir, load_in_8bit=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(ids).logits
        load_adapter(model, out / "adapter")
        after = model(ids).logits
    assert not torch.equal(before, after)
