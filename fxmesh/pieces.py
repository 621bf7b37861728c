"""Compile an optimizer step in pieces, each repeated piece once.

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

A step fxmesh does not lower (foreach or for-loop) is independent updates
too, one per parameter: its foreach calls are written one call per list
entry first (:func:`fxmesh.unroll.per_entry`), and the nodes that read the
parameters' tensors (inputs with a dimension, or written) are the components;
what runs before them (the norm and clip coefficient of clipping compiled
with the step) is the rest.  Foreach AdamW, 1000 parameters on two meshes:
196 s compiled whole, 62 s in pieces (2-core CPU, ``bench/RESULTS.md`` run Z).

Clipping compiled with the step splits too: the gradients' norm and the clip
coefficient are that first piece, which returns the coefficient (any 0-dim
value it computes that the components read) and the graph's outputs (the
norm); each component takes its entries of ``torch._foreach_mul_(grads,
coef)``, so the product stays fused into its update.  The grad-mode switches
around a ``no_grad`` function are left out where the graph ends in the mode
it started in: fxmesh runs these graphs under ``no_grad``.

A compiled graph already runs on any inputs of the metadata it was compiled
for: Dynamo's guards pin shapes, strides, dtypes and aliasing, not addresses,
and every step hands it new gradients.  Running it on another batch's tensors
is the same.  A batch's key is its computation, node by node (op, target,
arguments with inputs and earlier values by position, constants with their
type), and its inputs' shapes, strides, dtypes, devices, ``requires_grad`` and
which of them share storage.

Nothing is split (``None``) where a graph has inputs that are not tensors
(unless nothing reads them) or have symbolic sizes (Dynamo recompiled the step
for other shapes), or returns a
value the first piece does not compute; where nodes the lowering did
not emit (other than the scalar math above) read what the lowered nodes
compute, or are read by them other than as 0-dim values, or touch (or change
global state) after lowered nodes that touch the same tensors; or where
nothing repeats.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import has_free_symbols
from torch.multiprocessing.reductions import StorageWeakRef

from fxmesh.local import SHARD
from fxmesh.lowering import LOWERED_META
from fxmesh.unroll import per_entry

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


# ``x += 1`` on a tensor (a for-loop step's count) is ``operator.iadd`` in a Dynamo graph.
_IN_PLACE_OPERATORS = frozenset(
    {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow}
)


def _writes(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an in-place op (taken to write to every tensor it reads)."""
    if node.op == "call_method":
        return node.target.endswith("_")
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    if node.target in _IN_PLACE_OPERATORS:
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

    def __init__(self, node: torch.fx.Node, lanes: list[int], others: list[torch.fx.Node]) -> None:
        self.node = node
        self.lanes = lanes
        self.others = others  # the call's inputs other than its entries (see _lane_split)

    @property
    def all_input_nodes(self) -> list[torch.fx.Node]:
        return [*(self.node.args[0][i] for i in self.lanes), *self.others]

    def copy_into(self, graph: torch.fx.Graph, env: dict[torch.fx.Node, torch.fx.Node], name: str) -> None:
        args = ([env[self.node.args[0][i]] for i in self.lanes], *torch.fx.map_arg(self.node.args[1:], env.__getitem__))
        kwargs = torch.fx.map_arg(self.node.kwargs, env.__getitem__)
        graph.create_node("call_function", self.node.target, args, kwargs, name=name)


def _first_node(nodes: list[torch.fx.Node | _Lanes]) -> torch.fx.Node:
    """The first node of its own (not a foreach call's lanes) of a list of components."""
    return next(n for n in nodes if not isinstance(n, _Lanes))


# A piece's inputs: the frame's inputs, then attribute tensors, then values the prologue computed.
_INPUT_ORDER = {"placeholder": 0, "get_attr": 1}


