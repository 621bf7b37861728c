"""fxmesh: a torch.compile backend for optimizers whose parameters span several DeviceMeshes.

``import fxmesh`` registers the ``fxmesh`` backend (the ``torch_dynamo_backends``
entry point registers it without an import).
"""

from __future__ import annotations

from fxmesh.backend import FxmeshBackend, backend, fxmesh_backend
from fxmesh.clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from fxmesh.errors import EagerFallback, FxmeshError, UnsupportedInputError
from fxmesh.guards import skip_guard_on_dtensor_specs_unsafe

__all__ = [
    "EagerFallback",
    "FxmeshBackend",
    "FxmeshError",
    "UnsupportedInputError",
    "backend",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "fxmesh_backend",
    "get_total_norm",
    "skip_guard_on_dtensor_specs_unsafe",
]


def _register() -> None:
    # When Dynamo loads fxmesh through its entry point it registers the backend
    # itself, right after this import; registering here too would collide.
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if "fxmesh" in registry._COMPILER_FNS or isinstance(registry._BACKENDS.get("fxmesh"), EntryPoint):
        return
    registry.register_backend(compiler_fn=fxmesh_backend, name="fxmesh")


_register()
