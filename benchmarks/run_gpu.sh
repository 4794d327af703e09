#!/usr/bin/env bash
# The GPU session in one script (run from the repo root; the lent H100 runs `bash benchmarks/run_gpu.sh all`):
#   bash benchmarks/run_gpu.sh {tests|layers|unet|served|all} [OUTDIR]
#   tests   the kernel tests (tests/kernels, or $TESTS)
#   layers  the per-layer sweep (bench_layers.py)
#   unet    one U-Net step at SDXL 1024² and Turbo 512², 3-bit: eager dense, compiled dense, eager VQ,
#           compiled VQ, each also replayed as a CUDA graph (bench_unet.py --compile --cuda-graph)
#   served  served latency through a live `vqdm serve`, VQ vs dense, `--compile MODE` vs `--compile off`
#           (served_models.py makes random-weight models, bench_server.py --compare-compile times them)
#   all     every one of them, in that order, each under its own time limit: 5 minutes in all
# OUTDIR: $OUT when set (what the lent machine sends back), else benchmarks/results. A preflight (GPU,
# versions, imports, free memory) is written first; each step's result as soon as it exists; every
# step's output goes to gpu_run.log, and gpu_summary.json is rewritten after each step (a figure a
# step did not produce is null with the reason beside it; benchmarks/gpu_summary.py).
# Time limits in seconds, per step: T_PREFLIGHT T_INSTALL T_TESTS T_LAYERS T_UNET_TURBO T_UNET_SDXL T_SERVED
# (Turbo 512² served), T_SERVED_SDXL (added for SDXL 1024², served only while the steps so far leave
# room for it in T_BUDGET) (docs/kernels.md, "The GPU session").
# Needs the machine's own torch + triton. Everything else comes from the lock: on a machine without
# internet, run `make gpu-wheels` here first and carry .whl/ (requirements/gpu.txt, hash-checked).
# DRY_RUN=1: the same steps and files on the CPU with TRITON_INTERPRET=1, tiny models and shapes,
# and "device": "cpu-dry-run" (tests/test_run_gpu_dry_run.py runs it in `make test`).
set -u -o pipefail

usage() {
  echo "usage: bash benchmarks/run_gpu.sh {tests|layers|unet|served|all} [OUTDIR]   (DRY_RUN=1: on the CPU)" >&2
  exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || usage
case $1 in
  tests) steps="tests" ;;
  layers) steps="layers" ;;
  unet) steps="unet_turbo_512 unet_sdxl_1024" ;;
  served) steps="served" ;;
  all) steps="tests layers unet_turbo_512 unet_sdxl_1024 served" ;;
  *) echo "run_gpu.sh: unknown target '$1'" >&2; usage ;;
esac
out=${2:-${OUT:-benchmarks/results}}
work=${WORK:-/tmp/vqdm-gpu}  # the served models: large, and not results
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ "${DRY_RUN:-0}" = 1 ]; then
  device=cpu-dry-run dev=cpu
  export TRITON_INTERPRET=1
  # Micro models (the micro-* presets: the fewest U-Net blocks), few steps: the code paths of the GPU
  # run (compile flags, compiled serving's buckets, warm-up, metrics and fallbacks, every file and
  # key), at CI's cost. The compile backend is Dynamo's tracing alone (eager): each U-Net is traced
  # whole as on the GPU, without the minutes of code generation inductor takes on two cores
  # (COMPILE_BACKEND=aot_eager or inductor for those). One torch thread per process: on a loaded
  # 2-core machine two threads make a micro U-Net's eager step 10-100x slower. bench_unet.py runs its
  # variants in its own process (--in-process): peak RSS means nothing here, process starts cost.
  export OMP_NUM_THREADS=1
  backend=${COMPILE_BACKEND:-eager}
  tests_args=${TESTS:-"tests/kernels/test_triton_vq.py -k test_decode_kernel_matches_dequantize"}
  layers_args="--device cpu --dtypes fp32 --bits 3 --quick --max-rows 4 --repeat 1"
  unet_common="--device cpu --dtypes fp32 --bits 3 --steps 1 --warmup 1 --busy-retries 0 --threads 1 --in-process"
  unet_turbo="--preset micro-sdxl-turbo --resolution 64"
  unet_sdxl="--preset micro-sdxl --resolution 64"
  served_turbo="turbo_512:micro-sdxl-turbo:64x64:1"  # the models' own size: their compiled buckets
  served_sdxl="sdxl_1024:micro-sdxl:64x64:1"
  served_dtype=float32 served_requests=2 served_threads=--server-arg=--cpu-threads=1
  : "${T_PREFLIGHT:=60}" "${T_INSTALL:=60}" "${T_TESTS:=120}" "${T_LAYERS:=120}" "${T_UNET_TURBO:=300}"
  : "${T_UNET_SDXL:=300}" "${T_SERVED:=300}" "${T_SERVED_SDXL:=0}" "${T_BUDGET:=1800}"
