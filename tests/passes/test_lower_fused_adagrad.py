"""lower_fused_adagrad on hand-built graphs: the lowered math run eagerly against aten's fused kernel."""

from __future__ import annotations

import itertools

import pytest
import torch

from fxmesh.passes.lower_fused_adagrad import lower_fused_adagrad
from fxmesh.passes.split_by_mesh import split_by_mesh
from tests.helpers import dtensor_params, local, rel_error
from tests.passes.graphs import ADAGRAD_LISTS, clone_lists, fused_graph, fused_nodes

OPS = (torch._fused_adagrad_,)


def adagrad_lists(params, seed=0):
    torch.manual_seed(seed)
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [torch.randn_like(p) for p in params],
        "state_sums": [torch.rand_like(p) for p in params],
        "state_steps": [torch.tensor(3.0 + i) for i in range(len(params))],
    }


@pytest.mark.parametrize(
    "weight_decay,lr_decay,maximize,tensor_lr",
    list(itertools.product([0.0, 0.1], [0.0, 0.01], [False, True], [False, True])),
)
def test_matches_fused_kernel(weight_decay, lr_decay, maximize, tensor_lr):
    """Every option combination matches aten's fused Adagrad kernel (float32, CPU) to rounding."""
    lists = adagrad_lists([torch.randn(37, 5), torch.randn(8), torch.randn(3)])
    expected = clone_lists(lists)
    kwargs = dict(
        lr=torch.tensor(0.05) if tensor_lr else 0.05,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        eps=1e-6,
        maximize=maximize,
    )
    torch._fused_adagrad_(*(expected[k] for k in ADAGRAD_LISTS), **kwargs)
    gm, inputs = fused_graph(torch._fused_adagrad_, lists, list_names=ADAGRAD_LISTS, **kwargs)
    split_by_mesh(gm)
    assert lower_fused_adagrad(gm).modified and not fused_nodes(gm, OPS)
    gm(*inputs)
    for name in ADAGRAD_LISTS:
        for i, (got, want) in enumerate(zip(lists[name], expected[name])):
            assert rel_error(got, want) <= 2e-6, f"{name}[{i}]"


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_grad_scale_and_found_inf_on_meshes(meshes, found_inf):
    """Three meshes: one call per mesh after the split; grad_scale writes back unscaled grads."""
    lists = adagrad_lists(dtensor_params(meshes))
    local_lists = {k: [local(t).clone() for t in v] for k, v in lists.items()}
    kwargs = dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, eps=1e-10, maximize=False)
    scalars = dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(found_inf))
    torch._fused_adagrad_(*(local_lists[k] for k in ADAGRAD_LISTS), **kwargs, **scalars)
    gm, inputs = fused_graph(torch._fused_adagrad_, lists, list_names=ADAGRAD_LISTS, **kwargs, **scalars)
    assert split_by_mesh(gm).modified and len(fused_nodes(gm, OPS)) == 3
    assert lower_fused_adagrad(gm).modified and not fused_nodes(gm, OPS)
    gm(*inputs)
    for name in ADAGRAD_LISTS:
        for i, (got, want) in enumerate(zip(lists[name], local_lists[name])):
            assert rel_error(local(got), want) <= 2e-6, f"{name}[{i}]"
