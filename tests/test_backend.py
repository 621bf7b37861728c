"""Backend registration, options, and the capture hook's scope."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

import fxmesh
from tests.helpers import clone_params, dtensor_params, set_grads
from tests.test_adam import run_parity

FUSED_STEP_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import torch
    if sys.argv[1] == "import":
        import fxmesh
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    step = torch.compile(opt.step)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        step()
    breaks = {
        re.sub("0x[0-9a-f]+", "0x", reason): count
        for reason, count in torch._dynamo.utils.counters["graph_break"].items()
    }
    print(json.dumps({"breaks": breaks, "params": [p.tolist() for p in params]}))
    """
)


def run_python(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_import_does_not_change_the_default_backend():
    """After `import fxmesh`, the default backend graph-breaks on the fused step exactly as before."""
    before = json.loads(run_python(FUSED_STEP_SCRIPT, "no-import"))
    after = json.loads(run_python(FUSED_STEP_SCRIPT, "import"))
    assert any("don't trace into fused optimizer" in r for r in before["breaks"]), before["breaks"]
    assert len(before["breaks"]) == 2
    assert after == before


def test_entry_point_registers_backend_without_import():
    """backend="fxmesh" works from the torch_dynamo_backends entry point alone."""
    code = textwrap.dedent(
        """
        import sys, torch
        assert "fxmesh" in torch._dynamo.list_backends()
        out = torch.compile(lambda x: x * 2, backend="fxmesh")(torch.ones(3))
        assert "fxmesh" in sys.modules
        print(out.tolist())
        """
    )
    assert run_python(code) == "[2.0, 2.0, 2.0]"


def test_backend_options_are_checked():
    """Unknown inner compilers and pass names are refused with the known ones listed."""
    with pytest.raises(ValueError, match="compiler must be one of inductor, aot_eager, eager"):
        fxmesh.backend(compiler="tvm")
    with pytest.raises(ValueError, match="unknown fxmesh pass 'nope'; known: split_by_mesh, lower_fused_adam"):
        fxmesh.backend(passes=["nope"])
    assert "split_by_mesh" in repr(fxmesh.backend())


@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
def test_debug_compilers(meshes, compiler):
    """The aot_eager and eager inner compilers run the rewritten graph with eager's numbers."""
    run_parity(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
        dtensor_params(meshes),
        backend=fxmesh.backend(compiler=compiler),
    )
    assert counters["fxmesh"]["lowered_nodes"] == 3  # one per mesh


def test_pass_error_names_the_pass(meshes):
    """An unexpected failure inside a pass says which pass failed after which."""

    def broken(gm):
        raise KeyError("boom")

    params = dtensor_params(meshes)[:2]
    set_grads([params], 0)
    opt = torch.optim.AdamW(params, fused=True)
    step = torch.compile(opt.step, backend=fxmesh.backend(passes=["split_by_mesh", broken]))
    with pytest.raises(Exception, match="error in pass broken after passes split_by_mesh"):
        step()


def test_inductor_config_defaults_and_overrides():
    """Size asserts are off by default (Dynamo guards the inputs); user overrides win."""
    assert fxmesh.backend().inductor_config == {"size_asserts": False}
    assert fxmesh.backend(inductor_config={"size_asserts": True}).inductor_config["size_asserts"] is True
    assert fxmesh.backend(cudagraphs=True).inductor_config == {"size_asserts": False, "triton.cudagraphs": True}


@pytest.fixture
def config_patches(monkeypatch):
    """The Inductor config patches of each graph the backend compiles, in order."""
    from torch._inductor import compile_fx as compile_fx_module

    patches = []
    original = compile_fx_module.compile_fx

    def recording_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        if config_patches is not None:  # not compile_fx's own call under the patches
            patches.append(dict(config_patches))
        return original(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording_compile_fx)
    return patches


def test_graphs_with_symbolic_sizes_keep_size_asserts(config_patches):
    """Dynamo's automatic dynamic shapes give a recompiled graph symbolic sizes: Inductor's asserts bind them.

    torch 2.14's Inductor binds an input's size symbols only while writing its
    size asserts; without them the second graph below raised NameError.
    """
    patches = config_patches

    def scale(g):
        return min(1.0, 10.0 / float(g.norm()))  # a graph break: the norm is a graph of its own

    def step(params):
        for p in params:
            p.add_(p.grad, alpha=-0.1 * scale(p.grad))

    torch.manual_seed(0)
    params = [torch.randn(6, 3), torch.randn(4), torch.randn(7)]
    expected = [p.clone() for p in params]
    compiled = torch.compile(step, backend=fxmesh.backend())
    for _ in range(3):
        for p, e in zip(params, expected):
            p.grad = e.grad = torch.randn_like(p)
        step(expected)
        compiled(params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=0)
    assert patches[0] == {"size_asserts": False}, patches  # the first norm graph: static sizes
    assert {} in patches[1:], patches  # a graph over (s0,) keeps Inductor's setting
    assert not fxmesh.backend().inductor_config_for([torch.randn(3)])["size_asserts"]
    chosen = fxmesh.backend(inductor_config={"size_asserts": False})
    assert chosen.inductor_config_for([torch.randn(3)], dynamic=True)["size_asserts"] is False  # the user's choice


@pytest.mark.parametrize("backend", ["fxmesh", "aot_eager"])
def test_dynamic_true_over_dtensors_fails_in_dynamo(meshes, backend):
    """What the README says of ``dynamic=True``: Dynamo's graph reads a parameter before defining it.

    Upstream's bug (torch 2.11-2.15, any backend): this test notices when it is fixed.
    """
    params = [p for p in dtensor_params(meshes) if p.device_mesh is meshes["dp"]]  # one mesh: upstream's case too
    set_grads([params], 0)
    opt = torch.optim.AdamW(params, foreach=True)
    with pytest.raises(Exception, match="self___param_groups_0__params___"):
        torch.compile(opt.step, backend=backend, dynamic=True)()


@pytest.mark.parametrize(
    ("compile_kwargs", "expected"),
    [
        (
            dict(options={"size_asserts": True, "cpp.min-chunk-size": 1024}),
            {"size_asserts": True, "cpp.min_chunk_size": 1024},
        ),
        (
            dict(mode="max-autotune-no-cudagraphs"),
            {"size_asserts": False, "max_autotune": True, "coordinate_descent_tuning": True},
        ),
    ],
    ids=["options", "mode"],
)
def test_torch_compile_mode_and_options_configure_inductor(config_patches, compile_kwargs, expected):
    """``torch.compile(..., backend="fxmesh", mode=/options=)`` configures Inductor as under ``backend="inductor"``."""

    def make_opt(params):
        return torch.optim.AdamW(params, lr=0.01, fused=True)

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 3)), torch.nn.Parameter(torch.randn(4))]
    eager_params = clone_params(params)
    opt, eager = make_opt(params), make_opt(eager_params)
    step = torch.compile(opt.step, backend="fxmesh", **compile_kwargs)
    for s in range(3):
        set_grads([params, eager_params], s)
        step()
        eager.step()
    for p, e in zip(params, eager_params):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=0)
    assert config_patches and all(patch == expected for patch in config_patches), config_patches


