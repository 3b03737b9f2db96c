#!/usr/bin/env bash
# Install the peer stack (the blog-era trl 0.4.7 + peft 0.4.0) into its own virtual environment,
# .venv-peer, beside minippo's .venv and never into it. Used by benchmarks/ppo_step.py.
#
#   bash benchmarks/setup_peer.sh            # creates or reuses .venv-peer
#   PEER_VENV=/tmp/peer bash benchmarks/setup_peer.sh
#
# Recipe (measured to install together on Python 3.11): torch 2.13.0 first, then the pinned
# set under a constraint file that pins the torch just installed, so pip cannot swap it for another
# build (in particular never a CUDA build: a CPU machine takes the "+cpu" wheel when one is offered
# by a find-links folder, e.g. PIP_FIND_LINKS=/opt/wheels). Without the pyarrow/pandas pins pip
# takes a pyarrow that refuses numpy < 2.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PEER_VENV=${PEER_VENV:-.venv-peer}
TORCH=${TORCH:-torch==2.13.0}
# Extra pip arguments for the torch install, e.g. --index-url https://download.pytorch.org/whl/cpu
TORCH_INDEX=${TORCH_INDEX:-}
STAMP="$PEER_VENV/.peer-installed"

if [ -f "$STAMP" ]; then
  echo "peer environment ready: $PEER_VENV"
  exit 0
fi

test -x "$PEER_VENV/bin/python" || "$PYTHON" -m venv "$PEER_VENV"
PIP=("$PEER_VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

# 1. torch, preferring a CPU build (the "+cpu" local version) where a find-links folder has one.
torch_spec="$TORCH"
for folder in ${PIP_FIND_LINKS:-}; do
  ver=${TORCH#torch==}
  if ls "$folder"/torch-"$ver"+cpu-*.whl >/dev/null 2>&1; then torch_spec="torch==$ver+cpu"; fi
done
# shellcheck disable=SC2086
"${PIP[@]}" install -q $TORCH_INDEX "$torch_spec"

# 2. Pin the torch just installed, then the blog-era set under that constraint.
"$PEER_VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$PEER_VENV/constraints.txt"
"${PIP[@]}" install -q -c "$PEER_VENV/constraints.txt" \
  trl==0.4.7 transformers==4.31.0 peft==0.4.0 accelerate==0.21.0 datasets==2.14.4 \
  "numpy<2" pyarrow==15.0.2 pandas==2.2.3 psutil

# 3. Check: it imports, and torch is still the CPU build we pinned.
"$PEER_VENV/bin/python" - <<'EOF'
import torch, transformers, peft, trl
print(f"peer stack: torch {torch.__version__} (cuda {torch.version.cuda}), transformers "
      f"{transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}")
EOF
touch "$STAMP"
echo "peer environment ready: $PEER_VENV"