else
  device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  if [ -z "$device" ]; then
    echo "run_gpu.sh: no GPU here (nvidia-smi found none); DRY_RUN=1 runs the same steps on the CPU" >&2
    exit 1
  fi
  dev=cuda
  backend=${COMPILE_BACKEND:-inductor}
  tests_args=${TESTS:-tests/kernels}
  layers_args="--device cuda --dtypes fp16 --bits ${BITS:-3} --sweep"
  unet_common="--device cuda --dtypes fp16 --bits ${BITS:-3} --steps 5 --warmup 2 --cuda-graph"
  unet_turbo="--preset sdxl-turbo --resolution 512"
  unet_sdxl="--preset sdxl --resolution 1024"
  served_turbo="turbo_512:sdxl-turbo:512x512:4"
  served_sdxl="sdxl_1024:sdxl:1024x1024:${SDXL_STEPS:-20}"
  served_dtype=float16 served_requests=${REQUESTS:-3} served_threads=
  # 290 s in all, the install included: `all` ends within 5 minutes on an H100. The served step
  # serves Turbo 512² (dense + VQ: two full-size models to make, load and compile); SDXL 1024² joins
  # it only when the steps before ended early enough that T_SERVED + T_SERVED_SDXL still fit in
  # T_BUDGET (else its figures are null, "did not fit").
  : "${T_PREFLIGHT:=10}" "${T_INSTALL:=25}" "${T_TESTS:=35}" "${T_LAYERS:=25}" "${T_UNET_TURBO:=50}"
  : "${T_UNET_SDXL:=65}" "${T_SERVED:=80}" "${T_SERVED_SDXL:=90}" "${T_BUDGET:=290}"
fi
mkdir -p "$out" "$work"
log=$out/gpu_run.log
: >"$log"
# One mode for both: the U-Net steps measure what is served, and the server's compiles of the same
# graphs can come from inductor's cache that the unet steps filled.
compile_mode=${COMPILE_MODE:-reduce-overhead}  # bench_unet.py (CUDA graphs: its compiled step is its graph step)
serve_compile=${SERVE_COMPILE:-$compile_mode}  # vqdm serve --compile
export PY out work dev backend served_dtype served_requests served_threads serve_compile
compile_note="bench_unet.py --compile $compile_mode, vqdm serve --compile $serve_compile, backend $backend"

summary() {  # [--step NAME --rc RC --seconds S --limit S]: rewrite gpu_summary.json from the files so far
  "$PY" benchmarks/gpu_summary.py "$out" --device "$device" --compile "$compile_note" "$@" 2>&1 | tee -a "$log"
}

step() {  # NAME LIMIT COMMAND...: the command (or a function of this script) under its time limit, then the summary
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  # `timeout` stops the command's whole process group (bench workers, servers); it runs programs, so a
  # function runs in a bash of its own, with the variables above exported.
  if declare -F "$1" >/dev/null; then set -- bash -c "$(declare -f "$1"); $1"; fi
  rm -f "$out/gpu_$name.json"  # a result left from an earlier run is not this run's
  echo "=== $name (limit ${limit}s) $(date -u +%FT%TZ)" | tee -a "$log"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
  summary --step "$name" --rc "$rc" --seconds "$((SECONDS - t0))" --limit "$limit"
}

