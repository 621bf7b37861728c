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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor

from fxmesh.meshes import group_by_mesh, local_tensor, mesh_key, replicate

__all__ = [
    "MESH_AWARE_OPS",
    "PER_ENTRY",
    "VALUE_LAST",
    "WITH_A_SCALAR",
    "foreach_per_entry",
    "foreach_per_mesh",
    "fused_adagrad_",
    "fused_adam_",
    "fused_adamw_",
    "fused_sgd_",
    "has_per_entry_form",
    "per_entry_form",
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


# The ops X whose torch._foreach_X (out of place, a torch.X call per entry) and
# torch._foreach_X_ (in place, a Tensor.X_ call per entry, or torch.X and copy_
# where Tensor has no X_) fxmesh can compute one entry at a time: all of torch's
# elementwise foreach ops, not the reductions (norm, max, powsum) or mm.
PER_ENTRY = frozenset(
    {
        "abs", "acos", "add", "addcdiv", "addcmul", "asin", "atan", "ceil", "clamp_max", "clamp_min",
        "clone", "copy", "cos", "cosh", "div", "erf", "erfc", "exp", "expm1", "floor", "frac", "lerp",
        "lgamma", "log", "log10", "log1p", "log2", "maximum", "minimum", "mul", "neg", "pow",
        "reciprocal", "round", "rsqrt", "sigmoid", "sign", "sin", "sinh", "sqrt", "sub", "tan", "tanh",
        "trunc", "zero",
    }
)  # fmt: skip
# Whose fourth positional argument (value, or a list of scalars) is keyword-only per entry.
VALUE_LAST = frozenset({"addcdiv", "addcmul"})
# torch.maximum takes two tensors; aten computes _foreach_maximum.Scalar as clamp_min (the same NaNs).
WITH_A_SCALAR = {"maximum": "clamp_min", "minimum": "clamp_max"}


def has_per_entry_form(name: str) -> bool:
    """Whether ``torch._foreach_<name>`` (``name`` is ``X`` or ``X_``) is computed one entry at a time here."""
    in_place = name.endswith("_")
    base = name[:-1] if in_place else name
    return base in PER_ENTRY and (in_place or base not in ("copy", "zero"))


def per_entry_form(
    name: str, args: Sequence[Any], kwargs: dict[str, Any], is_tensor: Callable[[Any], bool]
) -> tuple[str, list[Any], dict[str, Any]]:
    """The one-tensor form of a ``torch._foreach_<name>`` call over whole lists, where :func:`has_per_entry_form`.

    Returns ``X`` (``torch.X``) or ``X_`` (``Tensor.X_``, or ``torch.X`` and
    ``copy_`` where Tensor has none) to call once per entry, and the
    arguments, a trailing scalar or list of scalars made the ``value``
    keyword.  ``is_tensor`` tells tensors (or the FX nodes standing for them)
    from scalars.
    """
    in_place = name.endswith("_")
    base = name[:-1] if in_place else name
    args, kwargs = list(args), dict(kwargs)
    others = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if base in WITH_A_SCALAR and not any(is_tensor(a) for a in others):
        base = WITH_A_SCALAR[base]
    if base in VALUE_LAST and len(args) == 4:
        kwargs["value"] = args.pop()
    return (base + "_" if in_place else base), args, kwargs


def _call_one_entry(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """The one-tensor op ``name`` of :func:`per_entry_form`, on one entry's values."""
    if not name.endswith("_"):
        return getattr(torch, name)(*args, **kwargs)
    if hasattr(torch.Tensor, name):
        return getattr(torch.Tensor, name)(*args, **kwargs)
    return args[0].copy_(getattr(torch, name[:-1])(*args, **kwargs))  # maximum_, minimum_


@functools.cache
def foreach_per_entry(op: Callable[..., Any]) -> Callable[..., Any]:
    """A graph-recordable stand-in for ``op`` over DTensors, one call per entry (see :func:`has_per_entry_form`).

    For the foreach ops DTensor has no sharding rule for, which differ between
    torch versions: ``_foreach_copy_`` and ``_foreach_maximum`` with a scalar on
    every version, ``_foreach_lerp`` with a float weight, ``_foreach_sign`` and
    ``_foreach_sigmoid`` on 2.11-2.12.  Each entry's op has a rule, and plain
    0-dim tensors beside a DTensor are replicated onto its mesh.  Over plain
    tensors (the local shards) it calls ``op`` itself.  Named
    ``fxmesh.ops.<op>_per_entry`` so FX graphs can name it.
    """
    name = op.__name__.removeprefix("_foreach_")
    if not has_per_entry_form(name):
        raise ValueError(f"fxmesh has no per-entry form of {op.__name__}")

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))]
        if not any(isinstance(t, DTensor) for entries in lists for t in entries):
            results = op(*args, **kwargs)
        else:
            n = len(lists[0])
            entry_op, args, kwargs = per_entry_form(name, args, kwargs, lambda a: isinstance(a, torch.Tensor))

            def entry(a: Any, i: int) -> Any:
                return a[i] if isinstance(a, (list, tuple)) and len(a) == n else a

            results = [
                _call_one_entry(entry_op, [entry(a, i) for a in args], {k: entry(v, i) for k, v in kwargs.items()})
                for i in range(n)
            ]
        return None if name.endswith("_") else results  # what the graph records for an in-place op

    return _recordable(stand_in, op, "per_entry")


MESH_AWARE_OPS: dict[Any, Callable[..., None]] = {
    torch._fused_adam_: fused_adam_,
    torch._fused_adamw_: fused_adamw_,
    torch._fused_sgd_: fused_sgd_,
    torch._fused_adagrad_: fused_adagrad_,
}
