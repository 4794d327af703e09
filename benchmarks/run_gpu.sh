#!/usr/bin/env bash
# GPU session for the kernels (run on a CUDA machine from the repo root; used on the lent H100).
#   bash benchmarks/run_gpu.sh tests|layers|unet OUTDIR
# Needs the machine's own torch + triton. Everything else comes from the lock: on a machine without
# internet, run `make gpu-wheels` here first and carry .whl/ (requirements/gpu.txt, hash-checked).
set -o pipefail
what=$1; out=${2:-benchmarks/results}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --find-links .whl --no-deps --require-hashes --no-compile --no-cache-dir \
    --upgrade --target /tmp/site -r requirements/gpu.txt || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
# The checkout itself, importable from the root (vqdm/ holds every code folder): no build, no index.
export PYTHONPATH=$PWD:$PYTHONPATH
mkdir -p "$out"
case $what in
  tests)
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    } 2>&1 | tee "$out/gpu_info.txt"
    python3 -m pytest tests/kernels/${TESTS:-} -q -x -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" ;;
  layers)
    python3 benchmarks/bench_layers.py --device cuda --dtypes fp16 --bits "${BITS:-3}" --sweep --json "$out/gpu_layers.json" 2>&1 | tee "$out/gpu_layers.log" ;;
  turbo)
    python3 benchmarks/bench_unet.py --device cuda --preset sdxl-turbo --resolution 512 --bits "${BITS:-3}" --dtypes fp16 \
      --steps 10 --warmup 2 --cuda-graph --budgets "${BUDGETS:-0.5,1}" --json "$out/gpu_unet_turbo_512.json" 2>&1 | tee "$out/gpu_unet_turbo.log" ;;
  sdxl)
    python3 benchmarks/bench_unet.py --device cuda --preset sdxl --resolution 1024 --bits "${BITS:-3}" --dtypes fp16 \
      --steps 5 --warmup 2 --cuda-graph --json "$out/gpu_unet_sdxl_1024.json" 2>&1 | tee "$out/gpu_unet_sdxl.log" ;;
esac
