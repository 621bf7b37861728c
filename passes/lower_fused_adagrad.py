"""Lower fused Adagrad calls to pointwise math that Inductor generates kernels for.

Why: ``torch._fused_adagrad_`` has no decomposition and no DTensor sharding rule,
so upstream cannot run it over DTensors even eagerly.  Upstream ships the fused
kernel for CPU only (``Adagrad(fused=True)`` refuses CUDA parameters).

What: each call becomes, per parameter, the math of aten's CPU kernel: the step
(already incremented by torch.optim) gives ``clr = lr / (1 + (step - 1) *
lr_decay)`` in float64, once per parameter, as materialized tables of
:data:`fxmesh.lowering.TABLE_ROWS` rows (of one local layout, see
:func:`fxmesh.lowering.table_groups`);
then ``grad_scale`` unscales and writes back the gradient, ``maximize`` negates
it, weight decay adds ``param * weight_decay``, ``state_sum += grad * grad`` and
``param -= clr * grad / (sqrt(state_sum) + eps)``, in the opmath type.  The
hyperparameters are rounded to the parameter's dtype, as the kernel's
vectorized loop holds them (``scalar_t(clr)``, ``scalar_t(eps)``...).
``found_inf == 1`` leaves every tensor unchanged.
A float hyperparameter that Dynamo made symbolic (a scheduler changes it every
step) arrives as a 0-dim float64 tensor and enters the same math; a weight
decay that is 0 on some step skips its term on that call.

Pre: run after ``split_by_mesh``.  Post: no fused Adagrad node is left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.proxy import Proxy

from fxmesh.fused_ops import FusedOp
from fxmesh.lowering import (
    OPMATH,
    Hyper,
    divided,
    grad_prologue,
    laid_out_like_each,
    local,
    lower_fused_calls,
    materialized,
    rounded,
    stack_scalars,
    table_groups,
    upcast,
    write_back,
)
from fxmesh.meshes import example_value

__all__ = ["lower_fused_adagrad"]

# Each may be a float that changes every step, which Dynamo then passes as a float64 tensor.
_HYPERPARAMETERS = ("lr", "lr_decay", "weight_decay", "eps")


def _adagrad_update(
    param: Proxy,
    grad: Proxy,
    state_sum: Proxy,
    clr: Proxy,
    *,
    laid_out: Proxy,
    weight_decay: Hyper,
    eps: Hyper,
    maximize: bool,
    grad_scale: Proxy | None,
    found_inf: Proxy | None,
    opmath: torch.dtype,
    held: torch.dtype,
) -> None:
    """One parameter's fused Adagrad update; ``clr`` is its float64 entry of the table.

    The kernel holds weight decay and eps in the parameter's type (``held``).
    """

    def as_held(x: Hyper) -> Hyper:
        x = rounded(x, held)
        return x.to(opmath) if isinstance(x, Proxy) else x

    p, g, outputs = grad_prologue(
        param,
        grad,
        laid_out=laid_out,
        opmath=opmath,
        grad_scale=grad_scale,
        maximize=maximize,
        weight_decay=as_held(weight_decay),
    )
    s = upcast(state_sum, opmath) + g * g
    p = p - clr.to(held).to(opmath) * g / (s.sqrt() + as_held(eps))
    write_back([(param, p), (state_sum, s), *outputs], found_inf)


def _emit(op: FusedOp, args: dict[str, Any], proxy: Callable[[Any], Any]) -> None:
    params, grads, state_sums, steps = (args[name] for name in op.list_args)
    lr = proxy(args["lr"])
    lr64 = local(lr).to(torch.float64) if isinstance(lr, Proxy) else lr
    for rows in table_groups(params):
        device = example_value(steps[rows[0]]).device
        steps64 = stack_scalars([local(proxy(steps[i])).to(torch.float64) for i in rows], device)
        clr = divided(lr64, 1.0 + (steps64 - 1.0) * proxy(args["lr_decay"]))
        if len(rows) > 1:  # Inductor leaves a 1-element value alone
            clr = materialized(clr, [1])
        laid_out = laid_out_like_each([proxy(grads[i]) for i in rows], [proxy(params[i]) for i in rows])
        for row, i in enumerate(rows):
            dtype = example_value(params[i]).dtype
            _adagrad_update(
                proxy(params[i]),
                proxy(grads[i]),
                proxy(state_sums[i]),
                clr[row],
                laid_out=laid_out[row],
                weight_decay=proxy(args["weight_decay"]),
                eps=proxy(args["eps"]),
                maximize=args["maximize"],
                grad_scale=proxy(args.get("grad_scale")),
                found_inf=proxy(args.get("found_inf")),
                opmath=OPMATH[dtype],
                held=dtype,
            )


def lower_fused_adagrad(gm: torch.fx.GraphModule) -> PassResult:
    """Replace every fused Adagrad call with per-parameter pointwise math."""
    return lower_fused_calls(
        gm, ("adagrad",), _emit, scalar_lists=("state_steps",), tensor_hyperparameters=_HYPERPARAMETERS
    )
