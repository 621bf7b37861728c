"""How far one tensor is from another, as fxmesh's checks measure it (no pytest needed)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["rel_error"]


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| over the local shards, in float64; NaN/inf must match."""
    import torch
    from torch.distributed.tensor import DTensor

    a, e = (t.to_local() if isinstance(t, DTensor) else t for t in (actual, expected))
    if a.shape != e.shape or a.dtype != e.dtype:
        return math.inf
    if a.numel() == 0:
        return 0.0
    wide = torch.complex128 if a.is_complex() else torch.float64
    a, e = a.detach().to(wide), e.detach().to(wide)
    same = (a == e) | (a.isnan() & e.isnan())
    diff = torch.where(same, 0, (a - e).abs()).max()
    scale = torch.where(e.isfinite(), e.abs(), 0).max().clamp_min(1e-30)
    return (diff / scale).item()
