"""Gradient-norm clipping over gradients that live on several DeviceMeshes.

``torch.nn.utils.clip_grad_norm_`` stacks one norm per gradient, and DTensor
refuses to stack norms from different meshes (``All operands in
aten.stack.default must have the same mesh``).  Here every gradient's norm is
computed from its local shard, the shards' contributions are reduced over the
mesh dims the gradient is sharded on (one all-reduce per mesh and sharding
pattern, for all its gradients at once), and the per-gradient norms are
combined exactly as torch combines them.  A gradient replicated on a mesh dim
is counted once; a ``Partial`` gradient is reduced first.

The functions are written so that Dynamo can trace them: under
``backend="fxmesh"`` the norm, the collectives and the scaling land in the same
graph as the optimizer step, and Inductor fuses the scaling into the step's
kernels.  The capture hook (:mod:`fxmesh.capture`) routes
``torch.nn.utils.get_total_norm`` and ``clip_grads_with_norm_`` (and so
``clip_grad_norm_``) here when the gradients span several meshes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm"]

Group = dist.ProcessGroup | DeviceMesh


def _as_list(tensors: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """A tensor or an iterable of them (a parameter generator, say), as torch's clipping takes them."""
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _reduce_op(norm_type: float) -> str:
    if norm_type == math.inf:
        return "max"
    if norm_type == -math.inf:
        return "min"
    return "sum"


def _local(t: DTensor) -> torch.Tensor:
    # Eagerly the local tensor itself: to_local() is an autograd.Function call,
    # microseconds per gradient.  Dynamo traces to_local().
    return t.to_local() if torch.compiler.is_compiling() else t._local_tensor


def _local_norms(tensors: list[torch.Tensor], norm_type: float, foreach: bool | None) -> list[torch.Tensor]:
    """The norm of each tensor's local shard (an empty shard has the reduction's identity)."""
    nonempty = [t for t in tensors if t.numel() > 0]
    if foreach is False:
        norms = [torch.linalg.vector_norm(t, norm_type) for t in nonempty]
    else:
        norms = list(torch._foreach_norm(nonempty, norm_type)) if nonempty else []
    empty = math.inf if norm_type == -math.inf else 0.0
    it = iter(norms)
    return [next(it) if t.numel() > 0 else torch.full((), empty, dtype=t.dtype, device=t.device) for t in tensors]


def _per_tensor_norms(tensors: list[torch.Tensor], norm_type: float, foreach: bool | None) -> list[torch.Tensor]:
    """Each tensor's norm as if it were unsharded, as plain tensors equal on every rank."""
    locals_: list[torch.Tensor] = []
    # (mesh, sharded mesh dims) -> indices of the tensors sharded that way.
    sharded: list[tuple[DeviceMesh, tuple[int, ...], list[int]]] = []
    for i, t in enumerate(tensors):
        if isinstance(t, DTensor):
            if any(p.is_partial() for p in t.placements):
                t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
            dims = tuple(d for d, p in enumerate(t.placements) if p.is_shard())
            if dims:
                for mesh, mesh_dims, indices in sharded:
                    if mesh is t.device_mesh and mesh_dims == dims:
                        indices.append(i)
                        break
                else:
                    sharded.append((t.device_mesh, dims, [i]))
            t = _local(t)
        locals_.append(t)
    norms = _local_norms(locals_, norm_type, foreach)
    op = _reduce_op(norm_type)
    # A finite p-norm adds up |x|^p over the shards; 0, inf and -inf reduce the norms themselves.
    powered = op == "sum" and norm_type != 0.0
    for mesh, dims, indices in sharded:
        parts = torch.stack([norms[i].to(torch.promote_types(norms[i].dtype, torch.float32)) for i in indices])
        if powered:
            parts = parts.pow(norm_type)
        for d in dims:
            parts = funcol.all_reduce(parts, op, (mesh, d))
        if powered:
            parts = parts.pow(1.0 / norm_type)
        for j, i in enumerate(indices):
            norms[i] = parts[j].to(norms[i].dtype)
    return norms


