#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, run the CUDA-marked tests (8-bit through the real
# CUDA kernels, LoRA, the planner against torch.cuda.max_memory_allocated, ...) and minippo's PPO
# step benchmark on the GPU (and, with 2+ GPUs, the data-parallel step), in under 10 minutes, writing
# everything to ONE file.
#
# The machine's image is expected to have python3 with torch (CUDA), transformers, peft, pytest,
# safetensors, but NOT bitsandbytes, datasets nor tyro: their wheels (bitsandbytes, datasets, dill,
# multiprocess, tyro, typeguard, docstring-parser, typing-extensions) are carried in .whl/ and
# installed to /tmp/site. The CUDA pipeline tests read IMDB
# from $MINIPPO_IMDB_DIR (a few hundred rows per split are enough).
#
# Prepare here (once, on a machine that reaches PyPI; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl bitsandbytes==0.50.2 \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 tyro==1.0.17 typeguard==4.6.1 \
#     docstring-parser==0.18.0 typing-extensions==4.16.0
# Run there (the device tool; results come back from $OUT):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# or on any CUDA machine:   bash benchmarks/gpu_check.sh [result-file]
#
# What it does not do: the peer (trl 0.4.7 stack) is not installed there, so the step benchmark is
# minippo alone (--no-peer); SmolLM2 needs the embedded GGUF package, so only the random GPT-NeoX
# models (~7M, ~100M) are timed. Each stage has its own time limit; a failing stage is recorded and
# the script goes on, and its exit code is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RESULT=${1:-${OUT:-/tmp}/gpu_check.md}
mkdir -p "$(dirname "$RESULT")"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
status=0
START=$(date +%s)

section() { printf '\n## %s\n\n' "$1" >> "$RESULT"; }
fenced() {  # fenced <seconds> <title> <command...>: run with a time limit, output in a code block
  local limit=$1 title=$2; shift 2
  section "$title"
  echo '```' >> "$RESULT"
  timeout "$limit" "$@" >> "$RESULT" 2>&1
  local rc=$?
  echo '```' >> "$RESULT"
  echo "exit code: $rc ($(( $(date +%s) - START )) s since start)" >> "$RESULT"
  [ "$rc" -eq 0 ] || status=1
  return $rc
}

echo "# minippo GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')" > "$RESULT"

# 1. bitsandbytes, datasets and tyro from the carried wheels, unless the image already has them.
if ! "$PY" -c "import bitsandbytes, datasets, tyro" 2>/dev/null; then
  if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >> "$RESULT" 2>&1 || status=1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "bitsandbytes missing and no wheel in .whl/: the 8-bit checks will fail" >> "$RESULT"
    status=1
  fi
fi

# 2. The machine and the versions.
fenced 60 "Machine" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; \
  \"$PY\" -c 'import sys, torch, transformers, bitsandbytes; print(sys.version.split()[0], \"torch\", torch.__version__, \
  \"cuda\", torch.version.cuda, \"| transformers\", transformers.__version__, \"| bitsandbytes\", bitsandbytes.__version__); \
  print(\"GPU:\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"none visible to torch\")'"

# 3. The CUDA-marked tests (other test files may fail to import on this image: that is not a CUDA
#    failure, so collection errors do not stop the run).
fenced 270 "pytest -m cuda" "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --continue-on-collection-errors tests

# 4. minippo's PPO step on the GPU (fp32; auto: bf16 stored and computed; bf16 autocast; int8; nf4),
#    and the planner's 20B verdict.
fenced 270 "PPO step on the GPU (minippo only)" "$PY" benchmarks/ppo_step.py --no-peer --device cuda \
  --models neox-7m,neox-100m --variants float32,auto,bfloat16,int8,nf4 --steps 3 --warmup 1 --out /tmp/gpu_step.md
fenced 30 "minippo plan --params 20e9 --gpu-gib 24" "$PY" -c "from minippo.app.memory_plan import PlanConfig, run_plan; run_plan(PlanConfig(params=20e9, gpu_gib=24))"

# 5. Data parallel on 2 GPUs (nccl), where the machine has them: the CPU-proved tests' launch path,
#    then the PPO step throughput of 1 GPU against 2 GPUs (8-bit base on each).
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  fenced 180 "2 GPUs: torchrun PPO step throughput, 1 GPU vs 2 GPUs" "$PY" benchmarks/data_parallel.py \
    --device cuda --rounds 1 --steps 3
else
  section "2 GPUs"; echo "skipped: $(nvidia-smi -L 2>/dev/null | wc -l) GPU(s) on this machine" >> "$RESULT"
fi

echo >> "$RESULT"
echo "total: $(( $(date +%s) - START )) s; status $status" >> "$RESULT"
echo "wrote $RESULT (status $status)"
exit $status
