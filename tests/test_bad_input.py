"""Bad input gets a clear error naming the parameter and the reason, or a logged eager fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters
from torch.distributed.tensor import Replicate

import fxmesh
from fxmesh.passes import PASSES
from tests.helpers import assert_same_state, clone_params, dtensor_params, param_values, set_grads, shard


def test_differentiable_is_refused(meshes):
    """fused + differentiable raises torch's own error, compiled as in eager."""
    params = dtensor_params(meshes)
    set_grads([params], 0)
    opt = torch.optim.AdamW(params, fused=True)
    opt.param_groups[0]["differentiable"] = True
    with pytest.raises(RuntimeError, match="differentiable"):
        torch.compile(opt.step, backend="fxmesh")()


def test_sparse_grad_is_refused():
    """A sparse gradient raises torch's error naming sparse gradients."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    opt = torch.optim.Adam([p], fused=True)
    with pytest.raises(RuntimeError, match="sparse"):
        torch.compile(opt.step, backend="fxmesh")()


def test_complex_param_is_refused():
    """A complex parameter slipped past the constructor is refused by torch's check, naming the dtype."""
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))]
    opt = torch.optim.Adam([params[0]], fused=True)
    opt.param_groups[0]["params"].append(params[1])
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(Exception, match="complex64"):
        torch.compile(opt.step, backend="fxmesh")()


def test_grad_on_another_mesh_names_the_parameter(meshes):
    """A gradient on another mesh than its parameter: error with the index and both meshes."""
    params = dtensor_params(meshes)[:3]
    set_grads([params], 0)
    params[1].grad = shard(torch.randn(params[1].shape), meshes["ep"], [Replicate(), Replicate()])
    opt = torch.optim.AdamW(params, fused=True)
    with pytest.raises(Exception, match=r"parameter 1 .*dp\(dp=8\).*grads.*ep\(dp_mod_ep=2, ep=4\)"):
        torch.compile(opt.step, backend="fxmesh")()


def test_fused_sgd_parameter_without_momentum_buffer_is_named(meshes):
    """Fused SGD creates momentum buffers only on a step where no parameter has one, so a parameter whose first
    gradient comes a step late has none, and torch.optim passes None beside the others' buffers: eagerly (over
    plain tensors) a TypeError; compiled, an error naming the parameter, the cause and what to do."""

    def two_steps(params, step):
        for none_at in [(1,), ()]:
            for i, p in enumerate(params):
                p.grad = None if i in none_at else torch.ones_like(p)
            step()

    plain = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    with pytest.raises(TypeError):
        two_steps(plain, torch.optim.SGD(plain, lr=0.1, momentum=0.9, fused=True).step)
    params = dtensor_params(meshes)[:3]
    step = torch.compile(torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True).step, backend="fxmesh")
    named = r"momentum_buffer_list\[1\] is None.*parameter 1 \(\S*params\S*1\).*first step"
    with pytest.raises(Exception, match=named):
        two_steps(params, step)


def test_unreadable_mesh_falls_back_to_eager(meshes, caplog):
    """A parameter whose mesh cannot be read: one warning, the graph runs eagerly, eager's numbers."""

    def drop_metadata(gm):
        for node in gm.graph.nodes:
            if node.op == "get_attr" and "params___2" in node.name:
                node.meta.pop("example_value", None)
        return torch.fx.passes.infra.pass_base.PassResult(gm, True)

    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    opt = torch.optim.AdamW(params, fused=True)
    eager_opt = torch.optim.AdamW(eager_params, fused=True)
    step = torch.compile(opt.step, backend=fxmesh.backend(passes=[drop_metadata, *PASSES]))
    with caplog.at_level(logging.WARNING, logger="fxmesh"):
        for s in range(3):
            set_grads([params, eager_params], s)
            before = param_values(opt), param_values(eager_opt)
            step()
            eager_opt.step()
            assert_same_state(opt, eager_opt, before=before)
    warnings = [r for r in caplog.records if "running this graph eagerly" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "parameter 2" in warnings[0].getMessage()
    assert counters["fxmesh"]["eager_fallbacks"] == 1


def test_params_on_unsupported_device_in_group_is_refused(meshes):
    """A group with a parameter on a device the fused kernel lacks: torch's error names the device."""
    params = dtensor_params(meshes)[:2]
    meta = torch.nn.Parameter(torch.randn(3, 2, device="meta"))
    opt = torch.optim.AdamW(params, fused=True)
    opt.param_groups[0]["params"].append(meta)
    set_grads([params], 0)
    meta.grad = torch.randn_like(meta)
    with pytest.raises(Exception, match="meta"):
        torch.compile(opt.step, backend="fxmesh")()
