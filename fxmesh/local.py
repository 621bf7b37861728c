"""Compile a mesh-local graph over the DTensors' local shards.

After fxmesh's passes an optimizer step is elementwise math: every op reads and
writes DTensors of one layout (mesh, placements, global shape), or 0-dim
replicated scalars beside them.  On each rank that is exactly the same math on
the local shards.  Handed to AOTAutograd as it is, every DTensor is a tensor
subclass: AOT traces through the subclass at compile time, and on every call
flattens each DTensor into its local tensor and its mesh in Python (about 0.4 us
per DTensor; 4,000 DTensors for 1,000 AdamW parameters).

:func:`localize` rewrites such a graph to take the local tensors: DTensor
placeholders and the DTensor attributes Dynamo installs for parameters and
optimizer state become plain-tensor placeholders, ``replicate``/``to_local``
glue disappears, and :class:`LocalShards` passes ``t._local_tensor`` for each
DTensor at call time.  The local tensor is read on every call, never captured,
so a DTensor whose local tensor is replaced is still updated where it lives.

A graph qualifies only if every node that touches a DTensor is in a fixed
vocabulary of elementwise ops (fused optimizer calls among them: each updates
a parameter from its own entries) and its DTensors share one layout; a DTensor
collective or redistribution, a reduction, a view, a random op or a DTensor
output keeps the graph on the DTensor path (collectives on plain local tensors,
as ``fxmesh.clip`` issues them, do not touch a DTensor and are left alone).
One redistribution is taken: a reduction of a ``Partial`` gradient to
``Replicate`` (the lowering's, :func:`fxmesh.lowering.laid_out_like_each`, and
fxmesh.clip's, for the norm) becomes DTensor's own functional all-reduce on
the local tensor, and a run of such reductions one all-reduce of one buffer.
A ``Partial`` input is taken where only such reductions and ``to_local`` read
it (clipping scales each rank's part in place).
Nothing here guesses whether an op is local.  The backend also keeps graphs
that record autograd on DTensors: the gradient of ``to_local`` needs the
DTensor.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_leaves

from fxmesh.fused_ops import bind, fused_op
from fxmesh.meshes import example_value, partial_reduced, redistributed_like, replicate

__all__ = [
    "SHARD",
    "LocalGraph",
    "LocalShards",
    "hide_shard_mutations",
    "input_writers",
    "is_redistribution",
    "is_to_local",
    "localize",
    "op_name",
]

log = logging.getLogger(__name__)

_ELEMENTWISE_FUNCTIONS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.neg,
        operator.pow,
        operator.eq,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.lerp,
        torch.where,
        torch.maximum,
        torch.minimum,
        torch.sqrt,
        torch.rsqrt,
        torch.pow,
        torch.abs,
        torch.neg,
        torch.reciprocal,
        torch.sign,
        torch.addcmul,
        torch.addcdiv,
        torch.clamp,
        torch.full_like,
        torch.empty_like,
        torch.zeros_like,
        torch.ones_like,
    }
)
_ELEMENTWISE_METHODS = frozenset(
    {
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "neg_",
        "sqrt", "sqrt_", "rsqrt", "lerp", "lerp_", "addcmul", "addcmul_", "addcdiv", "addcdiv_",
        "abs", "sign", "reciprocal", "maximum", "clamp", "clamp_", "pow", "pow_",
        "copy_", "zero_", "fill_", "clone", "detach", "to",
    }
)  # fmt: skip
# Every other torch._foreach_* op is elementwise per list entry.
_REDUCING_FOREACH = frozenset({"_foreach_norm", "_foreach_max"})


@dataclasses.dataclass(frozen=True)
class LocalShards:
    """Calls a graph compiled over local shards with the local tensors of its DTensor inputs.

    ``compiled`` takes the lifted DTensor attributes' local tensors first, then
    the frame's inputs, DTensors among them replaced by their local tensors.
    The DTensors the graph mutates get their version counters bumped, as an
    eager in-place DTensor op bumps them, so autograd still notices the
    update.  Their local tensors' counters stay where they were, as eager
    leaves them (:func:`hide_shard_mutations` tells AOT so).
    """

    lifted: tuple[DTensor, ...]
    dtensor_inputs: tuple[int, ...]
    mutated_lifted: tuple[DTensor, ...]
    mutated_inputs: tuple[int, ...]
    compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        local_args = [t._local_tensor for t in self.lifted]
        local_args.extend(args)
        offset = len(self.lifted)
        for i in self.dtensor_inputs:
            local_args[offset + i] = args[i]._local_tensor
        out = self.compiled(*local_args)
        torch.autograd.graph.increment_version([*self.mutated_lifted, *(args[i] for i in self.mutated_inputs)])
        return out


@dataclasses.dataclass(frozen=True)
class LocalGraph:
    """A graph rewritten to compute on local shards, and how to call it with the frame's inputs."""

    gm: torch.fx.GraphModule
    example_inputs: list[Any]
    shards: LocalShards

    def wrap(self, compiled: Callable[..., Any]) -> LocalShards:
        """The frame's callable around ``compiled``, the compiled form of :attr:`gm`."""
        return dataclasses.replace(self.shards, compiled=compiled)


