"""What the lowering passes share: walking fused calls, checking entries, and the kernels' number types.

A lowering pass replaces each fused optimizer call with pointwise torch ops
traced onto the graph through :class:`torch.fx.Proxy`; :func:`lower_fused_calls`
does the walk, the checks, the example values of the new nodes and the
bookkeeping, and calls the pass's ``emit`` for the math of one call.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
import torch.fx
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor
from torch.fx.experimental.symbolic_shapes import guard_bool
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.proxy import GraphAppendingTracer, Proxy

from fxmesh.errors import EagerFallback, UnsupportedInputError
from fxmesh.fused_ops import FusedOp, bind, fused_op
from fxmesh.meshes import (
    example_value,
    graph_fake_mode,
    local_tensor,
    propagate_example_value,
    redistributed_like,
    source_name,
)

__all__ = [
    "OPMATH",
    "TABLE_ROWS",
    "Emit",
    "LOWERED_META",
    "Hyper",
    "check_entry",
    "divided",
    "float64_source",
    "grad_prologue",
    "laid_out_like_each",
    "local",
    "lower_fused_calls",
    "materialized",
    "one_minus",
    "round_to",
    "rounded",
    "scalar",
    "stack_scalars",
    "symbolic_float_as_tensor",
    "table_groups",
    "upcast",
    "with_weight_decay",
    "write_back",
]

log = logging.getLogger(__name__)

# The type the fused kernels compute in, per parameter dtype.
OPMATH = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}

# emit(op, args, proxy): trace one call's math; ``args`` as bound by
# :func:`fxmesh.fused_ops.bind`, ``proxy`` wraps a node (other values pass through).
Emit = Callable[[FusedOp, dict[str, Any], Callable[[Any], Any]], None]

# Parameters per materialized scalar table.  One table per call made every
# update depend on every step count and read one buffer, and Inductor's
# scheduler (ancestor sets, pairwise fusion attempts among a buffer's readers)
# grew quadratically with the parameters; one kernel computes each table.
TABLE_ROWS = 16


# Node metadata naming the fused call a lowered node was emitted for.
LOWERED_META = "fxmesh_lowered_from"

# A hyperparameter as the emitters get it: a constant float, or a 0-dim tensor
# (a tensor lr, or a float that Dynamo made symbolic, as a float64 tensor).
Hyper = float | Proxy


def round_to(x: float, dtype: torch.dtype) -> float:
    """``x`` as a C++ kernel holding it in ``dtype`` sees it (round to nearest)."""
    return torch.tensor(x, dtype=torch.float64).to(dtype).item()


def rounded(x: Hyper, dtype: torch.dtype) -> Hyper:
    """:func:`round_to` for a float; a tensor cast to ``dtype``."""
    return x.to(dtype) if isinstance(x, Proxy) else round_to(x, dtype)


def scalar(x: Hyper, dtype: torch.dtype) -> Hyper:
    """``x`` as an operand of ``dtype`` math: a float as it is (Inductor rounds a constant to the
    op's type), a tensor cast to ``dtype`` (the same value)."""
    return x.to(dtype) if isinstance(x, Proxy) else x


def divided(numerator: Hyper, denominator: Proxy) -> Proxy:
    """``numerator / denominator`` as one division, as the kernels compute it.

    ``float / tensor`` is ``denominator.reciprocal() * float`` in PyTorch: two
    roundings, and one ulp off the kernels' quotient now and then.
    """
    if not isinstance(numerator, Proxy):
        numerator = torch.full_like(denominator, numerator)
    return numerator / denominator


def one_minus(x: Hyper, dtype: torch.dtype) -> Hyper:
    """``1 - x`` computed in ``x``'s own type (float64 for a float or a symbolic float), then rounded to ``dtype``."""
    return (1 - x).to(dtype) if isinstance(x, Proxy) else round_to(1 - x, dtype)


def _is_dtensor(t: Proxy) -> bool:
    return isinstance(example_value(t.node), DTensor)


def local(t: Proxy) -> Proxy:
    """The local tensor of a DTensor-valued proxy (plain ones as they are), with its example value."""
    value = example_value(t.node)
    if not isinstance(value, DTensor):
        return t
    out = t.to_local()
    propagate_example_value(out.node, value._local_tensor.fake_mode)  # for the math traced after it
    return out


def materialized(t: Proxy, stride: list[int]) -> Proxy:
    """``t`` (of contiguous ``stride``), computed into its own buffer by Inductor, not inlined into its readers.

    ``prims.inductor_force_stride_order`` is Inductor's own "this layout, copy if
    needed" op: an unrealized pointwise value has no layout yet, so Inductor
    realizes it.  Eagerly and under fake tensors it returns its input.  ``t``
    must have at least 2 elements (Inductor leaves 1-element values alone).
    """
    return torch.ops.prims.inductor_force_stride_order.default(t, stride)


def stack_scalars(values: list[Proxy], device: torch.device) -> Proxy:
    """``torch.stack`` of 0-dim values, written as a chain of ``where`` on a row index.

    On the CPU Inductor lowers every ``stack``/``cat`` to a concat buffer whose
    inputs are views into it, and its Python wrapper builds one view per input
    on every call: about 1 us per parameter for a table of steps.  As
    pointwise math the rows are read straight into the table's kernel.
    """
    # Built through the tracer: torch.arange of Python values would run eagerly.
    rows = values[0].tracer.create_proxy("call_function", torch.arange, (len(values),), {"device": device})
    out = values[0].expand(len(values))
    for i, value in enumerate(values[1:], start=1):
        out = torch.where(rows == i, value, out)
    return out


def upcast(t: Proxy, opmath: torch.dtype) -> Proxy:
    return t if example_value(t.node).dtype == opmath else t.to(opmath)


def grad_prologue(
    param: Proxy,
    grad: Proxy,
    *,
    laid_out: Proxy,
    opmath: torch.dtype,
    grad_scale: Proxy | None,
    maximize: bool,
    weight_decay: Hyper,
) -> tuple[Proxy, Proxy, list[tuple[Proxy, Proxy]]]:
    """The fused kernels' common start: param and grad in ``opmath``, the grad unscaled by
    ``grad_scale`` (and written back: returned as an output), negated for ``maximize``, plus
    ``param * weight_decay`` (L2; a tensor ``weight_decay`` must be in ``opmath``, and where it is
    0 the grad stays as it is, as the kernels skip the term).  ``laid_out`` is ``grad`` laid out
    like ``param`` (:func:`laid_out_like_each`).  Returns (param, grad, outputs)."""
    p = upcast(param, opmath)
    g = upcast(laid_out, opmath)
    outputs = []
    if grad_scale is not None:
        scale = grad_scale.to(opmath)
        g = g / scale
        if laid_out is grad:
            outputs.append((grad, g))
        else:
            # Written back in the gradient's own placements: each rank's own part (of a Partial
            # one, say), unscaled on the local tensors; as DTensor math the write-back would
            # reduce the part again.
            part = local(grad)
            outputs.append((part, upcast(part, opmath) / local(grad_scale).to(opmath)))
    if maximize:
        g = -g
    g = with_weight_decay(g, lambda: g + p * weight_decay, weight_decay)
    return p, g, outputs


def laid_out_like_each(grads: list[Proxy], params: list[Proxy]) -> list[Proxy]:
    """Each gradient redistributed to its parameter's placements where they differ (a gradient still
    ``Partial`` over ``tp``, or sharded on another dimension), else the gradient itself.

    Eager's fused op redistributes such a gradient once, before its kernel.  The
    lowered math would redistribute it in every op that reads it with a
    parameter or a state (each AdamW gradient four times: four all-reduces
    where one does).  The gradients themselves keep their placements, as
    eagerly.  The redistributions are traced next to each other, before the
    math: :func:`fxmesh.local.localize` all-reduces such a run of them as one
    buffer.
    """
    laid_out = []
    for grad, param in zip(grads, params):
        g, p = example_value(grad.node), example_value(param.node)
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            grad = grad.tracer.create_proxy("call_function", redistributed_like, (grad, param), {})
            propagate_example_value(grad.node, g._local_tensor.fake_mode)  # what the math after it reads
        laid_out.append(grad)
    return laid_out


def with_weight_decay(x: Proxy, decayed: Callable[[], Proxy], weight_decay: Hyper) -> Proxy:
    """``decayed()`` where ``weight_decay`` is not 0, else ``x``: the kernels skip the decay term for 0.

    A constant decides here; a tensor (a decay a scheduler changes) per call, in the graph.
    """
    if isinstance(weight_decay, Proxy):
        return torch.where(weight_decay != 0, decayed(), x)
    return decayed() if weight_decay != 0 else x


def write_back(outputs: list[tuple[Proxy, Proxy]], found_inf: Proxy | None) -> None:
    """``dst.copy_(new)`` for each pair, after all the math; with ``found_inf == 1`` every ``dst`` keeps its value."""
    if found_inf is not None:
        skip = local_skip = found_inf == 1.0
        if _is_dtensor(found_inf) and not all(_is_dtensor(dst) for dst, _ in outputs):
            # A gradient's part written back on its local tensor (see grad_prologue) takes a local flag.
            local_skip = local(found_inf) == 1.0
        outputs = [(dst, torch.where(skip if _is_dtensor(dst) else local_skip, dst, new)) for dst, new in outputs]
    for dst, new in outputs:
        dst.copy_(new)


def check_entry(op_name: str, i: int, name: str, node: torch.fx.Node, scalar_lists: tuple[str, ...] = ()) -> None:
    """Refuse, naming the parameter, entries the fused kernel does not take."""
    value = example_value(node)
    if value is None:
        raise UnsupportedInputError(f"fused {op_name}: {name}[{i}] ({source_name(node)}) has no example value")
    if value.layout != torch.strided:
        raise UnsupportedInputError(
            f"fused {op_name}: parameter {i}: {name} has layout {value.layout}; "
            "the fused kernel takes dense (strided) tensors only"
        )
    if name not in scalar_lists and value.dtype not in OPMATH:
        raise UnsupportedInputError(
            f"fused {op_name}: parameter {i}: {name} has dtype {value.dtype}; "
            f"the fused kernel takes {', '.join(map(str, OPMATH))}"
        )


def float64_source(value: torch.fx.Node) -> torch.fx.Node | None:
    """The 0-dim float64 tensor a symbolic float is read from with ``.item()``, or None."""
    source = value.args[0] if value.op == "call_method" and value.target == "item" else None
    t = example_value(source) if isinstance(source, torch.fx.Node) else None
    return source if isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == torch.float64 else None


def symbolic_float_as_tensor(
    graph: torch.fx.Graph, node: torch.fx.Node, source: torch.fx.Node, value: torch.fx.Node, fake_mode: Any
) -> torch.fx.Node:
    """A float64 tensor holding a float hyperparameter that Dynamo made symbolic.

    When a scheduler changes a float lr (or OneCycleLR a beta) every step,
    Dynamo recompiles once and then passes the float as a 0-dim float64 tensor
    that the graph reads with ``.item()``.  AOT's ``tensorify_python_scalars``
    must turn every such symbolic float back into tensor math, or it
    specializes it (and every new value recompiles); it does that for
    ``tensor + float``.  So the lowering gets ``zeros_like(source) + value``:
    exactly the float, in float64.
    """
    with graph.inserting_before(node):
        zeros = graph.call_function(torch.zeros_like, (source,))
        tensor = graph.call_function(operator.add, (zeros, value))
    propagate_example_value(zeros, fake_mode)
    propagate_example_value(tensor, fake_mode)
    return tensor


def _is_symbolic_int(value: torch.fx.Node) -> bool:
    return isinstance(example_value(value), torch.SymInt)


def _symbolic_int_as_tensor(
    graph: torch.fx.Graph, node: torch.fx.Node, value: torch.fx.Node, fake_mode: Any
) -> torch.fx.Node:
    """A float64 tensor holding an int hyperparameter that Dynamo made symbolic.

    torch.optim's defaults are ints in places (``Adam(weight_decay=0)``,
    ``SGD(momentum=0)``); where one optimizer has the int and another a float, or
    two have different ints, Dynamo recompiles the shared step code with the int
    as a graph input.  The fused kernel takes it as a double.
    """
    with graph.inserting_before(node):
        tensor = graph.call_function(torch.scalar_tensor, (value,), {"dtype": torch.float64})
    propagate_example_value(tensor, fake_mode)
    return tensor


def _layout(node: torch.fx.Node) -> tuple[Any, ...] | None:
    value = example_value(node)
    local = local_tensor(value)
    if not all(isinstance(d, int) for d in (*local.shape, *local.stride())):
        return None
    return tuple(local.shape), local.stride(), str(local.dtype)


def table_groups(params: list[torch.fx.Node]) -> list[list[int]]:
    """The parameters' indices in runs of at most :data:`TABLE_ROWS` that never mix local layouts.

    One scalar table per run; with the lists ordered by layout (see
    :func:`lower_fused_calls`), parameters of one layout make runs that are the
    same computation, which :mod:`fxmesh.pieces` compiles once.
    """
    groups: list[list[int]] = []
    previous = object()
    for i, param in enumerate(params):
        layout = _layout(param)
        if not groups or len(groups[-1]) == TABLE_ROWS or layout != previous:
            groups.append([])
        groups[-1].append(i)
        previous = layout
    return groups


def _order_by_layout(op: FusedOp, args: dict[str, Any]) -> bool:
    """Reorder the call's lists so that parameters of one local shape and dtype are next to each other.

    Each parameter's update is independent of the others', so the order is
    free; sorted, the scalar tables group parameters of one layout, and
    :mod:`fxmesh.pieces` compiles such groups once.  False (lists left as they
    are) where a parameter has symbolic sizes.
    """
    layouts = [_layout(p) for p in args[op.list_args[0]]]
    if None in layouts:
        return False
    order = sorted(range(len(layouts)), key=layouts.__getitem__)
    for name in op.list_args:
        if args[name]:
            args[name] = [args[name][i] for i in order]
    return True


def lower_fused_calls(
    gm: torch.fx.GraphModule,
    op_names: tuple[str, ...],
    emit: Emit,
    scalar_lists: tuple[str, ...] = (),
    tensor_hyperparameters: tuple[str, ...] = ("lr",),
) -> PassResult:
    """Replace every fused call whose op is in ``op_names`` by what ``emit`` traces, in its place.

    A hyperparameter in ``tensor_hyperparameters`` that Dynamo made a symbolic
    float or int reaches ``emit`` as a 0-dim float64 tensor (see
    :func:`symbolic_float_as_tensor`, :func:`_symbolic_int_as_tensor`); a
    symbolic bool is guarded to its value; any other symbolic number makes the
    graph run eagerly.
    """
    graph = gm.graph
    tracer = GraphAppendingTracer(graph)
    fake_mode = None
    modified = False
    warned = False

    def proxy(n: Any) -> Any:
        return Proxy(n, tracer) if isinstance(n, torch.fx.Node) else n

    for node in list(graph.nodes):
        op = fused_op(node)
        if op is None or op.name not in op_names:
            continue
        args = bind(node, op)
        for name in op.list_args:
            for i, entry in enumerate(args[name]):
                check_entry(op.name, i, name, entry, scalar_lists)
        if not _order_by_layout(op, args) and not warned:
            # Parameters keep their shapes, so symbolic sizes only cost compile time, and a lot of it: DTensor's
            # sharding propagation caches nothing for them, and the step compiles whole (fxmesh.pieces).
            log.warning(
                "fxmesh: fused %s: Dynamo traced the parameters with symbolic sizes (automatic dynamic shapes: "
                "this code was compiled before for other shapes, as for another optimizer), which compiles "
                "several times slower; torch.compile(..., dynamic=False) keeps them static (a float lr that "
                "changes every step then recompiles every step: make it a tensor)",
                op.name,
            )
            warned = True
        fake_mode = fake_mode or graph_fake_mode(gm)
        symbolic = {}
        for name, value in args.items():
            if isinstance(value, torch.fx.Node) and isinstance(example_value(value), torch.SymBool):
                # A flag computed from a symbolic number (fused SGD's is_first_step, ``not momentum == 0``, once
                # the momentum is symbolic; torch 2.15 keeps it symbolic): guarded to its value, as an ``if`` on
                # it would be. Two values at most, so at most one recompile.
                args[name] = guard_bool(example_value(value))
            elif isinstance(value, torch.fx.Node) and not isinstance(example_value(value), torch.Tensor):
                source = float64_source(value) if name in tensor_hyperparameters else None
                if source is None and not (name in tensor_hyperparameters and _is_symbolic_int(value)):
                    raise EagerFallback(
                        f"fused {op.name}: {name} is a symbolic number (Dynamo made it dynamic after it changed "
                        "between compiles); fxmesh lowers constant hyperparameters, a tensor lr, and a symbolic "
                        f"{', '.join(tensor_hyperparameters)} that is an int or a float Dynamo reads from a tensor"
                    )
                symbolic[name] = source
        for name, source in symbolic.items():
            if source is None:
                args[name] = _symbolic_int_as_tensor(graph, node, args[name], fake_mode)
            else:
                args[name] = symbolic_float_as_tensor(graph, node, source, args[name], fake_mode)
        before = node.prev
        with graph.inserting_before(node):
            emit(op, args, proxy)
        cursor = before.next
        while cursor is not node:
            propagate_example_value(cursor, fake_mode)
            cursor.meta[LOWERED_META] = node.name
            cursor = cursor.next
        graph.erase_node(node)
        counters["fxmesh"]["lowered_nodes"] += 1
        modified = True
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
