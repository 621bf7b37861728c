"""Give parameters, gradients and optimizer state back their static sizes.

Dynamo traces some optimizer tensors with symbolic sizes although they never
change shape: automatic dynamic shapes does it to every size of torch.optim's
shared step code once a second optimizer of other shapes compiles it.  (A
gradient that holds a view, FSDP2's, would be traced with symbolic sizes even
under ``dynamic=False``; :mod:`fxmesh.capture` has Dynamo trace those as it
traces any input, so they reach this pass static unless automatic dynamic
shapes made them symbolic.)  Symbolic sizes cost fxmesh a lot
and buy nothing there: DTensor's sharding propagation caches nothing for them,
the step cannot be compiled in pieces keyed by shape (:mod:`fxmesh.pieces`),
and Inductor must keep its per-input size asserts (measured in
``bench/RESULTS.md``).

:func:`specialize_sizes` guards every such size to its value, the way a
backend specializes a symbol it cannot compile generically (Dynamo installs
the guards the backend adds to the shape environment), and re-traces the
graph's example values with static fake tensors, so that every later pass
sees a static graph.  Another optimizer's shapes then fail the guard and
compile their own graph, as under ``dynamic=False``; a float hyperparameter
that Dynamo made symbolic stays symbolic (it is no size).

It leaves the graph as it is where a symbol is not a fixed optimizer size:
one on any other input (a batch's length), one ``mark_dynamic`` asked for,
an unbacked one, or every size under ``torch.compile(dynamic=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorConverter
from torch.fx.experimental.symbolic_shapes import free_symbols, free_unbacked_symbols, guard_int
from torch.multiprocessing.reductions import StorageWeakRef

from fxmesh.meshes import example_value, graph_fake_mode, local_tensor

__all__ = ["marked_dynamic", "specialize_sizes"]

log = logging.getLogger(__name__)


def specialize_sizes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Make the symbolic sizes of the graph's parameters, gradients and optimizer state static.

    Returns whether it did; then every size, stride and storage offset of the
    graph's example values is an int, and the shape environment holds a guard
    for each symbol it replaced.
    """
    tracing = torch._guards.TracingContext.try_get()
    if tracing is None or not torch._dynamo.config.assume_static_by_default:
        return False
    reals = _real_tensors(gm, example_inputs)
    symbols = {node: free_symbols(_sizes(example_value(node))) for node in reals}
    # A size whose symbol is already guarded to a number (by this pass, on another part of the frame's
    # graph: fxmesh.checks) has no free symbol left, but is still a SymInt to every later pass.
    symbolic = {node for node in reals if any(isinstance(s, torch.SymInt) for s in _sizes(example_value(node)))}
    if not symbolic:
        return False
    # The mode the graph's values were traced under (the context may hold a fresh one for the backend).
    fake_mode = graph_fake_mode(gm)
    sizes = set().union(*(symbols[node] for node in symbolic))
    # Dynamo passes a size the graph reads as a number (``p.numel()``) as an int placeholder of its own.
    size_inputs = [
        node
        for node in gm.graph.find_nodes(op="placeholder")
        if isinstance(example_value(node), torch.SymInt) and free_symbols(example_value(node)) <= sizes
    ]
    reason = _why_not(gm, reals, symbolic, {*symbolic, *size_inputs}, sizes, tracing)
    if reason:
        log.debug("fxmesh: keeping symbolic sizes: %s", reason)
        return False
    # The tensors that share storage with a symbolic one are faked again with
    # it, so that the new fake tensors alias as the real ones do.
    storages = {_storage(reals[node]) for node in symbolic}
    refaked = [node for node, real in reals.items() if node in symbolic or _storage(real) in storages]
    try:
        converter = FakeTensorConverter()  # Dynamo's would hand back the symbolic fakes it memoized
        seeds = {node: converter.from_real_tensor(fake_mode, reals[node]) for node in refaked}
        seeds.update((node, int(example_value(node).node.hint)) for node in size_inputs)
        values = _retrace(gm, fake_mode, seeds)
    except Exception as e:  # noqa: BLE001 - any failure keeps the graph as Dynamo traced it
        log.info("fxmesh: keeping symbolic sizes: tracing the graph with static sizes failed: %s", e)
        return False
    for node in symbolic:
        for size in _sizes(example_value(node)):
            guard_int(size)
    for node, value in values.items():
        node.meta["example_value"] = value
    return True