def is_to_local(node: torch.fx.Node) -> bool:
    """``DTensor.to_local``: a method call, or (torch 2.11) a function Dynamo names ``prim_to_local``."""
    if node.op == "call_method":
        return node.target == "to_local"
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "prim_to_local"


def _is_glue(node: torch.fx.Node) -> bool:
    """fxmesh's scalar-to-DTensor ``replicate`` or a ``to_local``: nothing on the local shards."""
    return node.target is replicate or is_to_local(node)


def _is_elementwise(node: torch.fx.Node) -> bool:
    """Elementwise per list entry: a fused optimizer call updates each parameter from its own entries."""
    if fused_op(node) is not None:
        return True
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return torch.Tag.pointwise in node.target.tags
    if node.target in _ELEMENTWISE_FUNCTIONS:
        return True
    name = op_name(node)
    return name.startswith("_foreach_") and name not in _REDUCING_FOREACH


def op_name(node: torch.fx.Node) -> str:
    """The name of the torch function a node calls, or "" (an fxmesh.ops stand-in names the op it stands for)."""
    target = getattr(node.target, "wrapped_op", node.target)
    name = getattr(target, "__name__", "")
    return name if getattr(torch, name, None) is target else ""


def _same_layout(a: DTensor, b: DTensor) -> bool:
    """Whether ``a`` and ``b`` are split across ranks alike; symbolic sizes must be provably equal."""
    return (
        a.device_mesh == b.device_mesh
        and a.placements == b.placements
        and a.device == b.device
        and getattr(a._spec, "shard_order", None) == getattr(b._spec, "shard_order", None)
        and a.dim() == b.dim()
        and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))
    )


def _is_replicated_scalar(t: DTensor) -> bool:
    return t.dim() == 0 and all(isinstance(p, Replicate) for p in t.placements)


def _lanes(node: torch.fx.Node) -> list[list[Any]]:
    """The values that meet elementwise in ``node``: a lane per list entry of foreach and fused ops; [] if lists differ.

    A fused optimizer call's empty lists (``max_exp_avg_sqs`` without amsgrad) are in no lane.
    """

    def value(a: Any) -> Any:
        return example_value(a) if isinstance(a, torch.fx.Node) else a

    op = fused_op(node)
    if op is not None:
        bound = bind(node, op)
        operands = [bound[name] for name in op.list_args if bound[name]]
        operands += [bound.get(name) for name in op.scalar_tensor_args]
    else:
        operands = [*node.args, *node.kwargs.values()]
    lists = [[value(x) for x in a] for a in operands if isinstance(a, (list, tuple))]
    single = [value(a) for a in operands if not isinstance(a, (list, tuple))]
    out = example_value(node)
    if isinstance(out, (list, tuple)):
        lists.append(list(out))
    else:
        single.append(out)
    if not lists:
        return [single]
    if any(len(entries) != len(lists[0]) for entries in lists):
        return []
    return [[*single, *entries] for entries in zip(*lists)]


def _local_math_refusal(node: torch.fx.Node) -> str | None:
    """Why ``node``'s DTensor math differs from the same op on local shards, or None if it does not."""
    if not _is_elementwise(node):
        return f"{node.format_node()} is not an elementwise op fxmesh knows"
    lanes = _lanes(node)
    if not lanes:
        return f"{node.format_node()} has lists of different lengths"
    for lane in lanes:
        dtensors = [v for v in lane if isinstance(v, DTensor)]
        full = [v for v in dtensors if not _is_replicated_scalar(v)]
        if any(not _same_layout(v, full[0]) for v in full[1:]) or any(
            v.device_mesh != dtensors[0].device_mesh for v in dtensors[1:]
        ):
            return f"{node.format_node()} mixes DTensor layouts"
        if any(isinstance(p, Partial) for v in dtensors for p in v.placements):
            return f"{node.format_node()} reads a Partial DTensor"
    return None


