"""One place that reads DTensor metadata off FX nodes and groups tensors by mesh.

Dynamo graphs carry the traced value of a node in ``meta["example_value"]``;
graphs produced by ``make_fx``/export carry it in ``meta["val"]``.  Every pass
reads metadata through :func:`example_value` so that a missing value is noticed
in one place instead of being guessed at in several.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from fxmesh.errors import EagerFallback

__all__ = [
    "MeshKey",
    "MissingMetadataError",
    "call_foreach_per_entry",
    "describe_mesh",
    "distinct_meshes",
    "example_value",
    "group_by_mesh",
    "local_tensor",
    "mesh_key",
    "node_mesh_key",
    "partial_reduced",
    "redistributed_like",
    "replicate",
    "source_name",
]


class MissingMetadataError(EagerFallback):
    """A node that a pass must understand carries no traced value."""


@dataclasses.dataclass(frozen=True)
class MeshKey:
    """Where a tensor lives: a DeviceMesh for DTensors, else a plain device."""

    mesh: DeviceMesh | None
    device: torch.device

    def __str__(self) -> str:
        return describe_mesh(self.mesh) if self.mesh is not None else f"plain {self.device}"


def example_value(node: torch.fx.Node) -> Any:
    """The traced (fake) value of ``node``, or None when the graph has none."""
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


def source_name(node: torch.fx.Node) -> str:
    """How an error names ``node``: where the user's code reads it (``L['opt'].param_groups[0]['params'][1]``)
    when Dynamo recorded that, a parameter's graph attribute, or else the node's name."""
    grapharg = node.meta.get("grapharg")
    if grapharg is not None:
        return grapharg.source.name
    return str(node.target) if node.op == "get_attr" else node.name


def describe_mesh(mesh: DeviceMesh) -> str:
    """A short readable name for a mesh, e.g. ``ep(dp_mod_ep=2, ep=4)``."""
    names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
    dims = ", ".join(f"{n}={s}" for n, s in zip(names, mesh.shape))
    return f"{names[-1]}({dims})"


def mesh_key(value: Any) -> MeshKey:
    """The mesh key of a traced tensor value."""
    if isinstance(value, DTensor):
        return MeshKey(value.device_mesh, value.device)
    if isinstance(value, torch.Tensor):
        return MeshKey(None, value.device)
    raise TypeError(f"expected a tensor, got {type(value).__name__}")


def node_mesh_key(node: torch.fx.Node, what: str) -> MeshKey:
    """The mesh key of ``node``; ``what`` names the node in the error if it has no value."""
    value = example_value(node)
    if value is None:
        raise MissingMetadataError(f"{what} ({node.format_node()}) has no example value, so its mesh cannot be read")
    return mesh_key(value)


def replicate(local: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """``local`` as a DTensor replicated on every dim of ``mesh``, without a cross-rank check.

    For values that are the same on every rank by construction (step counts, a
    tensor lr).  A module-level function so that FX graphs can name it: FX
    spells ``DTensor.from_local`` differently across torch versions.
    """
    return DTensor.from_local(local, mesh, (Replicate(),) * mesh.ndim, run_check=False)


def redistributed_like(t: DTensor, like: DTensor) -> DTensor:
    """``t`` redistributed to ``like``'s mesh and placements (a module-level function, for FX graphs)."""
    return t.redistribute(like.device_mesh, like.placements)


def partial_reduced(t: DTensor) -> DTensor:
    """``t`` with its ``Partial`` mesh dims reduced to ``Replicate`` (a module-level function, for FX graphs)."""
    return t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])


def distinct_meshes(tensors: Iterable[Any]) -> list[DeviceMesh]:
    """The meshes of the DTensors among ``tensors``, once each, in order of first appearance.

    Meshes compare as DTensor compares them, by value: FSDP2 gives each
    parameter on a 2-D mesh an equal mesh object of its own.
    """
    meshes: list[DeviceMesh] = []
    for t in tensors:
        if isinstance(t, DTensor) and not any(m == t.device_mesh for m in meshes):
            meshes.append(t.device_mesh)
    return meshes


def local_tensor(t: Any) -> Any:
    """A DTensor's local tensor (no autograd, no copy); anything else as it is."""
    return t._local_tensor if isinstance(t, DTensor) else t


def group_by_mesh(keys: Iterable[MeshKey]) -> dict[MeshKey, list[int]]:
    """Indices grouped by key, groups in order of first appearance."""
    groups: dict[MeshKey, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _foreach_length(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The length of the lists of a ``torch._foreach_*`` call over DTensors, where it is above 1; else None."""
    name = getattr(op, "__name__", "")
    if not name.startswith("_foreach_") or getattr(torch, name, None) is not op:
        return None
    lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))]
    lengths = {len(a) for a in lists}
    if len(lengths) != 1 or not any(isinstance(t, DTensor) for a in lists for t in a):
        return None
    (n,) = lengths
    return n if n > 1 else None


def call_foreach_per_entry(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``op(*args, **kwargs)``, where ``op`` is a ``torch._foreach_*`` op over DTensors run one list entry at a time.

    DTensor's rule for a foreach op takes time quadratic in the lists' length
    (upstream's strided-shard check looks at every list entry's spec for each
    entry: about 16 s per op for 1,000 entries on the CPU box), and its cache
    never sees a list's specs twice; one entry's rule is cached across entries
    of one layout.  A foreach op computes each entry on its own, so the values
    are the same.  Any other call is made as it is.
    """
    n = _foreach_length(op, args, kwargs)
    if n is None:
        return op(*args, **kwargs)

    def entry(value: Any, i: int) -> Any:
        return [value[i]] if isinstance(value, (list, tuple)) and len(value) == n else value

    results = [op(*(entry(a, i) for a in args), **{k: entry(v, i) for k, v in kwargs.items()}) for i in range(n)]
    return None if all(r is None for r in results) else [r[0] for r in results]


def propagate_example_value(node: torch.fx.Node, fake_mode: Any) -> None:
    """Compute ``node``'s example value from its inputs' under ``fake_mode`` (see :func:`call_foreach_per_entry`)."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), example_value)
    with fake_mode:
        if node.op == "call_function":
            value = call_foreach_per_entry(node.target, args, kwargs)
        elif node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot propagate a value through {node.op} nodes")
    node.meta["example_value"] = value


def graph_fake_mode(gm: torch.fx.GraphModule) -> Any:
    """The fake mode the graph's example values were traced under.

    Read off the values themselves: the ambient tracing context may hold a
    fresh fake mode by the time a backend runs.
    """
    for node in gm.graph.nodes:
        value = example_value(node)
        if isinstance(value, DTensor):
            value = value._local_tensor
        if isinstance(value, FakeTensor):
            return value.fake_mode
    raise MissingMetadataError("the graph carries no fake example values")
