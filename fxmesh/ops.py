"""Mesh-aware stand-ins for the fused optimizer ops, recorded in fxmesh graphs.

Dynamo runs every call it records on fake tensors.  ``torch._fused_adam(w)_``
with a tensor ``lr`` over DTensors on several meshes fails there: DTensor
replicates the plain ``lr`` onto the first parameter's mesh and then refuses the
other meshes (its cross-mesh allowance covers ``state_steps`` only).  While
fxmesh compiles, the capture hook records these functions instead.  Each does
what the aten op does, one call per mesh with its scalar tensors made
mesh-local, and the graph keeps a single node spanning all meshes for
``split_by_mesh`` to split.  On fake tensors they do nothing: the ops return
nothing and change no metadata, and aten has no fake kernel for the tensor-lr
overloads.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor

from fxmesh.meshes import group_by_mesh, local_tensor, mesh_key, replicate

__all__ = [
    "MESH_AWARE_OPS",
    "PER_ENTRY_OPS",
    "foreach_per_entry",
    "foreach_per_mesh",
    "fused_adagrad_",
    "fused_adam_",
    "fused_adamw_",
    "fused_sgd_",
]


def _mesh_local(value: Any, mesh: Any) -> Any:
    if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() == 0:
        return replicate(value, mesh)
    return value


def _scalars_on(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``kwargs`` with plain ``grad_scale`` and ``found_inf`` on ``device``, where eager torch.optim copies them.

    Under compile torch.optim groups the tensors under the device None, so its
    own copy is a no-op and CPU scalars arrive beside CUDA parameters; the CUDA
    kernels read these two through a device pointer.
    """
    moved = dict(kwargs)
    for name in ("grad_scale", "found_inf"):
        value = moved.get(name)
        if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.device != device:
            moved[name] = value.to(device, non_blocking=True)
    return moved


def _per_mesh(op: Callable[..., None], lists: tuple[list[torch.Tensor], ...], kwargs: dict[str, Any]) -> None:
    locals_ = [local_tensor(p) for p in lists[0]]
    if not locals_ or any(isinstance(t, FakeTensor) for t in locals_):
        return
    _call_per_mesh(op, lists, _scalars_on(kwargs, locals_[0].device))


def _on_local_tensors(op: Callable[..., None], lists: tuple[list[torch.Tensor], ...], kwargs: dict[str, Any]) -> None:
    """``op`` on the local tensors: for fused ops DTensor has no sharding rule for.

    The fused optimizers' math is elementwise on each rank's shard, so the local
    call is the whole update.
    """
    local_lists = [[local_tensor(t) for t in entries] for entries in lists]
    if not local_lists[0] or any(isinstance(t, FakeTensor) for t in local_lists[0]):
        return
    op(*local_lists, **_scalars_on({k: local_tensor(v) for k, v in kwargs.items()}, local_lists[0][0].device))


@torch._dynamo.allow_in_graph
def fused_adam_(*lists: list[torch.Tensor], **kwargs: Any) -> None:
    """``torch._fused_adam_`` over tensors on any number of meshes."""
    _per_mesh(torch._fused_adam_, lists, kwargs)


@torch._dynamo.allow_in_graph
def fused_adamw_(*lists: list[torch.Tensor], **kwargs: Any) -> None:
    """``torch._fused_adamw_`` over tensors on any number of meshes."""
    _per_mesh(torch._fused_adamw_, lists, kwargs)


@torch._dynamo.allow_in_graph
def fused_sgd_(*lists: list[torch.Tensor], **kwargs: Any) -> None:
    """``torch._fused_sgd_`` over tensors on any number of meshes (DTensor has no rule for it)."""
    _on_local_tensors(torch._fused_sgd_, lists, kwargs)


@torch._dynamo.allow_in_graph
def fused_adagrad_(*lists: list[torch.Tensor], **kwargs: Any) -> None:
    """``torch._fused_adagrad_`` over tensors on any number of meshes (DTensor has no rule for it)."""
    _on_local_tensors(torch._fused_adagrad_, lists, kwargs)


