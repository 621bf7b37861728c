"""What fxmesh does to one optimizer step: the meshes, the optimizer nodes, the compiled result.

:func:`inspect_target` loads ``path/to/file.py:function`` or
``package.module:function`` inside a single-process fake process group, calls
it, compiles what it returns (an optimizer's ``step`` or a zero-argument train
step) with the fxmesh backend, runs it once and returns a :class:`Report`.
The ``fxmesh inspect`` command prints it.

The backend is the registered one (all of :data:`fxmesh.passes.PASSES`), plus
a last pass that only observes: a :class:`Report` describes the graphs fxmesh
compiles, not a copy of them.  Element and byte counts are this rank's shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import operator
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.fx
from torch._dynamo.exc import Unsupported
from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics
from torch._inductor.graph import GraphLowering
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.fx.passes.infra.pass_base import PassResult
from torch.optim import optimizer as torch_optimizer
from torch.testing._internal.distributed.fake_pg import FakeStore

from fxmesh import ops
from fxmesh.backend import FxmeshBackend
from fxmesh.fused_ops import bind, fused_op
from fxmesh.meshes import MeshKey, MissingMetadataError, describe_mesh, group_by_mesh, node_mesh_key
from fxmesh.passes import PASSES
from fxmesh.passes.split_by_mesh import MESH_GROUPS_META

__all__ = [
    "GraphBreak",
    "Group",
    "MeshSummary",
    "NodeSummary",
    "Report",
    "TargetError",
    "error_line",
    "fake_world",
    "inspect_step",
    "inspect_target",
    "load_target",
]

log = logging.getLogger(__name__)

# Inductor's kernel definitions in its output code: C++ on the CPU, Triton on GPUs.
_KERNEL_DEF = re.compile(r"^\w+ = async_compile\.(?:cpp_pybinding|cpp|triton)\(", re.MULTILINE)
# Calls that leave Inductor's kernels: extern kernels and ATen (or other op) fallbacks.
_EXTERN_CALL = re.compile(r"(?<![\w.])(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(")
# Optimizer math that Inductor should have generated.  Not ``_foreach_norm``: clipping's
# norms, which Inductor lowers under no backend (aten's multi-tensor kernel runs them).
_OPTIMIZER_OP = re.compile(r"\.(_fused_(?:adam|adamw|sgd|adagrad)_?|_foreach_(?!norm\b)\w+)\b")


class TargetError(Exception):
    """TARGET cannot be loaded, called, or did not return a step to compile."""


@dataclasses.dataclass(frozen=True)
class MeshSummary:
    """One DeviceMesh and the tensors the step holds on it."""

    name: str
    dim_names: list[str] | None
    shape: list[int]
    tensors: int
    numel: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class Group:
    """One call that a node runs as: a mesh and how many parameters it updates there."""

    mesh: str
    tensors: int


@dataclasses.dataclass(frozen=True)
class NodeSummary:
    """An optimizer node of a graph as the passes saw it.

    ``tensors`` is the length of its tensor lists (one entry per parameter);
    ``groups`` are the calls it runs as: one per mesh after ``split_by_mesh``
    for fused ops, one per mesh at run time for per-mesh foreach stand-ins.
    """

    graph: int
    name: str
    target: str
    tensors: int
    meshes: list[str]
    groups: list[Group]


@dataclasses.dataclass(frozen=True)
class GraphBreak:
    """A graph break Dynamo took, where it happened, and how often."""

    reason: str
    location: str
    count: int
    # torch.optim's ``_use_grad_for_differentiable`` fences every step with
    # ``torch._dynamo.graph_break()``; that one is expected.
    optimizer_base: bool


@dataclasses.dataclass(frozen=True)
class Report:
    """What compiling one step with fxmesh found and produced."""

    target: str
    world_size: int
    graphs: int
    meshes: list[MeshSummary]
    nodes: list[NodeSummary]
    kernels: int
    extern_calls: dict[str, int]
    graph_breaks: list[GraphBreak]
    recompiles: int
    # Wall clock of the one call: Dynamo, the passes and Inductor, then the step itself.
    compile_seconds: float
    eager_fallbacks: int
    # Fused optimizer nodes whose tensors still sit on several meshes after the passes.
    multi_mesh_nodes: list[str]
    # Graphs compiled over the DTensors' local tensors (fxmesh.local); the others over DTensors.
    local_shard_graphs: int = 0
    # Graphs Dynamo passed symbolic sizes that fxmesh kept (a batch's length, mark_dynamic): slower to
    # compile, and Inductor keeps its size asserts.
    symbolic_graphs: int = 0
    # Graphs whose parameters', gradients' and optimizer state's symbolic sizes fxmesh made static
    # (a recompile for other shapes; gradients that are views, as FSDP2's; fxmesh.specialize).
    specialized_graphs: int = 0
    # Pieces those graphs run as, and how many of them were compiled (fxmesh.pieces; 0 where none split).
    pieces: int = 0
    piece_compiles: int = 0
    # Graphs compiled in two parts around a host-side check (clip_grad_norm_'s error_if_nonfinite, fxmesh.checks).
    check_splits: int = 0

    @property
    def fallbacks(self) -> int:
        return sum(self.extern_calls.values())

    @property
    def compiled_graphs(self) -> int:
        """The graphs fxmesh compiled: Dynamo's, each split at a check counted as its two parts."""
        return self.graphs + self.check_splits

    def problems(self) -> list[str]:
        """Why the step is not fully compiled; empty when it is."""
        found = [
            f"graph break at {b.location}: {b.reason.splitlines()[0]}"
            for b in self.graph_breaks
            if not b.optimizer_base
        ]
        found += [
            f"optimizer op left as an extern call: {name} ({n}x)"
            for name, n in self.extern_calls.items()
            if _OPTIMIZER_OP.search(name)
        ]
        found += [f"{node} still spans several meshes after the passes" for node in self.multi_mesh_nodes]
        if self.eager_fallbacks:
            found.append(f"{self.eager_fallbacks} graph(s) ran eagerly: a pass could not rewrite them")
        if self.graphs == 0:
            found.append("Dynamo compiled no graph: the step ran eagerly")
        return found

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fallbacks"] = self.fallbacks
        out["problems"] = self.problems()
        return out


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[int]:
    """A single-process fake process group of ``world_size`` ranks, unless a process group exists.

    Meshes of any size can then be built on one machine; each DTensor holds
    rank 0's shard.  Yields the world size in effect.
    """
    if dist.is_initialized():
        yield dist.get_world_size()
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield world_size
    finally:
        dist.destroy_process_group()


