"""split_by_mesh on hand-built graphs."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor, Replicate

from fxmesh.errors import EagerFallback, UnsupportedInputError
from fxmesh.meshes import example_value
from fxmesh.passes.split_by_mesh import split_by_mesh
from tests.helpers import dtensor_params, local, shard
from tests.passes.graphs import adam_lists, clone_lists, fused_graph, fused_nodes

KWARGS = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)


def test_splits_into_one_call_per_mesh_with_local_steps(meshes):
    """One call over dp/ep/tp becomes three calls; each step is a Replicate DTensor on its group's mesh."""
    lists = adam_lists(dtensor_params(meshes))
    gm, inputs = fused_graph(torch._fused_adamw_, lists, **KWARGS)
    result = split_by_mesh(gm)
    assert result.modified
    nodes = fused_nodes(gm)
    assert [n.meta["fxmesh_group"].split("(")[0] for n in nodes] == ["dp", "ep", "tp"]
    assert [len(n.args[0]) for n in nodes] == [3, 2, 2]
    for node in nodes:
        meshes_in_call = {example_value(e).device_mesh for lst in node.args for e in lst}
        assert len(meshes_in_call) == 1
        for step in node.args[5]:
            value = example_value(step)
            assert isinstance(value, DTensor) and value.placements == (Replicate(),) * value.device_mesh.ndim
    assert counters["fxmesh"]["mesh_groups"] == 3

    expected = clone_lists(lists)
    torch._fused_adamw_(
        *(expected[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")),
        **KWARGS,
    )
    gm(*inputs)
    for got, want in zip(lists["params"] + lists["exp_avgs"], expected["params"] + expected["exp_avgs"]):
        assert torch.equal(local(got), local(want))


def test_single_mesh_call_gets_mesh_local_scalars(meshes):
    """One mesh: no split, but the plain step, lr, grad_scale and found_inf become mesh-local."""
    lists = adam_lists(dtensor_params(meshes)[:3])
    kwargs = dict(KWARGS, lr=torch.tensor(1e-2), grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
    gm, _ = fused_graph(torch._fused_adam_, lists, **kwargs)
    assert split_by_mesh(gm).modified
    (node,) = fused_nodes(gm)
    for name in ("lr", "grad_scale", "found_inf"):
        assert isinstance(example_value(node.kwargs[name]), DTensor), name


def test_plain_call_is_left_alone():
    """Plain tensors on one device: nothing to do, and the pass says so."""
    lists = adam_lists([torch.randn(4, 3), torch.randn(5)])
    gm, _ = fused_graph(torch._fused_adamw_, lists, **KWARGS)
    code = gm.code
    assert not split_by_mesh(gm).modified
    assert gm.code == code


def test_grad_on_another_mesh_is_refused(meshes):
    """A gradient on another mesh: the error names the parameter index and both meshes."""
    lists = adam_lists(dtensor_params(meshes)[:2])
    lists["grads"][1] = shard(torch.randn(lists["params"][1].shape), meshes["ep"], [Replicate(), Replicate()])
    gm, _ = fused_graph(torch._fused_adamw_, lists, **KWARGS)
    with pytest.raises(UnsupportedInputError, match=r"parameter 1 .*dp\(dp=8\).*grads.*ep\("):
        split_by_mesh(gm)


def test_missing_metadata_asks_for_eager(meshes):
    """A parameter without an example value: EagerFallback naming it, never a guess."""
    gm, _ = fused_graph(torch._fused_adamw_, adam_lists(dtensor_params(meshes)[:2]), **KWARGS)
    next(iter(gm.graph.nodes)).meta.clear()
    with pytest.raises(EagerFallback, match="parameter 0"):
        split_by_mesh(gm)