def _fold_group(total: torch.Tensor, norm_type: float, group: Group) -> torch.Tensor:
    """Combine ``total`` with the totals of the other ranks of ``group`` (e.g. other pipeline stages)."""
    op = _reduce_op(norm_type)
    if op != "sum" or norm_type == 0.0:
        return funcol.all_reduce(total, op, group)
    return funcol.all_reduce(total.pow(norm_type), op, group).pow(1.0 / norm_type)


def get_total_norm(
    tensors: torch.Tensor | Iterable[torch.Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    group: Group | None = None,
) -> torch.Tensor:
    """The norm of ``tensors`` viewed as one vector of their unsharded values.

    Like ``torch.nn.utils.get_total_norm``, for plain tensors and DTensors on
    any number of meshes with any placements.  Returns a plain 0-dim tensor, the
    same on every rank.  ``group`` (a process group or 1-D DeviceMesh) folds in
    the norms held by its other ranks, e.g. the other pipeline stages.
    """
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    # A `with` block rather than a decorator: Dynamo traces it where the
    # capture hook redirects torch's get_total_norm here.
    with torch.no_grad():
        first_device = tensors[0].device
        norms = _per_tensor_norms(tensors, norm_type, foreach)
        total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
        if group is not None:
            total = _fold_group(total, norm_type, group)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    return total


def clip_grads_with_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
) -> None:
    """Scale the gradients of ``parameters`` by ``min(1, max_norm / (total_norm + 1e-6))``, in place.

    Like ``torch.nn.utils.clip_grads_with_norm_``, for gradients on any meshes:
    each gradient's local shard is scaled, which is right for every placement.
    """
    parameters = _as_list(parameters)
    grads = [_local(p.grad) if isinstance(p.grad, DTensor) else p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    with torch.no_grad():
        # No `if coef < 1` branch: it would synchronize with the device, as torch notes.
        coef = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
        for device, device_grads in by_device.items():
            device_coef = coef.to(device)
            if foreach is False:
                for g in device_grads:
                    g.mul_(device_coef)
            else:
                torch._foreach_mul_(device_grads, device_coef)


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    group: Group | None = None,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` to a total norm of ``max_norm``, across any meshes.

    ``torch.nn.utils.clip_grad_norm_`` for parameters on several DeviceMeshes:
    returns the total norm of all gradients as if they were unsharded (a plain
    0-dim tensor, the same on every rank) and scales every gradient in place.
    ``group`` (a process group or 1-D DeviceMesh, e.g. torchtitan's ``pp``
    mesh) folds in the norms of the gradients held by its other ranks.
    """
    parameters = _as_list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = get_total_norm(grads, norm_type, error_if_nonfinite, foreach, group)
    clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total


def spans_meshes(tensors: Iterable[Any]) -> bool:
    """Whether ``tensors`` hold DTensors on more than one mesh, or DTensors beside plain tensors."""
    meshes: list[Any] = []
    plain = False
    for t in tensors:
        if isinstance(t, DTensor):
            if not any(m is t.device_mesh for m in meshes):
                meshes.append(t.device_mesh)
        elif isinstance(t, torch.Tensor):
            plain = True
    return len(meshes) > 1 or (len(meshes) == 1 and plain)


def torch_get_total_norm(
    tensors: torch.Tensor | Iterable[torch.Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """What ``torch.nn.utils.get_total_norm`` runs under ``backend="fxmesh"``: fxmesh's norm where the
    tensors span several meshes (upstream fails there), upstream's own everywhere else."""
    tensors = _as_list(tensors)
    if spans_meshes(tensors):
        return get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    with torch.no_grad():
        return torch.nn.utils.get_total_norm.__wrapped__(tensors, norm_type, error_if_nonfinite, foreach)


def torch_clip_grads_with_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
) -> None:
    """What ``torch.nn.utils.clip_grads_with_norm_`` runs under ``backend="fxmesh"``.

    Across meshes fxmesh scales the local shards: torch's ``_foreach_mul_`` over
    DTensors leaves a ``Partial`` gradient unscaled on torch 2.11.
    """
    parameters = _as_list(parameters)
    if spans_meshes(p.grad for p in parameters if p.grad is not None):
        return clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    with torch.no_grad():
        return torch.nn.utils.clip_grads_with_norm_.__wrapped__(parameters, max_norm, total_norm, foreach)