def error_line(e: BaseException) -> str:
    """``e`` as one line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_target(target: str) -> Callable[..., Any]:
    """The function named by ``path/to/file.py:function`` or ``package.module:function``."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise TargetError(f"TARGET must be path/to/file.py:function or package.module:function, not {target!r}")
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise TargetError(f"no such file: {where}")
        # A name of its own: a file called e.g. torch.py must not replace a module in sys.modules.
        spec = importlib.util.spec_from_file_location(f"_fxmesh_target_{path.stem}", path)
        if spec is None:
            raise TargetError(f"cannot load {where} as Python source")
        module = importlib.util.module_from_spec(spec)
        # Registered before it runs, as importlib documents, for code that looks its module up (dataclasses).
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[spec.name]
            raise TargetError(f"importing {where} failed: {error_line(e)}") from e
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise TargetError(f"cannot import {where}: {error_line(e)}") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise TargetError(f"{where} has no function {name!r}")
    if not callable(fn):
        raise TargetError(f"{target} is a {type(fn).__name__}, not a function")
    return fn


def _step_of(value: Any, target: str) -> tuple[Callable[[], Any], torch.optim.Optimizer | None]:
    """The callable to compile for what TARGET returned, and the optimizer if it is one."""
    if isinstance(value, torch.optim.Optimizer):
        if not any(p.grad is not None for group in value.param_groups for p in group["params"]):
            raise TargetError(f"{target} returned an optimizer whose parameters have no gradients")
        return value.step, value
    if callable(value):
        try:
            inspect.signature(value).bind()
        except TypeError as e:
            raise TargetError(f"{target} returned a callable that needs arguments ({e}); expected a train step") from e
        except ValueError:  # no signature to check (some builtins): calling it will tell
            pass
        return value, None
    raise TargetError(
        f"{target} returned {type(value).__name__}; expected a torch.optim.Optimizer or a zero-argument callable"
    )


