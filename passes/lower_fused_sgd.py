"""Lower fused SGD calls to pointwise math that Inductor generates kernels for.

Why: ``torch._fused_sgd_`` is an in-place op with no decomposition and no DTensor
sharding rule, so upstream cannot run it over DTensors even eagerly, and
Inductor could only call it as an extern kernel.

What: each call becomes, per parameter, the math of aten's fused SGD kernel in
its order of operations, in the parameter's opmath type (float32 for bf16/fp16):
``grad_scale`` unscales and writes back the gradient; ``maximize`` negates it;
weight decay adds ``param * weight_decay``; with momentum the buffer becomes the
gradient on the first step and ``buf * momentum + grad * (1 - dampening)``
after, and the update uses ``grad + buf * momentum`` (nesterov) or the buffer;
``param - grad * lr``.  ``found_inf == 1`` leaves every tensor unchanged.  The
hyperparameters are rounded to the opmath type, as the kernel holds them.
A float hyperparameter that Dynamo made symbolic (a scheduler changes it every
step) arrives as a 0-dim float64 tensor and enters the same math; a weight
decay that is 0 on some step skips its term on that call.

For bf16/fp16 parameters this follows the CPU kernel's scalar loop, not its
vectorized loop: in torch 2.11-2.13 that loop never stores the updated
parameters (and reads a low-precision momentum buffer as float32), so eager
fused SGD on CPU leaves all but the tail elements unchanged.

The first step's new momentum buffers are laid out like their parameters, not
like gradients that are still ``Partial`` (see
:func:`_buffer_made_like_its_parameter`).

Pre: run after ``split_by_mesh``.  Post: no fused SGD node is left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.distributed.tensor import DTensor
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.proxy import Proxy

from fxmesh.fused_ops import FusedOp
from fxmesh.lowering import (
    OPMATH,
    Hyper,
    grad_prologue,
    laid_out_like_each,
    lower_fused_calls,
    one_minus,
    rounded,
    table_groups,
    upcast,
    write_back,
)
from fxmesh.meshes import example_value, propagate_example_value

__all__ = ["lower_fused_sgd"]

# Each may be a float that a scheduler changes every step (OneCycleLR cycles the
# momentum), which Dynamo then passes as a float64 tensor.
_HYPERPARAMETERS = ("lr", "weight_decay", "momentum", "dampening")


def _sgd_update(
    param: Proxy,
    grad: Proxy,
    momentum_buffer: Proxy | None,
    *,
    laid_out: Proxy,
    lr: Hyper,
    weight_decay: Hyper,
    momentum: Hyper,
    one_minus_dampening: Hyper,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Proxy | None,
    found_inf: Proxy | None,
    opmath: torch.dtype,
) -> None:
    """One parameter's fused SGD update, traced onto the graph (tensor hyperparameters in ``opmath``, but lr)."""
    p, g, outputs = grad_prologue(
        param,
        grad,
        laid_out=laid_out,
        opmath=opmath,
        grad_scale=grad_scale,
        maximize=maximize,
        weight_decay=weight_decay,
    )
    if momentum_buffer is not None:
        buf = g if is_first_step else upcast(momentum_buffer, opmath) * momentum + g * one_minus_dampening
        outputs.append((momentum_buffer, buf))
        g = g + buf * momentum if nesterov else buf
    p = p - g * (lr.to(opmath) if isinstance(lr, Proxy) else lr)
    outputs.insert(0, (param, p))
    write_back(outputs, found_inf)


def _buffer_made_like_its_parameter(
    buffer: torch.fx.Node, grad: torch.fx.Node, param: torch.fx.Node, position: dict[torch.fx.Node, int]
) -> None:
    """Make a first step's new momentum buffer, ``torch.empty_like(grad)``, with ``empty_like(param)`` where the
    gradient's placements differ from the parameter's.

    torch.optim makes fused SGD's buffers like the gradients.  A gradient still
    ``Partial`` over ``tp`` (a norm weight's) would give a ``Partial`` buffer:
    the optimizer state would then hold a sum of per-rank parts, which every
    later step reduces again (the math reads it beside the reduced gradient)
    and which ``torch.distributed.checkpoint`` refuses to save ("not supported
    for DTensor with partial placements").  The first step writes the reduced
    gradient into the buffer, so laid out like the parameter (as Adam's states
    are), it holds the same values and no rank's part.  Upstream has no
    DTensor rule for fused SGD, so there is no eager state format to keep.
    ``position`` caches each node's index in the graph (filled here when first needed).
    """
    if buffer.op != "call_function" or buffer.target is not torch.empty_like or buffer.args[:1] != (grad,):
        return
    g, p = example_value(grad), example_value(param)
    if not (isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements):
        return
    if not position:
        position.update((n, i) for i, n in enumerate(buffer.graph.nodes))
    if position[param] > position[buffer]:  # a parameter is an input, read before torch.optim's fused function
        return
    buffer.args = (param, *buffer.args[1:])
    propagate_example_value(buffer, p._local_tensor.fake_mode)


def _emit(op: FusedOp, args: dict[str, Any], proxy: Callable[[Any], Any]) -> None:
    params, grads, buffers = (args[name] for name in op.list_args)
    first = example_value(params[0])
    opmath = OPMATH[first.dtype]
    lr = proxy(args["lr"])
    hyper = dict(
        lr=lr if isinstance(lr, Proxy) else rounded(lr, opmath),
        weight_decay=rounded(proxy(args["weight_decay"]), opmath),
        momentum=rounded(proxy(args["momentum"]), opmath),
        one_minus_dampening=one_minus(proxy(args["dampening"]), opmath),
    )
    # torch.optim passes no buffers when momentum is 0; for a symbolic momentum, Dynamo traced that branch.
    has_momentum = bool(buffers) if isinstance(args["momentum"], torch.fx.Node) else args["momentum"] != 0
    if has_momentum and args["is_first_step"]:
        position: dict[torch.fx.Node, int] = {}
        for param, grad, buffer in zip(params, grads, buffers):
            _buffer_made_like_its_parameter(buffer, grad, param, position)
    for rows in table_groups(params):  # no table: the groups bound the runs of gradient redistributions
        laid_out = laid_out_like_each([proxy(grads[i]) for i in rows], [proxy(params[i]) for i in rows])
        for row, i in enumerate(rows):
            _sgd_update(
                proxy(params[i]),
                proxy(grads[i]),
                proxy(buffers[i]) if has_momentum else None,
                laid_out=laid_out[row],
                nesterov=args["nesterov"],
                maximize=args["maximize"],
                is_first_step=args["is_first_step"],
                grad_scale=proxy(args.get("grad_scale")),
                found_inf=proxy(args.get("found_inf")),
                opmath=OPMATH[example_value(params[i]).dtype],
                **hyper,
            )


def lower_fused_sgd(gm: torch.fx.GraphModule) -> PassResult:
    """Replace every fused SGD call with per-parameter pointwise math."""
    return lower_fused_calls(gm, ("sgd",), _emit, tensor_hyperparameters=_HYPERPARAMETERS)
