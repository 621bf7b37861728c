"""DTensor guards: the streamlined ones the backend installs, and the opt-in filter that drops the spec guards."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch.distributed.tensor._dtensor_spec import DTensorSpec

import fxmesh
from tests.helpers import assert_same_state, clone_params, dtensor_params, local, param_values, rtol_for, set_grads


@contextlib.contextmanager
def _counting_spec_guards():
    """Record each call of fxmesh's spec guard; yields the list of calls."""
    checks = []
    spec_match = fxmesh.guards._SpecMatch.__call__

    def counting(self, spec):
        checks.append(True)
        return spec_match(self, spec)

    with mock.patch.object(fxmesh.guards._SpecMatch, "__call__", counting):
        yield checks


@pytest.mark.parametrize("skip", [False, True], ids=["default-guards", "skip-spec-guards"])
def test_skip_guard_on_dtensor_specs(meshes, skip):
    """With the filter no DTensor spec guard runs on later calls; the step still matches eager and compiles once."""
    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-2), fused=True)
    eager_opt = torch.optim.AdamW(eager_params, lr=torch.tensor(1e-2), fused=True)
    options = {"guard_filter_fn": fxmesh.skip_guard_on_dtensor_specs_unsafe} if skip else {}
    with _counting_spec_guards() as checks:
        step = torch.compile(opt.step, backend="fxmesh", options=options)
        for s in range(3):
            set_grads([params, eager_params], s)
            checks.clear()
            before = param_values(opt), param_values(eager_opt)
            step()
            eager_opt.step()
            assert_same_state(opt, eager_opt, before=before)
    assert (not checks) == skip, f"{len(checks)} DTensor spec guard calls on the last call"
    assert torch._dynamo.utils.counters["fxmesh"]["graphs"] == 1


def _layouts(meshes):
    """DTensors with the same local tensor: a reference layout and variants that differ in one thing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from tests.helpers import DEVICE

    local = torch.randn(4, 4, device=DEVICE)
    dp = meshes["dp"]
    renamed = init_device_mesh(DEVICE, (8,), mesh_dim_names=("renamed",))
    rebuilt = init_device_mesh(DEVICE, (8,), mesh_dim_names=("dp",))  # equal to dp, another object
    return {
        "reference": DTensor.from_local(local, dp, [Shard(0)], run_check=False),
        "equal mesh, other object": DTensor.from_local(local, rebuilt, [Shard(0)], run_check=False),
        "other placement": DTensor.from_local(local, dp, [Replicate()], run_check=False),
        "other mesh": DTensor.from_local(local, renamed, [Shard(0)], run_check=False),
    }


@pytest.mark.parametrize("streamline", [False, True], ids=["dynamo-guards", "streamlined"])
def test_streamlined_dtensor_guards_accept_what_dynamo_accepts(meshes, streamline):
    """Dropping the mesh guard and sharing the mesh in the spec guard changes no guard decision."""
    layouts = _layouts(meshes)
    fn = torch.compile(lambda x: x * 2, backend=fxmesh.backend(compiler="eager", streamline_guards=streamline))
    counters = torch._dynamo.utils.counters["fxmesh"]
    recompiled = {}
    for name, x in layouts.items():
        fn(layouts["reference"])  # the reference graph is cached first
        before = counters["graphs"]
        torch.testing.assert_close(fn(x).to_local(), x.to_local() * 2)
        recompiled[name] = counters["graphs"] > before
        torch._dynamo.reset()
    assert recompiled == {
        "reference": False,
        "equal mesh, other object": False,
        "other placement": True,
        "other mesh": True,
    }
    assert (counters["streamlined_guards"] > 0) == streamline


@pytest.mark.parametrize("streamline", [False, True], ids=["dynamo-guards", "streamlined"])
def test_streamlined_guards_skip_the_redundant_mesh_checks(meshes, streamline):
    """Per call, the streamlined guards run no mesh guard_fn and never compare two distinct meshes."""
    from torch.distributed.device_mesh import DeviceMesh

    calls = {"mesh_guard_fn": 0, "mesh_field_compare": 0}
    check_opaque_obj = getattr(torch._dynamo.guards, "check_opaque_obj", None)
    mesh_eq = DeviceMesh.__eq__

    def counting_opaque(*args):
        calls["mesh_guard_fn"] += 1
        return check_opaque_obj(*args)

    def counting_eq(self, other):
        calls["mesh_field_compare"] += self is not other
        return mesh_eq(self, other)

    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-2), fused=True)
    eager_opt = torch.optim.AdamW(eager_params, lr=torch.tensor(1e-2), fused=True)
    step = torch.compile(opt.step, backend=fxmesh.backend(streamline_guards=streamline))
    set_grads([params, eager_params], 0)
    step()
    eager_opt.step()
    patches = [mock.patch.object(DeviceMesh, "__eq__", counting_eq)]
    if check_opaque_obj is not None:
        patches.append(mock.patch.object(torch._dynamo.guards, "check_opaque_obj", counting_opaque))
    for s in range(1, 3):
        set_grads([params, eager_params], s)
        with contextlib.ExitStack() as stack:  # only the compiled call: eager DTensor ops compare meshes too
            for p in patches:
                stack.enter_context(p)
            step()
        eager_opt.step()
    assert_same_state(opt, eager_opt)
    assert torch._dynamo.utils.counters["fxmesh"]["graphs"] == 1
    if streamline:
        assert calls == {"mesh_guard_fn": 0, "mesh_field_compare": 0}
    else:  # what the streamlining removes: each gradient's mesh compared field by field, at least once
        assert calls["mesh_field_compare"] + calls["mesh_guard_fn"] >= 2 * len(params)


@pytest.mark.parametrize("streamline", [False, True], ids=["dynamo-guards", "streamlined"])
def test_spec_guard_compares_a_spec_again_once_it_is_assigned(meshes, streamline):
    """A spec object seen on two calls is then accepted on identity (streamlined guards), until a
    compared field is assigned: then it is compared again, and a changed one recompiles, as with
    Dynamo's own guard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from tests.helpers import DEVICE

    renamed = init_device_mesh(DEVICE, (8,), mesh_dim_names=("renamed",))
    x = DTensor.from_local(torch.randn(4, 4, device=DEVICE), meshes["dp"], [Shard(0)], run_check=False)
    fn = torch.compile(lambda x: x * 2, backend=fxmesh.backend(compiler="eager", streamline_guards=streamline))
    counters = torch._dynamo.utils.counters["fxmesh"]
    guard_checks = []
    check_equals = DTensorSpec._check_equals

    def counting(self, other, skip_shapes=False):
        guard_checks.append(skip_shapes)  # DTensor's own ops compare specs with skip_shapes=False
        return check_equals(self, other, skip_shapes)

    def call():
        """(recompiled, spec guard checks) of one call."""
        before = counters["graphs"]
        guard_checks.clear()
        with mock.patch.object(DTensorSpec, "_check_equals", counting):
            torch.testing.assert_close(fn(x).to_local(), x.to_local() * 2)
        return counters["graphs"] > before, guard_checks.count(True)

    assert call()[0]  # compiling runs the new guards too: the spec is seen twice
    identical = 0 if streamline else 1
    seen = [call(), call()]
    x._spec.placements = tuple(x._spec.placements)  # assigned, but equal
    assigned = [call(), call()]
    x._spec.mesh = renamed  # changed in place
    changed = call()
    assert seen == [(False, identical)] * 2
    assert assigned == [(False, 1), (False, identical)]
    assert changed[0], "a spec changed in place was accepted"