def _target_name(target: Any) -> str:
    name = getattr(target, "__name__", repr(target))
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else name


def _distinct(keys: Iterable[MeshKey]) -> list[str]:
    return list(dict.fromkeys(map(str, keys)))


def _mesh_summaries(tensors: Iterable[Any]) -> list[MeshSummary]:
    """DTensors grouped by mesh (in order of first appearance), each tensor counted once."""
    seen: set[int] = set()
    totals: dict[DeviceMesh, list[int]] = {}
    for t in tensors:
        if not isinstance(t, DTensor) or id(t) in seen:
            continue
        seen.add(id(t))
        shard = t._local_tensor
        total = totals.setdefault(t.device_mesh, [0, 0, 0])
        total[0] += 1
        total[1] += shard.numel()
        total[2] += shard.numel() * shard.element_size()
    return [
        MeshSummary(
            name=describe_mesh(mesh),
            dim_names=list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
            shape=list(mesh.shape),
            tensors=n,
            numel=numel,
            bytes=nbytes,
        )
        for mesh, (n, numel, nbytes) in totals.items()
    ]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in opt.param_groups:
        for p in group["params"]:
            yield p
            if p.grad is not None:
                yield p.grad
            yield from (v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor))


class _Recorder:
    """Watches one inspection: every graph fxmesh compiles, Inductor's code, Dynamo's graph breaks."""

    def __init__(self, dump_dir: Path | None) -> None:
        self.dump_dir = dump_dir
        self.graphs = 0
        self.nodes: list[NodeSummary] = []
        self.inputs: list[Any] = []
        self.multi_mesh_nodes: list[str] = []
        self.output_code: list[str] = []
        self.compiled_per_graph: dict[int, int] = {}
        self.breaks: list[tuple[str, Any]] = []
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)

    def _dump(self, name: str, text: str) -> None:
        if self.dump_dir is not None:
            (self.dump_dir / name).write_text(text)

    def before_passes(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> None:
        index = self.graphs
        self.graphs += 1
        self._dump(f"graph_{index}.before_passes.py", gm.print_readable(print_output=False))
        self.inputs += [v for v in example_inputs if isinstance(v, torch.Tensor)]
        self.inputs += [operator.attrgetter(n.target)(gm) for n in gm.graph.find_nodes(op="get_attr")]
        for node in gm.graph.nodes:
            try:
                summary = _summary(node, index)
            except (MissingMetadataError, TypeError) as e:  # no value, or not a tensor
                log.warning("fxmesh inspect: %s left out of the report: %s", node.name, e)
                continue
            if summary is not None:
                self.nodes.append(summary)

    def after_passes(self, gm: torch.fx.GraphModule) -> PassResult:
        """The observing pass, run after the registered ones; changes nothing."""
        index = self.graphs - 1
        self._dump(f"graph_{index}.after_passes.py", gm.print_readable(print_output=False))
        recorded = gm.meta.get(MESH_GROUPS_META, {})
        self.nodes = [
            dataclasses.replace(n, groups=[Group(mesh, k) for mesh, k in recorded[n.name]])
            if n.graph == index and n.name in recorded
            else n
            for n in self.nodes
        ]
        for node in gm.graph.nodes:
            if fused_op(node) is None:
                continue
            try:
                summary = _summary(node, index)
            except MissingMetadataError as e:  # raised in a pass, it would make the backend fall back to eager
                log.warning("fxmesh inspect: cannot read the meshes of %s after the passes: %s", node.name, e)
                continue
            if len(summary.meshes) > 1:
                self.multi_mesh_nodes.append(f"graph {index} node {node.name} ({', '.join(summary.meshes)})")
        return PassResult(gm, False)

    def compiled(self, gm: torch.fx.GraphModule) -> None:
        """A graph the inner compiler gets: over the local shards where :mod:`fxmesh.local` applied; one
        per distinct piece where :mod:`fxmesh.pieces` split the step (``graph_G.compiled_K.py``)."""
        index = self.graphs - 1
        piece = self.compiled_per_graph.get(index, 0)
        self.compiled_per_graph[index] = piece + 1
        self._dump(f"graph_{index}.compiled_{piece}.py", gm.print_readable(print_output=False))

    def save_output_code(self, code: str) -> None:
        self._dump(f"output_code_{len(self.output_code)}.py", code)
        self.output_code.append(code)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Collect Inductor's output code and the location of every graph break inside the block."""
        add_to_stats = Unsupported.add_to_stats
        breaks = self.breaks

        # counters["graph_break"] holds reasons only, and torch.optim's own
        # break and a user's torch._dynamo.graph_break() share one; where the
        # break happened tells them apart.
        def add_to_stats_with_location(exc: Unsupported, category: str = "unimplemented") -> None:
            add_to_stats(exc, category)
            if category == "graph_break":
                stack = getattr(exc, "real_stack", None)
                breaks.append((exc.msg, stack[-1] if stack else None))

        with (
            mock.patch.object(GraphLowering, "save_output_code", self.save_output_code),
            mock.patch.object(Unsupported, "add_to_stats", add_to_stats_with_location),
        ):
            yield


class _RecordingBackend(FxmeshBackend):
    """The fxmesh backend, reporting each graph to a recorder before and after the passes."""

    def __init__(self, recorder: _Recorder, fused_kernels: str = "inductor") -> None:
        super().__init__(passes=[*PASSES, recorder.after_passes], fused_kernels=fused_kernels)
        self.recorder = recorder

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.recorder.before_passes(gm, example_inputs)
        return super().__call__(gm, example_inputs)

    def _compile_in_mode(
        self, gm: torch.fx.GraphModule, example_inputs: list[Any], inference: bool, dynamic: bool
    ) -> Callable[..., Any]:
        self.recorder.compiled(gm)
        return super()._compile_in_mode(gm, example_inputs, inference, dynamic)


def _summary(node: torch.fx.Node, graph: int) -> NodeSummary | None:
    """An optimizer node's summary, or None for other nodes.

    A fused node's groups are left empty: split_by_mesh records them
    (:data:`~fxmesh.passes.split_by_mesh.MESH_GROUPS_META`) when it runs.
    """
    op = fused_op(node)
    if op is not None:
        params = bind(node, op)[op.list_args[0]]
        keys = [node_mesh_key(p, f"{op.name} parameter {i}") for i, p in enumerate(params)]
        return NodeSummary(graph, node.name, _target_name(node.target), len(keys), _distinct(keys), [])
    name = getattr(node.target, "__name__", "")
    if node.op != "call_function" or not name.endswith("_per_mesh") or getattr(ops, name, None) is not node.target:
        return None
    # A foreach stand-in runs once per mesh of its first tensor list that holds a DTensor (fxmesh.ops).
    for entries in node.args:
        if not isinstance(entries, (list, tuple)) or not all(isinstance(e, torch.fx.Node) for e in entries):
            continue
        keys = [node_mesh_key(e, f"{node.name} entry {i}") for i, e in enumerate(entries)]
        if any(key.mesh is not None for key in keys):
            groups = [Group(str(key), len(idx)) for key, idx in group_by_mesh(keys).items()]
            return NodeSummary(graph, node.name, _target_name(node.target), len(keys), _distinct(keys), groups)
    return None


def _graph_breaks(recorded: list[tuple[str, Any]]) -> list[GraphBreak]:
    base = os.path.realpath(torch_optimizer.__file__)
    counts: dict[tuple[str, str, bool], int] = {}
    for reason, frame in recorded:
        if frame is None:
            key = (reason, "unknown", False)
        else:
            path = os.path.relpath(frame.filename) if frame.filename.startswith(os.getcwd()) else frame.filename
            own = frame.name == "_use_grad" and os.path.realpath(frame.filename) == base
            key = (reason, f"{path}:{frame.lineno} in {frame.name}", own)
        counts[key] = counts.get(key, 0) + 1
    return [GraphBreak(reason, where, n, own) for (reason, where, own), n in counts.items()]


def _extern_calls(codes: list[str]) -> dict[str, int]:
    calls: dict[str, int] = {}
    for code in codes:
        for line in code.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for name in _EXTERN_CALL.findall(line):
                calls[name] = calls.get(name, 0) + 1
    return calls


def inspect_step(
    step: Callable[[], Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    target: str = "",
    dump_dir: Path | None = None,
    fused_kernels: str = "inductor",
) -> Report:
    """Compile ``step`` with the fxmesh backend, call it once and report.

    With ``optimizer`` the meshes are read from its parameters, gradients and
    state; without, from the DTensors the compiled graphs take as inputs.
    Resets Dynamo's counters and compilation metrics first.  With ``dump_dir``
    each graph before and after the passes and Inductor's output code are
    written there as they are produced.  ``fused_kernels`` is the backend's
    option (:func:`fxmesh.backend`).
    """
    counters.clear()
    clear_compilation_metrics()
    recorder = _Recorder(dump_dir)
    compiled = torch.compile(step, backend=_RecordingBackend(recorder, fused_kernels))
    with recorder.watching():
        start = time.perf_counter()
        compiled()
        seconds = time.perf_counter() - start
    tensors = _optimizer_tensors(optimizer) if optimizer is not None else recorder.inputs
    return Report(
        target=target,
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        graphs=recorder.graphs,
        meshes=_mesh_summaries(tensors),
        nodes=recorder.nodes,
        kernels=sum(len(_KERNEL_DEF.findall(code)) for code in recorder.output_code),
        extern_calls=_extern_calls(recorder.output_code),
        graph_breaks=_graph_breaks(recorder.breaks),
        recompiles=sum(1 for m in get_compilation_metrics() if m.recompile_reason),
        compile_seconds=round(seconds, 3),
        eager_fallbacks=counters["fxmesh"]["eager_fallbacks"],
        multi_mesh_nodes=recorder.multi_mesh_nodes,
        local_shard_graphs=counters["fxmesh"]["local_shard_graphs"],
        symbolic_graphs=counters["fxmesh"]["symbolic_graphs"],
        specialized_graphs=counters["fxmesh"]["specialized_graphs"],
        pieces=counters["fxmesh"]["pieces"],
        piece_compiles=counters["fxmesh"]["piece_compiles"],
        check_splits=counters["fxmesh"]["split_at_checks"],
    )


def inspect_target(
    target: str, *, world_size: int = 8, dump_dir: Path | None = None, fused_kernels: str = "inductor"
) -> Report:
    """Load TARGET in a fake world of ``world_size`` ranks, call it, and inspect the step it returns.

    Raises :class:`TargetError` when TARGET cannot be loaded, raises, or
    returns neither an optimizer with gradients nor a zero-argument callable.
    Errors while compiling or running the step propagate.
    """
    with fake_world(world_size):
        fn = load_target(target)
        try:
            value = fn()
        except Exception as e:
            raise TargetError(f"{target} raised {error_line(e)}") from e
        step, optimizer = _step_of(value, target)
        return inspect_step(step, optimizer=optimizer, target=target, dump_dir=dump_dir, fused_kernels=fused_kernels)
