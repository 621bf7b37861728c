"""Compile a lowered optimizer step in pieces, each repeated piece once.

After fxmesh's lowering an optimizer step is a row of independent updates:
the parameters of one scalar table (at most :data:`fxmesh.lowering.TABLE_ROWS`
of them, of one local layout) share the table and their step counts, and
nothing else but read-only scalars (a tensor lr, ``grad_scale``) with the
others.  Inductor's compile time grows with the number of parameters (0.2 s
each on a 2-core CPU), and most of that work is the same work again: a
model's parameters come in a few shapes.

:func:`compile_in_pieces` splits such a graph into the connected components
of the lowered nodes: two nodes connect through a value one computes and the
other reads, or through a graph input they both touch, unless that input is a
0-dim tensor nothing writes to (shared scalars do not tie parameters
together).  The step counts' increment that torch.optim runs before the fused
call (an in-place ``_foreach_add_``) is split by entry into the components
that read them, and scalar math on shared read-only inputs (a scheduled
hyperparameter's float64 tensor, read with ``.item()``) is copied into each
component that reads it.  Components that are the same computation on inputs of the
same metadata are batched, about :data:`PIECE_NODES` nodes per batch; a batch
that repeats is compiled once and called with every such batch's tensors.
The rest (nodes the lowering did not emit first, then components that do not
repeat) is one more piece, run first.

A compiled graph already runs on any inputs of the metadata it was compiled
for: Dynamo's guards pin shapes, strides, dtypes and aliasing, not addresses,
and every step hands it new gradients.  Running it on another batch's tensors
is the same.  The inputs' shapes, strides, dtypes, devices, ``requires_grad``
and which of them share storage are part of a batch's key.

Nothing is split (``None``) where a graph has inputs that are not tensors or
returns a value; where nodes the lowering did not emit (other than the scalar
math above) read what the lowered nodes compute, or are read by them, or
touch (or change global state) after lowered nodes that touch the same
tensors; or where nothing repeats.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.multiprocessing.reductions import StorageWeakRef

from fxmesh.lowering import LOWERED_META

__all__ = ["PIECE_NODES", "compile_in_pieces"]

log = logging.getLogger(__name__)

# Nodes per batch: fewer pieces cost less per call (each is a compiled call,
# about 20 us on a CPU), smaller ones repeat more often.
PIECE_NODES = 2048

Compile = Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]


class _Components:
    """Union-find over nodes."""

    def __init__(self) -> None:
        self.parent: dict[torch.fx.Node, torch.fx.Node] = {}

    def find(self, n: torch.fx.Node) -> torch.fx.Node:
        self.parent.setdefault(n, n)
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: torch.fx.Node, b: torch.fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def _writes(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an in-place op (taken to write to every tensor it reads)."""
    if node.op == "call_method":
        return node.target.endswith("_")
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    if node.target is operator.setitem:
        return True
    # An fxmesh.ops stand-in is named for the op it stands for.
    name = getattr(getattr(node.target, "wrapped_op", node.target), "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _storage(value: torch.Tensor) -> StorageWeakRef:
    """The storage's identity (fake tensors have one too)."""
    return StorageWeakRef(value.untyped_storage())


def _metadata(value: Any) -> tuple[Any, ...]:
    return (value.shape, value.stride(), value.dtype, value.device, value.layout, value.requires_grad)


class _Lanes:
    """Some entries of an in-place foreach call (``torch._foreach_add_(steps, 1)``), as a call of their own."""

    def __init__(self, node: torch.fx.Node, lanes: list[int]) -> None:
        self.node = node
        self.lanes = lanes

    @property
    def all_input_nodes(self) -> list[torch.fx.Node]:
        entries = [self.node.args[0][i] for i in self.lanes]
        return [*entries, *(n for n in self.node.all_input_nodes if n not in self.node.args[0])]

    def copy_into(self, graph: torch.fx.Graph, env: dict[torch.fx.Node, torch.fx.Node], name: str) -> None:
        args = ([env[self.node.args[0][i]] for i in self.lanes], *torch.fx.map_arg(self.node.args[1:], env.__getitem__))
        kwargs = torch.fx.map_arg(self.node.kwargs, env.__getitem__)
        graph.create_node("call_function", self.node.target, args, kwargs, name=name)


def _first_node(nodes: list[torch.fx.Node | _Lanes]) -> torch.fx.Node:
    """The first node of its own (not a foreach call's lanes) of a list of components."""
    return next(n for n in nodes if not isinstance(n, _Lanes))


class _Piece:
    """Some components' nodes (and foreach lanes), in graph order, and the graph inputs they read."""

    def __init__(self, nodes: list[torch.fx.Node | _Lanes], leaves: dict[torch.fx.Node, Any]) -> None:
        self.nodes = nodes
        inputs: dict[torch.fx.Node, None] = {}
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg in leaves:
                    inputs.setdefault(arg)
        # The frame's inputs first, then attribute tensors: a call passes the ones by index, the
        # others as they were captured.
        self.inputs = sorted(inputs, key=lambda n: n.op != "placeholder")
        self.values = [leaves[n] for n in self.inputs]

    def build(self) -> tuple[torch.fx.GraphModule, str]:
        """The piece as a graph module, and its computation (the code, with canonical input names)."""
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for i, old in enumerate(self.inputs):
            new = graph.placeholder(f"input_{i}")
            new.meta.update(old.meta)
            # Not a static input: one compiled batch takes several batches' tensors, so Inductor must
            # not count on an address (on a GPU it then checks each input's alignment per call).
            tensor_dict = {**old.meta.get("tensor_dict", {})}
            if tensor_dict.pop("_dynamo_static_input_type", None) is not None:
                new.meta["tensor_dict"] = tensor_dict
            if hasattr(old, "_dynamo_source"):
                new._dynamo_source = old._dynamo_source
            env[old] = new
        # Fresh names, so that two copies of one computation print the same code.
        for i, old in enumerate(self.nodes):
            if isinstance(old, _Lanes):
                old.copy_into(graph, env, f"v{i}")
                continue
            args = torch.fx.map_arg(old.args, env.__getitem__)
            kwargs = torch.fx.map_arg(old.kwargs, env.__getitem__)
            env[old] = graph.create_node(old.op, old.target, args, kwargs, name=f"v{i}", type_expr=old.type)
            env[old].meta.update(old.meta)
        graph.output(())
        gm = torch.fx.GraphModule(torch.nn.Module(), graph)
        return gm, gm.code

    def key(self, code: str) -> tuple[Any, ...]:
        storages: dict[StorageWeakRef, int] = {}
        aliases = tuple(storages.setdefault(_storage(v), i) for i, v in enumerate(self.values))
        return code, tuple(n.op for n in self.inputs), tuple(_metadata(v) for v in self.values), aliases


def _lane_split(node: torch.fx.Node, leaves: dict[torch.fx.Node, Any]) -> bool:
    """Whether ``node`` is an in-place foreach call over graph inputs whose entries can run apart."""
    name = getattr(node.target, "__name__", "")
    entries = node.args[0] if node.args else None
    return (
        node.op == "call_function"
        and name.startswith("_foreach_")
        and name.endswith("_")
        and not node.users
        and isinstance(entries, (list, tuple))
        and all(e in leaves for e in entries)
        and all(n in entries for n in node.all_input_nodes)  # the other arguments are constants
    )


def _leaves(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[torch.fx.Node, Any] | None:
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(placeholders) != len(example_inputs):
        return None
    leaves = dict(zip(placeholders, example_inputs))
    for node in gm.graph.find_nodes(op="get_attr"):
        leaves[node] = operator.attrgetter(node.target)(gm)
    if not all(isinstance(v, torch.Tensor) for v in leaves.values()):
        return None
    return leaves


def _split(gm: torch.fx.GraphModule, leaves: dict[torch.fx.Node, Any]) -> tuple[list, list[list]] | None:
    """The prologue's nodes and the lowered components' nodes, or None where the graph does not split.

    An in-place foreach call over graph inputs (the step counts' increment)
    goes to the components, each getting the entries it reads, placed before
    its own nodes; entries no lowered node reads stay in the prologue.
    """
    graph = gm.graph
    if graph.output_node().all_input_nodes:
        return None
    calls = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    lowered = [n for n in calls if LOWERED_META in n.meta]
    if not lowered:
        return None
    lowered_set = set(lowered)
    # Inputs are compared by storage: two views of one tensor are one input here.
    storage = {leaf: _storage(value) for leaf, value in leaves.items()}
    written = {storage[a] for n in calls if _writes(n) for a in n.all_input_nodes if a in leaves}
    # Scalar math on shared read-only inputs (a scheduled hyperparameter's float64 tensor, read with
    # .item()) goes, copied, into every component that reads it, and ties no components together.
    scalars: set[torch.fx.Node] = set()
    for node in calls:
        if node in lowered_set or not _copyable(node) or not node.all_input_nodes or not _is_scalar(node):
            continue
        if all(
            a in scalars or (a in leaves and leaves[a].dim() == 0 and storage[a] not in written)
            for a in node.all_input_nodes
        ):
            scalars.add(node)
    components = _Components()
    by_storage: dict[StorageWeakRef, torch.fx.Node] = {}
    for node in lowered:
        components.find(node)
        for arg in node.all_input_nodes:
            if arg in lowered_set:
                components.union(node, arg)
            elif arg in scalars:
                continue
            elif arg not in leaves:
                return None  # reads a prologue value: the prologue would have to be split too
            elif leaves[arg].dim() > 0 or storage[arg] in written:
                components.union(node, by_storage.setdefault(storage[arg], node))
    groups: dict[torch.fx.Node, list[torch.fx.Node | _Lanes]] = {}
    lanes: dict[torch.fx.Node, list[_Lanes]] = {}
    prologue: list[torch.fx.Node | _Lanes] = []
    seen: set[StorageWeakRef] = set()  # touched by the lowered nodes so far
    moved: set[StorageWeakRef] = set()  # entries that go to the components
    prologue_touched: set[StorageWeakRef] = set()
    for node in calls:
        touched = {storage[a] for a in node.all_input_nodes if a in leaves}
        if node in lowered_set:
            seen |= touched
            continue
        if node in scalars:
            continue
        if any(a in scalars for a in node.all_input_nodes):
            return None  # the prologue would need the scalar math too
        if _lane_split(node, leaves):
            by_root: dict[torch.fx.Node, list[int]] = {}
            for i, entry in enumerate(node.args[0]):
                if storage[entry] in by_storage:
                    by_root.setdefault(components.find(by_storage[storage[entry]]), []).append(i)
            for root, idx in by_root.items():
                lanes.setdefault(root, []).append(_Lanes(node, idx))
            moving = {storage[node.args[0][i]] for idx in by_root.values() for i in idx}
            if moving & seen:
                return None  # a lowered node read the entry before this call
            moved |= moving
            kept = [i for i, entry in enumerate(node.args[0]) if storage[entry] not in moving]
            touched = {storage[node.args[0][i]] for i in kept}
            if kept:
                prologue.append(_Lanes(node, kept))
        elif not touched or any(a in lowered_set for a in node.all_input_nodes):
            return None  # global state (grad mode, say), or a value of the lowered nodes: keep the graph whole
        else:
            prologue.append(node)
        # The prologue runs first: it must not touch what lowered nodes before it touched.
        if touched & seen:
            return None
        prologue_touched |= touched
    if moved & prologue_touched:
        return None  # a moved entry is also touched by the prologue: keep their order
    for node in lowered:
        groups.setdefault(components.find(node), []).append(node)
    order = {n: i for i, n in enumerate(calls)}
    return prologue, [
        [*lanes.get(root, []), *sorted(_scalar_inputs(nodes, scalars), key=order.__getitem__), *nodes]
        for root, nodes in groups.items()
    ]


# What scalar math may be copied into several pieces: deterministic and writing nothing.  Enough for
# fxmesh.lowering's float64 tensor of a symbolic hyperparameter (``zeros_like(t) + t.item()``).
_COPYABLE_FUNCTIONS = frozenset(
    {operator.add, operator.sub, operator.mul, operator.truediv, torch.zeros_like, torch.ones_like, torch.full_like}
)
_COPYABLE_METHODS = frozenset({"item", "to"})


def _copyable(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _COPYABLE_METHODS
    return node.op == "call_function" and node.target in _COPYABLE_FUNCTIONS


def _is_scalar(node: torch.fx.Node) -> bool:
    value = node.meta.get("example_value")
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (bool, int, float, torch.SymBool, torch.SymInt, torch.SymFloat))


def _scalar_inputs(nodes: list[torch.fx.Node], scalars: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """The scalar-math nodes that ``nodes`` read, directly or through each other."""
    needed: set[torch.fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes if a in scalars]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(a for a in node.all_input_nodes if a in scalars)
    return needed


def compile_in_pieces(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], compile_fn: Compile) -> Any | None:
    """A callable like ``compile_fn(gm, example_inputs)``, compiled piece by piece; None where ``gm`` does not split.

    ``gm`` is a graph over plain tensors (see :func:`fxmesh.local.localize`)
    with nodes that fxmesh's lowering emitted.
    """
    leaves = _leaves(gm, example_inputs)
    split = _split(gm, leaves) if leaves is not None else None
    if split is None:
        return None
    prologue, components = split
    if len(components) < 2:
        return None
    by_key: dict[tuple[Any, ...], list[_Piece]] = {}
    for nodes in components:
        piece = _Piece(nodes, leaves)
        by_key.setdefault(piece.key(piece.build()[1]), []).append(piece)
    # A computation repeated in at least two full batches is compiled once for all of them; everything
    # else (the prologue first) is one more piece, so a step with nothing repeated stays one graph.
    rest: list[torch.fx.Node | _Lanes] = list(prologue)
    batches = []
    for same in by_key.values():
        per_piece = max(1, PIECE_NODES // len(same[0].nodes))
        full = len(same) // per_piece if len(same) >= 2 * per_piece else 0
        for b in range(full):
            # dict.fromkeys: the scalar math that several components copied, once per batch.
            nodes = dict.fromkeys(n for p in same[b * per_piece : (b + 1) * per_piece] for n in p.nodes)
            batches.append(_Piece(list(nodes), leaves))
        for piece in same[full * per_piece :]:
            rest.extend(piece.nodes)
    if not batches:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pieces = [_Piece(list(dict.fromkeys(rest)), leaves)] if rest else []
    pieces += sorted(batches, key=lambda p: order[_first_node(p.nodes)])
    compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
    calls = []
    for piece in pieces:
        piece_gm, code = piece.build()
        key = piece.key(code)
        if key not in compiled:
            compiled[key] = compile_fn(piece_gm, list(piece.values))
        calls.append((compiled[key], piece.inputs))
    counters["fxmesh"]["pieces"] += len(pieces)
    counters["fxmesh"]["piece_compiles"] += len(compiled)
    log.debug("fxmesh: %d pieces, %d compiled", len(pieces), len(compiled))
    return _Pieces(gm, calls)


class _Pieces:
    """Calls each piece's compiled graph with that piece's inputs, in order."""

    def __init__(self, gm: torch.fx.GraphModule, calls: list[tuple[Callable[..., Any], list[torch.fx.Node]]]) -> None:
        placeholders = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
        self.calls = []
        for fn, inputs in calls:
            index = [placeholders[n] for n in inputs if n in placeholders]
            attrs = tuple(operator.attrgetter(n.target)(gm) for n in inputs if n not in placeholders)
            # itemgetter of one index returns the item, not a tuple.
            pick = operator.itemgetter(*index) if len(index) > 1 else lambda args, i=tuple(index): [args[j] for j in i]
            self.calls.append((fn, pick, attrs))
        self.result = gm.graph.output_node().args[0]  # no nodes in it (see _split)

    def __call__(self, *args: Any) -> Any:
        for fn, pick, attrs in self.calls:
            fn(*pick(args), *attrs)
        return self.result
