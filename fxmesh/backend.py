"""The ``fxmesh`` Dynamo backend: fxmesh's passes, then an inner compiler.

``torch.compile(opt.step, backend="fxmesh")`` uses the default instance;
``fxmesh.backend(...)`` builds one with other options.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters

from fxmesh.capture import install
from fxmesh.errors import EagerFallback
from fxmesh.passes import Pass, resolve_passes, run_passes

__all__ = ["FxmeshBackend", "backend", "fxmesh_backend"]

log = logging.getLogger(__name__)

_COMPILERS = ("inductor", "aot_eager", "eager")


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
    ) -> None:
        if compiler not in _COMPILERS:
            raise ValueError(f"compiler must be one of {', '.join(_COMPILERS)}, not {compiler!r}")
        self.passes = resolve_passes(passes)
        self.compiler = compiler
        # Dynamo's guards already pin every input's size and stride; Inductor's
        # own per-input asserts cost ~2.5 us each, 1,000 per step for 200 params.
        self.inductor_config = {"size_asserts": False, **(inductor_config or {})}
        install()

    def __repr__(self) -> str:
        names = ", ".join(name for name, _ in self.passes)
        return f"FxmeshBackend(passes=[{names}], compiler={self.compiler!r})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        counters["fxmesh"]["graphs"] += 1
        try:
            modified = run_passes(gm, self.passes)
        except EagerFallback as e:
            log.warning("fxmesh: running this graph eagerly: %s", e)
            counters["fxmesh"]["eager_fallbacks"] += 1
            return gm.forward
        log.debug("fxmesh passes that changed the graph: %s", modified)
        if self.compiler == "eager":
            return gm.forward
        if self.compiler == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager

            return aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=self.inductor_config)


def backend(
    *,
    passes: Sequence[str | Pass] | None = None,
    compiler: str = "inductor",
    inductor_config: dict[str, Any] | None = None,
) -> FxmeshBackend:
    """Build an fxmesh backend for ``torch.compile(..., backend=...)``.

    Args:
        passes: pass names from ``fxmesh.passes.PASSES`` (or pass functions),
            run in the given order; all registered passes by default.
        compiler: ``"inductor"`` (default), or ``"aot_eager"``/``"eager"`` to
            debug the passes without Inductor.
        inductor_config: Inductor config overrides applied to this compile only.
    """
    return FxmeshBackend(passes=passes, compiler=compiler, inductor_config=inductor_config)


fxmesh_backend = FxmeshBackend()