class _Piece:
    """Some components' nodes (and foreach lanes), in graph order, and the inputs they read.

    ``sources`` holds the graph inputs and the values the prologue passes on,
    each with its example value; ``outputs`` are the values the piece returns.
    """

    def __init__(
        self,
        nodes: list[torch.fx.Node | _Lanes],
        sources: dict[torch.fx.Node, Any],
        outputs: Sequence[torch.fx.Node] = (),
    ) -> None:
        self.nodes = nodes
        own = set(nodes)
        inputs: dict[torch.fx.Node, None] = {}
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg in sources and arg not in own:
                    inputs.setdefault(arg)
        # A call passes the frame's inputs by index, attribute tensors as they were captured, and the
        # prologue's values from its results.
        self.inputs = sorted(inputs, key=lambda n: _INPUT_ORDER.get(n.op, 2))
        self.values = [sources[n] for n in self.inputs]
        self.outputs = list(outputs)

    def static_and_aligned(self, i: int) -> bool:
        """Whether input ``i`` is a static input of the step (a parameter or state) and aligned as Inductor requires."""
        from torch._inductor.utils import tensor_is_aligned

        value = self.values[i]
        static = self.inputs[i].meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
        return bool(static) and isinstance(value, torch.Tensor) and tensor_is_aligned(value)

    def build(self, like: torch.fx.GraphModule, static: set[int]) -> torch.fx.GraphModule:
        """The piece as a graph module, its inputs in :attr:`inputs` order.

        It carries the Dynamo metadata of ``like``, the graph it was split
        from, as Dynamo's DDPOptimizer passes it to the graphs it splits off
        (see AOTAutograd's Note [Assumption on Dynamo Metadata]): each input's
        source where it has one, and a static-input mark on inputs ``static``
        only.  AOTAutograd reads the marks into Inductor's static inputs.
        """
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for i, old in enumerate(self.inputs):
            new = graph.placeholder(f"input_{i}")
            new.meta.update(old.meta)
            tensor_dict = {**old.meta.get("tensor_dict", {})}
            if i not in static and tensor_dict.pop("_dynamo_static_input_type", None) is not None:
                new.meta["tensor_dict"] = tensor_dict
            new._dynamo_source = getattr(old, "_dynamo_source", None)
            env[old] = new
        for i, old in enumerate(self.nodes):
            if isinstance(old, _Lanes):
                old.copy_into(graph, env, f"v{i}")
                continue
            args = torch.fx.map_arg(old.args, env.__getitem__)
            kwargs = torch.fx.map_arg(old.kwargs, env.__getitem__)
            env[old] = graph.create_node(old.op, old.target, args, kwargs, name=f"v{i}", type_expr=old.type)
            env[old].meta.update(old.meta)
        graph.output(tuple(env[n] for n in self.outputs))
        module = torch.fx.GraphModule(torch.nn.Module(), graph)
        module.meta.update(like.meta)
        module._param_name_to_source = getattr(like, "_param_name_to_source", None) or {}
        return module

    def key(self) -> tuple[Any, ...]:
        """Equal for pieces that are the same computation on inputs of the same metadata.

        The computation is each node's op, target and arguments, with inputs
        and earlier values referred to by position (what :meth:`build` would
        print with canonical names, without building it).
        """
        position = {n: ("input", i) for i, n in enumerate(self.inputs)}
        ops = []
        for i, node in enumerate(self.nodes):
            if isinstance(node, _Lanes):
                call, entries = node.node, tuple(position[node.node.args[0][j]] for j in node.lanes)
                ops.append(("lanes", call.target, entries, *_frozen((call.args[1:], call.kwargs), position)))
                continue
            ops.append((node.op, node.target, *_frozen((node.args, node.kwargs), position)))
            position[node] = ("value", i)
        outputs = tuple(position[n] for n in self.outputs)
        storages: dict[StorageWeakRef, int] = {}
        aliases = tuple(storages.setdefault(_storage(v), i) for i, v in enumerate(self.values))
        # A local shard's mutations are hidden from autograd, a plain tensor's are not (fxmesh.local).
        kinds = tuple((_INPUT_ORDER.get(n.op, 2), bool(n.meta.get(SHARD))) for n in self.inputs)
        return tuple(ops), outputs, kinds, tuple(_metadata(v) for v in self.values), aliases