def marked_dynamic(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> torch.fx.Node | None:
    """The first input of the graph with a size ``torch._dynamo.mark_dynamic`` made symbolic, or None."""
    tracing = torch._guards.TracingContext.try_get()
    return None if tracing is None else _marked_dynamic(_real_tensors(gm, example_inputs), tracing)


def _marked_dynamic(
    reals: dict[torch.fx.Node, torch.Tensor], tracing: torch._guards.TracingContext
) -> torch.fx.Node | None:
    # Automatic dynamic shapes leaves a warn-only constraint; mark_dynamic a strict one.
    for node, real in reals.items():
        for constraint in _constraints(tracing.tensor_to_context.get(real)):
            if constraint is not None and not getattr(constraint, "warn_only", False):
                return node
    return None


def _real_tensors(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[torch.fx.Node, torch.Tensor]:
    """The real tensor behind each tensor placeholder and attribute of the graph."""
    reals = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
    for node in gm.graph.find_nodes(op="get_attr"):
        reals[node] = torch.fx.graph_module._get_attr(gm, node.target)
    return {
        node: real
        for node, real in reals.items()
        if isinstance(real, torch.Tensor) and isinstance(example_value(node), torch.Tensor)
    }


def _why_not(
    gm: torch.fx.GraphModule,
    reals: dict[torch.fx.Node, torch.Tensor],
    symbolic: set[torch.fx.Node],
    specialized: set[torch.fx.Node],
    sizes: set[Any],
    tracing: torch._guards.TracingContext,
) -> str | None:
    """Why the graph's symbolic sizes must stay symbolic, or None."""
    marked = _marked_dynamic(reals, tracing)
    if marked is not None:
        return f"{marked.name} was marked dynamic"
    grads = {id(real.grad) for real in reals.values() if isinstance(real, torch.nn.Parameter)}
    for node in symbolic:
        real = reals[node]
        # Dynamo installs only static-address tensors (parameters, optimizer state) as attributes.
        fixed = node.op == "get_attr" or isinstance(real, torch.nn.Parameter) or id(real) in grads
        if not (fixed or hasattr(real, "_dynamo_static_input_type")):
            return f"{node.name} is neither a parameter, a gradient nor optimizer state"
        if free_unbacked_symbols(_sizes(example_value(node))):
            return f"{node.name} has a data-dependent size"
    for node in gm.graph.find_nodes(op="placeholder"):
        if node not in specialized and free_symbols(example_value(node)) & sizes:
            return f"{node.name} shares a symbol with a parameter's size"
    return None


def _retrace(gm: torch.fx.GraphModule, fake_mode: Any, seeds: dict[torch.fx.Node, Any]) -> dict[torch.fx.Node, Any]:
    """New example values: ``seeds``' for their nodes, and recomputed for every node that reads one of them.

    Nodes that read none of them keep theirs: a symbolic float hyperparameter
    is read off a tensor with ``.item()``, which a fake tensor cannot redo.
    Grad-mode switches run as they come, as when Dynamo traced them.
    """
    values = dict(seeds)
    env: dict[torch.fx.Node, Any] = {}
    grad_enabled = torch.is_grad_enabled()
    try:
        with fake_mode:
            for node in gm.graph.nodes:
                if node in values:
                    env[node] = values[node]
                    continue
                switch = node.op == "call_function" and node.target is torch._C._set_grad_enabled
                if node.op == "output" or not (switch or any(n in values for n in node.all_input_nodes)):
                    env[node] = example_value(node)
                    continue
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                if node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    raise NotImplementedError(f"{node.op} {node.name}")
                if not switch:
                    values[node] = env[node]
    finally:
        torch._C._set_grad_enabled(grad_enabled)
    return {node: value for node, value in values.items() if "example_value" in node.meta}


def _sizes(value: Any) -> list[Any]:
    """Every size, stride and storage offset of a tensor, and of a DTensor's local tensor."""
    if not isinstance(value, torch.Tensor):
        return []
    local = local_tensor(value)
    return [*value.shape, *value.stride(), *local.shape, *local.stride(), local.storage_offset()]


def _storage(real: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(local_tensor(real).untyped_storage())


def _constraints(context: Any) -> Iterator[Any]:
    """The size and stride constraints of a symbolic context and of its inner tensors' (a DTensor's)."""
    if context is None:
        return
    yield from getattr(context, "constraint_sizes", None) or ()
    yield from getattr(context, "constraint_strides", None) or ()
    for inner in (getattr(context, "inner_contexts", None) or {}).values():
        yield from _constraints(inner)
