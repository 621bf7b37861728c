"""fxmesh.ops: the fused-op stand-ins that fxmesh's capture records, where they run for real.

A graph runs them where nothing lowers the call they stand for (a backend without the lowering
passes, an eager fallback).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

import fxmesh.ops
from tests.helpers import shard


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adagrad"])
def test_stand_ins_copy_cpu_grad_scaler_scalars_to_the_parameters_device(monkeypatch, name):
    """Under compile torch.optim leaves GradScaler's grad_scale and found_inf where they are (it groups the
    tensors under the device None), and the CUDA kernels read them through a device pointer (GPU run 4: an
    illegal memory access): the stand-ins copy CPU ones to the parameters' device (meta here, CUDA in use),
    as eager torch.optim does."""
    seen = {}
    monkeypatch.setattr(torch, f"_fused_{name}_", lambda *lists, **kwargs: seen.update(kwargs))
    params = [torch.empty(4, 3, device="meta") for _ in range(2)]
    grad_scale, found_inf = torch.tensor(4.0), torch.tensor(0.0)
    getattr(fxmesh.ops, f"fused_{name}_")(params, params, grad_scale=grad_scale, found_inf=found_inf, lr=0.1)
    assert seen["grad_scale"].device.type == seen["found_inf"].device.type == "meta", seen


@pytest.mark.parametrize("op", [torch._foreach_copy_, torch._foreach_sign_], ids=lambda op: op.__name__)
def test_per_entry_stand_ins_run_over_dtensors(meshes, op):
    """Rprop's foreach step calls ``_foreach_copy_`` and ``_foreach_sign_``, which DTensor has no sharding rule for
    (copy on torch 2.11-2.14, sign on 2.11): the stand-in calls the op once per DTensor entry, on whatever mesh it
    sits, and the foreach op itself over plain tensors."""
    dsts = [
        shard(torch.randn(8, 4), meshes["dp"], [Shard(0)]),
        shard(torch.randn(6, 4), meshes["ep"], [Replicate(), Shard(1)]),
    ]
    srcs = [shard(torch.randn(d.shape), d.device_mesh, d.placements) for d in dsts]
    args = lambda lists: lists if op is torch._foreach_copy_ else lists[:1]  # noqa: E731
    plain = [[t.to_local().clone() for t in ts] for ts in (dsts, srcs)]
    expected = [[t.clone() for t in ts] for ts in plain]
    op(*args(expected))
    stand_in = fxmesh.ops.foreach_per_entry(op)
    assert stand_in.__name__ == f"{op.__name__}_per_entry" and stand_in.wrapped_op is op
    stand_in(*args([dsts, srcs]))
    stand_in(*args(plain))
    assert all(torch.equal(d.to_local(), e) for d, e in zip(dsts, expected[0]))
    assert all(torch.equal(p, e) for p, e in zip(plain[0], expected[0]))
