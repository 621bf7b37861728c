"""aten_fused_adam on hand-built graphs: which calls keep aten's kernel, and that the custom op is that kernel."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fxmesh.errors import UnsupportedInputError
from fxmesh.meshes import example_value
from fxmesh.passes import aten_fused_adam as pass_module
from fxmesh.passes.aten_fused_adam import ATEN_FUSED_ADAM_OPS, aten_fused_adam
from tests.helpers import dtensor_params
from tests.passes.graphs import ADAM_LISTS, adam_lists, clone_lists, fused_graph, fused_nodes

KWARGS = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=True)


def _calls(gm, name="adamw", unscales=False):
    return [n for n in gm.graph.nodes if n.target is ATEN_FUSED_ADAM_OPS[name, unscales]]


@pytest.mark.parametrize("target,name", [(torch._fused_adam_, "adam"), (torch._fused_adamw_, "adamw")])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("unscales", [False, True], ids=["", "grad_scale"])
def test_custom_op_is_the_fused_kernel(target, name, tensor_lr, unscales):
    """The call becomes the custom op, and running it updates every list bit for bit as aten's kernel does."""
    lists = adam_lists([torch.randn(37, 5), torch.randn(8), torch.randn(3, 3)], amsgrad=True)
    kwargs = {**KWARGS, "lr": torch.tensor(1e-2)} if tensor_lr else KWARGS
    if unscales:
        kwargs = {**kwargs, "grad_scale": torch.tensor(2.0), "found_inf": torch.tensor(0.0)}
    expected = clone_lists(lists)
    target(*(expected[k] for k in ADAM_LISTS), **kwargs)
    gm, inputs = fused_graph(target, lists, **kwargs)
    assert aten_fused_adam(gm).modified
    assert not fused_nodes(gm) and len(_calls(gm, name, unscales)) == 1
    assert counters["fxmesh"]["aten_fused_calls"] == 1
    gm(*inputs)
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (got, want) in enumerate(zip(lists[key], expected[key])):
            assert torch.equal(got, want), f"{key}[{i}]"


def test_gradients_are_written_only_to_unscale():
    """Only the ops that take a grad_scale declare the gradients mutated; the others read them."""
    for (name, unscales), op in ATEN_FUSED_ADAM_OPS.items():
        written = {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        expected = {"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"} | ({"grads"} if unscales else set())
        assert written == expected, (name, unscales)


def test_long_calls_are_chunked(monkeypatch):
    """A call with more than CALL_TENSORS parameters becomes consecutive calls, each list sliced alike."""
    monkeypatch.setattr(pass_module, "CALL_TENSORS", 2)
    lists = adam_lists([torch.randn(4) for _ in range(5)])
    kwargs = {**KWARGS, "amsgrad": False}
    expected = clone_lists(lists)
    torch._fused_adamw_(*(expected[k] for k in ADAM_LISTS), **kwargs)
    gm, inputs = fused_graph(torch._fused_adamw_, lists, **kwargs)
    aten_fused_adam(gm)
    calls = _calls(gm)
    assert [len(c.args[0]) for c in calls] == [2, 2, 1]
    assert [a.name for c in calls for a in c.args[5]] == [f"state_steps_{i}" for i in range(5)]
    assert all(c.args[4] == [] for c in calls)  # no amsgrad: max_exp_avg_sqs stays empty
    gm(*inputs)
    assert all(torch.equal(got, want) for got, want in zip(lists["params"], expected["params"]))


def test_symbolic_hyperparameter_is_left_for_the_lowering():
    """A float that Dynamo made symbolic cannot be a constant of the custom op: the call stays for lower_fused_adam."""
    gm, _ = fused_graph(torch._fused_adamw_, adam_lists([torch.randn(4)]), **KWARGS)
    node = fused_nodes(gm)[0]
    with gm.graph.inserting_before(node):
        beta1 = gm.graph.placeholder("beta1")
    beta1.meta["example_value"] = 0.9  # what Dynamo records for a SymFloat's node: not a tensor
    node.update_kwarg("beta1", beta1)
    assert not aten_fused_adam(gm).modified
    assert fused_nodes(gm) == [node]


def test_dtensor_call_is_left_alone(meshes):
    """The pass runs on graphs over local shards; a call over DTensors stays (the lowering takes it)."""
    params = dtensor_params(meshes)[:2]
    gm, _ = fused_graph(torch._fused_adamw_, adam_lists([p.detach() for p in params]), **KWARGS)
    assert not aten_fused_adam(gm).modified


def test_unsupported_dtype_names_the_parameter():
    lists = adam_lists([torch.randn(4), torch.randn(4)])
    lists["params"][1] = torch.zeros(4, dtype=torch.int32)
    gm, _ = fused_graph(torch._fused_adamw_, lists, **KWARGS)
    with pytest.raises(UnsupportedInputError, match="parameter 1: params has dtype torch.int32"):
        aten_fused_adam(gm)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_scalars_are_copied_to_the_parameters_device(device):
    """Under compile torch.optim leaves grad_scale and found_inf where GradScaler made them (it groups the tensors
    under the device None), and aten's CUDA kernel reads them through a device pointer (GPU run 4: an illegal
    memory access). CPU scalars beside parameters on another device (meta here, CUDA in use) are copied to it
    first, as eager torch.optim copies them; beside CPU parameters they are passed as they are."""
    lists = adam_lists([torch.empty(4, 3, device=device) for _ in range(2)])
    kwargs = {**KWARGS, "amsgrad": False, "grad_scale": torch.tensor(2.0), "found_inf": torch.tensor(0.0)}
    gm, _ = fused_graph(torch._fused_adamw_, lists, **kwargs)
    assert aten_fused_adam(gm).modified
    (call,) = _calls(gm, unscales=True)
    for name in ("grad_scale", "found_inf"):
        arg = call.kwargs[name]
        if device == "cpu":
            assert arg.op == "placeholder" and arg.name == name, arg.format_node()
            continue
        assert arg.op == "call_method" and arg.target == "to" and arg.args[0].name == name, arg.format_node()
        assert example_value(arg).device.type == device, name
