"""Gradient-norm clipping over gradients that live on several DeviceMeshes.

``torch.nn.utils.clip_grad_norm_`` stacks one norm per gradient, and DTensor
refuses to stack norms from different meshes (``All operands in
aten.stack.default must have the same mesh``).  Here every gradient's norm is
computed from its local shard; the gradients sharded alike (one mesh, the same
sharded mesh dims) add up their norms to the power p (take the largest for
inf, the smallest for -inf), and that one value is all-reduced over those mesh
dims.  Combining these as torch combines the per-gradient norms gives torch's
total: for p = 0 torch counts the gradients whose norm is nonzero, so there
each gradient's count is all-reduced instead.  A gradient replicated on a mesh
dim is counted once; a ``Partial`` gradient is reduced first.

The functions are written so that Dynamo can trace them: under
``backend="fxmesh"`` the norm, the collectives and the scaling land in the same
graph as the optimizer step, and Inductor fuses the scaling into the step's
kernels.  The capture hook (:mod:`fxmesh.capture`) routes
``torch.nn.utils.get_total_norm`` and ``clip_grads_with_norm_`` (and so
``clip_grad_norm_``) here when the gradients span several meshes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from fxmesh.meshes import distinct_meshes, partial_reduced

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
    if len(nonempty) == len(tensors):
        return norms
    empty = math.inf if norm_type == -math.inf else 0.0
    it = iter(norms)
    return [next(it) if t.numel() > 0 else torch.full((), empty, dtype=t.dtype, device=t.device) for t in tensors]


def _reduce(values: torch.Tensor, op: str) -> torch.Tensor:
    return values.sum() if op == "sum" else values.amax() if op == "max" else values.amin()


# One call for a group's part of the total, so that a compiled graph holds one node for it: over
# aten's _foreach_norm (which Inductor leaves to aten) Inductor's wrapper took each norm out of the
# list, made a view of a stacked buffer for it and copied it there, a few microseconds of Python
# per gradient on every call (bench/RESULTS.md CPU run T).  Library, not custom_op: see
# fxmesh.passes.aten_fused_adam.
_LIB = torch.library.Library("fxmesh", "FRAGMENT")
_LIB.define("clip_norm_part(Tensor[] tensors, float norm_type, ScalarType dtype, bool foreach) -> Tensor")


def _clip_norm_part(tensors: list[torch.Tensor], norm_type: float, dtype: torch.dtype, foreach: bool) -> torch.Tensor:
    """The norms of ``tensors`` in ``dtype``, summed to the power p (the largest for inf, the smallest for -inf)."""
    op = _reduce_op(norm_type)
    # torch.stack promotes norms of mixed dtypes to a float type that holds each of them exactly.
    values = torch.stack(_local_norms(tensors, norm_type, None if foreach else False)).to(dtype)
    return _reduce(values.pow(norm_type) if op == "sum" else values, op)


def _clip_norm_part_fake(
    tensors: list[torch.Tensor], norm_type: float, dtype: torch.dtype, foreach: bool
) -> torch.Tensor:
    return tensors[0].new_empty((), dtype=dtype)


_LIB.impl("clip_norm_part", _clip_norm_part, "CompositeExplicitAutograd")
torch.library.register_fake("fxmesh::clip_norm_part", _clip_norm_part_fake, lib=_LIB)


# The dtype of a norm: real for complex tensors.
_NORM_DTYPE = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def _sharding_groups(
    tensors: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[tuple[Any, tuple[int, ...], list[int]]]]:
    """The local tensors, and the indices of the tensors sharded alike: (mesh, sharded mesh dims, indices).

    Plain tensors and DTensors sharded on no mesh dim form one group with no mesh.
    """
    locals_: list[torch.Tensor] = []
    groups: list[tuple[Any, tuple[int, ...], list[int]]] = []
    for i, t in enumerate(tensors):
        mesh, dims = None, ()
        if isinstance(t, DTensor):
            if any(p.is_partial() for p in t.placements):
                t = partial_reduced(t)
            # Every mesh dim left that is not Replicate splits the tensor: Shard, and
            # FSDP2's _StridedShard (an expert's rows already split over ep), whose
            # is_shard() is False.
            dims = tuple(d for d, p in enumerate(t.placements) if not p.is_replicate())
            mesh = t.device_mesh if dims else None
            t = _local(t)
        for group_mesh, group_dims, indices in groups:
            if group_mesh == mesh and group_dims == dims:
                indices.append(i)
                break
        else:
            groups.append((mesh, dims, [i]))
        locals_.append(t)
    return locals_, groups


def _total_norm(tensors: list[torch.Tensor], norm_type: float, foreach: bool | None) -> torch.Tensor:
    """The norm of ``tensors`` viewed as one vector: one all-reduce per group of tensors sharded alike."""
    locals_, groups = _sharding_groups(tensors)
    dtype = functools.reduce(torch.promote_types, (_NORM_DTYPE.get(t.dtype, t.dtype) for t in locals_))
    work = torch.promote_types(dtype, torch.float32)
    device = tensors[0].device
    op = _reduce_op(norm_type)
    powered = op == "sum" and norm_type != 0.0

    parts = []
    for mesh, dims, indices in groups:
        if norm_type == 0.0:
            # torch counts the gradients with a nonzero norm: each gradient's count is needed whole.
            norms = _local_norms([locals_[i] for i in indices], norm_type, foreach)
            counts = torch.stack([n.to(work) for n in norms])
            for d in dims:
                counts = funcol.all_reduce(counts, "sum", (mesh, d))
            part = (counts != 0).sum().to(work)
        else:
            part = torch.ops.fxmesh.clip_norm_part([locals_[i] for i in indices], norm_type, work, foreach is not False)
            for d in dims:
                part = funcol.all_reduce(part, op, (mesh, d))
        parts.append(part.to(device))
    total = _reduce(torch.stack(parts), op)
    return (total.pow(1.0 / norm_type) if powered else total).to(dtype)


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
    total = _norm(tensors, norm_type, foreach, group)
    if error_if_nonfinite:
        raise_if_nonfinite(total, float(norm_type))
    return total


def traced_get_total_norm(
    tensors: torch.Tensor | Iterable[torch.Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    group: Group | None = None,
) -> torch.Tensor:
    """:func:`get_total_norm` as Dynamo traces it for an fxmesh backend.

    The finiteness check is one ``fxmesh::finite_norm`` node, at which the
    backend splits the graph (:mod:`fxmesh.checks`), instead of a branch, at
    which Dynamo would break the graph at the user's call.
    """
    total = _norm(tensors, norm_type, foreach, group)
    return torch.ops.fxmesh.finite_norm(total, float(norm_type)) if error_if_nonfinite else total


def _norm(
    tensors: torch.Tensor | Iterable[torch.Tensor], norm_type: float, foreach: bool | None, group: Group | None
) -> torch.Tensor:
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    # A `with` block rather than a decorator: Dynamo traces it where the
    # capture hook redirects torch's get_total_norm here.
    with torch.no_grad():
        total = _total_norm(tensors, norm_type, foreach)
        if group is not None:
            total = _fold_group(total, norm_type, group)
    return total


def raise_if_nonfinite(total: torch.Tensor, norm_type: float) -> None:
    """Raise torch's error for a non-finite total norm (a data-dependent branch: Dynamo breaks the graph here)."""
    if torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )


