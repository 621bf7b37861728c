"""Reduce a ``Partial`` input once, before the math that reads it.

Under tensor parallelism a weight replicated over ``tp`` (a norm's, a bias)
gets a gradient that is still a ``Partial`` sum when the step runs.  DTensor
keeps it ``Partial`` through linear ops and reduces whatever it became where
it meets a parameter or a state: a foreach AdamW step reduces each gradient's
derived values twice and the gradient once, three all-reduces where one does,
and the graph cannot run on the local shards (:mod:`fxmesh.local` takes no
math on ``Partial`` values).  The fused lowerings reduce once themselves
(:func:`fxmesh.lowering.laid_out_like_each`); this pass does the same for what
is left.

For an input ``Partial`` on some mesh dims, follow the values that stay
``Partial`` on them through the ops that read the input after the last op that
writes to it (clipping scales each rank's part in place): every such path must
end in an op whose DTensor results are no longer ``Partial`` there, so DTensor
reduced on it (not in an in-place write into a ``Partial`` state, where it
reduces nothing), and none may reach the graph's outputs, a ``to_local`` or a
``redistribute`` (which would see the placements).  Then those ops read the
input reduced on those dims (:func:`fxmesh.meshes.partial_reduced`) instead,
and the example values of the ops whose inputs' placements changed are
computed again.  The values are the same: a ``Partial`` DTensor and its
reduction are one logical tensor, and an in-place op keeps its destination's
placements.  The reductions are placed next to each other where they can be,
where :mod:`fxmesh.local` all-reduces them as one buffer.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils._pytree import tree_leaves

from fxmesh.local import input_writers, is_redistribution, is_to_local
from fxmesh.meshes import example_value, graph_fake_mode, partial_reduced, propagate_example_value

__all__ = ["reduce_partial_reads"]

log = logging.getLogger(__name__)


def _dtensors(node: torch.fx.Node) -> list[DTensor]:
    return [v for v in tree_leaves(example_value(node)) if isinstance(v, DTensor)]


def _placements(value: object) -> list[object]:
    return [v.placements for v in tree_leaves(value) if isinstance(v, DTensor)]


def _partial_on(node: torch.fx.Node, dims: set[int]) -> bool:
    return any(p.is_partial() and d in dims for v in _dtensors(node) for d, p in enumerate(v.placements))


def _reduced_here(node: torch.fx.Node, dims: set[int]) -> bool | None:
    """Whether a path through ``node`` (a value computed from a Partial input) ends well on ``dims``: True where
    DTensor reduced there, False where it reaches something that sees placements or local parts, or stays
    Partial in a dead end; None where that depends on ``node``'s users."""
    if node.op not in ("call_function", "call_method") or is_to_local(node) or is_redistribution(node):
        return False
    if node.target is getattr:
        return node.args[1] == "device_mesh"
    if not _partial_on(node, dims):
        # Reduced here, or a list entry that never was Partial; a plain value read off a Partial one
        # (.item(), a size): leave it.
        return bool(_dtensors(node)) or node.target is operator.getitem
    if not node.users:
        return False  # left Partial: written into a Partial state, say, where DTensor reduces nothing
    return None


def _reduced_downstream(dims: set[int]) -> Callable[[list[torch.fx.Node]], bool]:
    """A test of readers: whether DTensor reduces on ``dims`` every value they compute that stays ``Partial``
    there, before it reaches anything that sees placements or local parts.

    The verdict of each node is kept, so the inputs one foreach op reads (whose
    paths run through the same list ops and their entries) cost one walk in all,
    not one walk each.
    """
    verdicts: dict[torch.fx.Node, bool] = {}

    def verdict(root: torch.fx.Node) -> bool:
        stack = [root]
        while stack:  # depth first, a node decided after its users
            node = stack[-1]
            if node in verdicts:
                stack.pop()
                continue
            here = _reduced_here(node, dims)
            if here is None:
                undecided = [u for u in node.users if u not in verdicts]
                if undecided:
                    stack.extend(undecided)
                    continue
                here = all(verdicts[u] for u in node.users)
            verdicts[node] = here
            stack.pop()
        return verdicts[root]

    return lambda readers: all(verdict(r) for r in readers)


def reduce_partial_reads(gm: torch.fx.GraphModule) -> PassResult:
    """Read each ``Partial`` input through one reduction where DTensor reduces everything computed from it."""
    graph = gm.graph
    partial = {}
    for node in [*graph.find_nodes(op="placeholder"), *graph.find_nodes(op="get_attr")]:
        value = example_value(node)
        # Not an input autograd differentiates through: its reduction's backward would differ.
        if isinstance(value, DTensor) and not value.requires_grad:
            dims = {d for d, p in enumerate(value.placements) if p.is_partial()}
            if dims:
                partial[node] = dims
    if not partial:
        return PassResult(gm, False)
    order = {n: i for i, n in enumerate(graph.nodes)}
    writers = input_writers(gm)
    reduced_downstream: dict[frozenset[int], Callable[[list[torch.fx.Node]], bool]] = {}
    targets: dict[torch.fx.Node, tuple[list[torch.fx.Node], int]] = {}
    for node, dims in partial.items():
        ready = max(order[n] for n in [node, *writers.get(node, [])])  # defined, and last written
        readers = sorted((u for u in node.users if order[u] > ready), key=order.__getitem__)
        test = reduced_downstream.setdefault(frozenset(dims), _reduced_downstream(dims))
        if readers and test(readers):
            targets[node] = (readers, ready)
    if not targets:
        return PassResult(gm, False)
    fake_mode = graph_fake_mode(gm)
    saved = {n: n.meta.get("example_value") for n in graph.nodes}
    outputs = graph.output_node().all_input_nodes
    first = min((readers[0] for readers, _ in targets.values()), key=order.__getitem__)
    reductions = {}
    for node, (readers, ready) in targets.items():
        # Before the first reader of any such input (they are then next to each other), or of its own
        # where the input is defined or written only after that one.
        with graph.inserting_before(first if ready < order[first] else readers[0]):
            reductions[node] = graph.call_function(partial_reduced, (node,))
        for reader in readers:
            reader.replace_input_with(node, reductions[node])
    try:
        with torch.no_grad():
            # Again for the reductions and every op that reads a value whose placements changed: the rewrite changes
            # placements only, and only up to where DTensor reduced.
            changed = set(reductions.values())
            for node in graph.nodes:
                if node in changed:
                    propagate_example_value(node, fake_mode)
                # Tensor values only: the graph's grad-mode switches and the like stay unrun.
                elif node.op in ("call_function", "call_method") and not changed.isdisjoint(node.all_input_nodes):
                    if any(isinstance(v, torch.Tensor) for v in tree_leaves(saved[node])):
                        propagate_example_value(node, fake_mode)
                        if _placements(example_value(node)) != _placements(saved[node]):
                            changed.add(node)
        # The paths never reach the outputs, so nothing there may change.
        altered = [n.name for n in outputs if _placements(example_value(n)) != _placements(saved[n])]
        if altered:
            raise ValueError(f"the outputs {altered} would change")
    except Exception as e:  # the graph as it was: the rewrite only saves collectives
        log.warning("fxmesh: Partial inputs left to DTensor: %s", e)
        for node, reduced in reductions.items():
            reduced.replace_all_uses_with(node)
            graph.erase_node(reduced)
        for node, value in saved.items():
            node.meta["example_value"] = value
        return PassResult(gm, False)
    counters["fxmesh"]["partial_inputs_reduced"] += len(reductions)
    graph.lint()
    gm.recompile()
    return PassResult(gm, True)
