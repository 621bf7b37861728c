"""Write a step's foreach calls one call per list entry, so that it splits into per-parameter pieces.

A foreach optimizer step (``torch.optim``'s default on CUDA, and what Dynamo
traces for ``foreach=True``) is a row of ``torch._foreach_*`` calls, each over
every parameter's entry of its lists.  Each entry is computed on its own, so
the step is independent per-parameter updates, as fxmesh's lowering of a fused
step is, but every call ties all parameters together and :mod:`fxmesh.pieces`
cannot split it: Inductor compiles the whole list, with compile time growing
faster than the parameters (foreach AdamW on two meshes, 2-core CPU box, cold:
42 s for 200 parameters, 196 s for 1000; in pieces 62 s, ``bench/RESULTS.md``
run Z).

:func:`per_entry` copies such a graph (over local shards: plain tensors) with
every foreach call written as the per-entry op, once per entry, where the
entry's math is exactly that op: ``torch._foreach_addcmul_(a, b, c, v)``
becomes ``a[i].addcmul_(b[i], c[i], value=v)``; an out-of-place call's
results (``operator.getitem`` of it) become its per-entry calls.  Inductor
lowers a foreach op to the same per-entry pointwise math
(``torch/_inductor/lowering.py``, ``register_foreach_pointwise``).  Only the
ops in :data:`fxmesh.ops.PER_ENTRY` are written so (what torch.optim calls, and fxmesh's
per-mesh and per-entry stand-ins for them); a graph with any other foreach
call, or with a list of scalars as a tensor, is left alone (None).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from fxmesh.local import op_name
from fxmesh.meshes import example_value
from fxmesh.ops import has_per_entry_form, per_entry_form

__all__ = ["per_entry"]


def _foreach_name(node: torch.fx.Node) -> str | None:
    """``X_`` or ``X`` of a ``torch._foreach_X_``/``torch._foreach_X`` call (or an fxmesh.ops stand-in for one)."""
    name = op_name(node)
    return name[len("_foreach_") :] if name.startswith("_foreach_") else None


def _value(gm: torch.fx.GraphModule, node: Any) -> Any:
    """The traced value of an argument: a node's example value (an attribute's tensor), or a constant."""
    if not isinstance(node, torch.fx.Node):
        return node
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(gm)
    return example_value(node)


def _write_per_entry(gm: torch.fx.GraphModule, node: torch.fx.Node, name: str) -> bool:
    """Replace foreach call ``node`` by its per-entry calls; False (and nothing changed) where it cannot be."""
    if not has_per_entry_form(name):
        return False
    in_place = name.endswith("_")
    name, args, kwargs = per_entry_form(name, node.args, node.kwargs, lambda a: isinstance(a, torch.fx.Node))
    base = name[:-1] if in_place else name
    if isinstance(kwargs.get("value"), torch.fx.Node):
        return False  # the scalars as one tensor: no per-entry value
    lengths = {len(a) for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))}
    if len(lengths) != 1:
        return False
    (n,) = lengths
    results = None if in_place else example_value(node)
    if not in_place and not (
        isinstance(results, (list, tuple))
        and len(results) == n
        and all(u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users)
    ):
        return False
    if in_place and not isinstance(args[0], (list, tuple)):
        return False

    def entry(a: Any, i: int) -> Any:
        return a[i] if isinstance(a, (list, tuple)) else a

    graph = gm.graph
    entries = []
    with graph.inserting_before(node):
        for i in range(n):
            entry_args = tuple(entry(a, i) for a in args)
            entry_kwargs = {k: entry(v, i) for k, v in kwargs.items()}
            if not in_place:
                call = graph.call_function(getattr(torch, base), entry_args, entry_kwargs)
                call.meta["example_value"] = results[i]
            elif hasattr(torch.Tensor, name):
                call = graph.call_method(name, entry_args, entry_kwargs)
                call.meta["example_value"] = _value(gm, entry_args[0])
            else:  # maximum_, minimum_: no Tensor method
                value = graph.call_function(getattr(torch, base), entry_args, entry_kwargs)
                value.meta["example_value"] = _value(gm, entry_args[0])
                call = graph.call_method("copy_", (entry_args[0], value))
                call.meta["example_value"] = value.meta["example_value"]
            entries.append(call)
    for user in list(node.users):
        user.replace_all_uses_with(entries[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    return True


def per_entry(gm: torch.fx.GraphModule) -> torch.fx.GraphModule | None:
    """``gm`` with every foreach call written one call per list entry, as a new graph module.

    ``gm`` itself when it has no foreach call (a for-loop step already is one
    call per entry); None when some foreach call is not one :data:`fxmesh.ops.PER_ENTRY`
    covers.  The copy keeps ``gm``'s attributes, Dynamo metadata and its
    placeholders' sources (:mod:`fxmesh.pieces` passes them on to AOT).
    """
    if not any(_foreach_name(n) is not None for n in gm.graph.nodes):
        return gm
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old in gm.graph.find_nodes(op="placeholder"):
        if hasattr(old, "_dynamo_source"):
            env[old]._dynamo_source = old._dynamo_source
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    copy._param_name_to_source = getattr(gm, "_param_name_to_source", None)
    for node in list(graph.nodes):
        name = _foreach_name(node)
        if name is not None and not _write_per_entry(copy, node, name):
            return None
    graph.lint()
    copy.recompile()
    return copy