def test_cuda_graphs_from_any_source_turn_pieces_off():
    """A CUDA graph records its inputs' addresses: no compiled piece may serve several pieces."""
    assert fxmesh.backend().pieces
    assert not fxmesh.backend(cudagraphs=True).pieces
    assert not fxmesh.backend(inductor_config={"triton.cudagraphs": True}).pieces
    for mode in ("reduce-overhead", "max-autotune"):
        backend = fxmesh.backend().with_inductor_options(mode)
        assert backend.inductor_config["triton.cudagraphs"] is True and not backend.pieces
    assert fxmesh.backend().pieces, "with_inductor_options leaves the backend it was called on alone"


def test_torch_compile_options_are_checked():
    with pytest.raises(ValueError, match="'bogus' is not an Inductor config option"):
        fxmesh.backend().with_inductor_options(options={"bogus": 1})
    with pytest.raises(ValueError, match="configure Inductor; this fxmesh backend compiles with 'aot_eager'"):
        fxmesh.backend(compiler="aot_eager").with_inductor_options("max-autotune")
    with pytest.raises(RuntimeError, match="Unrecognized mode"):
        fxmesh.backend().with_inductor_options("fastest")


def test_graphs_on_dtensors_do_not_share_compiled_code_across_uneven_shards(dp, monkeypatch, tmp_path):
    """AOTAutograd's cache keys a DTensor by its global spec: two ranks of one machine whose uneven shards differ
    (9 rows over 2: 5 and 4) would share an entry, and the second would run code compiled for the first's shard.
    fxmesh compiles graphs that stay on DTensors past that cache (default backend: a size-assert error)."""
    from torch.distributed.tensor import DTensor, Shard

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    for rows in (4, 5):  # what rank 1, then rank 0, holds
        torch._dynamo.reset()
        local = torch.arange(rows * 8.0).reshape(rows, 8)
        x = DTensor.from_local(local, dp, [Shard(0)], shape=(9, 8), stride=(8, 1))
        with torch._functorch.config.patch(enable_autograd_cache=True):
            y = torch.compile(lambda t: t * 2 + 1, backend="fxmesh")(x)
        assert torch.equal(y.to_local(), local * 2 + 1), f"{rows} local rows"
    assert not counters["aot_autograd"]["autograd_cache_hit"]
