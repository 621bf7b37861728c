"""fxmesh's FX passes over the Dynamo graph, and the one ordered registry of them.

Every pass is a function ``GraphModule -> PassResult`` that rewrites the graph
in place and says whether it changed anything.  The backend and the CLI both
run passes from :data:`PASSES`, in its order.  One pass is not in it:
``aten_fused_adam`` takes calls over plain tensors, so the backend runs it
after localizing the graph, and only with
``fxmesh.backend(fused_kernels="aten")``, deferring ``lower_fused_adam`` until
then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fxmesh.errors import FxmeshError
from fxmesh.passes.lower_fused_adagrad import lower_fused_adagrad
from fxmesh.passes.lower_fused_adam import lower_fused_adam
from fxmesh.passes.lower_fused_sgd import lower_fused_sgd
from fxmesh.passes.reduce_partial_reads import reduce_partial_reads
from fxmesh.passes.split_by_mesh import split_by_mesh

__all__ = ["PASSES", "Pass", "resolve_passes", "run_passes"]

log = logging.getLogger(__name__)

Pass = Callable[[torch.fx.GraphModule], PassResult]

PASSES: dict[str, Pass] = {
    # First: the lowering expects one mesh per fused call, with mesh-local scalars.
    "split_by_mesh": split_by_mesh,
    # Then the lowerings, which leave no fused optimizer call for AOT to see.
    "lower_fused_adam": lower_fused_adam,
    "lower_fused_sgd": lower_fused_sgd,
    "lower_fused_adagrad": lower_fused_adagrad,
    # Last: the lowerings reduce their Partial gradients themselves.
    "reduce_partial_reads": reduce_partial_reads,
}


def resolve_passes(passes: Sequence[str | Pass] | None) -> list[tuple[str, Pass]]:
    """Names and functions of ``passes`` (all registered passes when None)."""
    if passes is None:
        return list(PASSES.items())
    resolved = []
    for p in passes:
        if isinstance(p, str):
            if p not in PASSES:
                raise ValueError(f"unknown fxmesh pass {p!r}; known: {', '.join(PASSES)}")
            resolved.append((p, PASSES[p]))
        else:
            resolved.append((getattr(p, "__name__", repr(p)), p))
    return resolved


def run_passes(gm: torch.fx.GraphModule, passes: Sequence[tuple[str, Pass]]) -> list[str]:
    """Run ``passes`` in order on ``gm``; returns the names of those that changed it."""
    done: list[str] = []
    modified: list[str] = []
    for name, fn in passes:
        try:
            result = fn(gm)
        except FxmeshError:
            raise
        except Exception as e:
            after = f" after passes {', '.join(done)}" if done else ""
            raise RuntimeError(f"fxmesh: error in pass {name}{after}: {e}") from e
        done.append(name)
        if result.modified:
            modified.append(name)
        log.debug("pass %s: modified=%s", name, result.modified)
    return modified
