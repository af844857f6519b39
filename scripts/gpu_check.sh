#!/usr/bin/env bash
# The GPU check of issue 10 (item 5), one command, < 10 minutes on one H100/H200:
#   bash scripts/gpu_check.sh                 # every section, table printed, results in benchmarks/results/gpu_check.*
#   bash scripts/gpu_check.sh --sections kernel
#   bash scripts/gpu_check.sh --cpu-smoke     # the same code at tiny sizes on the CPU (what CI can run)
# Sections (benchmarks/gpu_check.py): compiled Triton kernel vs the PyTorch reference (B up to 163,840,
# d 256/768, fp32/bf16, errors and times) and a paper-scale selection; ACID vs IID step for aced-vit-t and a
# ViT-B/16 student at 224 px with bf16 scoring; torchrun on every visible GPU (NCCL probe + the W = 1
# equality check of the trainer). Exit 0 = all passed, 1 = a check failed, 2 = nothing could run.
# Python: $PYTHON, else the project's .venv, else python3 (which must hold torch with CUDA, triton,
# open_clip_torch and the project's other dependencies; the kernel section needs only torch + triton).
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
if ! command -v "$py" >/dev/null 2>&1 && [[ ! -x "$py" ]]; then
    echo "gpu_check: no Python at '$py' (set PYTHON=...)" >&2
    exit 2
fi

smoke=0
for a in "$@"; do [[ "$a" == "--cpu-smoke" ]] && smoke=1; done
if [[ $smoke == 0 ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu_check: nvidia-smi not found: this machine has no NVIDIA driver (use --cpu-smoke to check the script on a CPU)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || {
        echo "gpu_check: nvidia-smi cannot talk to a GPU" >&2; exit 2; }
    out=(--out "${GPU_CHECK_OUT:-benchmarks/results}")
else
    out=()
fi
echo "python: $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
export PYTHONUNBUFFERED=1
# 10-minute budget for the whole check (the device tool's limit); each torchrun child has its own timeout too
exec timeout --signal=TERM --kill-after=30 "${GPU_CHECK_TIMEOUT:-590}" "$py" benchmarks/gpu_check.py "${out[@]}" "$@"
