"""Keep aten's fused Adam/AdamW kernel for each mesh's call on the local shards.

Why: the lowering (``lower_fused_adam``) gives Inductor one generated kernel
per parameter group.  On a GPU each is a launch the host pays for, about 11 us
through Inductor's and Triton's launch path on an H100, while aten's fused
kernel walks all of a call's tensors in a few multi-tensor launches: eager
fused on plain tensors ran 1000 small AdamW parameters in 2.79 ms where the
lowered step took 15.5 ms (``bench/RESULTS.md``, GPU run 3).  Over plain local
shards the fused kernel is exactly the update eager runs on each rank.

What: each fused Adam/AdamW call over plain tensors becomes calls (of at most
:data:`CALL_TENSORS` parameters each) of ``fxmesh::aten_fused_adam(w)_``, ops
that run ``torch._fused_adam(w)_``.  AOT functionalization refuses aten's fused
ops (in-place, with no functional form it can use), but an op outside aten
that declares the lists it writes is functionalized as
``auto_functionalized_v2`` and re-inplaced by Inductor, so the kernel updates
the optimizer's tensors where they are, with no copies.  The kernel writes the
gradients only when it unscales them (``grad_scale``): the ``*_unscale_`` ops
declare them written, the others read-only, so a step without GradScaler bumps
no gradient's version counter.  A call whose hyperparameters Dynamo made
symbolic (a float a scheduler changes every step) is left for the lowering,
which takes them as float64 tensors; so is a call with tensor betas (the
kernel takes floats, which eager reads off the tensors on every call), and a
call where some parameter's gradient or state is laid out otherwise than the
parameter (see :func:`_laid_out_alike`).

Pre: after ``split_by_mesh``, and after :func:`fxmesh.local.localize` has
turned the graph's DTensors into their local shards where it can: calls over
DTensors are left alone.  Run before ``lower_fused_adam``, which lowers any
call this pass leaves.  Post: every fused Adam/AdamW call over plain tensors
with constant hyperparameters (a tensor lr included) calls these ops, with
``grad_scale`` and ``found_inf`` on the parameters' device (copied there when
they are not, as eager torch.optim copies them).  Raises
:class:`UnsupportedInputError` naming the parameter for dtypes or layouts the
fused kernel does not take.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor
from torch.fx.passes.infra.pass_base import PassResult

from fxmesh.fused_ops import bind, fused_op
from fxmesh.lowering import check_entry
from fxmesh.meshes import example_value, graph_fake_mode, propagate_example_value

__all__ = ["ATEN_FUSED_ADAM_OPS", "CALL_TENSORS", "aten_fused_adam"]

# Parameters per call.  Inductor's passes over an auto_functionalized node grow
# with the square of its list lengths (1000 parameters in one call compiled in
# 301 s on a 2-core CPU, in calls of 100 in 60 s); a multiple of 36 and 30, the
# tensors per launch of CUDA's multi-tensor apply for Adam's 4 and amsgrad's 5
# lists, costs no extra launch.
CALL_TENSORS = 180

_STATES = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
_HYPERPARAMETERS = ("lr", "beta1", "beta2", "weight_decay", "eps")
# Metadata that stays true when a call is replaced by the same call of a custom op.
_SAFE_META = ("stack_trace", "source_fn_stack", "nn_module_stack", "fxmesh_group")


# Defined through torch.library.Library, not torch.library.custom_op: custom_op's Python wrapper
# bumps the version counter of every mutated tensor in a Python loop on every call (about 0.5 ms
# per 334 parameters on a 2-core CPU), which AOT's runtime wrapper then does again for the graph's
# mutated inputs.
_LIB = torch.library.Library("fxmesh", "DEF")


def _define(name: str, fused: torch._ops.OpOverloadPacket, unscales: bool) -> torch._ops.OpOverload:
    # A schema has no "float or Tensor": a tensor lr travels as lr_tensor.  AOT's and Inductor's
    # caches know an op by its name, not its schema: a changed schema needs a new name.
    grads = "Tensor(e!)[] grads" if unscales else "Tensor[] grads"
    _LIB.define(
        f"{name}(Tensor(a!)[] params, {grads}, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, *, float lr, Tensor? lr_tensor, float beta1, "
        "float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, Tensor? grad_scale, "
        "Tensor? found_inf) -> ()"
    )

    def kernel(*lists: list[torch.Tensor], lr: float, lr_tensor: torch.Tensor | None, **kwargs: object) -> None:
        fused(*lists, lr=lr if lr_tensor is None else lr_tensor, **kwargs)

    def fake(*args: object, **kwargs: object) -> None:
        return None

    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fxmesh::{name}", fake, lib=_LIB)
    return getattr(torch.ops.fxmesh, name).default


# By op name and whether the call unscales (and so writes) the gradients.
ATEN_FUSED_ADAM_OPS: dict[tuple[str, bool], torch._ops.OpOverload] = {
    (name, unscales): _define(f"aten_fused_{name}{'_unscale' if unscales else ''}_", fused, unscales)
    for name, fused in (("adam", torch._fused_adam_), ("adamw", torch._fused_adamw_))
    for unscales in (False, True)
}
_OP_NAMES = {name for name, _ in ATEN_FUSED_ADAM_OPS}


def _keeps_aten_kernel(args: dict[str, object]) -> bool:
    """Whether a call's hyperparameters are constants (or a tensor lr: not tensor betas), its tensors plain and
    laid out alike."""
    for name in _HYPERPARAMETERS:
        value = args[name]
        if isinstance(value, torch.fx.Node) and not (name == "lr" and isinstance(example_value(value), torch.Tensor)):
            return False
    entries = [e for name in ("grads", *_STATES) for e in args[name]]
    if any(isinstance(example_value(e), DTensor) for e in entries):
        return False
    lanes = zip(*(args[name] for name in ("grads", *_STATES) if args[name]))
    return all(_laid_out_alike(example_value(lane[0]), example_value(e)) for lane in lanes for e in lane[1:])


def _laid_out_alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape are laid out alike, size-1 dims aside.

    aten's kernel walks a parameter's tensors as one memory layout.  Where a
    gradient or state is laid out otherwise (a transposed gradient), its CPU
    kernel computes as if it were not, with no error (torch 2.11-2.14), and its
    CUDA kernel refuses; the lowering computes elementwise on any layout.
    Symbolic strides (a gradient that is a view, from torch 2.13) are compared
    by their values, under a guard: a later call laid out otherwise recompiles.
    """
    return all(bool(size == 1) or bool(x == y) for x, y, size in zip(a.stride(), b.stride(), a.shape))