@pytest.mark.parametrize("clipped", ["list", "module"])
def test_clip_then_step_guards_parameters_by_id(meshes, clipped):
    """Clipping ahead of the step traces each parameter before the optimizer marks it static; the
    frame is traced again, so per call the parameters are guarded by id as in a bare step: a spec
    guard for each gradient, none for an optimizer's parameter, whether clipping reads a list or
    ``model.parameters()`` (which marks them static but unguarded). A clipped parameter outside
    the optimizer keeps its own guards. Clip + step match eager over 3 steps and compile once."""
    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    frozen, eager_frozen = clone_params(params[:1]), clone_params(params[:1])  # clipped, not stepped
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    eager_opt = torch.optim.AdamW(eager_params, lr=1e-2, fused=True)
    model = torch.nn.Module()
    for i, p in enumerate(params + frozen):
        model.register_parameter(f"p{i}", p)

    def clip_and_step():
        norm = torch.nn.utils.clip_grad_norm_(params + frozen if clipped == "list" else model.parameters(), 0.5)
        opt.step()
        return norm

    step = torch.compile(clip_and_step, backend="fxmesh")
    with _counting_spec_guards() as checks:
        for s in range(3):
            set_grads([params + frozen, eager_params + eager_frozen], s)
            checks.clear()
            before = param_values(opt), param_values(eager_opt)
            norm = step()
            eager_norm = fxmesh.clip_grad_norm_(eager_params + eager_frozen, 0.5)
            eager_opt.step()
            torch.testing.assert_close(norm, eager_norm, rtol=rtol_for(torch.float32), atol=0)
            assert_same_state(opt, eager_opt, before=before)
            for p, e in zip(frozen, eager_frozen):
                torch.testing.assert_close(local(p.grad), local(e.grad), rtol=rtol_for(torch.float32), atol=0)
    # Every gradient's spec, and the frozen parameter's own; before the new trace, every parameter's too.
    assert len(checks) == len(params) + 2 * len(frozen), f"{len(checks)} spec guard calls on the last call"
    assert torch._dynamo.utils.counters["fxmesh"]["graphs"] == 1
