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
    "describe_mesh",
    "example_value",
    "group_by_mesh",
    "mesh_key",
    "node_mesh_key",
    "replicate",
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


def group_by_mesh(keys: Iterable[MeshKey]) -> dict[MeshKey, list[int]]:
    """Indices grouped by key, groups in order of first appearance."""
    groups: dict[MeshKey, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def propagate_example_value(node: torch.fx.Node, fake_mode: Any, memo: dict[Any, Any] | None = None) -> None:
    """Compute ``node``'s example value from its inputs' under ``fake_mode``.

    With ``memo`` (one dict per pass run), a node that repeats an earlier
    node's op on inputs of the same metadata gets a fresh value of the earlier
    result's metadata instead of a second DTensor dispatch (about 1 ms per
    node; a lowered step has some 25 nodes per parameter).  Results that share
    memory with an input (views, in-place ops) are always computed.
    """
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), example_value)
    key = _memo_key(node, args, kwargs) if memo is not None else None
    if key is not None and key in memo:
        with fake_mode:
            node.meta["example_value"] = _like(memo[key])
        return
    with fake_mode:
        if node.op == "call_function":
            value = node.target(*args, **kwargs)
        elif node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot propagate a value through {node.op} nodes")
    node.meta["example_value"] = value
    if key is not None and _fresh(value, args, kwargs):
        memo[key] = value


def _signature(value: Any) -> Any:
    """Hashable metadata of an example value; raises TypeError for values it cannot describe."""
    if isinstance(value, DTensor):
        spec = value._spec
        order = getattr(spec, "shard_order", None)
        return ("D", _signature(value._local_tensor), id(spec.mesh), spec.placements, spec.shape, spec.stride, order)
    if isinstance(value, FakeTensor):
        return ("T", value.shape, value.stride(), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_signature, value))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.layout)):
        return (type(value).__name__, value)
    raise TypeError(type(value).__name__)


def _memo_key(node: torch.fx.Node, args: Any, kwargs: Any) -> Any:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_function", "call_method") or name.endswith("_"):
        return None  # in-place: the value is the input itself
    try:
        key = node.op, node.target, _signature(args), _signature(sorted(kwargs.items()))
        hash(key)
    except TypeError:
        return None
    return key


def _local_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, DTensor):
        return [value._local_tensor]
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _local_tensors(v)]
    return []


def _fresh(value: Any, args: Any, kwargs: Any) -> bool:
    """Whether ``value`` holds tensors only, none of them sharing memory with an input."""
    outputs = _local_tensors(value)
    if not outputs or not all(isinstance(t, FakeTensor) for t in outputs):
        return False
    if isinstance(value, (list, tuple)) and len(outputs) != len(value):
        return False
    inputs = {t.untyped_storage()._cdata for t in _local_tensors([args, list(kwargs.values())])}
    return all(t.untyped_storage()._cdata not in inputs for t in outputs)


def _like(value: Any) -> Any:
    """A new value of ``value``'s metadata (in the ambient fake mode)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_like(v) for v in value)
    if isinstance(value, DTensor):
        return DTensor(_like(value._local_tensor), value._spec, requires_grad=value.requires_grad)
    out = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    return out.requires_grad_(value.requires_grad)


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
