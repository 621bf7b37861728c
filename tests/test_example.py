"""The README's example runs and reports a match."""

from __future__ import annotations

import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "multi_mesh_adamw.py"


def test_example_matches_eager():
    """examples/multi_mesh_adamw.py exits 0 and prints its verdict."""
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK: compiled fxmesh AdamW over meshes" in out.stdout
