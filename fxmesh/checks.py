"""Host-side checks inside an fxmesh graph: the graph is split there and the check runs between the parts.

``torch.nn.utils.clip_grad_norm_(..., error_if_nonfinite=True)`` raises before
it scales a gradient when the total norm is not finite.  Its check is a
data-dependent branch, so Dynamo breaks the graph there, and a break inside
the clipping function fxmesh traces in place of torch's (:mod:`fxmesh.clip`)
becomes a break at the user's call: Dynamo then runs torch's own clipping,
which fails across meshes.  Under fxmesh the check is traced as one node,
``fxmesh::finite_norm``, and the backend compiles the graph before it and the
graph after it separately, running the check on the host in between, as eager
does: nothing after it (the gradients' scaling, the optimizer step, its step
counts) runs when the norm is not finite.  Compiled as one graph the node
would be an op like any other, and Inductor may order an update that does not
read the norm (a step count) before it.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from fxmesh import clip

__all__ = ["SplitAtCheck", "find_check", "keeping_grad_mode", "split_at_check"]

# The check ops, each with what runs between the parts, called with the op's arguments.
CHECKS: dict[Any, Callable[..., None]] = {torch.ops.fxmesh.finite_norm: clip.raise_if_nonfinite}

# Nodes that read the graph's inputs without computing: copied into the second part
# rather than passed from the first, so that its inputs do not alias one another.
_COPYABLE = frozenset({("call_method", "to_local"), ("call_function", operator.getitem), ("call_function", getattr)})
# Context managers Dynamo records as calls; a check inside one is not split (grad mode is).
_CONTEXT_CALLS = frozenset({torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast})


def _check_of(node: torch.fx.Node) -> Callable[..., None] | None:
    if node.op != "call_function":
        return None
    return CHECKS.get(getattr(node.target, "overloadpacket", node.target))


def find_check(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The graph's first check node, or None."""
    return next((n for n in gm.graph.nodes if _check_of(n) is not None), None)