def _frozen(value: Any, position: dict[torch.fx.Node, tuple[str, int]]) -> Any:
    """``value`` (node arguments) as a hashable key: nodes by position, lists as tuples, constants as below.

    A tensor keys by identity; a constant that is hashable and equal to itself keys as itself, with its
    type (``1.0``, a dtype, a function); anything else (a ``nan``, a slice before Python 3.12) by its type
    and repr.
    """
    if isinstance(value, torch.fx.Node):
        return position[value]
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_frozen(v, position) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _frozen(v, position)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    try:
        hash(value)
        itself = value == value
    except Exception:
        itself = False
    # With its type: 1, 1.0 and True are equal and hash alike, but are not the same argument.
    return (type(value), value) if itself is True else ("repr", type(value).__name__, repr(value))


def _lane_split(node: torch.fx.Node, leaves: dict[torch.fx.Node, Any]) -> list[torch.fx.Node] | None:
    """The inputs other than its entries of ``node``, an in-place foreach call over graph inputs whose entries
    can run apart; None for any other node.

    Those other inputs are 0-dim values computed before it (the clip
    coefficient of ``torch._foreach_mul_(grads, coef)``); its other arguments
    are constants.
    """
    name = getattr(node.target, "__name__", "")
    entries = node.args[0] if node.args else None
    if not (
        node.op == "call_function"
        and name.startswith("_foreach_")
        and name.endswith("_")
        and not node.users
        and isinstance(entries, (list, tuple))
        and all(e in leaves for e in entries)
    ):
        return None
    # A set: a list membership test per input would be quadratic in the entries.
    entry_set = set(entries)
    others = [n for n in node.all_input_nodes if n not in entry_set]
    return others if all(n not in leaves and _is_scalar(n) for n in others) else None