# The check traced_get_total_norm records. Run as an op (where no fxmesh backend splits the graph at it),
# it checks and returns a copy of the norm.
_LIB.define("finite_norm(Tensor total, float norm_type) -> Tensor")


def _finite_norm(total: torch.Tensor, norm_type: float) -> torch.Tensor:
    raise_if_nonfinite(total, norm_type)
    return total.clone()


_LIB.impl("finite_norm", _finite_norm, "CompositeExplicitAutograd")
torch.library.register_fake("fxmesh::finite_norm", lambda total, norm_type: torch.empty_like(total), lib=_LIB)


def clip_grads_with_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float | torch.Tensor,
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
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)  # torch's expression; max_norm may be a tensor
        for device, device_grads in by_device.items():
            device_coef = coef.to(device)
            if foreach is False:
                for g in device_grads:
                    g.mul_(device_coef)
            else:
                torch._foreach_mul_(device_grads, device_coef)


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float | torch.Tensor,
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
    """Whether ``tensors`` hold DTensors on more than one mesh, or DTensors beside plain tensors.

    Meshes compare by value (:func:`fxmesh.meshes.distinct_meshes`): upstream's
    norm takes DTensors on equal meshes (and returns a DTensor, which callers use).
    """
    tensors = list(tensors)
    meshes = distinct_meshes(tensors)
    plain = any(isinstance(t, torch.Tensor) and not isinstance(t, DTensor) for t in tensors)
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
        return traced_get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    with torch.no_grad():
        return torch.nn.utils.get_total_norm.__wrapped__(tensors, norm_type, error_if_nonfinite, foreach)


def torch_clip_grads_with_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float | torch.Tensor,
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
