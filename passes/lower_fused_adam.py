"""Lower fused Adam/AdamW calls to pointwise math that Inductor generates kernels for.

Why: ``torch._fused_adam_``/``torch._fused_adamw_`` are in-place ops with no
decomposition; AOT functionalization rejects them and Inductor could only call
them as extern kernels.  Written as pointwise torch ops, the update of each
parameter becomes one generated kernel that reads and writes every buffer once.

What: each call is replaced by, per parameter, the math of aten's fused kernel
for the parameters' device, in its order of operations.  CPU: the scalars
(bias corrections, step size) in float64 as the kernel computes them on the
host, ``exp_avg`` updated with ``lerp``.  CUDA (and MPS): hyperparameters and
scalars in the opmath type, ``exp_avg`` as ``beta1 * exp_avg + (1 - beta1) *
grad``.  Everywhere the elementwise part runs in the parameter's opmath type
(float32 for bf16/fp16 parameters); ``grad_scale`` unscales and writes back the
gradient; ``found_inf == 1`` leaves every tensor unchanged.  Results are written
back with ``copy_``, after all of a parameter's math, so the call stays in place.
A float hyperparameter that Dynamo made symbolic (a scheduler changes it every
step) arrives as a 0-dim float64 tensor and enters the same math, as do a
tensor lr and tensor betas (on the CPU in float64: the kernel reads them as
doubles); a weight decay that is 0 on some step skips its term on that call.

The per-parameter scalars of one call are computed together, as a
``(rows, 2)`` table on the local step tensors for every
:data:`fxmesh.lowering.TABLE_ROWS` parameters of one local layout
(:func:`fxmesh.lowering.table_groups`), and each table is materialized
(:func:`fxmesh.lowering.materialized`).  Written per parameter, Inductor
inlined each 0-dim scalar into its reader, and each parameter's vectorized
loop recomputed ``pow(beta, step)`` in float64 in every iteration: on CPU that
made the step 2.5x slower (200 params of 64x64: 3.1-3.6 ms against 1.1-1.2
ms).  One table for a whole call made every parameter's update depend on every
step count, and Inductor's scheduler, which tracks each node's ancestors and
tries fusions within groups of nodes that read a common buffer, grew
quadratically: 500 parameters compiled in 142 s, against 119 s with tables of
16 rows.  The step counts are gathered into a table with
:func:`fxmesh.lowering.stack_scalars`, not ``torch.stack``: on the CPU
Inductor's concat buffer made its Python wrapper build one view per parameter
on every call (200 params of 64x64: 1.28 ms per step against 0.72 ms, and a
46 s compile against 56 s).  Materializing the table explicitly keeps it from
resting on Inductor's reuse heuristics.  Inside a DTensor group the table's
plain 0-dim entries are replicated implicitly on the group's one mesh.

Pre: run after ``split_by_mesh``: every call has its tensors on one mesh and
its scalar tensors on that mesh too.  Post: no fused Adam/AdamW node is left.
Raises :class:`UnsupportedInputError` naming the parameter index for dtypes or
layouts the fused kernel does not take.
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
    one_minus,
    round_to,
    rounded,
    scalar,
    stack_scalars,
    table_groups,
    upcast,
    with_weight_decay,
    write_back,
)
from fxmesh.meshes import example_value

__all__ = ["lower_fused_adam"]

# Each may be a float that a scheduler changes every step (OneCycleLR cycles
# beta1), which Dynamo then passes as a float64 tensor.
_HYPERPARAMETERS = ("lr", "beta1", "beta2", "weight_decay", "eps")


def _scalar_table(steps: list[Proxy], lr: Hyper, beta1: Hyper, beta2: Hyper, dtype: torch.dtype) -> Proxy:
    """``(len(steps), 2)`` table in ``dtype``: per parameter, step size and sqrt of bias correction 2."""
    device = example_value(steps[0].node).device
    steps_t = stack_scalars([local(step).to(dtype) for step in steps], device)

    def on_steps(x: Hyper) -> Hyper:  # a tensor hyperparameter as an operand of the local step math
        return local(x).to(dtype) if isinstance(x, Proxy) else x

    bias_correction1 = 1 - torch.pow(on_steps(beta1), steps_t)
    bias_correction2_sqrt = (1 - torch.pow(on_steps(beta2), steps_t)).sqrt()
    return materialized(torch.stack([divided(on_steps(lr), bias_correction1), bias_correction2_sqrt], dim=1), [2, 1])


def _adam_update(
    param: Proxy,
    grad: Proxy,
    exp_avg: Proxy,
    exp_avg_sq: Proxy,
    max_exp_avg_sq: Proxy | None,
    scalars: Proxy,
    *,
    laid_out: Proxy,
    opmath: torch.dtype,
    lr: Hyper,
    beta1: Hyper,
    beta2: Hyper,
    weight_decay: Hyper,
    eps: Hyper,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Proxy | None,
    found_inf: Proxy | None,
    gpu_kernel: bool,
) -> None:
    """One parameter's fused Adam(W) update, traced onto the graph.

    ``scalars`` is this parameter's row of a :func:`_scalar_table`.  With
    ``gpu_kernel`` the hyperparameters are already rounded to ``opmath`` (but
    a tensor lr); on the CPU a tensor hyperparameter is float64.
    """

    def up(t: Proxy) -> Proxy:
        return upcast(t, opmath)

    step_size = scalars[0].to(opmath)
    bias_correction2_sqrt = scalars[1].to(opmath)

    # Adam adds the decay to the grad (L2); AdamW decays the param.
    l2_decay = 0.0 if decoupled_weight_decay else scalar(weight_decay, opmath)
    p, g, grad_outputs = grad_prologue(
        param, grad, laid_out=laid_out, opmath=opmath, grad_scale=grad_scale, maximize=maximize, weight_decay=l2_decay
    )
    if decoupled_weight_decay and gpu_kernel:  # param -= lr * weight_decay * param, in opmath
        if isinstance(lr, Proxy) or isinstance(weight_decay, Proxy):
            lr_decay = scalar(lr, opmath) * scalar(weight_decay, opmath)
        else:
            lr_decay = round_to(lr * weight_decay, opmath)
        p = with_weight_decay(p, lambda: p - lr_decay * p, weight_decay)
    elif decoupled_weight_decay:  # param *= 1 - lr * weight_decay, the factor in float64
        decay = 1 - (lr.to(torch.float64) if isinstance(lr, Proxy) else lr) * weight_decay
        p = with_weight_decay(p, lambda: p * scalar(decay, opmath), weight_decay)
    if gpu_kernel:
        m = up(exp_avg) * scalar(beta1, opmath) + one_minus(beta1, opmath) * g
    else:
        m = torch.lerp(up(exp_avg), g, scalar(1 - beta1, opmath))
    v = up(exp_avg_sq) * scalar(beta2, opmath) + one_minus(beta2, opmath) * g * g
    outputs = [(exp_avg, m), (exp_avg_sq, v)]
    if max_exp_avg_sq is not None:
        v = torch.maximum(up(max_exp_avg_sq), v)
        outputs.append((max_exp_avg_sq, v))
    denom = v.sqrt() / bias_correction2_sqrt + scalar(eps, opmath)
    p = p - step_size * m / denom
    write_back([(param, p), *outputs, *grad_outputs], found_inf)


def _gpu_kernel(device: torch.device) -> bool:
    """Whether to follow the GPU kernels' arithmetic (CUDA, MPS) rather than the CPU kernel's."""
    return device.type != "cpu"


def _emit(op: FusedOp, args: dict[str, Any], proxy: Callable[[Any], Any]) -> None:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = (args[name] for name in op.list_args)
    first = example_value(params[0])
    opmath = OPMATH[first.dtype]
    gpu_kernel = _gpu_kernel(first.device)
    # The GPU kernels (CUDA, MPS) hold the hyperparameters and the per-tensor
    # scalars in the opmath type; the CPU kernel computes in float64, and reads
    # a tensor lr or tensor betas (torch.optim takes both) as doubles (lr is
    # cast where it is used).
    given = {k: proxy(args[k]) for k in _HYPERPARAMETERS}
    if gpu_kernel:
        hyper = {k: v if k == "lr" and isinstance(v, Proxy) else rounded(v, opmath) for k, v in given.items()}
    else:
        hyper = {k: upcast(v, torch.float64) if k != "lr" and isinstance(v, Proxy) else v for k, v in given.items()}
    table_dtype = opmath if gpu_kernel else torch.float64
    lr = hyper["lr"]
    for rows in table_groups(params):
        # The table's math is on the local step tensors, so it takes the given values (local() reads their metadata).
        table = _scalar_table([proxy(steps[i]) for i in rows], given["lr"], given["beta1"], given["beta2"], table_dtype)
        laid_out = laid_out_like_each([proxy(grads[i]) for i in rows], [proxy(params[i]) for i in rows])
        for row, i in enumerate(rows):
            _adam_update(
                proxy(params[i]),
                proxy(grads[i]),
                proxy(exp_avgs[i]),
                proxy(exp_avg_sqs[i]),
                proxy(max_exp_avg_sqs[i]) if args["amsgrad"] else None,
                table[row],
                laid_out=laid_out[row],
                opmath=OPMATH[example_value(params[i]).dtype],
                lr=lr,
                beta1=hyper["beta1"],
                beta2=hyper["beta2"],
                weight_decay=hyper["weight_decay"],
                eps=hyper["eps"],
                maximize=args["maximize"],
                decoupled_weight_decay=op.name == "adamw",
                grad_scale=proxy(args.get("grad_scale")),
                found_inf=proxy(args.get("found_inf")),
                gpu_kernel=gpu_kernel,
            )


def lower_fused_adam(gm: torch.fx.GraphModule) -> PassResult:
    """Replace every fused Adam/AdamW call with per-parameter pointwise math."""
    return lower_fused_calls(
        gm, ("adam", "adamw"), _emit, scalar_lists=("state_steps",), tensor_hyperparameters=_HYPERPARAMETERS
    )
