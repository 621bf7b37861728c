"""Symbolic float hyperparameters of foreach calls, passed as 0-dim tensors.

Why: when a scheduler changes a float lr every step, Dynamo recompiles once and
then passes it as a symbolic float (a float64 input read with ``.item()``).
AOT's ``tensorify_python_scalars`` must turn each use of it into tensor math,
or it specializes the value and every new value recompiles.  It can do that
for a pointwise op (``tensor * lr``) but not for a foreach op's Scalar
argument: foreach Adam's ``_foreach_div_(bias_correction1, lr)``, AdamW's
``_foreach_mul_(params, 1 - lr * weight_decay)``, SGD's
``_foreach_add_(params, grads, alpha=-lr)``, RMSprop's ``_foreach_addcdiv_(...,
value=-lr)``.  So upstream recompiles those steps on every step, up to Dynamo's
limit of 8, and then runs them eagerly (on plain tensors too).

What: :func:`tensorify_foreach_scalars` rewrites, in a local-shard graph (plain
tensors), each such argument as a 0-dim float64 tensor: the same arithmetic
on the tensor Dynamo reads the float from, or else ``zeros((), float64) + s``,
which AOT turns into tensor math itself.  A Scalar of ``_foreach_mul``/
``_foreach_div``/``_foreach_add`` becomes their Tensor overload's 0-dim tensor
(the same values: the lists' dtype wins over a 0-dim tensor's), and an
``alpha`` or ``value`` multiplies the list it scales first (``a + alpha * b``
as ``a + (b * alpha)``, ``p + value * a / b`` as ``p + (a * value) / b``: a
rounding apart).  The result stays per entry for :mod:`fxmesh.unroll`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from fxmesh.local import op_name
from fxmesh.lowering import float64_source, symbolic_float_as_tensor
from fxmesh.meshes import example_value, graph_fake_mode, propagate_example_value

__all__ = ["tensorify_foreach_scalars"]

# Foreach ops whose second argument may be a Scalar, with a Tensor overload for it.
_SCALAR_AS_TENSOR = frozenset({"mul", "div", "add"})
# Foreach ops with a keyword that scales their second list: ``a + alpha * b``, ``p + value * a / b``.
_SCALED_LIST = {"add": "alpha", "sub": "alpha", "addcmul": "value", "addcdiv": "value"}


def _is_symbolic_float(value: Any) -> bool:
    return isinstance(value, torch.fx.Node) and isinstance(example_value(value), torch.SymFloat)


# Python arithmetic on symbolic floats that is written again as the same tensor arithmetic.
_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow})


def _tensor_expression(
    graph: torch.fx.Graph, value: torch.fx.Node, before: torch.fx.Node, fake_mode: Any
) -> torch.fx.Node | None:
    """``value`` (a symbolic float) as float64 tensor math on the tensor it is read from, or None.

    Dynamo reads the float from a 0-dim float64 tensor with ``.item()`` and
    computes on it in Python (``1 - lr * weight_decay``, ``-lr``).  AOT turns
    such chains into tensor math itself from torch 2.13 on; written here, they
    need nothing from it.
    """
    source = float64_source(value)
    if source is not None:
        # Not the source itself: AOT specializes a symbol that no tensor math it rewrote reads.
        return symbolic_float_as_tensor(graph, before, source, value, fake_mode)
    if value.op != "call_function" or value.target not in _ARITHMETIC or value.kwargs:
        return None
    args = []
    for arg in value.args:
        if _is_symbolic_float(arg):
            arg = _tensor_expression(graph, arg, before, fake_mode)
            if arg is None:
                return None
        elif not isinstance(arg, (int, float)) or isinstance(arg, bool):
            return None
        args.append(arg)
    with graph.inserting_before(before):
        tensor = graph.call_function(value.target, tuple(args))
    propagate_example_value(tensor, fake_mode)
    return tensor


def tensorify_foreach_scalars(gm: torch.fx.GraphModule) -> int:
    """Rewrite the symbolic float Scalar arguments of ``gm``'s foreach calls as 0-dim tensors; how many."""
    graph = gm.graph
    fake_mode = None
    tensors: dict[torch.fx.Node, torch.fx.Node] = {}
    rewritten = 0

    def as_tensor(value: torch.fx.Node, like: torch.fx.Node, before: torch.fx.Node) -> torch.fx.Node:
        nonlocal fake_mode
        if value not in tensors:
            fake_mode = fake_mode or graph_fake_mode(gm)
            expression = _tensor_expression(graph, value, before, fake_mode)
            if expression is not None:
                tensors[value] = expression
                return expression
            with graph.inserting_before(before):
                zeros = graph.call_function(
                    torch.zeros, ((),), {"dtype": torch.float64, "device": example_value(like).device}
                )
                tensors[value] = graph.call_function(operator.add, (zeros, value))
            propagate_example_value(zeros, fake_mode)
            propagate_example_value(tensors[value], fake_mode)
        return tensors[value]

    for node in list(graph.nodes):
        name = op_name(node)
        if node.op != "call_function" or not name.startswith("_foreach_"):
            continue
        base = name[len("_foreach_") :].rstrip("_")
        args, kwargs = list(node.args), dict(node.kwargs)
        if len(args) < 2 or not isinstance(args[0], (list, tuple)) or not args[0]:
            continue
        first = args[0][0]
        if base in _SCALAR_AS_TENSOR and _is_symbolic_float(args[1]):
            args[1] = as_tensor(args[1], first, node)
        elif base in _SCALED_LIST:
            key = _SCALED_LIST[base]
            if base in ("addcmul", "addcdiv") and len(args) == 4:
                kwargs[key] = args.pop()
            scale, scaled = kwargs.get(key), args[1]
            if not _is_symbolic_float(scale) or not isinstance(scaled, (list, tuple)):
                continue
            fake_mode = fake_mode or graph_fake_mode(gm)
            with graph.inserting_before(node):
                product = graph.call_function(torch._foreach_mul, (list(scaled), as_tensor(scale, first, node)))
            propagate_example_value(product, fake_mode)
            entries = []
            for i in range(len(scaled)):
                with graph.inserting_before(node):
                    entries.append(graph.call_function(operator.getitem, (product, i)))
                entries[-1].meta["example_value"] = example_value(product)[i]
            args[1] = entries
            del kwargs[key]
        else:
            continue
        node.args, node.kwargs = tuple(args), kwargs
        rewritten += 1
    if rewritten:
        # The Python arithmetic left without users: AOT would still specialize its symbols (torch 2.11).
        for node in reversed(list(graph.nodes)):
            if not node.users and _is_symbolic_float(node):
                graph.erase_node(node)
        graph.lint()
        gm.recompile()
    return rewritten