def is_redistribution(node: torch.fx.Node) -> bool:
    """fxmesh's ``redistributed_like`` or ``partial_reduced``, or ``DTensor.redistribute``: a method
    call, or (torch 2.11) a function Dynamo names ``prim_redistribute``."""
    if node.op == "call_method":
        return node.target == "redistribute"
    return node.op == "call_function" and (
        node.target in (redistributed_like, partial_reduced)
        or getattr(node.target, "__name__", "") == "prim_redistribute"
    )


def _local_reduction(node: torch.fx.Node) -> tuple[tuple[str, str], ...] | None:
    """For a redistribution that only reduces ``Partial`` mesh dims to ``Replicate``, in the input's
    dtype: the (reduce op, process group name) of each such dim, in mesh-dim order; None for any
    other node."""
    if not is_redistribution(node):
        return None
    src, dst = example_value(node.args[0]), example_value(node)
    if not isinstance(src, DTensor) or not isinstance(dst, DTensor) or src.device_mesh != dst.device_mesh:
        return None
    if src.dtype != dst.dtype:  # redistribute(forward_dtype=...) reduces in another dtype
        return None
    reductions = []
    for dim, (a, b) in enumerate(zip(src.placements, dst.placements)):
        if a == b:
            continue
        if not (isinstance(a, Partial) and isinstance(b, Replicate)):
            return None
        reductions.append((a.reduce_op, src.device_mesh.get_group(dim).group_name))
    return tuple(reductions)


def _all_reduced(local: torch.Tensor, reductions: tuple[tuple[str, str], ...]) -> torch.Tensor:
    """What ``redistributed_like`` does to a local shard when it only reduces Partial dims
    (see :func:`_local_reduction`): DTensor's own functional all-reduce, one per dim."""
    for reduce_op, group_name in reductions:
        local = torch.ops._c10d_functional.wait_tensor(
            torch.ops._c10d_functional.all_reduce(local, reduce_op, group_name)
        )
    return local


def _all_reduced_together(locals_: list[torch.Tensor], reductions: tuple[tuple[str, str], ...]) -> list[torch.Tensor]:
    """:func:`_all_reduced` of each tensor (one dtype), as one all-reduce per dim of one flat buffer."""
    flat = _all_reduced(torch.cat([t.reshape(-1) for t in locals_]), reductions)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in locals_]), locals_)]


# The most bytes one bucket of reductions holds: past that the buffer's copy costs more memory than
# the latency it saves (DDP's buckets hold 25 MiB).
BUCKET_BYTES = 64 * 2**20


def _bucket_reductions(graph: torch.fx.Graph) -> int:
    """Replace each run of adjacent :func:`_all_reduced` nodes over the same groups, of one dtype and
    device, with one :func:`_all_reduced_together`; returns the number of runs replaced.

    Such runs are what the lowering (:func:`fxmesh.lowering.laid_out_like_each`)
    and fxmesh.clip trace for Partial gradients.  A Partial gradient is often a
    small one (a norm's weight, a bias), and an all-reduce of a few hundred
    bytes costs its latency, not its bytes; eager issues one per gradient.
    Nothing runs between the nodes of a run, so every input is ready where the
    run starts and the order of collectives is the same on every rank.  A run
    holds at most :data:`BUCKET_BYTES`.
    """

    def key(node: torch.fx.Node) -> tuple[Any, ...] | None:
        if node.target is not _all_reduced:
            return None
        value = example_value(node.args[0])
        return node.args[1], value.dtype, value.device

    def nbytes(node: torch.fx.Node) -> int:
        local = example_value(node.args[0])._local_tensor
        size = local.numel() * local.element_size()
        return size if isinstance(size, int) else BUCKET_BYTES + 1  # a symbolic size goes alone

    runs: list[list[torch.fx.Node]] = []
    run_bytes = 0
    for node in graph.nodes:
        k = key(node)
        if k is None:
            continue
        size = nbytes(node)
        if (
            runs
            and node.prev is runs[-1][-1]
            and key(runs[-1][-1]) == k
            and node.args[0] not in runs[-1]
            and run_bytes + size <= BUCKET_BYTES
        ):
            runs[-1].append(node)
            run_bytes += size
        else:
            runs.append([node])
            run_bytes = size
    runs = [run for run in runs if len(run) > 1]
    for run in runs:
        with graph.inserting_before(run[0]):
            bucket = graph.call_function(_all_reduced_together, ([n.args[0] for n in run], run[0].args[1]))
            bucket.meta = {**run[0].meta, "example_value": [example_value(n) for n in run]}
            for i, node in enumerate(run):
                part = graph.call_function(operator.getitem, (bucket, i))
                part.meta = dict(node.meta)
                node.replace_all_uses_with(part)
        for node in run:
            graph.erase_node(node)
    return len(runs)


