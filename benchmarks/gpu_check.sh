#!/usr/bin/env bash
# Every check that needs a CUDA GPU, sized for a short GPU booking (15 minutes of one H200, in two
# calls: see GPU_CHECK_STEPS), most valuable first; each step has its own time limit and a failing
# step does not stop the next. Logs go to OUT_DIR (default: $OUT if set, else benchmarks/results/gpu-check), at most
# seven files, each headed by the device, torch/triton versions and the date:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
#   00-env.log          nvidia-smi, versions, the offline install of this package
#   01-correctness.log  every Triton kernel at full size against exact references
#   02-kernels.log      Triton INT8 GEMM vs torch._int_mm / BF16 / FP16, implicit-GEMM conv vs cuDNN BF16
#   03-train-step.log   ResNet-18 (CIFAR, batch 256) step: FP32, autocast bf16/fp16, 8-16 bit, peak memory
#   04-tests.log        the kernel, route and memory tests on the GPU (compiled kernels, no interpreter)
#   summary.log         each step's exit status and seconds
#
# GPU_CHECK_STEPS=03-train-step,02-kernels runs only the steps named (00-env always runs), so a
# booking can be spent in several shorter calls.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export TRITON_PRINT_AUTOTUNING=1  # each autotuning: its seconds and the configuration that won, in the logs

header() {
    $PY - <<'EOF'
import datetime, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"# {name}, torch {torch.__version__}, triton {tv}, {datetime.date.today()}")
EOF
}

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    if [ "$name" != 00-env ] && [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
        return 0
    fi
    local log="$OUT_DIR/$name.log" t0=$SECONDS
    { header; echo "\$ $*"; } >"$log" 2>&1
    timeout -s INT -k 15 "$limit" "$@" >>"$log" 2>&1  # SIGINT: pytest still prints its failures
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT_DIR/summary.log"
}

: >"$OUT_DIR/summary.log"
step 00-env 60 bash -c "nvidia-smi; $PY -m pip install -q --no-deps --no-index --no-build-isolation -e . \
    && $PY -c 'import muppet_fx; print(\"muppet_fx\", muppet_fx.__file__)'"
if ! $PY -c "import muppet_fx" 2>/dev/null; then  # not installable here: the package laid out as installed
    SHIM=$(mktemp -d)
    cp -r muppet_fx "$SHIM/muppet_fx" && cp -r passes "$SHIM/muppet_fx/passes" && cp -r kernels "$SHIM/muppet_fx/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "muppet_fx imported from $SHIM (not installed)" | tee -a "$OUT_DIR/summary.log"
fi
# On an H200 (2026-12-04, third run; benchmarks/results/gpu-h200-2026-12-04-third.md), with
# every option below but --fp16-grad-weight, the ResNet-18 step took 163 s (75 s the first
# torch.compile step, which tuned the kernels; 49 s the 16-bit level's first step), the quick
# kernel tables 46 s, the correctness checks just over 100 s, these tests 155 s: about 490 s
# with the install, more than one 10-minute call leaves after the machine starts. So a booking
# runs it as two calls: GPU_CHECK_STEPS=03-train-step, then
# GPU_CHECK_STEPS=02-kernels,01-correctness,04-tests. The step prints each configuration's
# first-step seconds to the log as they complete.
# --cuda-graphs adds graph replays: the step's device time without the host's (about 280 Triton
# launches and the routes' Python per 8-bit ResNet-18 step; benchmarks/NOTES.md section 33).
# --compile adds torch.compile of the 8-bit model, default and mode="reduce-overhead" (Inductor's
# own CUDA graphs): never run on a GPU, so given the time of two compilations of the step.
# --master adds the 8-bit step with MasterCopyOptimizer around a fused SGD (and its capture);
# --host-profile prints where the eager 8-bit step's host time goes (cProfile, 3 steps).
# --device-profile prints each kernel's own device time in autocast BF16 and the 8/16-bit steps
# (torch.profiler): which of the quantised step's kernels make it slower than autocast's.
# --fp16-grad-weight adds the 8-bit step with the weight gradients on FP16 MMA, whose int8
# operand loads pipeline (triton_aot); the int8-MMA ones ran at 0.22-0.30x cuDNN BF16.
step 03-train-step 300 $PY benchmarks/train_step.py --models resnet18 --batch 256 --reps 3 --levels 8,16 --memory --saved \
    --cuda-graphs --compile --master --fp16-grad-weight --host-profile --device-profile
step 02-kernels 60 $PY benchmarks/kernels.py --device cuda --reps 5 --quick
step 01-correctness 150 $PY benchmarks/gpu_correctness.py --batch 128
# -rf --tb=line: each failure's assertion in the summary, which pytest prints on the SIGINT of a limit too.
# On a GPU the suite keeps one autotuning configuration per kernel (MUPPET_FX_AUTOTUNE=0, tests/conftest.py).
step 04-tests 200 $PY -m pytest -q -p no:cacheprovider -rf --tb=line --maxfail=10 tests/test_quantise_triton.py \
    tests/test_quantise_many.py tests/test_batch_norm_triton.py tests/test_relu_triton.py tests/test_gemm_triton.py \
    tests/test_conv_triton.py \
    tests/test_routes.py tests/test_compact.py