class SplitAtCheck:
    """A graph split at its first check.

    ``before`` takes the graph's inputs and returns the checked value, the
    other values ``after`` reads (carried), then the values the graph returns
    as ``before`` computed them; ``after`` takes the graph's inputs at
    ``after_inputs``, then the carried values (the checked value standing for
    the check's result, which is its input), and returns the graph's outputs
    it computes.  ``outputs`` says where each of the graph's outputs comes
    from: ``("input", i)``, ``("before", i)`` or ``("after", i)``.
    """

    def __init__(
        self,
        before: torch.fx.GraphModule,
        after: torch.fx.GraphModule,
        after_inputs: list[int],
        carried_examples: list[torch.Tensor],
        output_spec: Any,
        outputs: dict[torch.fx.Node, tuple[str, int]],
        check: Callable[..., None],
        check_args: tuple[Any, ...],
    ) -> None:
        self.before = before
        self.after = after
        self.after_inputs = after_inputs
        self.carried_examples = carried_examples
        self.output_spec = output_spec
        self.outputs = outputs
        self.check = check
        self.check_args = check_args

    def compile(self, example_inputs: Sequence[Any], compile_fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compile both parts with ``compile_fn(gm, example_inputs)``; returns the graph's replacement."""
        before = compile_fn(self.before, list(example_inputs))
        after = compile_fn(self.after, [*(example_inputs[i] for i in self.after_inputs), *self.carried_examples])
        after_inputs, carried = self.after_inputs, len(self.carried_examples)
        check, check_args = self.check, self.check_args
        spec, outputs = self.output_spec, self.outputs

        def run(*args: Any) -> Any:
            first = before(*args)
            check(first[0], *check_args)
            values = {
                "input": args,
                "before": first,
                "after": after(*[args[i] for i in after_inputs], *first[:carried]),
            }
            return torch.fx.map_arg(spec, lambda n: values[outputs[n][0]][outputs[n][1]])

        return keeping_grad_mode(run)


def keeping_grad_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the grad mode it was called in restored when it raises.

    A graph that raises half-way through (at a check, run eagerly or between
    two parts) has not run its last ``_set_grad_enabled``.
    """

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        mode = torch.is_grad_enabled()
        try:
            return fn(*args)
        except BaseException:
            torch._C._set_grad_enabled(mode)
            raise

    return run


def _example_like(value: Any) -> torch.Tensor | None:
    """A real tensor laid out like the traced plain tensor ``value`` (an input of the second part), or None."""
    if type(value) is not torch._subclasses.fake_tensor.FakeTensor or value._is_view() or value.requires_grad:
        return None
    if any(isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride())):
        return None
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)


def split_at_check(gm: torch.fx.GraphModule, check_node: torch.fx.Node) -> SplitAtCheck | str:
    """Split ``gm`` at ``check_node``; returns the split, or why it cannot be split."""
    nodes = list(gm.graph.nodes)
    at = nodes.index(check_node)
    first, second = nodes[:at], nodes[at + 1 :]
    if any(n.op == "call_function" and n.target in _CONTEXT_CALLS for n in nodes):
        return "the check sits in an autocast region"
    checked = check_node.args[0] if check_node.args else None
    if check_node.kwargs or not isinstance(checked, torch.fx.Node):
        return f"unexpected arguments of {check_node.format_node()}"
    if any(isinstance(a, torch.fx.Node) for a in check_node.args[1:]):
        return f"a traced argument of {check_node.format_node()}"
    if _example_like(checked.meta.get("example_value")) is None or checked.op == "placeholder":
        return f"{checked.format_node()} is not a plain tensor the graph computes"
    position = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}

    # What the second part reads from the first: the graph's inputs (passed again), nodes that only
    # read them (copied), and values computed there (carried over, the checked value first).
    inputs: set[torch.fx.Node] = set()
    copies: set[torch.fx.Node] = set()
    carried: list[torch.fx.Node] = [checked]

    def classify(n: torch.fx.Node) -> str | None:
        if position[n] >= at or n in inputs or n in copies or n in carried:
            return None
        if n.op == "placeholder":
            inputs.add(n)
        elif n.op == "get_attr" or (n.op, n.target) in _COPYABLE:
            copies.add(n)
            for arg in n.all_input_nodes:
                if (why := classify(arg)) is not None:
                    return why
        elif isinstance(value := n.meta.get("example_value"), torch.Tensor) and _example_like(value) is not None:
            carried.append(n)
        else:
            return f"{n.format_node()} is needed after the check and is not a plain tensor made before it"
        return None

    output = second[-1]
    for n in second[:-1]:
        for arg in n.all_input_nodes:
            if (why := classify(arg)) is not None:
                return why
    # The graph's outputs: its inputs as they came, what the first part computed (the norm, a value
    # before the check) as the first part returns it, the rest from the second part.
    returned = [n for n in dict.fromkeys(output.all_input_nodes) if position[n] < at and n.op != "placeholder"]
    made_after = [n for n in dict.fromkeys(output.all_input_nodes) if position[n] > at]
    outputs = {n: ("input", index[n]) for n in output.all_input_nodes if n.op == "placeholder"}
    outputs.update({n: ("before", len(carried) + i) for i, n in enumerate(returned)})
    outputs.update({n: ("after", i) for i, n in enumerate(made_after)})
    outputs[check_node] = ("before", 0)

    after = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    after_inputs = [index[n] for n in placeholders if n in inputs]
    for n in placeholders:
        if n in inputs:
            env[n] = after.node_copy(n)
            env[n]._dynamo_source = getattr(n, "_dynamo_source", None)
    for n in carried:
        env[n] = after.placeholder(f"{n.name}_carried")
        env[n].meta = dict(n.meta)
        env[n]._dynamo_source = None
    env[check_node] = env[checked]  # the check returns its input
    # Dynamo guarded grad mode on entry; the first part ends with it restored, the second restarts from it.
    entry_mode = torch.is_grad_enabled()
    mode_at_check = entry_mode
    for n in first:
        if n.op == "call_function" and n.target is torch._C._set_grad_enabled:
            mode_at_check = bool(n.args[0])
    if mode_at_check != entry_mode:
        after.call_function(torch._C._set_grad_enabled, (mode_at_check,))
    for n in first:
        if n in copies:
            env[n] = after.node_copy(n, env.__getitem__)
    for n in second[:-1]:
        env[n] = after.node_copy(n, env.__getitem__)
    after.output(tuple(env[n] for n in made_after))

    before = torch.fx.Graph()
    benv: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in first:
        benv[n] = before.node_copy(n, benv.__getitem__)
        if n.op == "placeholder":
            benv[n]._dynamo_source = getattr(n, "_dynamo_source", None)
    if mode_at_check != entry_mode:
        before.call_function(torch._C._set_grad_enabled, (entry_mode,))
    before.output(tuple(benv[n] for n in (*carried, *returned)))
    return SplitAtCheck(
        _module(gm, before),
        _module(gm, after),
        after_inputs,
        [_example_like(n.meta["example_value"]) for n in carried],
        output.args[0],
        outputs,
        _check_of(check_node),
        tuple(check_node.args[1:]),
    )


def _module(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A part of Dynamo's graph, with the metadata AOT reads from Dynamo's graphs (a carried value has no source).

    No dead-code elimination: FX counts torch's in-place functions (``_foreach_mul_``) as pure.
    """
    module = torch.fx.GraphModule(gm, graph)
    module.meta = dict(gm.meta)
    module._param_name_to_source = getattr(gm, "_param_name_to_source", None)
    return module
