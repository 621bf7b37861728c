#!/usr/bin/env bash
# The checks one GPU session runs (results go to bench/RESULTS.md): which arithmetic this
# torch's fused CUDA Adam uses, the end-to-end tests on CUDA (Triton kernels; test_foreach adds
# the capturable=True cases there), the moe-shard benchmark with clipping and CUDA graphs, and
# a reduced overhead workload.  Logs land in $OUT.  Needs pytest-xdist and tabulate (the GPU
# image has both).  The CPU suite runs in CI and on torch 2.11/2.13 CPU builds, not here.  The
# timeouts (190 + 230 + 120 s) keep the whole script under the device tool's 600 s per call;
# every stage prints as it goes, so a stage cut off still reports what it finished.
set -uo pipefail
export PYTHONUNBUFFERED=1 FXMESH_BENCH_TRACEBACK=1
OUT=${OUT:-/tmp/fxmesh-device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3

python3 bench/probe_fused_adam.py --device cuda 2>&1 | tee "$OUT/probe.txt" | grep -v -i warn
start=$SECONDS
FXMESH_TEST_DEVICE=cuda timeout ${TEST_TIMEOUT:-190} python3 -m pytest -v -n 8 -p no:cacheprovider \
    tests/test_adam.py tests/test_state.py tests/test_sgd.py tests/test_foreach.py tests/test_train_step.py \
    tests/test_clip.py tests/test_local.py >"$OUT/tests_cuda.log" 2>&1
echo "cuda tests: rc=$? in $((SECONDS - start)) s"
grep -E "^(FAILED|ERROR|E  )" "$OUT/tests_cuda.log" | head -n 12
grep -c PASSED "$OUT/tests_cuda.log"; grep -c -E " (FAILED|ERROR) " "$OUT/tests_cuda.log"
tail -n 1 "$OUT/tests_cuda.log"

start=$SECONDS
timeout ${BENCH_TIMEOUT:-230} python3 bench/optim_step.py --device cuda --workload moe-shard \
    --variants "${BENCH_VARIANTS:-eager_fused,fxmesh,fxmesh_cudagraphs,eager_fused_plain,eager_clip,fxmesh_clip}" \
    --json "$OUT/moe_shard.json" >"$OUT/bench_moe_shard.txt" 2>&1
echo "bench moe-shard: rc=$? in $((SECONDS - start)) s"
grep -E "^\[|\|" "$OUT/bench_moe_shard.txt" | tail -n 14

start=$SECONDS
timeout ${OVERHEAD_TIMEOUT:-120} python3 bench/optim_step.py --device cuda --workload overhead \
    --tensors ${OVERHEAD_TENSORS:-200} --variants eager_fused,eager_fused_plain,fxmesh,fxmesh_cudagraphs \
    --json "$OUT/overhead.json" >"$OUT/bench_overhead.txt" 2>&1
echo "bench overhead: rc=$? in $((SECONDS - start)) s"
grep -E "^\[|\|" "$OUT/bench_overhead.txt" | tail -n 10
