"""Cheaper Dynamo guards for DTensor inputs.

Dynamo guards every DTensor input of a compiled frame in Python, on every call:

- ``DTENSOR_SPEC_MATCH`` on ``x._spec``: mesh, placements, shard order and
  dtype, compared with a deep copy of the spec taken at compile time.  The
  copy holds a copy of the mesh, so ``DeviceMesh.__eq__`` cannot return on
  identity and compares the rank map and layout field by field.
- ``OPAQUE_OBJ_GUARD_FN_MATCH`` on ``x.device_mesh`` (where ``DeviceMesh`` is
  registered as an opaque reference type, as in torch 2.13): the same five
  mesh fields again, through the mesh's registered ``guard_fn``.

An optimizer step guards every gradient like this (parameters and states are
guarded by id), so at 1,000 parameters these two Python checks cost
milliseconds per call.  :func:`streamline_dtensor_guards`, run by
the fxmesh backend while the frame's guards are still being collected, makes
them cheaper without changing what they accept:

- the mesh guard of a DTensor whose spec is guarded is dropped: the spec guard
  compares that mesh with ``DeviceMesh.__eq__``, over the same fields;
- the spec guard keeps a shallow copy of the spec, so its mesh is the mesh
  object itself and ``DeviceMesh.__eq__`` returns on identity.  A mesh's
  compared fields never change after construction; placements and dtype are
  still compared by value;
- a spec object the guard accepted on two calls in a row is accepted on
  identity afterwards, while it keeps the hash it had then: ``DTensorSpec``
  clears its cached hash whenever a compared field is assigned (see
  :class:`_SpecMatch`).

:func:`skip_guard_on_dtensor_specs_unsafe` goes further and drops the spec
guards; that one is opt-in because it is not equivalent.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["skip_guard_on_dtensor_specs_unsafe", "streamline_dtensor_guards"]

log = logging.getLogger(__name__)

_SPEC_GUARD = "DTENSOR_SPEC_MATCH"
_MESH_GUARD = "OPAQUE_OBJ_GUARD_FN_MATCH"


def skip_guard_on_dtensor_specs_unsafe(guard_entries: Sequence[Any]) -> list[bool]:
    """Keep every guard but the DTensor spec ones; pass as ``torch.compile``'s ``guard_filter_fn``.

    ``torch.compile(opt.step, backend="fxmesh", options={"guard_filter_fn":
    fxmesh.skip_guard_on_dtensor_specs_unsafe})``.  Unsafe in the sense of
    ``torch.compiler.skip_guard_on_all_nn_modules_unsafe``: use it only where no
    DTensor input changes its mesh or placements after the first compile (an
    optimizer's parameters, gradients and states keep theirs).  Without the
    guard such a change goes unnoticed, and the compiled step reads the new
    local tensors as if they were laid out as before.  (Under the fxmesh
    backend the separate mesh guards are already gone, see
    :func:`streamline_dtensor_guards`; with this filter nothing checks the mesh.)
    """
    return [entry.guard_type != _SPEC_GUARD for entry in guard_entries]


def streamline_dtensor_guards() -> int:
    """Make the current frame's DTensor guards cheaper; returns how many guards changed.

    Call from a backend: Dynamo builds the frame's guards from this set after
    the backend returns.  Does nothing outside a Dynamo compile, or where the
    guards do not look as described in the module docstring.
    """
    from torch._dynamo.source import AttrSource
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    if context is None:
        return 0
    guards = context.guards_context.dynamo_guards

    def owner(guard: Any, member: str) -> Any:
        source = guard.originating_source
        if isinstance(source, AttrSource) and source.member == member:
            return source.base
        return None

    spec_owners = {owner(g, "_spec") for g in guards if g.create_fn_name() == _SPEC_GUARD} - {None}
    if not spec_owners:
        return 0
    redundant = {id(g) for g in guards if g.create_fn_name() == _MESH_GUARD and owner(g, "device_mesh") in spec_owners}
    kept = []
    changed = len(redundant)
    for guard in guards:
        if id(guard) in redundant:
            continue
        if guard.create_fn_name() == _SPEC_GUARD and guard.create_fn is not _spec_match_sharing_the_mesh:
            guard = copy.copy(guard)
            guard.create_fn = _spec_match_sharing_the_mesh
            guard._hash = None
            changed += 1
        kept.append(guard)
    _replace_guards(guards, kept)
    log.debug("fxmesh: %d DTensor guards made cheaper (%d mesh guards dropped)", changed, len(redundant))
    return changed


def _replace_guards(guards: Any, kept: list[Any]) -> None:
    # GuardsSet has no public way to replace guards; its constructor rebuilds
    # whatever per-source index this torch keeps.
    guards.__dict__.update(vars(type(guards)(type(guards.inner)(kept))))


def _original_spec_match() -> Any:
    from torch._dynamo.guards import GuardBuilder

    return GuardBuilder.DTENSOR_SPEC_MATCH


# Dynamo's DTENSOR_SPEC_MATCH (same name, so guard filters and logs see the
# same guard type), comparing against a shallow copy of the spec.
@functools.wraps(_original_spec_match())
def _spec_match_sharing_the_mesh(builder: Any, guard: Any) -> None:
    from torch._dynamo.guards import get_verbose_code_parts

    guard_fn = _SpecMatch(copy.copy(builder.get(guard)))
    code = f"__dtensor_spec_{id(guard_fn)}"
    builder.get_guard_manager(guard).add_lambda_guard(guard_fn, get_verbose_code_parts(code, guard), guard.user_stack)


class _SpecMatch:
    """``spec._check_equals(expected, skip_shapes=True)``, skipped for a spec object it already accepted.

    Gradients keep their spec object from step to step where it comes from a
    cache: DTensor's sharding propagation (autograd through DTensor ops) or
    FSDP2's per-parameter spec.  Such a spec seen on two calls in a row is
    pinned, with its hash (``DTensorSpec`` clears its cached ``_hash`` whenever
    a compared field is assigned, and a recomputed hash is a new int object),
    and later calls accept it on identity while that same hash object is still
    cached.  A spec that differs on every call (``DTensor.from_local`` per
    step) is compared every time, with no hashing.  The pinned spec is held,
    so its id cannot be reused by another object.
    """

    __slots__ = ("expected", "last")

    def __init__(self, expected: Any) -> None:
        self.expected = expected
        self.last: tuple[Any, int | None] = (None, None)  # (spec, its _hash object), replaced as a whole

    def __call__(self, spec: Any) -> bool:
        last_spec, last_hash = self.last
        if spec is last_spec and last_hash is not None and getattr(spec, "_hash", None) is last_hash:
            return True
        if not spec._check_equals(self.expected, skip_shapes=True):
            return False
        pinned = None
        if spec is last_spec:
            hash(spec)
            pinned = getattr(spec, "_hash", None)  # a torch whose spec caches no hash never pins
            # Python caches small ints, so their identity would not show a recomputed hash.
            if not isinstance(pinned, int) or -5 <= pinned <= 256:
                pinned = None
        self.last = (spec, pinned)
        return True
