"""``fxmesh inspect`` through the command line, on the targets in tests/inspect_targets.py.

Each compiling target runs once (module-scoped fixtures); the tests read its output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxmesh.inspection import GraphBreak, Report

REPO = Path(__file__).resolve().parents[1]
TARGETS = "tests/inspect_targets.py"
DP = "dp(dp=8)"
EP = "ep(dp_mod_ep=2, ep=4)"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fxmesh.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fxmesh inspect: error:")]


@pytest.fixture(scope="module")
def adamw(tmp_path_factory):
    """Fused AdamW over dp and ep, with --json --strict --dump: (report, dump dir)."""
    dump = tmp_path_factory.mktemp("dump")
    out = run_cli("inspect", f"{TARGETS}:fused_adamw", "--json", "--strict", "--dump", str(dump))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), dump


@pytest.fixture(scope="module")
def graph_break_step():
    """A foreach Adam train step with a graph break before opt.step(), as a table, with --strict."""
    return run_cli("inspect", "tests.inspect_targets:foreach_adam_step_with_graph_break", "--strict")


def test_json_counts_each_mesh_exactly(adamw):
    """Params, grads, exp_avg and exp_avg_sq per mesh (steps are plain tensors), rank 0's elements and bytes."""
    report, _ = adamw
    assert report["meshes"] == [
        {"name": DP, "dim_names": ["dp"], "shape": [8], "tensors": 8, "numel": 64, "bytes": 256},
        {"name": EP, "dim_names": ["dp_mod_ep", "ep"], "shape": [2, 4], "tensors": 12, "numel": 128, "bytes": 512},
    ]


def test_json_reports_the_fused_node_and_its_groups(adamw):
    """One fused AdamW node over 5 tensors on both meshes, split into 2 + 3 by split_by_mesh."""
    report, _ = adamw
    [node] = report["nodes"]
    assert node["target"] == "fxmesh.ops.fused_adamw_"
    assert node["tensors"] == 5
    assert node["meshes"] == [DP, EP]
    assert node["groups"] == [{"mesh": DP, "tensors": 2}, {"mesh": EP, "tensors": 3}]


def test_json_clean_fused_step_passes_strict(adamw):
    """Exit 0 under --strict: kernels generated, no extern calls, no recompile, only torch.optim's own breaks."""
    report, _ = adamw
    assert report["kernels"] >= 1
    assert report["fallbacks"] == 0 and report["extern_calls"] == {}
    assert all(b["optimizer_base"] and "User-inserted graph break" in b["reason"] for b in report["graph_breaks"])
    assert report["recompiles"] == 0
    assert report["local_shard_graphs"] == report["graphs"] == 1 and report["symbolic_graphs"] == 0
    assert isinstance(report["compile_seconds"], float) and report["compile_seconds"] > 0
    assert report["problems"] == [] and report["multi_mesh_nodes"] == []


def test_split_at_the_nonfinite_check_is_fully_compiled():
    """clip_grad_norm_(..., error_if_nonfinite=True) + fused AdamW: one Dynamo graph, compiled as two parts
    around the check, both on the local shards; --strict passes."""
    out = run_cli("inspect", f"{TARGETS}:clip_with_error_if_nonfinite_and_step", "--strict")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"^graphs split at a host-side check\s+1$", out.stdout, re.M), out.stdout
    assert re.search(r"^graphs on local shards\s+2 of 2$", out.stdout, re.M), out.stdout
    assert "fully compiled" in out.stdout


def test_fused_kernels_aten_shows_the_kernel_per_mesh():
    """--fused-kernels aten: aten's kernel called once per mesh, which is compiled as intended (--strict passes)."""
    out = run_cli("inspect", f"{TARGETS}:fused_adamw", "--json", "--strict", "--fused-kernels", "aten")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["extern_calls"] == {"torch.ops.fxmesh.aten_fused_adamw_.default": 2}
    assert report["problems"] == [] and report["local_shard_graphs"] == 1


def test_dump_writes_graphs_and_output_code(adamw):
    """--dump: the graph with the fused call before the passes, without it after, the graphs Inductor gets
    (over the local shards: no DTensor left; one per distinct piece), and Inductor's C++ kernels."""
    _, dump = adamw
    names = sorted(p.name for p in dump.iterdir())
    compiled = [n for n in names if n.startswith("graph_0.compiled_")]
    output_code = [n for n in names if n.startswith("output_code_")]
    assert names == sorted(["graph_0.after_passes.py", "graph_0.before_passes.py", *compiled, *output_code])
    # A piece whose code Inductor already generated (its graph cache) writes no output code again.
    assert compiled and 1 <= len(output_code) <= len(compiled), names
    assert "fused_adamw_" in (dump / "graph_0.before_passes.py").read_text()
    assert "fused_adamw_" not in (dump / "graph_0.after_passes.py").read_text()
    assert "DTensor(" in (dump / "graph_0.after_passes.py").read_text()
    assert all("DTensor(" not in (dump / n).read_text() for n in compiled)
    assert all("cpp_fused" in (dump / n).read_text() for n in output_code)


