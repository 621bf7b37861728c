"""fxmesh.unroll: a step's foreach calls written one call per list entry."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx

from fxmesh.unroll import per_entry


def _foreach_graph(calls) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """Three lists of two entries (a, b, c), updated by ``calls(graph, a, b, c)``; returns what it returns.

    Each placeholder's example value is a tensor like the inputs, as Dynamo's would be; a node of an
    out-of-place call gets its list of results.
    """
    graph = torch.fx.Graph()
    inputs = [torch.rand(3, 2) + 0.5 for _ in range(6)]
    nodes = [graph.placeholder(f"x{i}") for i in range(6)]
    for node, value in zip(nodes, inputs):
        node.meta["example_value"] = value
    a, b, c = nodes[0:2], nodes[2:4], nodes[4:6]
    graph.output(calls(graph, a, b, c))
    for node in graph.nodes:
        if node.op == "call_function" and node.target is not operator.getitem and node.target.__name__[-1] != "_":
            node.meta["example_value"] = [torch.empty(3, 2), torch.empty(3, 2)]
    return torch.fx.GraphModule(torch.nn.Module(), graph), inputs


def _out_of_place(graph, op, *args, **kwargs):
    node = graph.call_function(op, args, kwargs)
    return [graph.call_function(operator.getitem, (node, i)) for i in range(2)]


def _adam_like(graph, a, b, c):
    """An update in foreach calls with every argument form torch.optim uses."""
    graph.call_function(torch._foreach_mul_, (a, 0.9))
    d = _out_of_place(graph, torch._foreach_sub, b, c)
    graph.call_function(torch._foreach_addcmul_, (c, d, d, 0.1))  # value: the fourth positional argument
    graph.call_function(torch._foreach_addcdiv_, (a, c, b), {"value": -0.01})
    graph.call_function(torch._foreach_maximum_, (b, c))  # no Tensor.maximum_: maximum, then copy_
    graph.call_function(torch._foreach_maximum_, (c, 0.7))  # a scalar: clamp_min_, as aten computes it
    graph.call_function(torch._foreach_lerp_, (a, b, [0.25, 0.5]))  # a list of scalars
    p = _out_of_place(graph, torch._foreach_pow, 0.9, b)
    graph.call_function(torch._foreach_add_, (a, p), {"alpha": 2.0})
    return tuple(d)


def test_foreach_calls_become_the_same_math_per_entry():
    """Every call is written per entry, and the graph computes what it computed, bit for bit, updates and
    returned values alike."""
    gm, inputs = _foreach_graph(_adam_like)
    entries = per_entry(gm)
    assert entries is not None and entries is not gm
    assert not [n for n in entries.graph.nodes if "_foreach_" in str(n.target)]
    assert not entries.graph.find_nodes(op="call_function", target=operator.getitem)
    expected, actual = [x.clone() for x in inputs], [x.clone() for x in inputs]
    returned, returned_per_entry = gm(*expected), entries(*actual)
    for i, (e, a) in enumerate(zip(expected + list(returned), actual + list(returned_per_entry))):
        assert torch.equal(e, a), f"value {i}"
    methods = {n.target for n in entries.graph.find_nodes(op="call_method")}
    assert methods == {"mul_", "addcmul_", "addcdiv_", "copy_", "clamp_min_", "lerp_", "add_"}
    # The example values follow: the per-entry result's, or the updated entry's.
    for node in entries.graph.nodes:
        if node.op in ("call_function", "call_method"):
            assert isinstance(node.meta.get("example_value"), torch.Tensor), node.format_node()


def test_original_graph_is_left_alone():
    """The graph handed in is not changed: the backend compiles it whole where the pieces do not split."""
    gm, _ = _foreach_graph(_adam_like)
    before = str(gm.graph)
    per_entry(gm)
    assert str(gm.graph) == before


def test_a_graph_without_foreach_calls_is_itself():
    """A for-loop step is already one call per entry."""
    gm, _ = _foreach_graph(lambda graph, a, b, c: tuple(graph.call_method("add_", (x, 1.0)) for x in a))
    assert per_entry(gm) is gm


@pytest.mark.parametrize(
    "calls",
    [
        # No per-entry op fxmesh writes (a norm reduces each entry).
        lambda graph, a, b, c: tuple(_out_of_place(graph, torch._foreach_norm, a)),
        # The scalars as one tensor: no scalar per entry to pass as value.
        lambda graph, a, b, c: graph.call_function(torch._foreach_addcmul_, (a, b, c, graph.placeholder("s"))),
    ],
    ids=["norm", "tensor-of-scalars"],
)
def test_calls_it_cannot_write_per_entry_leave_the_graph_whole(calls):
    """Any call outside fxmesh.unroll.PER_ENTRY, or whose scalars are a tensor: None, the graph compiles whole."""
    gm, _ = _foreach_graph(calls)
    assert per_entry(gm) is None
