"""The ``fxmesh`` Dynamo backend: fxmesh's passes, then an inner compiler.

``torch.compile(opt.step, backend="fxmesh")`` uses the default instance;
``fxmesh.backend(...)`` builds one with other options.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor
from torch.fx.experimental.symbolic_shapes import DimDynamic

from fxmesh.capture import install
from fxmesh.checks import find_check, keeping_grad_mode, split_at_check
from fxmesh.errors import EagerFallback
from fxmesh.guards import streamline_dtensor_guards
from fxmesh.local import HIDE_CACHEABLE, hide_shard_mutations, localize
from fxmesh.passes import Pass, resolve_passes, run_passes
from fxmesh.passes.aten_fused_adam import aten_fused_adam
from fxmesh.passes.lower_fused_adam import lower_fused_adam
from fxmesh.pieces import compile_in_pieces
from fxmesh.scalars import tensorify_foreach_scalars
from fxmesh.specialize import marked_dynamic, specialize_sizes

__all__ = ["FxmeshBackend", "backend", "fxmesh_backend"]

log = logging.getLogger(__name__)

_COMPILERS = ("inductor", "aot_eager", "eager")
_FUSED_KERNELS = ("inductor", "aten")


class FxmeshBackend:
    """A Dynamo backend: run fxmesh's passes on the graph, then compile it.

    A pass that cannot rewrite the graph but knows the eager graph is right
    raises :class:`~fxmesh.errors.EagerFallback`; the graph then runs eagerly
    and one warning says why.
    """

    def __init__(
        self,
        passes: Sequence[str | Pass] | None = None,
        compiler: str = "inductor",
        inductor_config: dict[str, Any] | None = None,
        streamline_guards: bool = True,
        local_shards: bool = True,
        cudagraphs: bool = False,
        combo_kernels: bool | None = None,
        pieces: bool = True,
        fused_kernels: str = "inductor",
    ) -> None:
        if compiler not in _COMPILERS:
            raise ValueError(f"compiler must be one of {', '.join(_COMPILERS)}, not {compiler!r}")
        if fused_kernels not in _FUSED_KERNELS:
            raise ValueError(f"fused_kernels must be one of {', '.join(_FUSED_KERNELS)}, not {fused_kernels!r}")
        self.passes = resolve_passes(passes)
        self.fused_kernels = fused_kernels
        # With aten's kernels, fused Adam is lowered only where the graph stays on
        # DTensors or a call cannot keep the kernel: after localize.
        self.deferred_passes: list[tuple[str, Pass]] = []
        if fused_kernels == "aten":
            self.deferred_passes = [(name, fn) for name, fn in self.passes if fn is lower_fused_adam]
            self.passes = [(name, fn) for name, fn in self.passes if fn is not lower_fused_adam]
        self.compiler = compiler
        # Dynamo's guards already pin every input's size and stride; Inductor's
        # own per-input asserts cost ~2.5 us each, 1,000 per step for 200 params.
        # Graphs with symbolic sizes keep them (see inductor_config_for).
        self.inductor_config: dict[str, Any] = {"size_asserts": False}
        self.size_asserts_chosen = "size_asserts" in (inductor_config or {})
        if cudagraphs:  # off: whatever Inductor's config says
            self.inductor_config["triton.cudagraphs"] = True
        if combo_kernels is not None:
            self.inductor_config["combo_kernels"] = combo_kernels
        self.inductor_config.update(inductor_config or {})
        self.streamline_guards = streamline_guards
        self.local_shards = local_shards
        self.pieces_option = pieces
        self._follow_inductor_config()
        install()

    def _follow_inductor_config(self) -> None:
        """Set what follows from :attr:`inductor_config`."""
        # Unless told otherwise, the graphs that run on CUDA get combo kernels.
        self.combo_kernels_on_cuda = "combo_kernels" not in self.inductor_config
        # A CUDA graph records its inputs' addresses: one compiled piece cannot serve several pieces.
        self.pieces = self.pieces_option and not self.inductor_config.get("triton.cudagraphs")

    def __repr__(self) -> str:
        names = [name for name, _ in self.passes]
        if self.fused_kernels == "aten":
            names += ["aten_fused_adam (local shards)", *(name for name, _ in self.deferred_passes)]
        return f"FxmeshBackend(passes=[{', '.join(names)}], compiler={self.compiler!r})"

    def __call__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: list[Any],
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        """Run the passes on Dynamo's graph and compile it.

        ``mode`` and ``options`` are ``torch.compile``'s (Dynamo passes them on
        to the backend): they configure Inductor for this graph as they would
        under ``backend="inductor"`` (:meth:`with_inductor_options`).
        """
        if mode is not None or options:
            return self.with_inductor_options(mode, options)(gm, example_inputs)
        counters["fxmesh"]["graphs"] += 1
        if self.streamline_guards:
            counters["fxmesh"]["streamlined_guards"] += streamline_dtensor_guards()
        return self._compile_graph(gm, example_inputs)

    def _compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """Compile a graph of the frame: in two parts around a host-side check (:mod:`fxmesh.checks`), if it has one."""
        check = find_check(gm)
        if check is not None:
            split = split_at_check(gm, check)
            if isinstance(split, str):
                log.warning(
                    "fxmesh: running this graph eagerly: it cannot be split at %s: %s", check.format_node(), split
                )
                counters["fxmesh"]["eager_fallbacks"] += 1
                return keeping_grad_mode(gm.forward)
            counters["fxmesh"]["split_at_checks"] += 1
            return split.compile(example_inputs, self._compile_graph)
        # Read before the passes add nodes.  A step traced without torch.optim's
        # graph breaks (fxmesh.capture) still computes under no_grad; compiled
        # with grad on, AOT would build a training graph that copies the
        # mutated parameters back outside Inductor's view.
        records_autograd = _records_autograd(gm)
        inference = torch.is_grad_enabled() and not records_autograd
        # Before the passes, which read the example values' sizes.
        specialized = not records_autograd and specialize_sizes(gm, example_inputs)
        if specialized:
            counters["fxmesh"]["specialized_graphs"] += 1
        # A size mark_dynamic asked for stays symbolic on the DTensors; the local shards would specialize it.
        on_dtensors = records_autograd or not self.local_shards or marked_dynamic(gm, example_inputs) is not None
        try:
            # The passes rewrite optimizer math, which torch.optim runs under
            # no_grad: the in-place updates of leaf parameters they trace are
            # refused with grad on.
            with torch.no_grad():
                modified = run_passes(gm, self.passes)
                # Autograd through to_local needs the DTensor; only no-grad math runs on the shards.
                local = None if on_dtensors else localize(gm, example_inputs)
                if local is not None:
                    counters["fxmesh"]["tensorified_scalars"] += tensorify_foreach_scalars(local.gm)
                if self.fused_kernels == "aten":
                    passes = [("aten_fused_adam", aten_fused_adam), *self.deferred_passes]
                    modified += run_passes(gm if local is None else local.gm, passes)
        except EagerFallback as e:
            log.warning("fxmesh: running this graph eagerly: %s", e)
            counters["fxmesh"]["eager_fallbacks"] += 1
            return gm.forward
        log.debug("fxmesh passes that changed the graph: %s", modified)
        # Read from Dynamo's inputs: the local shards carry no symbolic context of
        # their own, and AOT fakes DTensor inputs again from that context (a
        # specialized size is then a symbol bound to its value).
        dynamic = has_dynamic_sizes(example_inputs)
        if dynamic and not specialized:
            counters["fxmesh"]["symbolic_graphs"] += 1
        if local is None:
            return self._compile_in_mode(gm, example_inputs, inference, dynamic)
        counters["fxmesh"]["local_shard_graphs"] += 1
        dynamic = dynamic and not specialized
        compiled = None
        if self.pieces:
            compiled = compile_in_pieces(
                local.gm,
                local.example_inputs,
                lambda gm, inputs: self._compile_in_mode(gm, inputs, inference, dynamic),
            )
        if compiled is None:
            compiled = self._compile_in_mode(local.gm, local.example_inputs, inference, dynamic)
        return local.wrap(compiled)

    def with_inductor_options(self, mode: str | None = None, options: dict[str, Any] | None = None) -> FxmeshBackend:
        """This backend with ``torch.compile``'s ``mode`` and ``options`` over its Inductor config.

        ``mode``'s settings (``torch._inductor.list_mode_options``) apply first,
        then ``options`` (Inductor config names, ``-`` or ``_``), over this
        backend's own ``inductor_config``.  CUDA graphs, from a mode
        (``"reduce-overhead"``, ``"max-autotune"``) or ``triton.cudagraphs``,
        turn pieces off as ``cudagraphs=True`` does.
        """
        if self.compiler != "inductor":
            raise ValueError(
                f"torch.compile's mode and options configure Inductor; this fxmesh backend compiles with "
                f"{self.compiler!r} (mode={mode!r}, options={options!r})"
            )
        from torch._inductor import config as inductor_config
        from torch._inductor import list_mode_options

        known = inductor_config.get_config_copy()
        extra = dict(list_mode_options(mode)) if mode is not None else {}
        for key, value in (options or {}).items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"torch.compile options: {key!r} is not an Inductor config option")
            extra[name] = value
        backend = copy.copy(self)
        backend.inductor_config = {**self.inductor_config, **extra}
        backend.size_asserts_chosen = self.size_asserts_chosen or "size_asserts" in extra
        backend._follow_inductor_config()
        return backend

    def _compile_in_mode(
        self, gm: torch.fx.GraphModule, example_inputs: list[Any], inference: bool, dynamic: bool
    ) -> Callable[..., Any]:
        if not inference:
            return self._compile(gm, example_inputs, dynamic)
        with torch.no_grad():
            compiled = self._compile(gm, example_inputs, dynamic)

        def run_without_grad(*args: Any) -> Any:
            with torch.no_grad():
                return compiled(*args)

        return run_without_grad

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any], dynamic: bool) -> Callable[..., Any]:
        if self.compiler == "eager":
            return gm.forward
        hidden = hide_shard_mutations(gm)
        if self.compiler == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager

            return aot_eager(gm, example_inputs)
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        config_patches = self.inductor_config_for(example_inputs, dynamic)
        if hidden:
            cacheable = config_patches.get(
                "unsafe_marked_cacheable_functions", inductor_config.unsafe_marked_cacheable_functions
            )
            config_patches = {**config_patches, "unsafe_marked_cacheable_functions": {**cacheable, **HIDE_CACHEABLE}}
        if not any(isinstance(t, DTensor) for t in example_inputs):
            return compile_fx(gm, example_inputs, config_patches=config_patches)
        # AOTAutograd's cache keys a DTensor input by its global spec, not its local
        # shape (torch 2.13-2.14, pytorch#188390): a rank whose uneven shard differs
        # from the rank that wrote the entry (same machine, same cache directory)
        # would run code compiled for the other's shard, a wrong result without
        # Inductor's size asserts.  Inductor's own graph cache keys the local shapes.
        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, config_patches=config_patches)

    def inductor_config_for(self, example_inputs: Sequence[Any], dynamic: bool = False) -> dict[str, Any]:
        """The Inductor config patches of a graph with these example inputs.

        ``dynamic``: Dynamo made some size of the frame's inputs symbolic
        (:func:`has_dynamic_sizes` of Dynamo's inputs, read once per frame: the
        local shards a graph is compiled over carry no symbolic context).  Such
        a graph keeps Inductor's size asserts unless the user turned them off:
        from torch 2.14 Inductor binds an input's size symbols to their values
        only while it writes those asserts, and a symbol Dynamo specialized
        away (so no placeholder passes it) is left unbound; the compiled call
        raises ``NameError: name 's41' is not defined``.
        """
        config = self.inductor_config
        if dynamic and not self.size_asserts_chosen:
            config = {k: v for k, v in config.items() if k != "size_asserts"}
        if self.combo_kernels_on_cuda and any(
            isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs
        ):
            return {**config, "combo_kernels": True}
        return config


def has_dynamic_sizes(example_inputs: Sequence[Any]) -> bool:
    """Whether some size of these graph inputs is, or will be traced as, a symbol.

    Dynamo hands a backend real tensors, and AOT fakifies them again with the
    symbolic context Dynamo recorded for each: a size that automatic dynamic
    shapes (or ``mark_dynamic``) made dynamic shows in that context, not in the
    tensor.  Fake inputs (a graph built from Dynamo's example values) show it
    in their shapes.
    """
    context = torch._guards.TracingContext.try_get()
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            return True
        if not isinstance(x, torch.Tensor):
            continue
        if any(isinstance(size, torch.SymInt) for size in x.shape):
            return True
        symbolic = None if context is None else context.tensor_to_context.get(x)
        if any(d is not DimDynamic.STATIC for d in getattr(symbolic, "dynamic_sizes", None) or ()):
            return True
    return False


def _records_autograd(gm: torch.fx.GraphModule) -> bool:
    """Whether any node of the graph makes a tensor with autograd history.

    Dynamo records a traced value for every node that makes a tensor; nodes
    without one (``_set_grad_enabled``, the in-place fused optimizer ops) make
    none.  An in-place op on a parameter (the foreach step's ``_foreach_add_``)
    returns the leaf parameter itself: it requires grad but has no history.
    """
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            values = torch.utils._pytree.tree_leaves(node.meta.get("example_value"))
            if any(isinstance(v, torch.Tensor) and v.grad_fn is not None for v in values):
                return True
    return False


def backend(
    *,
    passes: Sequence[str | Pass] | None = None,
    compiler: str = "inductor",
    inductor_config: dict[str, Any] | None = None,
    streamline_guards: bool = True,
    local_shards: bool = True,
    cudagraphs: bool = False,
    combo_kernels: bool | None = None,
    pieces: bool = True,
    fused_kernels: str = "inductor",
) -> FxmeshBackend:
    """Build an fxmesh backend for ``torch.compile(..., backend=...)``.

    Args:
        passes: pass names from ``fxmesh.passes.PASSES`` (or pass functions),
            run in the given order; all registered passes by default.
        compiler: ``"inductor"`` (default), or ``"aot_eager"``/``"eager"`` to
            debug the passes without Inductor.
        inductor_config: Inductor config overrides applied to this compile only.
            ``torch.compile``'s ``mode`` and ``options`` apply over them, as
            under ``backend="inductor"`` (:meth:`FxmeshBackend.with_inductor_options`).
        streamline_guards: make Dynamo's per-call DTensor guards of the frame
            cheaper without changing what they accept
            (:func:`fxmesh.guards.streamline_dtensor_guards`).
        local_shards: compile a graph whose DTensor math is elementwise and
            local over the DTensors' local tensors (:func:`fxmesh.local.localize`);
            graphs with collectives or other non-local ops stay on DTensors.
        cudagraphs: replay each compiled graph from a CUDA graph (Inductor's
            CUDA-graph trees, ``triton.cudagraphs``); parameters and optimizer
            states are static inputs, gradients are copied in.  That copy is
            one more read and write of every gradient: on the H100 moe-shard
            step (1 GB of gradients) 5.24 ms against 4.50 ms without, so the
            option pays only where launches, not bytes, bound the step.  CUDA
            only: a graph on the CPU runs as it would without it.
        combo_kernels: let Inductor put the per-parameter kernels, which are
            independent of each other, into shared launches (Inductor's
            ``combo_kernels``).  ``None`` (the default): on for graphs on CUDA,
            Inductor's own setting elsewhere; ``True``/``False``: on/off
            everywhere.  On an H100 (torch 2.11) the 200-parameter moe-shard
            AdamW step went from 240 launches and 4.90 ms to 46 and 3.39 ms,
            and the 100-tensor overhead step from 1.76 to 1.36 ms.  Triton
            only: C++ kernels on the CPU already take up to 32 parameters each.
        pieces: compile a lowered step over local shards as independent
            pieces, each distinct piece once (:mod:`fxmesh.pieces`): parameters
            of the same shapes share one compile.  Off with CUDA graphs
            (``cudagraphs``, ``triton.cudagraphs``, or a mode that uses them).
        fused_kernels: ``"inductor"`` (default): fused optimizer calls are
            lowered to pointwise math and Inductor generates their kernels.
            ``"aten"``: each mesh's fused Adam/AdamW call over local shards
            (or plain tensors) keeps aten's multi-tensor kernel (an op
            Inductor calls in place, :mod:`fxmesh.passes.aten_fused_adam`);
            calls in a graph that stays on DTensors, a scheduled float
            hyperparameter, and fused SGD and Adagrad are lowered as by
            default.  On an H100 (``bench/RESULTS.md``, GPU run 4) it
            launches fewer kernels, which pays where the host cannot keep up
            with the GPU (200 tensors of 1024x1280: 4.78 against 5.20 ms per
            step), but its kernels move bytes more slowly (89% against 96% of
            the copy-bandwidth floor in GPU time).  On the 2-core CPU,
            Inductor's kernels are faster (200 tensors of 10x1280: 1.12
            against 1.67 ms), and only they fuse clipping's product into the
            update.
    """
    return FxmeshBackend(
        passes=passes,
        compiler=compiler,
        inductor_config=inductor_config,
        streamline_guards=streamline_guards,
        local_shards=local_shards,
        cudagraphs=cudagraphs,
        combo_kernels=combo_kernels,
        pieces=pieces,
        fused_kernels=fused_kernels,
    )


fxmesh_backend = FxmeshBackend()
