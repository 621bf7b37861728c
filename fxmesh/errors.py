"""Exceptions raised by fxmesh passes and the backend."""

from __future__ import annotations

__all__ = ["EagerFallback", "FxmeshError", "UnsupportedInputError"]


class FxmeshError(RuntimeError):
    """Base class of fxmesh's own errors."""


class UnsupportedInputError(FxmeshError):
    """The optimizer step cannot be compiled and eager would not be right either.

    The message names the fused call, the parameter index and the reason.
    """


class EagerFallback(FxmeshError):
    """A pass cannot rewrite this graph; the backend runs it eagerly instead.

    Raised only where the eager graph computes the right result, e.g. when a
    node's metadata is missing so its mesh cannot be read.
    """
