#!/usr/bin/env bash
# The GPU figures the issues ask for, in one call on a machine lent by the `device` tool
# (build the kit first: bench/device-kit.sh): lung-quant on P001 and on 600 slices, cold
# and warm on the GPU, and warm on the same machine's CPU for comparison; then the
# foundation model's network (untrained: its weights cannot travel) in batches of 1, 2 and
# 4, fp32 and bf16. Output goes to $OUT (the device tool's) or ./device-out.
# The device tool's run: carry [".device-kit"], command "bash bench/device-run.sh".
# KIT_PYTHON=.venv/bin/python NO_INSTALL=1 runs it here, on what this machine has.
set -euo pipefail
cd "$(dirname "$0")/.."

kit=.device-kit
out=${OUT:-device-out}
python=${KIT_PYTHON:-python3}
mkdir -p "$out"
export AINODE_DATA=$kit/data PYTHONUNBUFFERED=1
if [[ -z ${NO_INSTALL:-} ]]; then  # beside the image's packages, not over them
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$kit"/wheels/*.whl
  export PYTHONPATH=/tmp/site
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  nproc
} 2>&1 | tee "$out/machine.txt"
gpu_only=()
if "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  gpu_only=(--gpu-only)
  "$python" bench/lung_quant.py --device cuda --runs 1 2>&1 | tee "$out/lung-quant-cuda.txt"
  "$python" bench/lung_quant.py --device cuda --runs 3 --warm 2>&1 | tee "$out/lung-quant-cuda-warm.txt"
else
  echo "no CUDA device: CPU figures only"
fi
"$python" bench/lung_quant.py --device cpu --runs 1 --warm 2>&1 | tee "$out/lung-quant-cpu-warm.txt"
"$python" bench/embedding.py --untrained --repeat 3 "${gpu_only[@]}" 2>&1 | tee "$out/embedding.txt"
