"""Graphs whose DTensor math is elementwise and local compile over the local shards (fxmesh.local)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import fxmesh
from fxmesh.backend import FxmeshBackend
from fxmesh.meshes import example_value, replicate
from tests.helpers import DEVICE, dtensor_params, set_grads
from tests.test_adam import run_parity


@pytest.fixture
def compiled_graphs(monkeypatch):
    """The graphs the backend hands to its inner compiler."""
    graphs = []
    compile_in_mode = FxmeshBackend._compile_in_mode

    def recording(self, gm, example_inputs, *args):
        graphs.append(gm)
        return compile_in_mode(self, gm, example_inputs, *args)

    monkeypatch.setattr(FxmeshBackend, "_compile_in_mode", recording)
    return graphs


def test_fused_step_runs_on_local_shards(meshes, compiled_graphs):
    """A fused AdamW step over three meshes reaches Inductor with no DTensor left and matches eager."""
    run_parity(
        lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2), weight_decay=0.1, fused=True), dtensor_params(meshes)
    )
    assert counters["fxmesh"]["local_shard_graphs"] == 1
    assert compiled_graphs  # one per distinct piece (fxmesh.pieces)
    for gm in compiled_graphs:
        for node in gm.graph.nodes:
            value = example_value(node)
            assert not any(isinstance(v, DTensor) for v in torch.utils._pytree.tree_leaves(value)), node.format_node()
            assert node.target is not replicate and node.target != "to_local", node.format_node()
        assert not any(isinstance(v, DTensor) for v in gm.state_dict().values())


def test_local_shards_off(meshes):
    """``local_shards=False`` compiles over the DTensors, with the same numbers."""
    run_parity(
        lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
        dtensor_params(meshes),
        backend=fxmesh.backend(local_shards=False),
    )
    assert counters["fxmesh"]["graphs"] == 1
    assert counters["fxmesh"]["local_shard_graphs"] == 0


def test_cudagraphs_option(meshes):
    """``cudagraphs=True`` turns on Inductor's CUDA graphs for the step: on CUDA the local-shard step replays
    one (nothing skipped; parameters and states are static inputs), on the CPU it runs as without; the numbers
    match eager either way."""
    backend = fxmesh.backend(cudagraphs=True)
    assert backend.inductor_config["triton.cudagraphs"] is True
    run_parity(
        lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2), weight_decay=0.1, fused=True),
        dtensor_params(meshes),
        backend=backend,
    )
    assert counters["fxmesh"]["local_shard_graphs"] == 1
    if DEVICE == "cuda":
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_combo_kernels_option(meshes):
    """Combo kernels (Inductor puts independent kernels into shared launches) are on by default for graphs on
    CUDA and left to Inductor's own setting elsewhere; ``combo_kernels=True/False`` or ``inductor_config`` say
    otherwise everywhere.  On CUDA the default step's seven parameter updates share launches; on the CPU (C++
    kernels, no combo kernels) it runs as without; the numbers match eager either way."""
    with FakeTensorMode():
        on_cuda, on_cpu = [torch.empty(2, device="cuda")], [torch.empty(2, device="cpu")]
    default = fxmesh.backend()
    assert default.inductor_config_for(on_cuda)["combo_kernels"] is True
    assert "combo_kernels" not in default.inductor_config_for(on_cpu)  # Inductor's own setting stands
    for backend, on in (
        (fxmesh.backend(combo_kernels=True), True),
        (fxmesh.backend(combo_kernels=False), False),
        (fxmesh.backend(inductor_config={"combo_kernels": False}), False),
    ):
        assert backend.inductor_config_for(on_cuda)["combo_kernels"] is on
        assert backend.inductor_config_for(on_cpu)["combo_kernels"] is on
    _, _, code = run_parity(
        lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2), weight_decay=0.1, fused=True),
        dtensor_params(meshes),
        backend=default,
    )
    assert counters["fxmesh"]["local_shard_graphs"] == 1
    if DEVICE == "cuda":
        kernels = code.count("async_compile.triton(")
        assert 0 < kernels < 7, code


def test_mutated_dtensors_get_new_versions(meshes):
    """Parameters and states updated on their local shards still count as modified in place for autograd;
    grads do not.  As under an eager in-place DTensor op, a DTensor's counter moves and its local tensor's
    does not; the plain step counts' move, as eagerly."""
    params = dtensor_params(meshes)
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    step = torch.compile(opt.step, backend="fxmesh")
    set_grads([params], 0)
    step()
    assert counters["fxmesh"]["local_shard_graphs"] == 1
    p = params[0]
    saved = p * p  # autograd saves p for the backward
    set_grads([params], 1)
    states = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    steps = [opt.state[p]["step"] for p in params]
    assert not any(isinstance(t, DTensor) for t in steps)

    def versions(tensors):
        return [t._version for t in tensors]

    before = [versions(ts) for ts in (params, states, [t._local_tensor for t in params + states], steps)]
    grad_versions = [p.grad._version for p in params]
    step()
    after = [versions(ts) for ts in (params, states, [t._local_tensor for t in params + states], steps)]
    assert all(a > b for a, b in zip(after[0], before[0])), "parameters"
    assert all(a > b for a, b in zip(after[1], before[1])), "states"
    assert after[2] == before[2], "local tensors"
    assert all(a > b for a, b in zip(after[3], before[3])), "step counts"
    assert [p.grad._version for p in params] == grad_versions
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward(torch.ones_like(saved))
    # The eager reference for the local tensors: an in-place DTensor op leaves their counters alone.
    local_version = p._local_tensor._version
    with torch.no_grad():
        p.mul_(1.0)
    assert p._local_tensor._version == local_version


