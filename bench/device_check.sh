#!/usr/bin/env bash
# The checks a GPU session runs (results go to bench/RESULTS.md).  Stages, in the order given:
#   tests     the end-to-end tests on CUDA (combo kernels by default): bench/cuda_tests.txt's 76,
#             most needed first (Adam and SGD against CUDA's fused kernels with each step's change
#             compared, new since run 5; run 5's 3 failures, all in the tests' references and fixed
#             since; what it did not reach; foreach, pieces, local shards, last run on a GPU in runs
#             2-3). Run 5 (H200): 75 tests in 150 s on 12 workers, about 24 s per test per worker.
#             TEST_FILES picks others. A CUDA error poisons its worker for every later test (run
#             4: 89 failures from one), so look for each worker's first.
#   overhead1000  the issue's 1000-tensor workload, profiled: plain eager fused, eager fused (the
#             reference for the error column), fxmesh_aten (run 5: 11.9 ms, compile 73 s), fxmesh
#             (lowered; not timed since run 3's 15.5 ms on an H100). Run 5 timed
#             fxmesh_aten_cudagraphs (4.9 ms, the CUDA-graph trees' Python over 5,000 inputs);
#             these two are what the fused_kernels default needs (RESULTS, run 5)
#   moe       the moe-shard benchmark, profiled with traces: fxmesh (pieces, combo kernels of at
#             most 8 parameters: Inductor's cap), fxmesh_foreach (combo kernels of 19: 14 launches
#             against 46, and faster in run 5's other call; in one process here, that says what
#             the launch count costs), fxmesh_aten, fxmesh_cpp_wrapper (compile 85 s). Run 5:
#             kernels at 93% of the floor, wall-clock 40% (fxmesh), 55-56% (cpp_wrapper, aten):
#             the host launches them. Run 5 also timed fxmesh_cudagraphs (3.94 ms); fxmesh_whole
#             has never been reached
#   clip      clipping + step compiled together against eager clipping, and both with
#             error_if_nonfinite=True, now profiled: run 5 put its kernels at 95% of the floor and
#             its wall-clock at 1.2-1.3x eager (72-78 launches)
#   foreach   moe-shard with the foreach step, torch.optim's default on CUDA (there Dynamo makes it
#             capturable), profiled: run 5's fastest fxmesh path (3.89 ms, 14 kernels, 99.7%); the
#             moe stage now times fxmesh_foreach too
#   moe_bf16  the same in bf16: eager fused, on plain tensors, fxmesh, fxmesh_aten
#   fsdp      moe-shard with FSDP2-like gradients (views of a buffer per 8 parameters,
#             --grad-buffers): eager fused, fxmesh, fxmesh_aten. From torch 2.13 Dynamo traces such
#             gradients with symbolic sizes (CPU run P: compile 2.2x, size asserts per call); the
#             GPU image's torch 2.11 does not, so there it measures the shared buffers alone
#   overhead  100 tensors of 64x64 on three meshes, with a profiler table and a Chrome trace
#   demo      `fxmesh demo --device cuda --world-size 1` (one GPU: two one-rank meshes over NCCL);
#             run 5: 30 steps, 1.0e-5 from eager (within the 1e-4 bound it now has off the CPU), 37 s
#   probe     which arithmetic this torch's fused CUDA Adam uses (measured in runs 1 and 2)
# Default: tests overhead1000 moe (stage limits 150 + 200 + 230 s: one device call of about
# 570 s, timeout_s 595, after a machine start); then `CLIP_TIMEOUT=120 BF16_TIMEOUT=80
# DEMO_TIMEOUT=45 bash bench/device_check.sh clip moe_bf16 demo` as a second call while the
# machine is warm (30 s), timeout_s 270: run 5's two calls took 568 + 237 s of the 900.  Logs land in $OUT (8
# files come back at most).
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
    # Inductor's generated code (wrappers and Triton kernels) comes back in traces.tgz: the
    # launches' arguments are what the host pays for (GPU run 4).
    TORCHINDUCTOR_CACHE_DIR="$OUT/traces/code/$name" timeout "$limit" \
        python3 bench/optim_step.py --device cuda "$@" --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1
    echo "bench $name: rc=$? in $((SECONDS - start)) s"
    grep -E "^\[[a-z_]+\] median|\|" "$OUT/$name.txt" | tail -n 14
}

