"""Let Dynamo trace torch.optim's fused functions, only for frames fxmesh compiles.

Dynamo's ``TorchPatcher`` wraps ``torch.optim.<name>._fused_<name>`` in
``torch.compiler.disable`` the first time anything compiles, so a fused
optimizer step always graph-breaks and runs eagerly.  fxmesh needs the fused
call in the graph to split and lower it.

:func:`install` wraps two of Dynamo's call handlers, and both act only while
the frame being traced is compiled by an fxmesh backend:

- calls to disabled functions: a fused optimizer function whose op fxmesh can
  lower is inlined (the original, reached through the wrapper, which is also
  what Dynamo guards on, so later calls do not recompile), and so is the
  functional ``adam``/``adamw``/``sgd``/``adagrad`` API with ``fused=True``,
  which torch.optim disables under compile when the state steps are on CUDA;
- calls to ``torch._fused_{adam,adamw,sgd,adagrad}_`` (in-graph functions, or
  skipped ones as ``_fused_adagrad_`` is on torch 2.11): recorded as the
  mesh-aware stand-ins of :mod:`fxmesh.ops`, which Dynamo's fake-tensor run
  accepts across meshes with a tensor ``lr`` (and, for SGD and Adagrad, at
  all: DTensor has no sharding rule for their fused ops).

- calls to ``torch._foreach_*`` whose tensor lists hold DTensors on several
  meshes beside plain tensors (the foreach optimizers' step counts and bias
  corrections, the clip coefficient): recorded as
  :func:`fxmesh.ops.foreach_per_mesh` stand-ins, which run the op once per mesh
  with the plain tensors made mesh-local, unless Dynamo has its own rewrite
  of the call (``_foreach_lerp_`` with a tensor weight: tensor betas), whose
  calls come back here;
- ``torch.nn.utils.get_total_norm`` and ``clip_grads_with_norm_`` (which
  ``clip_grad_norm_`` calls): traced as fxmesh's own (:mod:`fxmesh.clip`) when
  the gradients span several meshes;
- the ``torch._dynamo.graph_break()`` calls with which torch.optim's
  ``_use_grad_for_differentiable`` fences every step, where the step is called
  from a user function being compiled: skipped, so that a train step that clips
  and then steps is one graph.  They exist so that AOT sees the step as an
  inference graph; the backend compiles a graph that records no autograd
  history under ``no_grad`` instead (:mod:`fxmesh.backend`).  Where
  ``opt.step`` itself is compiled they stay: its outer frames (torch.optim's
  wrappers) are shared by every optimizer class, and one graph through them
  would make Dynamo treat hyperparameters that differ between optimizers as
  dynamic.

Two more hooks are not call handlers.  Dynamo computes each op's example
value by running it on the fake inputs (``torch._dynamo.utils.run_node``).  A
``torch._foreach_*`` op over DTensors is run there one list entry at a time
(:func:`fxmesh.meshes.call_foreach_per_entry`): DTensor's rule for a whole list
takes time quadratic in its length, which made it nearly half of a foreach
AdamW step's compile at 1,000 parameters.  The graph records the op as it was
called, unless DTensor has no sharding rule for it (Rprop's
``_foreach_copy_`` and a user's ``_foreach_maximum`` with a scalar on every
torch version; on 2.11-2.12 also ``_foreach_sign_``, ``_foreach_lerp`` with a
float weight and more): then the node becomes a
:func:`fxmesh.ops.foreach_per_entry` stand-in, one call per entry, each of
which has a rule.

And Dynamo makes a tensor's fake ``.grad``
along with the tensor, and where the gradient holds a view and the tensor
does not hold a like one (FSDP2's gradients are views of its reduce-scatter
buffer; ``DTensor.from_local`` returns a view), it gives the gradient symbolic
sizes even under ``dynamic=False``: all-dynamic ones on torch 2.12-2.15
(``meta_utils``), the view's base size on 2.11.  On 2.13 those symbols cost
about 50 ms of tracing per gradient and a Python shape guard on every call
(``bench/RESULTS.md``, CPU run V), and :mod:`fxmesh.specialize` then had to
make them static again.  So, where a tensor's gradient holds a view, Dynamo's
``wrap_to_fake_tensor_and_record`` is called for the gradient first, under the
source Dynamo gives it (``GradSource``): it gets the sizes Dynamo gives any
tensor passed in (static, or what automatic dynamic shapes decided for that
source), and the tensor's fake ``.grad`` is that fake tensor.

Last, the parameters' guards.  Dynamo guards an optimizer's parameters by id:
the step's first read of ``param_groups`` marks them static and guarded
(``mark_static_address(p, guard=True)``), and a tensor so marked is wrapped with
an id match only.  Clipping ahead of the step reads every ``p.grad`` before
that, so each parameter is wrapped as a graph input with a tensor match, and
its spec and local tensor guarded, all evaluated on every call: at 1,000
parameters Dynamo's guard check took 2.19 ms, and 1.19 ms with the parameters
guarded by id (``bench/RESULTS.md``, CPU run AA).  Where the backend
streamlines guards (its default), a trace that reaches the optimizer with its
parameters already graph inputs is restarted once (Dynamo's
``RestartAnalysis``), and the new trace wraps them as the step would.
Wrapping an ``nn.Module`` (``model.parameters()``) marks its parameters static
but unguarded, over the optimizer's mark; in these frames a guarded mark is
kept.

Every other call, and every call under any other backend, takes Dynamo's own
path unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch._dynamo import utils as dynamo_utils
from torch._dynamo.exc import RestartAnalysis
from torch._dynamo.source import AttrSource, GradSource
from torch._dynamo.variables import builder
from torch._dynamo.variables.constant import ConstantVariable
from torch._dynamo.variables.functions import SkipFunctionVariable, UserFunctionVariable
from torch._dynamo.variables.lists import BaseListVariable
from torch._dynamo.variables.optimizer import OptimizerVariable
from torch._dynamo.variables.tensor import TensorVariable
from torch._dynamo.variables.torch import TorchInGraphFunctionVariable
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import _use_grad_for_differentiable
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.weak import WeakIdKeyDictionary

from fxmesh import clip
from fxmesh.meshes import call_foreach_per_entry, distinct_meshes
from fxmesh.ops import MESH_AWARE_OPS, foreach_per_entry, foreach_per_mesh, has_per_entry_form

__all__ = ["FUNCTIONAL_APIS", "FUSED_FUNCTIONS", "install"]

# module.function of the fused optimizer functions fxmesh can lower.
FUSED_FUNCTIONS = frozenset(
    {
        "torch.optim.adam._fused_adam",
        "torch.optim.adamw._fused_adamw",
        "torch.optim.sgd._fused_sgd",
        "torch.optim.adagrad._fused_adagrad",
    }
)
# Functional APIs that torch.optim disables under compile when the state steps
# are on CUDA/XPU (``_disable_dynamo_if_unsupported``); captured only with fused=True.
FUNCTIONAL_APIS = frozenset(
    {"torch.optim.adam.adam", "torch.optim.adamw.adamw", "torch.optim.sgd.sgd", "torch.optim.adagrad.adagrad"}
)


# Code of the wrapper torch.optim puts around every ``step`` (a closure, one code object).
_OPTIMIZER_STEP_WRAPPER = _use_grad_for_differentiable(lambda self: None).__code__
_OPTIMIZER_FILE = _OPTIMIZER_STEP_WRAPPER.co_filename


# torch.nn.utils functions traced as fxmesh's versions, which defer to torch's
# own where the gradients sit on one mesh; fxmesh's norm traced with its check as
# a node (fxmesh.checks).
_CLIP_FUNCTIONS = {
    torch.nn.utils.get_total_norm: clip.torch_get_total_norm,
    torch.nn.utils.clip_grads_with_norm_: clip.torch_clip_grads_with_norm_,
    clip.get_total_norm: clip.traced_get_total_norm,
}


def _unwrap(value: Any, source: Any) -> tuple[Any, Any]:
    """The function under Dynamo's disable wrappers, and a source that reaches it."""
    for attr in ("_torchdynamo_orig_callable", "__wrapped__"):
        inner = inspect.getattr_static(value, attr, None)
        if inner is not None:
            return _unwrap(inner, AttrSource(source, attr) if source else None)
    return value, source