def test_table_lists_meshes_per_mesh_nodes_and_breaks(graph_break_step):
    """The table: mesh rows read off the graphs' inputs, the per-mesh foreach stand-ins, the break's line."""
    out = graph_break_step.stdout
    assert re.search(r"^graphs on local shards\s+(\d+) of \1$", out, re.M), out
    assert re.search(r"^graphs with symbolic sizes\s+0 of \d+$", out, re.M), out
    assert re.search(r"^graphs made static\s+\d+ of \d+$", out, re.M), out
    assert re.search(r"^pieces \(compiled\)\s+\d+ \(\d+\)$", out, re.M), out
    assert re.search(r"^dp\(dp=8\)\s+dp\s+8\s+8\s+64\s+256$", out, re.M), out
    assert re.search(r"^ep\(dp_mod_ep=2, ep=4\)\s+dp_mod_ep, ep\s+2x4\s+12\s+128\s+512$", out, re.M), out
    assert re.search(r"fxmesh\.ops\._foreach_div__per_mesh\s+5\s+dp\(dp=8\)\s+dp\(dp=8\): 2$", out, re.M), out
    assert re.search(r"^\s+ep\(dp_mod_ep=2, ep=4\)\s+ep\(dp_mod_ep=2, ep=4\): 3$", out, re.M), out
    lines = (REPO / TARGETS).read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "torch._dynamo.graph_break()" in text)
    assert f"{TARGETS}:{line} in step" in out


def test_strict_fails_on_a_graph_break_in_the_step(graph_break_step):
    """--strict exits 1 naming the user's graph break, and not torch.optim's own."""
    assert graph_break_step.returncode == 1, graph_break_step.stderr[-3000:]
    reasons = [line for line in graph_break_step.stderr.splitlines() if "not fully compiled" in line]
    assert len(reasons) == 1, graph_break_step.stderr[-3000:]
    assert f"graph break at {TARGETS}:" in reasons[0] and "in step" in reasons[0]


def test_problems_name_extern_optimizer_ops_and_multi_mesh_nodes():
    """An aten optimizer op left as an extern call and a node on several meshes fail; other externs
    (a matmul, clipping's ``_foreach_norm``, which Inductor never lowers) do not."""
    report = Report(
        target="t",
        world_size=8,
        graphs=1,
        meshes=[],
        nodes=[],
        kernels=1,
        extern_calls={
            "torch.ops.aten._fused_adamw_.default": 2,
            "extern_kernels.mm": 1,
            "torch.ops.aten._foreach_norm.Scalar": 1,
            "torch.ops.aten._foreach_mul_.Tensor": 1,
        },
        graph_breaks=[GraphBreak("Call to `torch._dynamo.graph_break()`", "optimizer.py:79 in _use_grad", 1, True)],
        recompiles=0,
        compile_seconds=1.0,
        eager_fallbacks=0,
        multi_mesh_nodes=["graph 0 node fused_adamw_ (dp(dp=8), ep(dp_mod_ep=2, ep=4))"],
    )
    assert report.problems() == [
        "optimizer op left as an extern call: torch.ops.aten._fused_adamw_.default (2x)",
        "optimizer op left as an extern call: torch.ops.aten._foreach_mul_.Tensor (1x)",
        "graph 0 node fused_adamw_ (dp(dp=8), ep(dp_mod_ep=2, ep=4)) still spans several meshes after the passes",
    ]
    assert report.to_json()["fallbacks"] == 5


@pytest.mark.parametrize(
    "target, message",
    [
        ("tests/no_such_file.py:f", "no such file: tests/no_such_file.py"),
        (f"{TARGETS}:no_such_function", f"{TARGETS} has no function 'no_such_function'"),
        (f"{TARGETS}:returns_a_number", "returned int; expected a torch.optim.Optimizer or a zero-argument callable"),
        (f"{TARGETS}:raises", "raises raised ValueError: no model here"),
    ],
    ids=["missing-file", "missing-function", "wrong-return-type", "raises"],
)
def test_bad_target_is_one_line_and_exit_2(target, message):
    """A bad TARGET: exit 2, one error line saying why, no traceback, nothing on stdout."""
    out = run_cli("inspect", target)
    assert out.returncode == 2, out.stderr[-3000:]
    [line] = error_lines(out.stderr)
    assert message in line
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_failing_step_is_one_line_and_exit_1():
    """A step that raises once compiled: exit 1, one error line with the step's exception, no traceback."""
    out = run_cli("inspect", f"{TARGETS}:step_that_raises")
    assert out.returncode == 1, out.stderr[-3000:]
    [line] = error_lines(out.stderr)
    assert line.endswith("failed: RuntimeError: the step failed")
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_verbose_shows_the_traceback():
    """--verbose: the same error line, after the traceback of the target's exception."""
    out = run_cli("inspect", f"{TARGETS}:raises", "--verbose")
    assert out.returncode == 2
    assert "Traceback" in out.stderr and 'raise ValueError("no model here")' in out.stderr
    assert len(error_lines(out.stderr)) == 1