def _call_per_mesh(op: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``op`` (over parallel tensor lists) once per mesh, plain 0-dim tensors made mesh-local.

    Groups by the first list that holds a DTensor (else the first list; plain
    tensors group by device).  Returns the per-entry results in the original
    order, or None for ops that return nothing.
    """
    lists = [a for a in args if isinstance(a, (list, tuple))]
    keyed = next((a for a in lists if any(isinstance(t, DTensor) for t in a)), lists[0])
    n = len(keyed)
    out: list[Any] = [None] * n
    returned = False
    for key, idx in group_by_mesh(map(mesh_key, keyed)).items():

        def part(a: Any, key: Any = key, idx: list[int] = idx) -> Any:
            if isinstance(a, (list, tuple)) and len(a) == n:
                a = [a[i] for i in idx]
                return [_mesh_local(t, key.mesh) for t in a] if key.mesh is not None else a
            return _mesh_local(a, key.mesh) if key.mesh is not None else a

        result = op(*map(part, args), **{k: part(v) for k, v in kwargs.items()})
        if result is not None:
            returned = True
            for j, i in enumerate(idx):
                out[i] = result[j]
    return out if returned else None


@functools.cache
def foreach_per_mesh(op: Callable[..., Any]) -> Callable[..., Any]:
    """A graph-recordable stand-in for ``op`` whose tensor lists span several meshes beside plain tensors.

    DTensor replicates plain tensors (Adam's step counts and bias corrections)
    onto one mesh and then refuses the others; per mesh, each gets its own.
    The stand-in is named ``fxmesh.ops.<op>_per_mesh`` so FX graphs can name it.
    """

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return _call_per_mesh(op, args, kwargs)

    return _recordable(stand_in, op, "per_mesh")


def _recordable(stand_in: Callable[..., Any], op: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """``stand_in`` for ``op``, named ``fxmesh.ops.<op>_<kind>`` (FX graphs name it so) and allowed in graphs."""
    stand_in.__name__ = stand_in.__qualname__ = f"{op.__name__}_{kind}"
    stand_in.wrapped_op = op  # type: ignore[attr-defined]
    setattr(sys.modules[__name__], stand_in.__name__, stand_in)
    return torch._dynamo.allow_in_graph(stand_in)


# In-place foreach ops torch.optim calls over parameters or states that DTensor has
# no sharding rule for (Rprop's foreach step; ``_foreach_sign_`` only on torch 2.11),
# with the op for one entry.
PER_ENTRY_OPS: dict[Any, Callable[..., Any]] = {
    torch._foreach_copy_: torch.Tensor.copy_,
    torch._foreach_sign_: torch.Tensor.sign_,
}


@functools.cache
def foreach_per_entry(op: Callable[..., Any]) -> Callable[..., Any]:
    """A graph-recordable stand-in for ``op`` (a key of :data:`PER_ENTRY_OPS`) over DTensors: one call per entry.

    Over plain tensors (the local shards) it calls ``op`` itself.  Named
    ``fxmesh.ops.<op>_per_entry`` so FX graphs can name it.
    """
    entry_op = PER_ENTRY_OPS[op]

    def stand_in(self: list[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        if not any(isinstance(t, DTensor) for t in self):
            op(self, *args, **kwargs)
            return
        for i, t in enumerate(self):
            entry_op(t, *(a[i] if isinstance(a, (list, tuple)) else a for a in args), **kwargs)

    return _recordable(stand_in, op, "per_entry")


MESH_AWARE_OPS: dict[Any, Callable[..., None]] = {
    torch._fused_adam_: fused_adam_,
    torch._fused_adamw_: fused_adamw_,
    torch._fused_sgd_: fused_sgd_,
    torch._fused_adagrad_: fused_adagrad_,
}
