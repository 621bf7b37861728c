"""lower_fused_adam on hand-built graphs: the lowered math run eagerly against aten's fused kernel."""

from __future__ import annotations

import itertools

import pytest
import torch

from fxmesh.errors import UnsupportedInputError
from fxmesh.meshes import example_value
from fxmesh.passes.lower_fused_adam import lower_fused_adam
from fxmesh.passes.split_by_mesh import split_by_mesh
from tests.helpers import dtensor_params, local, rel_error
from tests.passes.graphs import ADAM_LISTS, adam_lists, clone_lists, fused_graph, fused_nodes

DEFAULTS = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)

OPTIONS = list(
    itertools.product(
        [torch._fused_adam_, torch._fused_adamw_],
        [False, True],  # amsgrad
        [False, True],  # maximize
        [0.0, 0.1],  # weight_decay
        [False, True],  # tensor lr
    )
)


def _layout(node) -> tuple:
    t = local(example_value(node))
    return t.shape, t.stride(), t.dtype


def check_lowering(target, lists, kwargs, rtol):
    expected = clone_lists(lists)
    target(*(expected[k] for k in ADAM_LISTS), **kwargs)
    gm, inputs = fused_graph(target, lists, **kwargs)
    split_by_mesh(gm)
    # One table per call and local layout (every layout here has fewer than 16 parameters).
    layouts = sum(len({_layout(p) for p in node.args[0]}) for node in fused_nodes(gm))
    assert lower_fused_adam(gm).modified
    assert not fused_nodes(gm)
    lowered = [n for n in gm.graph.nodes if "fxmesh_lowered_from" in n.meta]
    assert lowered and all("example_value" in n.meta for n in lowered)
    # Materialized float64 scalar tables, one row per parameter.
    tables = [n for n in lowered if n.target is torch.ops.prims.inductor_force_stride_order.default]
    assert len(tables) == layouts
    assert sum(example_value(t).shape[0] for t in tables) == len(lists["params"])
    assert all(example_value(t).dtype == torch.float64 for t in tables)
    gm(*inputs)
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (got, want) in enumerate(zip(lists[name], expected[name])):
            assert rel_error(got, want) <= rtol, f"{name}[{i}]"


@pytest.mark.parametrize("target,amsgrad,maximize,weight_decay,tensor_lr", OPTIONS)
def test_matches_fused_kernel(target, amsgrad, maximize, weight_decay, tensor_lr):
    """Every option combination matches aten's fused kernel to float32 rounding."""
    lists = adam_lists([torch.randn(37, 5), torch.randn(8)], amsgrad=amsgrad)
    lr = torch.tensor(3e-3) if tensor_lr else 3e-3
    kwargs = dict(
        lr=lr, beta1=0.85, beta2=0.99, weight_decay=weight_decay, eps=1e-7, amsgrad=amsgrad, maximize=maximize
    )
    check_lowering(target, lists, kwargs, rtol=2e-6)


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_grad_scale_and_found_inf_on_meshes(meshes, found_inf):
    """Three meshes with grad_scale/found_inf: unscaled grads written back, or no change at all."""
    lists = adam_lists(dtensor_params(meshes))
    kwargs = dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        weight_decay=0.01,
        eps=1e-8,
        amsgrad=False,
        maximize=False,
        grad_scale=torch.tensor(8.0),
        found_inf=torch.tensor(found_inf),
    )
    before = [local(p).clone() for p in lists["params"]]
    check_lowering(torch._fused_adamw_, lists, kwargs, rtol=2e-6)
    changed = any(not torch.equal(local(p), b) for p, b in zip(lists["params"], before))
    assert changed == (found_inf == 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    """bf16/fp16 compute in float32 and round once; float64 computes in float64."""
    lists = adam_lists([torch.randn(64, 3).to(dtype)])
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False)
    lists["max_exp_avg_sqs"] = [torch.rand_like(lists["params"][0]) * 0.01]
    check_lowering(torch._fused_adamw_, lists, kwargs, rtol={torch.float64: 1e-12}.get(dtype, 2**-7))


def test_complex_dtype_is_refused():
    """A complex parameter: the error names the parameter index and the dtype."""
    lists = adam_lists([torch.randn(4), torch.randn(4, dtype=torch.complex64)])
    gm, _ = fused_graph(
        torch._fused_adam_,
        lists,
        **dict(DEFAULTS, lr=1e-3),
    )
    with pytest.raises(UnsupportedInputError, match=r"parameter 1: params has dtype torch.complex64"):
        lower_fused_adam(gm)


def test_graph_without_fused_call_is_unchanged():
    """No fused call: modified is False."""
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    assert not lower_fused_adam(gm).modified


def test_example_values_follow_the_mesh(meshes):
    """Lowered nodes carry DTensor example values on their parameter's mesh."""
    lists = adam_lists(dtensor_params(meshes))
    gm, _ = fused_graph(
        torch._fused_adamw_,
        lists,
        **dict(DEFAULTS, lr=1e-2),
    )
    split_by_mesh(gm)
    lower_fused_adam(gm)
    copies = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "copy_"]
    assert len(copies) == 3 * len(lists["params"])
    params = [example_value(n.args[0]) for n in copies[::3]]
    assert [v.device_mesh for v in params] == [p.device_mesh for p in lists["params"]]
