"""The fused optimizer ops fxmesh understands, and how to read their arguments.

The fused kernels take parallel tensor lists (entry ``i`` of every list belongs
to parameter ``i``) plus per-call scalars.  A pass binds a node's arguments by
name through :func:`bind` rather than by position.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from fxmesh.errors import UnsupportedInputError
from fxmesh.meshes import source_name
from fxmesh.ops import fused_adagrad_, fused_adam_, fused_adamw_, fused_sgd_

__all__ = ["FUSED_OPS", "FusedOp", "bind", "fused_op"]


@dataclasses.dataclass(frozen=True)
class FusedOp:
    name: str
    # Positional tensor-list arguments, parameters first.  A list is either as
    # long as ``params`` or empty (e.g. ``max_exp_avg_sqs`` without amsgrad).
    list_args: tuple[str, ...]
    # Keyword arguments that may be 0-dim tensors shared by every parameter.
    scalar_tensor_args: tuple[str, ...]


_ADAM_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
_ADAM_SCALARS = ("lr", "grad_scale", "found_inf")

_ADAM = FusedOp("adam", _ADAM_LISTS, _ADAM_SCALARS)
_ADAMW = FusedOp("adamw", _ADAM_LISTS, _ADAM_SCALARS)
# momentum_buffer_list is empty when momentum == 0.
_SGD = FusedOp("sgd", ("params", "grads", "momentum_buffer_list"), _ADAM_SCALARS)
_ADAGRAD = FusedOp("adagrad", ("params", "grads", "state_sums", "state_steps"), _ADAM_SCALARS)

# The aten ops, and the mesh-aware stand-ins that fxmesh's capture records.
FUSED_OPS: dict[Any, FusedOp] = {
    torch._fused_adam_: _ADAM,
    torch._fused_adamw_: _ADAMW,
    fused_adam_: _ADAM,
    fused_adamw_: _ADAMW,
    torch._fused_sgd_: _SGD,
    fused_sgd_: _SGD,
    torch._fused_adagrad_: _ADAGRAD,
    fused_adagrad_: _ADAGRAD,
}


def fused_op(node: torch.fx.Node) -> FusedOp | None:
    """The spec of ``node`` if it calls a fused optimizer op, else None."""
    if node.op != "call_function":
        return None
    return FUSED_OPS.get(node.target)


def bind(node: torch.fx.Node, op: FusedOp) -> dict[str, Any]:
    """``node``'s arguments by name: lists as lists of nodes, the rest as given.

    Raises :class:`UnsupportedInputError` for a list entry that is not a tensor
    (the kernel takes none; eagerly the call fails too).
    """
    if len(node.args) > len(op.list_args):
        raise ValueError(f"{node.format_node()}: too many positional arguments for {op.name}")
    bound = dict(zip(op.list_args, node.args))
    bound.update(node.kwargs)
    for name in op.list_args:
        bound[name] = list(bound.get(name) or ())
        for i, entry in enumerate(bound[name]):
            if not isinstance(entry, torch.fx.Node):
                raise UnsupportedInputError(_not_a_tensor(op, name, i, entry, bound))
    return bound


def _not_a_tensor(op: FusedOp, name: str, i: int, entry: Any, bound: dict[str, Any]) -> str:
    params = bound[op.list_args[0]]
    param = f" ({source_name(params[i])})" if i < len(params) and isinstance(params[i], torch.fx.Node) else ""
    message = (
        f"fused {op.name}: {name}[{i}] is {entry!r}, not a tensor, for parameter {i}{param}; the fused kernel "
        "takes a tensor for every parameter (eagerly this call fails too)"
    )
    if name == "momentum_buffer_list":
        message += (
            ". torch.optim's fused SGD creates momentum buffers only on a step where no parameter has one, so a "
            "parameter that first had a gradient after the others' first step() has none: give every parameter a "
            "gradient on the first step (zeros will do), or use SGD(foreach=...), which creates it"
        )
    return message