for stage in "${@:-tests overhead1000 moe}"; do
    for s in $stage; do
        case $s in
        probe) python3 bench/probe_fused_adam.py --device cuda 2>&1 | tee "$OUT/probe.txt" | grep -v -i warn ;;
        demo)
            start=$SECONDS
            timeout "${DEMO_TIMEOUT:-90}" python3 -m fxmesh.cli demo --device cuda --world-size 1 >"$OUT/demo.txt" 2>&1
            echo "demo: rc=$? in $((SECONDS - start)) s"
            tail -n 4 "$OUT/demo.txt"
            ;;
        tests)
            start=$SECONDS
            # bench/cuda_tests.txt's selection, or TEST_FILES (files or node ids, space-separated).
            if [ -n "${TEST_FILES:-}" ]; then
                read -ra selected <<<"$TEST_FILES"
            else
                mapfile -t selected < <(grep -v '^#' bench/cuda_tests.txt | grep .)
            fi
            # 12 workers, each with 4 Triton compile processes (Inductor's default is one per core);
            # tests spread one by one (setup.cfg's --dist loadfile would keep each file on one worker).
            FXMESH_TEST_DEVICE=cuda TORCHINDUCTOR_COMPILE_THREADS=4 \
                timeout -s INT -k 20 ${TEST_TIMEOUT:-150} \
                python3 -m pytest -v -n 12 --dist load -p no:cacheprovider --tb=short "${selected[@]}" \
                >"$OUT/tests_cuda.log" 2>&1
            echo "cuda tests: rc=$? in $((SECONDS - start)) s"
            echo "passed $(grep -c ' PASSED ' "$OUT/tests_cuda.log"), failed $(grep -c -E ' (FAILED|ERROR) ' "$OUT/tests_cuda.log")"
            grep -E "^(FAILED|ERROR|E  )" "$OUT/tests_cuda.log" | head -n 16
            ;;
        moe) bench moe_shard "${BENCH_TIMEOUT:-230}" --workload moe-shard --profile --trace-dir "$OUT/traces/moe" \
            --variants eager_fused,eager_fused_plain,fxmesh,fxmesh_foreach,fxmesh_aten,fxmesh_cpp_wrapper ;;
        clip) bench moe_clip "${CLIP_TIMEOUT:-150}" --workload moe-shard --profile --trace-dir "$OUT/traces/clip" \
            --variants eager_clip,fxmesh_clip,eager_clip_checked,fxmesh_clip_checked ;;
        overhead1000) bench overhead1000 "${OVERHEAD1000_TIMEOUT:-200}" --workload overhead --profile \
            --trace-dir "$OUT/traces/overhead1000" --variants eager_fused_plain,eager_fused,fxmesh_aten,fxmesh ;;
        foreach) bench moe_foreach "${FOREACH_TIMEOUT:-150}" --workload moe-shard --profile --trace-dir "$OUT/traces/foreach" \
            --variants eager_fused,eager_foreach,fxmesh_foreach ;;
        moe_bf16) bench moe_bf16 "${BF16_TIMEOUT:-100}" --workload moe-shard-bf16 \
            --variants eager_fused,eager_fused_plain,fxmesh,fxmesh_aten ;;
        fsdp) bench moe_fsdp "${FSDP_TIMEOUT:-120}" --workload moe-shard --grad-buffers 8 \
            --variants eager_fused,fxmesh,fxmesh_aten ;;
        overhead) bench overhead "${OVERHEAD_TIMEOUT:-160}" --workload overhead --tensors 100 --profile \
            --trace-dir "$OUT/traces/overhead" --variants eager_fused,eager_fused_plain,fxmesh,fxmesh_aten,fxmesh_cudagraphs,fxmesh_aten_cudagraphs ;;
        *) echo "unknown stage $s" ;;
        esac
    done
done
# $OUT brings back 8 files at most: the traces travel as one archive.
if [ -d "$OUT/traces" ]; then
    find "$OUT/traces/code" -type f ! -name '*.py' -delete 2>/dev/null
    tar czf "$OUT/traces.tgz" -C "$OUT" traces && rm -rf "$OUT/traces"
fi
