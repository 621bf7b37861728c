"""Split fused optimizer calls that span several meshes into one call per mesh.

Why: one ``torch._fused_adamw_`` node whose tensor lists hold DTensors on
several DeviceMeshes cannot be lowered as it is.  DTensor casts the plain 0-dim
tensors of the call (state steps, a tensor lr, ``grad_scale``, ``found_inf``)
onto the mesh of the first list entry, and any math written over the whole
call mixes meshes.

What: list entries are grouped by the mesh of their parameter (plain tensors
form one group per device).  Each group gets its own call of the same op, with
its slice of every list, inserted where the original call was and in the order
the groups first appear, so in-place semantics and order are kept.  In a
DTensor group every plain 0-dim tensor argument is rewritten as a Replicate
DTensor on the group's mesh (:func:`fxmesh.meshes.replicate`, ``from_local``
without a check: the value is the same on every rank by construction).

Pre: nodes carry example values.  Post: every fused optimizer node has all its
tensors on one mesh (or all plain) and no plain scalar tensor beside DTensors.
``gm.meta[MESH_GROUPS_META]`` maps the name of every fused call the pass saw,
split or not, to its groups as ``(mesh, number of parameters)`` pairs, for
tools that report what the pass did (``fxmesh inspect``).
Raises :class:`UnsupportedInputError` naming the parameter index when a
gradient or state lives on another mesh than its parameter.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor
from torch.fx.passes.infra.pass_base import PassResult

from fxmesh.errors import UnsupportedInputError
from fxmesh.fused_ops import FusedOp, bind, fused_op
from fxmesh.meshes import (
    MeshKey,
    example_value,
    graph_fake_mode,
    group_by_mesh,
    node_mesh_key,
    propagate_example_value,
    replicate,
    source_name,
)

__all__ = ["MESH_GROUPS_META", "split_by_mesh"]

log = logging.getLogger(__name__)

# Metadata that stays true when a call is replaced by a slice of itself.
_SAFE_META = ("stack_trace", "source_fn_stack", "nn_module_stack")

MESH_GROUPS_META = "fxmesh_mesh_groups"


def _entry_keys(node: torch.fx.Node, op: FusedOp, args: dict[str, Any]) -> list[MeshKey]:
    """The mesh of every parameter, checked against its gradient and states."""
    params = args[op.list_args[0]]
    keys = [node_mesh_key(p, f"{op.name} parameter {i}") for i, p in enumerate(params)]
    for name in op.list_args[1:]:
        entries = args[name]
        if not entries:
            continue
        if len(entries) != len(params):
            raise UnsupportedInputError(
                f"fused {op.name}: {name} has {len(entries)} entries for {len(params)} parameters"
            )
        for i, entry in enumerate(entries):
            key = node_mesh_key(entry, f"{op.name} {name}[{i}]")
            if key.mesh is None and keys[i].mesh is not None and _is_scalar(entry):
                continue  # a plain scalar is made mesh-local below
            if key != keys[i]:
                raise UnsupportedInputError(
                    f"fused {op.name}: parameter {i} ({source_name(params[i])}) is on {keys[i]} "
                    f"but its {name} entry ({source_name(entry)}) is on {key}"
                )
    return keys


def _is_scalar(node: torch.fx.Node) -> bool:
    value = example_value(node)
    return isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() == 0


class _Localizer:
    """Turns plain scalar tensors into Replicate DTensors on one group's mesh."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node, key: MeshKey, fake_mode: Any):
        self.graph = graph
        self.fake_mode = fake_mode
        # The mesh is read off a parameter of the group so the graph needs no
        # DeviceMesh constant.
        self.mesh = graph.call_function(getattr, (anchor, "device_mesh"))
        self.mesh.meta["example_value"] = key.mesh

    def __call__(self, arg: Any) -> Any:
        if not isinstance(arg, torch.fx.Node) or not _is_scalar(arg):
            return arg
        local = self.graph.call_function(replicate, (arg, self.mesh))
        propagate_example_value(local, self.fake_mode)
        return local


def _has_plain_scalars(op: FusedOp, args: dict[str, Any], idx: list[int]) -> bool:
    entries = [args[name][i] for name in op.list_args if args[name] for i in idx]
    entries += [args.get(name) for name in op.scalar_tensor_args]
    return any(isinstance(e, torch.fx.Node) and _is_scalar(e) for e in entries)


def split_by_mesh(gm: torch.fx.GraphModule) -> PassResult:
    """Give every fused optimizer call a single mesh and mesh-local scalars."""
    graph = gm.graph
    fake_mode = None
    modified = False
    for node in list(graph.nodes):
        op = fused_op(node)
        if op is None:
            continue
        args = bind(node, op)
        groups = group_by_mesh(_entry_keys(node, op, args))
        gm.meta.setdefault(MESH_GROUPS_META, {})[node.name] = [(str(key), len(idx)) for key, idx in groups.items()]
        if len(groups) < 2 and not any(
            key.mesh is not None and _has_plain_scalars(op, args, idx) for key, idx in groups.items()
        ):
            continue
        fake_mode = fake_mode or graph_fake_mode(gm)
        params = args[op.list_args[0]]
        scalar_kwargs = {k: v for k, v in node.kwargs.items() if k not in op.list_args}
        with graph.inserting_before(node):
            for key, idx in groups.items():
                lists = [[args[name][i] for i in idx] if args[name] else [] for name in op.list_args]
                kwargs = scalar_kwargs
                if key.mesh is not None:
                    localize = _Localizer(graph, params[idx[0]], key, fake_mode)
                    lists = [[localize(e) for e in entries] for entries in lists]
                    kwargs = {k: localize(v) for k, v in kwargs.items()}
                piece = graph.call_function(node.target, tuple(lists), kwargs)
                piece.meta.update({k: node.meta[k] for k in _SAFE_META if k in node.meta})
                piece.meta["example_value"] = None
                piece.meta["fxmesh_group"] = str(key)
        log.debug("split %s into %d calls: %s", node.name, len(groups), ", ".join(map(str, groups)))
        counters["fxmesh"]["split_nodes"] += 1
        counters["fxmesh"]["mesh_groups"] += len(groups)
        graph.erase_node(node)
        modified = True
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