def _captured_function(value: Any, source: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    inner, inner_source = _unwrap(value, source)
    name = f"{getattr(inner, '__module__', '')}.{getattr(inner, '__name__', '')}"
    if inner is not value and name in FUSED_FUNCTIONS:
        return inner, inner_source
    fused = kwargs.get("fused")
    if (
        inner is not value
        and name in FUNCTIONAL_APIS
        and fused is not None
        and fused.is_python_constant()
        and fused.as_python_constant() is True
    ):
        return inner, inner_source
    return None, None


def _compiling_with_fxmesh(tx: Any) -> bool:
    return _output_compiled_with_fxmesh(tx.output)


def _output_compiled_with_fxmesh(output: Any) -> bool:
    """Whether Dynamo's output graph ``output`` goes to an fxmesh backend."""
    return _fxmesh_backend(output) is not None


def _fxmesh_backend(output: Any) -> Any:
    """The fxmesh backend Dynamo's output graph ``output`` goes to, or None."""
    from fxmesh.backend import FxmeshBackend

    fn = getattr(output, "compiler_fn", None)
    seen = set()
    while fn is not None and id(fn) not in seen:
        if isinstance(fn, FxmeshBackend):
            return fn
        seen.add(id(fn))
        fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
    return None


def _streamlining_guards(tx: Any) -> bool:
    backend = _fxmesh_backend(tx.output)
    return backend is not None and backend.streamline_guards


# What DTensor's dispatch raises for an op it has no sharding rule for (torch 2.11-2.15).
_NO_SHARDING_RULE = "does not have a sharding strategy registered"


def _per_entry_stand_in(target: Any, error: Exception) -> Any:
    """The per-entry stand-in for a foreach call (or its per-mesh stand-in) that failed for want of a DTensor rule."""
    op = getattr(target, "wrapped_op", target)
    name = getattr(op, "__name__", "").removeprefix("_foreach_")
    if isinstance(error, NotImplementedError) and _NO_SHARDING_RULE in str(error) and has_per_entry_form(name):
        return foreach_per_entry(op)
    return None


def _traced_values(var: Any) -> list[Any]:
    """Example values of a Dynamo variable: of each item for lists, else of the variable."""
    if isinstance(var, BaseListVariable):
        return [v for item in var.items for v in _traced_values(item)]
    if isinstance(var, TensorVariable):
        return [var.proxy.node.meta.get("example_value")]
    return []


def _spans_meshes_beside_plain_tensors(fn: Any, args: Any, kwargs: Any) -> bool:
    """A ``torch._foreach_*`` call whose DTensors sit on several meshes next to plain tensors."""
    if not getattr(fn, "__name__", "").startswith("_foreach_"):
        return False
    values = _traced_tensors(args, kwargs)
    return len(distinct_meshes(values)) > 1 and any(not isinstance(v, DTensor) for v in values)


def _traced_tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    """Example values of a call's tensor arguments, list items included."""
    return [v for var in (*args, *kwargs.values()) for v in _traced_values(var) if isinstance(v, torch.Tensor)]


def _lookup(table: dict[Any, Any], value: Any) -> Any:
    try:
        return table.get(value)
    except TypeError:  # unhashable
        return None


def _is_optimizer_step_graph_break(value: Any, tx: Any) -> bool:
    """A graph break that fences a step called from user code (not one of ``torch.compile(opt.step)``)."""
    if value is not torch._dynamo.graph_break or getattr(tx, "f_code", None) is not _OPTIMIZER_STEP_WRAPPER:
        return False
    root = tx
    while getattr(root, "parent", None) is not None:
        root = root.parent
    return root.f_code.co_filename != _OPTIMIZER_FILE


def _holds_a_view(t: torch.Tensor) -> bool:
    """``t`` is a view, or a wrapper subclass (a DTensor) around one."""
    if t._is_view():
        return True
    if is_traceable_wrapper_subclass(t):
        inner = (getattr(t, attr) for attr in t.__tensor_flatten__()[0])
        return any(isinstance(x, torch.Tensor) and _holds_a_view(x) for x in inner)
    return False


def _view_grad(e: Any) -> torch.Tensor | None:
    """The gradient of leaf tensor ``e`` where it holds a view (FSDP2's, ``DTensor.from_local``'s)."""
    if not isinstance(e, torch.Tensor) or isinstance(e, FakeTensor) or not e.is_leaf:
        return None
    grad = e.grad
    return grad if grad is not None and _holds_a_view(grad) else None


# Parameters a trace was restarted for: never again, whatever keeps them graph inputs the second time.
_RESTARTED_FOR: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _restart_if_parameters_are_inputs(optimizer: torch.optim.Optimizer, tx: Any) -> None:
    """Trace the frame again where it took ``optimizer``'s parameters as inputs before the optimizer marked them.

    Dynamo marks an optimizer's parameters as static, guarded by id, when the
    step reads ``param_groups``.  A parameter it wrapped before that (clipping
    ahead of the step reads each ``p.grad``) stays a graph input with a tensor
    match and guards on its spec and local tensor, which Dynamo evaluates on
    every call.  Traced again, the marked parameters are wrapped as the step
    would wrap them.
    """
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    inputs = (arg.example for arg in tx.output.graphargs)
    wrapped = [t for t in inputs if isinstance(t, torch.Tensor) and id(t) in ids and t not in _RESTARTED_FOR]
    if not wrapped:
        return
    for t in wrapped:
        _RESTARTED_FOR[t] = True
    raise RestartAnalysis(restart_reason=f"fxmesh: {len(wrapped)} optimizer parameters were traced as graph inputs")


def _dynamo_handlers() -> dict[Any, Any]:
    """Dynamo's special handlers of in-graph torch functions (a private API; checked on torch 2.11-2.15)."""
    get_handlers = getattr(TorchInGraphFunctionVariable, "_get_handlers", None)
    return get_handlers() if get_handlers is not None else {}


@functools.cache
def install() -> None:
    """Install the scoped hook (idempotent)."""
    dynamo_call_function = SkipFunctionVariable.call_function
    dynamo_call_in_graph = TorchInGraphFunctionVariable.call_function
    dynamo_call_user_function = UserFunctionVariable.call_function
    dynamo_wrap_to_fake = builder.wrap_to_fake_tensor_and_record
    dynamo_run_node = dynamo_utils.run_node
    # Private hooks of torch 2.11-2.14; where a later torch has none, parameters keep Dynamo's guards.
    dynamo_set_capturable = getattr(OptimizerVariable, "_set_capturable", None)
    dynamo_mark_static_input = getattr(builder.VariableBuilder, "mark_static_input", None)

    def record_stand_in(stand_in: Any, tx: Any, args: Any, kwargs: Any) -> Any:
        return dynamo_call_in_graph(TorchInGraphFunctionVariable(stand_in), tx, args, kwargs)

    @functools.wraps(dynamo_call_function)
    def call_function(self: SkipFunctionVariable, tx: Any, args: Any, kwargs: Any) -> Any:
        if _is_optimizer_step_graph_break(self.value, tx) and _compiling_with_fxmesh(tx):
            return ConstantVariable.create(None)
        stand_in = _lookup(MESH_AWARE_OPS, self.value)
        if stand_in is not None:  # some torch versions skip the fused ops themselves (2.11: _fused_adagrad_)
            if _compiling_with_fxmesh(tx):
                return record_stand_in(stand_in, tx, args, kwargs)
            return dynamo_call_function(self, tx, args, kwargs)
        inner, source = _captured_function(self.value, self.source, kwargs)
        if inner is None or not _compiling_with_fxmesh(tx):
            return dynamo_call_function(self, tx, args, kwargs)
        return UserFunctionVariable(inner, source=source).call_function(tx, args, kwargs)

    @functools.wraps(dynamo_call_in_graph)
    def call_in_graph(self: TorchInGraphFunctionVariable, tx: Any, args: Any, kwargs: Any) -> Any:
        stand_in = _lookup(MESH_AWARE_OPS, self.value)
        per_mesh = stand_in is None and _spans_meshes_beside_plain_tensors(self.value, args, kwargs)
        if (stand_in is None and not per_mesh) or not _compiling_with_fxmesh(tx):
            return dynamo_call_in_graph(self, tx, args, kwargs)
        if per_mesh:
            # Dynamo's own rewrite first: _foreach_lerp_ with a tensor weight (tensor betas) becomes other
            # foreach calls, which come back here; run as it is, the op reads the weight with .item().
            handler = _dynamo_handlers().get(self.value)
            result = handler(self, tx, *args, **kwargs) if handler is not None else None
            if result is not None:
                return result
        return record_stand_in(stand_in or foreach_per_mesh(self.value), tx, args, kwargs)

    @functools.wraps(dynamo_call_user_function)
    def call_user_function(self: UserFunctionVariable, tx: Any, args: Any, kwargs: Any) -> Any:
        redirect = _lookup(_CLIP_FUNCTIONS, self.fn)
        if redirect is not None and _compiling_with_fxmesh(tx):
            self = UserFunctionVariable(redirect)
        return dynamo_call_user_function(self, tx, args, kwargs)

    @functools.wraps(dynamo_wrap_to_fake)
    def wrap_to_fake(
        e: Any, tx: Any, *, source: Any, is_tensor: bool, parent_context: Any = None, **kwargs: Any
    ) -> Any:
        if parent_context is None and source is not None and _compiling_with_fxmesh(tx):
            grad = _view_grad(e)
            if grad is not None:  # before its tensor, along with which it would get symbolic sizes
                dynamo_wrap_to_fake(grad, tx, source=GradSource(source, "grad"), is_tensor=True)
        return dynamo_wrap_to_fake(e, tx, source=source, is_tensor=is_tensor, parent_context=parent_context, **kwargs)

    @functools.wraps(dynamo_run_node)
    def run_node(tracer: Any, node: torch.fx.Node, args: Any, kwargs: Any, nnmodule: Any) -> Any:
        if (
            node.op == "call_function"
            and getattr(node.target, "__name__", "").startswith("_foreach_")
            and _output_compiled_with_fxmesh(tracer)
        ):
            stand_in = None
            try:
                with dynamo_utils.set_current_node(node):
                    return call_foreach_per_entry(node.target, args, kwargs)
            except Exception as e:  # noqa: BLE001 - unless a stand-in runs, Dynamo's own run reports it as Dynamo does
                stand_in = _per_entry_stand_in(node.target, e)
            if stand_in is not None:
                try:
                    with dynamo_utils.set_current_node(node):
                        value = call_foreach_per_entry(stand_in, args, kwargs)
                except Exception:  # noqa: BLE001 - as above
                    pass
                else:
                    node.target = stand_in  # the graph records the call one entry at a time
                    return value
        return dynamo_run_node(tracer, node, args, kwargs, nnmodule)

    # Dynamo calls this right after it marks the optimizer's parameters static, on each read of
    # ``param_groups`` in a trace.
    def set_capturable(self: OptimizerVariable, tx: Any) -> None:
        if _streamlining_guards(tx):
            _restart_if_parameters_are_inputs(self.value, tx)
        dynamo_set_capturable(self, tx)

    # Wrapping an nn.Module marks its parameters static but unguarded, over the optimizer's mark.
    def mark_static_input(self: builder.VariableBuilder, value: torch.Tensor, guard: bool) -> None:
        if not guard and dynamo_utils.get_static_address_type(value) == "guarded" and _streamlining_guards(self.tx):
            guard = True
        dynamo_mark_static_input(self, value, guard)

    builder.wrap_to_fake_tensor_and_record = wrap_to_fake
    if dynamo_set_capturable is not None and dynamo_mark_static_input is not None:
        builder.VariableBuilder.mark_static_input = functools.wraps(dynamo_mark_static_input)(mark_static_input)
        OptimizerVariable._set_capturable = functools.wraps(dynamo_set_capturable)(set_capturable)
    dynamo_utils.run_node = run_node
    SkipFunctionVariable.call_function = call_function
    TorchInGraphFunctionVariable.call_function = call_in_graph
    UserFunctionVariable.call_function = call_user_function
