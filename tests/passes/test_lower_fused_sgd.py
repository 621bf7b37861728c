"""lower_fused_sgd on hand-built graphs: the lowered math run eagerly against aten's fused SGD kernel."""

from __future__ import annotations

import itertools

import pytest
import torch

from fxmesh.meshes import example_value
from fxmesh.passes.lower_fused_sgd import lower_fused_sgd
from fxmesh.passes.split_by_mesh import split_by_mesh
from tests.helpers import dtensor_params, local, rel_error
from tests.passes.graphs import SGD_LISTS, clone_lists, fused_graph, fused_nodes

SGD_OPS = (torch._fused_sgd_,)


def sgd_lists(params, momentum: bool, seed=0):
    torch.manual_seed(seed)
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [torch.randn_like(p) for p in params],
        "momentum_buffer_list": [torch.randn_like(p) for p in params] if momentum else [],
    }


def check_lowering(lists, kwargs, rtol=2e-6):
    expected = clone_lists(lists)
    torch._fused_sgd_(*(expected[k] for k in SGD_LISTS), **kwargs)
    gm, inputs = fused_graph(torch._fused_sgd_, lists, list_names=SGD_LISTS, **kwargs)
    split_by_mesh(gm)
    assert lower_fused_sgd(gm).modified
    assert not fused_nodes(gm, SGD_OPS)
    lowered = [n for n in gm.graph.nodes if "fxmesh_lowered_from" in n.meta]
    assert lowered and all("example_value" in n.meta for n in lowered)
    gm(*inputs)
    for name in SGD_LISTS:
        for i, (got, want) in enumerate(zip(lists[name], expected[name])):
            assert rel_error(got, want) <= rtol, f"{name}[{i}]"


@pytest.mark.parametrize(
    "momentum,nesterov,dampening,is_first_step,maximize,tensor_lr",
    [
        (m, n, d, f, mx, t)
        for m, n, d, f, mx, t in itertools.product(
            [0.0, 0.9], [False, True], [0.0, 0.2], [False, True], [False, True], [False, True]
        )
        if not (n and (m == 0 or d != 0)) and not (f and m == 0)
    ],
)
def test_matches_fused_kernel(momentum, nesterov, dampening, is_first_step, maximize, tensor_lr):
    """Every option combination matches aten's fused SGD kernel (float32, CPU) to rounding."""
    lists = sgd_lists([torch.randn(37, 5), torch.randn(8)], momentum=momentum != 0)
    kwargs = dict(
        weight_decay=0.01,
        momentum=momentum,
        lr=torch.tensor(0.05) if tensor_lr else 0.05,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=is_first_step,
    )
    check_lowering(lists, kwargs)


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_grad_scale_and_found_inf_on_meshes(meshes, found_inf):
    """Three meshes, one call per mesh after the split; grad_scale writes back unscaled grads."""
    params = dtensor_params(meshes)
    lists = sgd_lists(params, momentum=True)
    local_lists = {k: [local(t).clone() for t in v] for k, v in lists.items()}
    kwargs = dict(weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=True, maximize=False, is_first_step=False)
    scalars = dict(lr=0.05, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(found_inf))
    torch._fused_sgd_(*(local_lists[k] for k in SGD_LISTS), **kwargs, **scalars)
    gm, inputs = fused_graph(torch._fused_sgd_, lists, list_names=SGD_LISTS, **kwargs, **scalars)
    assert split_by_mesh(gm).modified and len(fused_nodes(gm, SGD_OPS)) == 3
    assert lower_fused_sgd(gm).modified and not fused_nodes(gm, SGD_OPS)
    assert all(example_value(n) is not None for n in gm.graph.nodes if n.op == "call_function")
    gm(*inputs)
    for name in SGD_LISTS:
        for i, (got, want) in enumerate(zip(lists[name], local_lists[name])):
            assert rel_error(local(got), want) <= 2e-6, f"{name}[{i}]"