def _leaves(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[torch.fx.Node, Any] | None:
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(placeholders) != len(example_inputs):
        return None
    # Inputs nothing reads are in no piece.  Dynamo lifts the size symbols of an input it traced
    # symbolically (automatic dynamic shapes) as inputs of their own, and once fxmesh.specialize has
    # made the sizes static no node reads them.
    leaves = {p: v for p, v in zip(placeholders, example_inputs) if p.users or isinstance(v, torch.Tensor)}
    for node in gm.graph.find_nodes(op="get_attr"):
        leaves[node] = operator.attrgetter(node.target)(gm)
    if not all(isinstance(v, torch.Tensor) for v in leaves.values()):
        return None
    return leaves


class _Split:
    """How a graph splits: the prologue, the lowered components, and what flows out of the prologue.

    ``carried`` are the 0-dim values the prologue computes and components read
    (the clip coefficient).  The graph's outputs are all prologue values too.
    """

    def __init__(self, prologue: list, components: list[list], carried: list[torch.fx.Node]) -> None:
        self.prologue = prologue
        self.components = components
        self.carried = carried


def _drops_grad_mode(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The ``_set_grad_enabled`` calls, where leaving them out changes nothing (else none of them).

    A graph that sets grad mode ends by restoring the mode Dynamo guarded on
    entry; fxmesh runs a local-shard graph, whatever its pieces, under no_grad.
    """
    calls = graph.find_nodes(op="call_function", target=torch._C._set_grad_enabled)
    if calls and calls[-1].args != (torch.is_grad_enabled(),):
        return set()
    return set(calls)


def _reduces(node: torch.fx.Node, leaves: dict[torch.fx.Node, Any]) -> bool:
    """Whether ``node`` computes only 0-dim values, from some larger tensor (a gradient's norm)."""
    inputs = [leaves[a] if a in leaves else a.meta.get("example_value") for a in node.all_input_nodes]
    outputs = torch.utils._pytree.tree_leaves(node.meta.get("example_value"))
    return (
        any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in inputs)
        and any(isinstance(v, torch.Tensor) for v in outputs)
        and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in outputs)
    )


def _update_nodes(
    calls: list[torch.fx.Node], leaves: dict[torch.fx.Node, Any], entry_leaves: set[torch.fx.Node]
) -> list[torch.fx.Node]:
    """The nodes of the per-parameter updates of a step fxmesh did not lower (foreach, one call per entry, or
    for-loop): what reads the parameters' tensors (``entry_leaves``: inputs with a dimension, or written).

    The rest runs before them: reductions of such tensors to 0-dim values (clipping's norm), what is computed
    from those and nothing of the parameters' (the clip coefficient), and whatever those read.
    """
    updates: set[torch.fx.Node] = set()
    before: set[torch.fx.Node] = set()
    for node in calls:
        inputs = node.all_input_nodes
        if _reduces(node, leaves):
            before.add(node)
        elif any(a in updates or a in entry_leaves for a in inputs):
            updates.add(node)
        elif any(a in before for a in inputs):
            before.add(node)
    stack = [a for n in before for a in n.all_input_nodes if a in updates]
    while stack:
        node = stack.pop()
        if node in updates:
            updates.remove(node)
            stack.extend(a for a in node.all_input_nodes if a in updates)
    return [n for n in calls if n in updates]


def _split(gm: torch.fx.GraphModule, leaves: dict[torch.fx.Node, Any], lowered_step: bool = True) -> _Split | None:
    """The prologue's nodes and the lowered components' nodes, or None where the graph does not split.

    ``lowered_step``: the components are the nodes fxmesh's lowering emitted;
    else (a step written one call per entry, :func:`fxmesh.unroll.per_entry`)
    the nodes :func:`_update_nodes` finds.
    An in-place foreach call over graph inputs (the step counts' increment, the
    clip coefficient's product with the gradients) goes to the components,
    each getting the entries it reads, placed before its own nodes; entries no
    lowered node reads stay in the prologue.
    """
    graph = gm.graph
    dropped = _drops_grad_mode(graph)
    calls = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output") and n not in dropped]
    # Inputs are compared by storage: two views of one tensor are one input here.
    storage = {leaf: _storage(value) for leaf, value in leaves.items()}
    written = {storage[a] for n in calls if _writes(n) for a in n.all_input_nodes if a in leaves}
    if lowered_step:
        lowered = [n for n in calls if LOWERED_META in n.meta]
    else:
        entry_leaves = {a for a, v in leaves.items() if v.dim() > 0 or storage[a] in written}
        lowered = _update_nodes(calls, leaves, entry_leaves)
    if not lowered:
        return None
    lowered_set = set(lowered)
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
    # Scalar math the prologue reads too (the clip coefficient from a total norm that is an input, as
    # where fxmesh.checks split the graph at the norm's check): computed there as well.
    prologue_scalars: set[torch.fx.Node] = set()
    stack = [a for n in calls if n not in lowered_set and n not in scalars for a in n.all_input_nodes if a in scalars]
    while stack:
        node = stack.pop()
        if node not in prologue_scalars:
            prologue_scalars.add(node)
            stack.extend(a for a in node.all_input_nodes if a in scalars)
    # 0-dim values the prologue computes and the components read: passed to each piece that reads them.
    carried: dict[torch.fx.Node, None] = {}
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
                if arg in dropped or not _is_scalar(arg):
                    return None  # reads a prologue tensor: the prologue would have to be split too
                carried.setdefault(arg)
            elif leaves[arg].dim() > 0 or storage[arg] in written:
                components.union(node, by_storage.setdefault(storage[arg], node))
    groups: dict[torch.fx.Node, list[torch.fx.Node | _Lanes]] = {}
    lanes: dict[torch.fx.Node, list[_Lanes]] = {}
    prologue: list[torch.fx.Node | _Lanes] = []
    seen: set[StorageWeakRef] = set()  # touched by the lowered nodes so far
    moved: set[StorageWeakRef] = set()  # entries that go to the components
    for node in calls:
        touched = {storage[a] for a in node.all_input_nodes if a in leaves}
        if node in lowered_set:
            seen |= touched
            continue
        if node in scalars:
            if node in prologue_scalars:
                prologue.append(node)
            continue
        if any(a in dropped for a in node.all_input_nodes):
            return None
        if any(a in lowered_set for a in node.all_input_nodes):
            return None  # a value of the lowered nodes: keep the graph whole
        others = _lane_split(node, leaves)
        if others is not None:
            by_root: dict[torch.fx.Node, list[int]] = {}
            for i, entry in enumerate(node.args[0]):
                if storage[entry] in by_storage:
                    by_root.setdefault(components.find(by_storage[storage[entry]]), []).append(i)
            for root, idx in by_root.items():
                lanes.setdefault(root, []).append(_Lanes(node, idx, others))
            moving = {storage[node.args[0][i]] for idx in by_root.values() for i in idx}
            if moving & seen:
                return None  # a lowered node read the entry before this call
            if by_root:
                carried.update(dict.fromkeys(a for a in others if a not in leaves))
            kept = [i for i, entry in enumerate(node.args[0]) if storage[entry] not in moving]
            # The prologue runs before the moved entries' new place, so nothing after this call in it
            # may touch them (prologue nodes before it ran before it anyway).
            moved |= moving
            touched = {storage[node.args[0][i]] for i in kept}
            if kept:
                prologue.append(_Lanes(node, kept, others))
        elif not node.all_input_nodes:
            return None  # global state: keep the graph whole
        else:
            prologue.append(node)
        # The prologue runs first: it must not touch what lowered nodes before it touched, nor entries
        # moved to the components before it.
        if touched & (seen | moved):
            return None
    outputs = graph.output_node().all_input_nodes
    prologue_nodes = {n for n in prologue if not isinstance(n, _Lanes)}
    if any(n not in prologue_nodes and n not in leaves for n in outputs):
        return None  # returns a value the prologue does not compute
    for node in lowered:
        groups.setdefault(components.find(node), []).append(node)
    order = {n: i for i, n in enumerate(calls)}
    return _Split(
        prologue,
        [
            [*lanes.get(root, []), *sorted(_scalar_inputs(nodes, scalars), key=order.__getitem__), *nodes]
            for root, nodes in groups.items()
        ],
        list(carried),
    )


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

    ``gm`` is a graph over plain tensors (see :func:`fxmesh.local.localize`):
    a step fxmesh lowered, or a foreach or for-loop step.
    """
    lowered_step = any(LOWERED_META in n.meta for n in gm.graph.nodes)
    if not lowered_step:
        gm = per_entry(gm)
        if gm is None:
            return None
    leaves = _leaves(gm, example_inputs)
    split = _split(gm, leaves, lowered_step) if leaves is not None else None
    if split is None or len(split.components) < 2:
        return None
    sources = {**leaves, **{n: n.meta.get("example_value") for n in split.carried}}
    if not all(isinstance(sources[n], torch.Tensor) for n in split.carried):
        return None
    if any(has_free_symbols(v) for v in sources.values()):
        # Dynamo makes sizes symbolic when it recompiles a frame for other shapes (a second optimizer),
        # and then the parameters' and states' example values have them: keep such a graph whole.
        log.debug("fxmesh: compiling whole: an input has symbolic sizes")
        return None
    by_key: dict[tuple[Any, ...], list[_Piece]] = {}
    for nodes in split.components:
        piece = _Piece(nodes, sources)
        by_key.setdefault(piece.key(), []).append(piece)
    # A computation repeated in at least two full batches is compiled once for all of them; everything
    # else (the prologue first) is one more piece, so a step with nothing repeated stays one graph.
    rest: list[torch.fx.Node | _Lanes] = list(split.prologue)
    batches = []
    for same in by_key.values():
        per_piece = max(1, PIECE_NODES // len(same[0].nodes))
        full = len(same) // per_piece if len(same) >= 2 * per_piece else 0
        for b in range(full):
            # dict.fromkeys: the scalar math that several components copied, once per batch.
            nodes = dict.fromkeys(n for p in same[b * per_piece : (b + 1) * per_piece] for n in p.nodes)
            batches.append(_Piece(list(nodes), sources))
        for piece in same[full * per_piece :]:
            rest.extend(piece.nodes)
    if not batches:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    graph_outputs = _computed_outputs(gm)
    # The first piece (the prologue, then the components that do not repeat) returns what the others
    # read of it and the graph's outputs.
    first = [_Piece(list(dict.fromkeys(rest)), sources, [*split.carried, *graph_outputs])] if rest else []
    pieces = first + sorted(batches, key=lambda p: order[_first_node(p.nodes)])
    keys = [piece.key() for piece in pieces]
    same: dict[tuple[Any, ...], list[_Piece]] = {}
    for key, piece in zip(keys, pieces):
        same.setdefault(key, []).append(piece)
    compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
    calls = []
    for key, piece in zip(keys, pieces):
        if key not in compiled:
            # An input is static, as the step's parameters and states are in a graph compiled whole, where
            # it is in every piece this compile serves: Inductor then checks its alignment once, on the
            # example, instead of on every call (on a GPU, a data_ptr() read per input per call).
            static = {i for i in range(len(piece.inputs)) if all(p.static_and_aligned(i) for p in same[key])}
            compiled[key] = compile_fn(piece.build(gm, static), list(piece.values))
        calls.append((compiled[key], piece.inputs))
    counters["fxmesh"]["pieces"] += len(pieces)
    counters["fxmesh"]["piece_compiles"] += len(compiled)
    log.debug("fxmesh: %d pieces, %d compiled", len(pieces), len(compiled))
    return _Pieces(gm, calls, split.carried if first else [])


class _Pieces:
    """Calls each piece's compiled graph with that piece's inputs, in order.

    Where the first piece computes values for the others (``carried``), it
    returns them, then the graph's outputs.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        calls: list[tuple[Callable[..., Any], list[torch.fx.Node]]],
        carried: list[torch.fx.Node],
    ) -> None:
        placeholders = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
        position = {n: i for i, n in enumerate(carried)}
        entries = []
        for fn, inputs in calls:
            index = [placeholders[n] for n in inputs if n in placeholders]
            attrs = tuple(operator.attrgetter(n.target)(gm) for n in inputs if n.op == "get_attr")
            # itemgetter of one index returns the item, not a tuple.
            pick = operator.itemgetter(*index) if len(index) > 1 else lambda args, i=tuple(index): [args[j] for j in i]
            passed = [position[n] for n in inputs if n in position]
            entries.append((fn, pick, attrs, (lambda out, i=tuple(passed): [out[j] for j in i]) if passed else None))
        self.first, *self.rest = entries
        output = gm.graph.output_node()
        self.output_spec = output.args[0]
        self.returns_values = bool(output.all_input_nodes)
        # The graph's outputs are the first piece's results after the carried values (see _split), or
        # its inputs as they came (a total norm computed before the graph, where fxmesh.checks split it).
        self.output_position = {n: len(carried) + i for i, n in enumerate(_computed_outputs(gm))}
        self.output_inputs = {n: placeholders[n] for n in output.all_input_nodes if n in placeholders}
        self.output_attrs = {n: operator.attrgetter(n.target)(gm) for n in output.all_input_nodes if n.op == "get_attr"}

    def __call__(self, *args: Any) -> Any:
        fn, pick, attrs, _ = self.first
        out = fn(*pick(args), *attrs)
        for fn, pick, attrs, passed in self.rest:
            fn(*pick(args), *attrs, *(passed(out) if passed else ()))
        if not self.returns_values:
            return self.output_spec  # holds no values
        return torch.fx.map_arg(self.output_spec, lambda n: self._output(n, args, out))

    def _output(self, n: torch.fx.Node, args: tuple[Any, ...], out: Sequence[Any]) -> Any:
        if n in self.output_position:
            return out[self.output_position[n]]
        return args[self.output_inputs[n]] if n in self.output_inputs else self.output_attrs[n]


def _computed_outputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's outputs that are not its inputs or attributes: the first piece returns them."""
    return [n for n in gm.graph.output_node().all_input_nodes if n.op not in ("placeholder", "get_attr")]
