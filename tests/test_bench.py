"""bench/optim_step.py runs end to end on a tiny workload and reports what it measured."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import types

import pytest
import torch

BENCH = pathlib.Path(__file__).parents[1] / "bench" / "optim_step.py"


def _eager_fused_and_fxmesh(tmp_path, *args: str) -> tuple[dict, dict[str, dict]]:
    """The bench's eager_fused and fxmesh variants over 8x8 shards with ``args``: its JSON, and its rows by variant."""
    out_json = tmp_path / "out.json"
    cmd = [sys.executable, str(BENCH), *args, "--shape", "8", "8", "--steps", "3", "--warmup", "1"]
    cmd += ["--variants", "eager_fused,fxmesh", "--json", str(out_json)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out_json.read_text())
    return result, {r["variant"]: r for r in result["rows"]}


def test_optim_step_bf16_workload(tmp_path):
    """moe-shard-bf16: bf16 parameters and states, a 14 B/param floor, fxmesh within one bf16 ulp of eager fused."""
    result, rows = _eager_fused_and_fxmesh(tmp_path, "--workload", "moe-shard-bf16", "--tensors", "2")
    assert result["workload"]["dtype"] == "bfloat16" and result["workload"]["numel"] == 2 * 64
    floor_s = 7 * 2 * 2 * 64 / result["bandwidth_bytes_per_s"]  # AdamW: 7 tensors of 2 bytes per param
    assert result["floor_ms"] == pytest.approx(floor_s * 1e3)
    assert rows["fxmesh"]["median_ms"] > 0 and rows["fxmesh"]["recompiles"] == 0, rows["fxmesh"]
    assert rows["fxmesh"]["rel_err"] <= 2**-8, rows["fxmesh"]


def test_optim_step_gradient_buffers(tmp_path):
    """--grad-buffers: gradients as views of a buffer per K parameters (FSDP2's); fxmesh still matches eager fused."""
    result, rows = _eager_fused_and_fxmesh(tmp_path, "--tensors", "5", "--grad-buffers", "2")
    assert result["grad_buffers"] == 2 and "gradients as views of a buffer per 2" in result["header"]
    assert rows["fxmesh"]["median_ms"] > 0 and rows["fxmesh"]["recompiles"] == 0, rows["fxmesh"]
    assert rows["fxmesh"]["rel_err"] <= 1e-5, rows["fxmesh"]


def test_optim_step_rounds(tmp_path):
    """--rounds: all variants resident, timed in rounds; x eager_fused is the median of the rounds' ratios."""
    result, rows = _eager_fused_and_fxmesh(tmp_path, "--tensors", "3", "--rounds", "3")
    assert result["rounds"] == 3 and "in 3 rounds of alternating order" in result["header"]
    eager, fx = rows["eager_fused"], rows["fxmesh"]
    assert len(eager["round_medians_ms"]) == len(fx["round_medians_ms"]) == 3, rows  # --steps 3: one step a round
    ratios = sorted(e / f for e, f in zip(eager["round_medians_ms"], fx["round_medians_ms"]))
    assert fx["speedup"] == pytest.approx(ratios[1], rel=1e-12) and eager["speedup"] == 1.0, rows
    assert min(fx["round_medians_ms"]) <= fx["median_ms"] <= max(fx["round_medians_ms"]), fx
    assert fx["note"] == f"rounds: {ratios[0]:.2f}-{ratios[2]:.2f}x eager_fused", fx
    assert fx["recompiles"] == 0 and fx["compile_s"] > 0 and fx["rel_err"] <= 1e-5, fx
    assert result["bandwidth_end_bytes_per_s"] > 0


@pytest.mark.parametrize("rounds", ["0", "4"])
def test_optim_step_rounds_out_of_range(rounds):
    """--rounds outside 1..--steps is refused before anything runs, naming the limit."""
    cmd = [sys.executable, str(BENCH), "--steps", "3", "--rounds", rounds]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"--rounds must be from 1 to --steps (3), not {rounds}" in out.stderr, out.stderr


