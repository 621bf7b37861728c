#!/usr/bin/env bash
# The checks a GPU session runs (results go to bench/RESULTS.md).  Stages, in the order given:
#   overhead  100 tensors of 64x64 on three meshes, with a profiler table of each variant's step:
#             in GPU run 2 fxmesh was slower than eager fused here (200 tensors, 7.62 against
#             4.14 ms) for a reason the timings alone did not show
#   tests     the end-to-end tests on CUDA with Inductor's combo kernels on (Triton kernels;
#             test_foreach adds the capturable cases there); in GPU run 2 (without combo
#             kernels) 73 of them ran and every parity check passed; most of test_clip was not
#             reached
#   moe       the moe-shard benchmark: combo kernels (with their error against eager), clipping,
#             then fxmesh without combo kernels (measured in GPU run 2; last, where the stage
#             limit may cut it)
#   moe_bf16  the same in bf16 (never measured on a GPU): eager fused, on plain tensors, combo kernels
#   probe     which arithmetic this torch's fused CUDA Adam uses (measured in runs 1 and 2)
# Default: overhead tests (about 450 s: one device call); then `bash bench/device_check.sh moe
# moe_bf16` (about 330 s) as a second call while the machine is warm.  Logs land in $OUT.
# Needs pytest-xdist and tabulate (the GPU image has both).  Every stage prints as it goes, so a
# stage cut off by its timeout still reports what it finished.
set -uo pipefail
export PYTHONUNBUFFERED=1 FXMESH_BENCH_TRACEBACK=1
OUT=${OUT:-/tmp/fxmesh-device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3

bench() {  # name timeout args...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" python3 bench/optim_step.py --device cuda "$@" --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1
    echo "bench $name: rc=$? in $((SECONDS - start)) s"
    grep -E "^\[[a-z_]+\] median|\|" "$OUT/$name.txt" | tail -n 14
}

for stage in "${@:-overhead tests}"; do
    for s in $stage; do
        case $s in
        probe) python3 bench/probe_fused_adam.py --device cuda 2>&1 | tee "$OUT/probe.txt" | grep -v -i warn ;;
        tests)
            start=$SECONDS
            # 12 workers, each with 4 Triton compile processes (Inductor's default is one per core).
            FXMESH_TEST_DEVICE=cuda FXMESH_TEST_COMBO_KERNELS=1 TORCHINDUCTOR_COMPILE_THREADS=4 \
                timeout ${TEST_TIMEOUT:-250} \
                python3 -m pytest -v -n 12 -p no:cacheprovider --tb=short \
                tests/test_adam.py tests/test_state.py tests/test_sgd.py tests/test_foreach.py \
                tests/test_train_step.py tests/test_clip.py tests/test_local.py tests/test_pieces.py \
                >"$OUT/tests_cuda.log" 2>&1
            echo "cuda tests (combo kernels): rc=$? in $((SECONDS - start)) s"
            echo "passed $(grep -c ' PASSED ' "$OUT/tests_cuda.log"), failed $(grep -c -E ' (FAILED|ERROR) ' "$OUT/tests_cuda.log")"
            grep -E "^(FAILED|ERROR|E  )" "$OUT/tests_cuda.log" | head -n 16
            ;;
        moe) bench moe_shard "${BENCH_TIMEOUT:-230}" --workload moe-shard \
            --variants eager_fused,fxmesh_combo,eager_fused_plain,eager_clip,fxmesh_clip,fxmesh ;;
        moe_bf16) bench moe_bf16 "${BF16_TIMEOUT:-100}" --workload moe-shard-bf16 \
            --variants eager_fused,eager_fused_plain,fxmesh_combo ;;
        overhead) bench overhead "${OVERHEAD_TIMEOUT:-200}" --workload overhead --tensors 100 \
            --profile --trace-dir "$OUT/traces" --variants eager_fused,eager_fused_plain,fxmesh_combo,fxmesh_cudagraphs,fxmesh ;;
        *) echo "unknown stage $s" ;;
        esac
    done
done