def _refusal(gm: torch.fx.GraphModule) -> str | None:
    """Why ``gm`` cannot run on local shards, or None if it can."""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            value = example_value(node)
            if isinstance(value, DTensor) and any(isinstance(p, Partial) for p in value.placements):
                # Fine where nothing computes with the DTensor: it is reduced (as the lowering and
                # fxmesh.clip reduce a Partial gradient) or taken apart (clipping scales each rank's part).
                if not node.users or any(
                    _local_reduction(user) is None and not is_to_local(user) for user in node.users
                ):
                    return f"input {node.name} is a Partial DTensor"
            continue
        if node.op == "output":
            if any(isinstance(example_value(a), DTensor) for a in node.all_input_nodes):
                return "the graph returns a DTensor"
            continue
        values = [example_value(a) for a in node.all_input_nodes]
        values.append(example_value(node))
        if not any(isinstance(v, DTensor) for v in tree_leaves(values)):
            continue
        if node.target is getattr and node.args[1] == "device_mesh":
            if any(user.target is not replicate for user in node.users):
                return f"{node.format_node()} is used outside fxmesh's scalar glue"
            continue
        if _is_glue(node) or _local_reduction(node) is not None:
            continue
        if node.target is operator.getitem and isinstance(example_value(node.args[0]), (list, tuple)):
            continue
        reason = _local_math_refusal(node)
        if reason is not None:
            return reason
    return None


# Methods in the vocabulary whose result may share the input's memory.
_ALIASING_METHODS = frozenset({"detach", "to", "to_local"})


