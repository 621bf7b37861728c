#!/usr/bin/env bash
# The checks one GPU session runs (results go to bench/RESULTS.md): the CPU test suite on the
# GPU machine's torch, the end-to-end tests on CUDA (Triton kernels), and the moe-shard
# benchmark.  Logs land in $OUT.  Needs pytest-xdist and tabulate, which that image has.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fxmesh-device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3

timeout 240 python3 -m pytest -q -x -n 6 -p no:cacheprovider tests >"$OUT/tests_cpu.log" 2>&1 &
cpu_tests=$!
FXMESH_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -n 3 -p no:cacheprovider \
    tests/test_adam.py tests/test_state.py >"$OUT/tests_cuda.log" 2>&1
echo "cuda tests: rc=$?"
tail -n 4 "$OUT/tests_cuda.log"
wait "$cpu_tests"
echo "cpu tests: rc=$?"
tail -n 4 "$OUT/tests_cpu.log"

timeout ${BENCH_TIMEOUT:-300} python3 bench/optim_step.py --device cuda --workload moe-shard \
    --json "$OUT/moe_shard.json" >"$OUT/bench_moe_shard.txt" 2>&1
echo "bench: rc=$?"
grep -v -i warn "$OUT/bench_moe_shard.txt" | tail -n 12