def _bench_module():
    """The bench script as a module, loaded without running it."""
    spec = importlib.util.spec_from_file_location("fxmesh_bench_optim_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _bench_variants() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The bench's VARIANTS and GPU_ONLY."""
    module = _bench_module()
    return module.VARIANTS, module.GPU_ONLY


def test_cuda_test_selection_names_tests():
    """Every line of bench/cuda_tests.txt (what a GPU session's tests stage runs) still names a test."""
    selection = BENCH.parent / "cuda_tests.txt"
    ids = [line for line in selection.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ids, selection
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=BENCH.parents[1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = int(re.search(r"(\d+) tests? collected", out.stdout).group(1))
    assert len(ids) <= collected <= 90, out.stdout[-500:]


def test_device_kernels_leave_out_annotations():
    """The kernel count and GPU time leave out the profiler step's range, which the GPU shows too
    (GPU run 5 counted it: one kernel and the step's whole span on the GPU too many)."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, device_type, annotation=False):
        return types.SimpleNamespace(name=name, device_type=device_type, is_user_annotation=annotation)

    events = [
        event("ProfilerStep#1", cpu, annotation=True),
        event("ProfilerStep#1", cuda, annotation=True),
        event("ProfilerStep#1", cuda),  # torch versions that do not flag it
        event("fxmesh step", cuda, annotation=True),
        event("triton_poi_fused_0", cuda),
        event("void at::native::multi_tensor_apply_kernel<...>", cuda),
        event("aten::_fused_adamw_", cpu),
    ]
    kept = _bench_module().device_kernels(events)
    assert [e.name for e in kept] == ["triton_poi_fused_0", "void at::native::multi_tensor_apply_kernel<...>"]


def test_optim_step_every_variant(tmp_path):
    """Every variant the bench offers, on a tiny CPU workload and under the profiler: a time matching
    eager_fused (fp32: 1e-5; fxmesh_aten, eager fused's own kernel, exactly), or a reason in words (GPU-only
    variants; upstream's compile of foreach across meshes); the JSON matches the table."""
    variants, gpu_only = _bench_variants()
    out_json = tmp_path / "out.json"
    cmd = [sys.executable, str(BENCH), "--tensors", "3", "--shape", "8", "8", "--steps", "2", "--warmup", "1"]
    cmd += ["--variants", ",".join(variants), "--json", str(out_json), "--profile", "--trace-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out_json.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == list(variants)
    reasons = {name: "GPU only" for name in gpu_only} | {"torch_compile_foreach": "different mesh"}
    for name, row in rows.items():
        if name in reasons:
            # "meshes" on torch 2.13, "mesh" on 2.11
            assert row["median_ms"] is None and reasons[name] in row["note"], row
        else:
            assert row["median_ms"] > 0 and row["rel_err"] <= 1e-5, row
        # Kernel counts and times come from a CUDA profile: the CPU run leaves them empty, not zero.
        assert row["kernels"] is None and row["gpu_ms"] is None and row["gpu_floor_pct"] is None, row
    for name in ("fxmesh", "fxmesh_aten", "fxmesh_clip", "fxmesh_clip_checked"):
        assert rows[name]["compile_s"] > 0 and rows[name]["recompiles"] == 0, rows[name]
    assert rows["eager_fused"]["speedup"] == 1.0 and rows["fxmesh_aten"]["rel_err"] == 0, rows
    assert rows["fxmesh_clip"]["note"].endswith("x eager_clip"), rows["fxmesh_clip"]
    assert rows["fxmesh_clip_checked"]["note"].endswith("x eager_clip_checked"), rows["fxmesh_clip_checked"]
    assert result["clip_floor_ms"] == pytest.approx(result["floor_ms"] * 9 / 7)  # + read and write the grads
    assert result["floor_ms"] > 0 and result["workload"]["numel"] == 3 * 64
    assert "fxmesh" in out.stdout and "x eager_fused" in out.stdout
    assert "[fxmesh] one step under the profiler" in out.stdout
    trace = json.loads((tmp_path / "fxmesh.json").read_text())
    assert any("Torch-Compiled Region" in e.get("name", "") for e in trace["traceEvents"])
    assert any(e.get("cat") == "python_function" for e in trace["traceEvents"])  # with --trace-dir: Python frames
