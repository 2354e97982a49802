#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine that has Python 3 with its own CUDA
# build of torch and torchvision but no package registry:
#
#     benchmarks/gpu_check.sh OUT_DIR
#
# Wheels the machine lacks (opacus; pydicom) are carried beside the checkout in
# .whl/ and installed into a private folder first. Writes into OUT_DIR: env.txt
# (GPU, driver, torch/CUDA versions) and models.txt / models.json
# (benchmarks/models.py on CUDA: per model and size, non-DP, bf16, image-level
# DP with hooks and with ghost clipping, and fedrad's patient-level DP, with
# images/s, DP/non-DP ratios and CUDA peak memory). Runs in well under 8 minutes
# on an H200. Still owed (issue 18): one DP round of a ResNet-18 site on
# fl-synth data and a 2-site fl-sim round on CUDA, once the model registry
# holds the torchvision models.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fedrad-site .whl/*.whl
    export PYTHONPATH="/tmp/fedrad-site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c 'import sys, torch, torchvision, opacus; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "opacus", opacus.__version__, "gpu", torch.cuda.get_device_name(0))'
} | tee "$out/env.txt"
timeout 420 python3 -m benchmarks.models --device cuda --models resnet18,resnet50,densenet121 --sizes 224 \
    --extra resnet18@512 --batch-size 64 --patients 8 --slices 16 --steps 5 --json "$out/models.json" \
    | tee "$out/models.txt"
