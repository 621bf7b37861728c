"""``fxmesh demo`` through the command line: the default run (30 steps, about 10 s) on 2 local gloo ranks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxmesh.demo import RTOL, TRAINING_RTOL, DemoConfig, DemoResult

REPO = Path(__file__).resolve().parents[1]
# The whole default run: ulp-level differences between eager and compiled show only after some steps.
STEPS = DemoConfig().steps


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fxmesh.cli", "demo", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess:
    return run_demo()


def test_demo_trains_and_matches_eager(demo):
    """The demo exits 0 with one table row per step in which eager and compiled losses and parameters agree."""
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.e+-]+)\s+([\d.]+)$", demo.stdout, re.MULTILINE)
    assert [int(r[0]) for r in rows] == list(range(1, STEPS + 1)), demo.stdout
    for _, eager, compiled, diff, _ in rows:
        assert abs(float(eager) - float(compiled)) <= 1e-5 * abs(float(eager))
        assert float(diff) <= 1e-5
    assert f"OK: {STEPS} compiled steps matched eager" in demo.stdout


def test_demo_shows_meshes_and_the_resumed_run(demo):
    """The mesh table lists dp and ep; the run resumed from the halfway checkpoint repeats every loss."""
    assert re.search(r"^dp\(dp=2\)\s+dp\s+2\s+3\s", demo.stdout, re.MULTILINE), demo.stdout
    assert re.search(r"^ep\(dp_mod_ep=1, ep=2\)\s+dp_mod_ep, ep\s+1x2\s+2\s", demo.stdout, re.MULTILINE)
    assert "with 0 graph break(s)" in demo.stdout
    half = STEPS // 2
    assert f"Resumed from the step-{half} checkpoint: {STEPS - half}/{STEPS - half} losses identical" in demo.stdout
    assert "[fxmesh demo] compiling" in demo.stdout  # progress while it compiles


def test_demo_on_one_rank():
    """One rank (one GPU) runs with an ep degree of 1: two meshes of one rank, still split per mesh, still eager's."""
    out = run_demo("--world-size", "1", "--steps", "4")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"^dp\(dp=1\)\s+dp\s+1\s+3\s", out.stdout, re.MULTILINE), out.stdout
    assert re.search(r"^ep\(dp_mod_ep=1, ep=1\)\s+dp_mod_ep, ep\s+1x1\s+2\s", out.stdout, re.MULTILINE), out.stdout
    assert "split into 2 per-mesh groups" in out.stdout
    assert "OK: 4 compiled steps matched eager" in out.stdout


def _result(device: str, diffs: list[float]) -> DemoResult:
    rows = [{"loss_eager": 1.0, "loss_compiled": 1.0, "max_diff": d, "norm": 1.0} for d in diffs]
    return DemoResult(DemoConfig(device=device), rows, [], 0.0, [], 1.0, 1, 0, 2, "fused")


@pytest.mark.parametrize(
    ("device", "diffs", "problem"),
    [
        ("cpu", [0.0, 2e-7, 9e-6], None),
        ("cpu", [0.0, 2e-5], "compiled parameters differ from eager by 2.0e-05 > 1e-05"),
        ("cuda", [4.2e-7, 1.0e-5, 9.7e-6], None),  # GPU run 5's 30 steps
        ("cuda", [4.2e-7, 2e-4], "compiled parameters differ from eager by 2.0e-04 > 1e-04"),
        ("cuda", [2e-5, 2e-5], "the first compiled step differs from eager by 2.0e-05 > 1e-05"),
    ],
)
def test_demo_bounds(device, diffs, problem):
    """The first step is held to RTOL on every device; later steps to RTOL on the CPU, where fxmesh's step is
    eager's arithmetic bit for bit, and to TRAINING_RTOL elsewhere, where training grows rounding differences."""
    assert RTOL < TRAINING_RTOL
    result = _result(device, diffs)
    assert result.rtol == (RTOL if device == "cpu" else TRAINING_RTOL)
    assert result.problems() == ([problem] if problem else [])
    assert result.ok == (problem is None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--world-size", "3"], "not a multiple of the ep degree 2"),
        (["--optimizer", "lion"], "invalid choice: 'lion'"),
    ],
)
def test_demo_rejects_bad_arguments(args, message):
    """Bad arguments exit 2 with one error line and no traceback."""
    out = run_demo(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