def _moved_to(graph: torch.fx.Graph, scalar: torch.fx.Node, device: torch.device, fake_mode: Any) -> torch.fx.Node:
    """``scalar.to(device, non_blocking=True)``, the copy eager torch.optim makes of ``grad_scale`` and ``found_inf``.

    Under compile, ``Optimizer._group_tensors_by_device_and_dtype`` groups every
    tensor under the device None, so torch.optim's own ``.to(device)`` is a no-op
    and a CPU scalar reaches the call beside CUDA parameters.  The lowering reads
    such a scalar as a kernel argument; aten's CUDA kernel reads it through a
    device pointer (an illegal memory access).
    """
    moved = graph.call_method("to", (scalar, device), {"non_blocking": True})
    propagate_example_value(moved, fake_mode)
    return moved


def aten_fused_adam(gm: torch.fx.GraphModule) -> PassResult:
    """Replace every fused Adam/AdamW call over plain tensors with constant hyperparameters by aten's kernel."""
    graph = gm.graph
    fake_mode = None
    modified = False
    for node in list(graph.nodes):
        op = fused_op(node)
        if op is None or op.name not in _OP_NAMES:
            continue
        args = bind(node, op)
        if not _keeps_aten_kernel(args):
            continue
        for name in op.list_args:
            for i, entry in enumerate(args[name]):
                check_entry(op.name, i, name, entry, ("state_steps",))
        lr = args["lr"]
        kwargs = {name: args.get(name) for name in ("beta1", "beta2", "weight_decay", "eps", "amsgrad", "maximize")}
        kwargs.update(
            lr=0.0 if isinstance(lr, torch.fx.Node) else lr,
            lr_tensor=lr if isinstance(lr, torch.fx.Node) else None,
            grad_scale=args.get("grad_scale"),
            found_inf=args.get("found_inf"),
        )
        for name in ("grad_scale", "found_inf") if args["params"] else ():
            scalar, device = kwargs[name], example_value(args["params"][0]).device
            if isinstance(scalar, torch.fx.Node) and example_value(scalar).device != device:
                fake_mode = fake_mode or graph_fake_mode(gm)
                with graph.inserting_before(node):
                    kwargs[name] = _moved_to(graph, scalar, device, fake_mode)
        lists = [args[name] for name in op.list_args]
        for start in range(0, len(lists[0]), CALL_TENSORS):
            chunk = tuple(entries[start : start + CALL_TENSORS] for entries in lists)
            with graph.inserting_before(node):
                call = graph.call_function(
                    ATEN_FUSED_ADAM_OPS[op.name, kwargs["grad_scale"] is not None], chunk, kwargs
                )
            call.meta.update({k: node.meta[k] for k in _SAFE_META if k in node.meta})
            call.meta["example_value"] = None
        graph.erase_node(node)
        counters["fxmesh"]["aten_fused_calls"] += 1
        modified = True
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