# The preflight: written before anything else runs, so even a run that hangs says what it ran on.
{
  echo "device: $device  target: $1  out: $out  compile: $compile_note"
  git log -1 --format='commit %H %cI' 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 || true
} >"$out/gpu_preflight.txt"
preflight() {
  "$PY" - <<'EOF'
import shutil, time
t0 = time.perf_counter()
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "threads", torch.get_num_threads())
for name in ("triton", "diffusers", "transformers", "fastapi"):
    try:
        print(name, __import__(name).__version__)
    except ImportError as e:
        print(name, "MISSING:", e)
import vqdm.kernels, vqdm.models, vqdm.server.app  # noqa: E401,F401  (what the steps import)
print("vqdm imports ok; kernel backends:", vqdm.kernels.available_backends())
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"{torch.cuda.get_device_name()}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
import psutil
print(f"RAM available {psutil.virtual_memory().available / 2**30:.1f} GiB; "
      f"disk free {shutil.disk_usage('/tmp').free / 2**30:.1f} GiB in /tmp")
print(f"preflight imports took {time.perf_counter() - t0:.1f}s")
EOF
}

if ls .whl/*.whl >/dev/null 2>&1; then
  install() {
    "$PY" -m pip install -q --no-index --find-links .whl --no-deps --require-hashes --no-compile --no-cache-dir \
      --upgrade --target /tmp/site -r requirements/gpu.txt
  }
  step install "$T_INSTALL" install || true
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The checkout itself, importable from the root (vqdm/ holds every code folder): no build, no index.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
summary  # every key null, "did not run", until its step has run
timeout -k 2 "$T_PREFLIGHT" bash -c "$(declare -f preflight); preflight" >>"$out/gpu_preflight.txt" 2>&1 \
  || echo "preflight: exit $? (limit ${T_PREFLIGHT}s)" >>"$out/gpu_preflight.txt"
cat "$out/gpu_preflight.txt" | tee -a "$log"

for s in $steps; do
  case $s in
    tests)
      # shellcheck disable=SC2086  # the selection is words: paths and -k expressions
      step tests "$T_TESTS" "$PY" -m pytest $tests_args -q -x -p no:cacheprovider ;;
    layers)
      # shellcheck disable=SC2086
      step layers "$T_LAYERS" "$PY" benchmarks/bench_layers.py $layers_args --json "$out/gpu_layers.json" ;;
    unet_turbo_512|unet_sdxl_1024)
      [ "$s" = unet_turbo_512 ] && args=$unet_turbo limit=$T_UNET_TURBO || args=$unet_sdxl limit=$T_UNET_SDXL
      # shellcheck disable=SC2086
      step "$s" "$limit" "$PY" benchmarks/bench_unet.py $args $unet_common --compile "$compile_mode" \
        --compile-backend "$backend" --json "$out/gpu_$s.json" ;;
    served)
      # Turbo 512² always; SDXL 1024² too when it still fits in the budget (the dry run: always).
      served_pairs=$served_turbo limit=$T_SERVED left=$((T_BUDGET - SECONDS))
      if [ "$left" -ge $((T_SERVED + T_SERVED_SDXL)) ]; then
        served_pairs="$served_turbo $served_sdxl" limit=$((T_SERVED + T_SERVED_SDXL))
      else
        echo "served: SDXL 1024² not served: ${left}s left of the ${T_BUDGET}s budget, it needs $((T_SERVED + T_SERVED_SDXL))s" | tee -a "$log"
      fi
      export served_pairs
      served() {  # the models (made once per machine, kept in $work), then one server per compile mode
        # shellcheck disable=SC2086
        "$PY" benchmarks/served_models.py $served_pairs --dtype "$served_dtype" --device "$dev" \
          --out "$work/models" || return
        # shellcheck disable=SC2086  # served_threads: empty, or one --server-arg
        "$PY" benchmarks/bench_server.py --compare-compile "$serve_compile" --models-json "$work/models/models.json" \
          --pairs $(for p in $served_pairs; do echo "${p%%:*}"; done) --device "$dev" --requests "$served_requests" --warmup 1 \
          --server-arg=--no-verify-artifacts --server-arg=--warmup-size=default --server-arg=--dtype="$served_dtype" \
          --server-arg=--compile-backend="$backend" $served_threads --json "$out/gpu_served.json"
      }
      step served "$limit" served ;;
  esac
done
echo "=== done: $out/gpu_summary.json" | tee -a "$log"
cat "$out/gpu_summary.json"