def _refused_cases(dp):
    g = torch.Generator().manual_seed(0)

    def dt(placements, shape=(16, 8)):
        return DTensor.from_local(torch.randn(shape, generator=g).to(DEVICE), dp, placements, run_check=False)

    return {
        # DTensor slices the replicated operand to the shard: not the same op on the raw local tensors.
        "mixed layouts": (lambda a, b: a.add_(b), dt([Shard(0)]), dt([Replicate()], (128, 8))),
        "partial operand": (lambda a, b: a.mul_(b), dt([Replicate()]), dt([Partial()])),
        # amax, not sum: exact in any order, so the comparison below can be exact too.
        "reduction": (lambda a, b: a.mul_(b.amax()), dt([Shard(0)]), dt([Shard(0)])),
        "view": (lambda a, b: a.add_(b.t().t()), dt([Shard(0)]), dt([Shard(0)])),
    }


@pytest.mark.parametrize("case", ["mixed layouts", "partial operand", "reduction", "view"])
def test_non_local_math_stays_on_dtensors(dp, case):
    """Any op outside the local elementwise vocabulary keeps the graph on DTensors, and the result is eager's."""
    fn, a, b = _refused_cases(dp)[case]
    expected = fn(a.detach().clone(), b)
    torch.compile(fn, backend="fxmesh")(a, b)
    assert counters["fxmesh"]["graphs"] == 1
    assert counters["fxmesh"]["local_shard_graphs"] == 0
    torch.testing.assert_close(a.to_local(), expected.to_local(), rtol=1e-6, atol=0)


def test_mutation_through_an_alias_bumps_the_dtensor(dp):
    """An in-place op on ``detach()`` of a DTensor input still counts as modifying that DTensor."""
    a = DTensor.from_local(torch.randn(4, 4, device=DEVICE), dp, [Shard(0)], run_check=False)
    b = DTensor.from_local(torch.randn(4, 4, device=DEVICE), dp, [Shard(0)], run_check=False)
    expected = a.to_local() * b.to_local()
    version = a._version

    def scale(a, b):
        a.detach().mul_(b)

    torch.compile(scale, backend="fxmesh")(a, b)
    assert counters["fxmesh"]["local_shard_graphs"] == 1
    assert a._version > version
    torch.testing.assert_close(a.to_local(), expected, rtol=1e-6, atol=0)


def test_local_tensor_is_read_on_every_call(meshes):
    """A parameter whose local tensor is swapped for another between steps is updated where it now lives."""
    params = dtensor_params(meshes)
    swapped = []

    def swap(s, compiled_opt, eager_opt):
        if s == 1:
            swapped.append(params[0]._local_tensor.clone())
            params[0]._local_tensor = swapped[0]

    run_parity(lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2), fused=True), params, before_step=swap)
    assert params[0]._local_tensor is swapped[0]
    assert counters["fxmesh"]["graphs"] == counters["fxmesh"]["local_shard_graphs"] == 1