def input_writers(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """The in-place ops that write to each placeholder and get_attr node, directly or through an
    alias, in graph order (inputs nothing writes to are left out)."""
    writers: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        op = fused_op(node)
        if op is not None:
            # The kernels write the gradients only to unscale them.
            bound = bind(node, op)
            written = [n for n in op.list_args if n != "state_steps" and (n != "grads" or bound.get("grad_scale"))]
            targets = [t for name in written for t in bound[name]]
        elif node.op == "call_method" and node.target.endswith("_"):
            targets = [node.args[0]]
        elif node.op == "call_function" and op_name(node).endswith("_"):
            first = node.args[0] if node.args else None
            targets = list(first) if isinstance(first, (list, tuple)) else [first]
        else:
            continue
        for t in targets:
            while isinstance(t, torch.fx.Node) and (
                (t.op == "call_method" and t.target in _ALIASING_METHODS) or is_to_local(t)
            ):
                t = t.args[0]
            if isinstance(t, torch.fx.Node) and t.op in ("placeholder", "get_attr"):
                if node not in writers.setdefault(t, []):
                    writers[t].append(node)
    return writers


def _as_local(value: Any) -> Any:
    if isinstance(value, DTensor):
        return value._local_tensor
    if isinstance(value, (list, tuple)):
        return type(value)(_as_local(v) for v in value)
    return value


# Placeholder meta of a local graph: the input is a DTensor's local tensor.
SHARD = "fxmesh_local_shard"


@torch.fx.node.has_side_effect
def _hide_mutations_from_autograd(*shards: Any) -> None:
    """At AOT's trace: count every mutation so far of these functional tensors as hidden from autograd."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    for t in shards:
        if not isinstance(t, FunctionalTensor):
            continue  # run outside AOT's functionalization: nothing to record
        for _ in range(torch._functionalize_mutation_counter(t.elem)):
            if torch._functionalize_are_all_mutations_hidden_from_autograd(t.elem):
                break
            torch._functionalize_mark_mutation_hidden_from_autograd(t.elem)


# Inductor's config entry that lets AOTAutograd's cache keep graphs calling it; the value keys
# the cache entries, so it changes whenever the function's behaviour does.
HIDE_CACHEABLE = {f"{__name__}.{_hide_mutations_from_autograd.__name__}": "1"}


def hide_shard_mutations(gm: torch.fx.GraphModule) -> bool:
    """Make AOTAutograd leave the version counters of the local shards ``gm`` mutates alone; True if any.

    An eager in-place op on a DTensor bumps the DTensor's version counter, not
    its local tensor's (torch 2.11-2.14), and :class:`LocalShards` bumps the
    DTensors'.  AOT would bump each mutated graph input's counter on every
    call as well: a second counter per updated tensor (3,000 at 1,000 AdamW
    parameters), which eager never moves.  Appends, in place, a node that
    marks the mutations of the :data:`SHARD` placeholders hidden from autograd
    while AOT traces the graph (as it marks a Triton kernel's); the node
    traces to nothing.  Plain-tensor inputs (step counts) keep AOT's bump, as
    eager bumps them.  (Under ``compiler="aot_eager"`` AOT applies input
    mutations after the graph with ``copy_``, which bumps them all anyway.)
    """
    shards = [p for p in gm.graph.find_nodes(op="placeholder") if p.meta.get(SHARD)]
    if not shards or gm.graph.find_nodes(op="call_function", target=_hide_mutations_from_autograd):
        return False
    with gm.graph.inserting_before(gm.graph.output_node()):
        gm.graph.call_function(_hide_mutations_from_autograd, tuple(shards))
    gm.recompile()
    return True


_DYNAMO_GM_ATTRIBUTES = ("_backend_id", "compile_subgraph_reason", "_source_to_user_stacks")


def localize(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> LocalGraph | None:
    """``gm`` rewritten to compute on local shards, or None when its DTensor math must stay on DTensors.

    ``gm`` itself is not changed: Dynamo reads its placeholders after the
    backend returns.  The reason for None is logged at debug level.
    """
    reason = _refusal(gm)
    if reason is not None:
        log.debug("fxmesh: compiling over DTensors: %s", reason)
        return None
    attrs = {n.target: operator.attrgetter(n.target)(gm) for n in gm.graph.find_nodes(op="get_attr")}
    dtensor_attrs = {target: value for target, value in attrs.items() if isinstance(value, DTensor)}
    dtensor_inputs = [i for i, x in enumerate(example_inputs) if isinstance(x, DTensor)]
    if not dtensor_attrs and not dtensor_inputs:
        return None
    mutated = input_writers(gm)  # the inputs an in-place op writes to
    mutated_inputs = [i for i, p in enumerate(gm.graph.find_nodes(op="placeholder")) if p in mutated]

    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    shard_inputs = set(dtensor_inputs)
    for i, old in enumerate(gm.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            env[old]._dynamo_source = old._dynamo_source
        if i in shard_inputs:
            env[old].meta[SHARD] = True
    sources = dict(getattr(gm, "_param_name_to_source", None) or {})
    lifted: dict[str, torch.fx.Node] = {}
    first = next(iter(graph.nodes))
    for old in gm.graph.find_nodes(op="get_attr"):
        if old.target not in dtensor_attrs:
            continue
        if old.target not in lifted:
            with graph.inserting_before(first):
                placeholder = graph.placeholder(old.target.replace(".", "_"))
            # What AOT reads off a Dynamo placeholder: the source (for its
            # duplicate-input guards) and, like the attribute it replaces, a
            # static address (for CUDA graphs).
            placeholder._dynamo_source = sources.pop(old.target, None)
            placeholder.meta["tensor_dict"] = {"_dynamo_static_input_type": "guarded"}
            placeholder.meta["example_value"] = example_value(old)
            placeholder.meta[SHARD] = True
            lifted[old.target] = placeholder
        env[old].replace_all_uses_with(lifted[old.target])
        graph.erase_node(env[old])
    for node in list(graph.nodes):
        if _is_glue(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif (reductions := _local_reduction(node)) is not None:
            node.op, node.target = "call_function", _all_reduced
            node.args, node.kwargs = (node.args[0], reductions), {}
    for node in list(graph.nodes):
        if node.target is getattr and not node.users:
            graph.erase_node(node)
    counters["fxmesh"]["reduction_buckets"] += _bucket_reductions(graph)
    for node in graph.nodes:
        for key in ("example_value", "val"):
            if key in node.meta:
                node.meta[key] = _as_local(node.meta[key])
    graph.lint()

    local_gm = torch.fx.GraphModule(gm, graph)
    local_gm.meta.update(gm.meta)
    local_gm._param_name_to_source = sources
    for name in _DYNAMO_GM_ATTRIBUTES:
        if hasattr(gm, name):
            setattr(local_gm, name, getattr(gm, name))
    mutated_targets = {n.target for n in mutated if n.op == "get_attr"}
    return LocalGraph(
        gm=local_gm,
        example_inputs=[*(example_value(p) for p in lifted.values()), *map(_as_local, example_inputs)],
        shards=LocalShards(
            lifted=tuple(dtensor_attrs[t] for t in lifted),
            dtensor_inputs=tuple(dtensor_inputs),
            mutated_lifted=tuple(dtensor_attrs[t] for t in lifted if t in mutated_targets),
            mutated_inputs=tuple(i for i in mutated_inputs if i in shard_inputs),
        ),
    )
