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


def test_foreach_copy_copies_dtensors_entry_by_entry(meshes):
    """DTensor has no sharding rule for ``aten._foreach_copy_`` (Rprop's foreach step calls it): the stand-in copies
    each DTensor entry with ``copy_``, on whatever mesh it sits, and leaves plain lists to the foreach op."""
    dsts = [
        shard(torch.zeros(8, 4), meshes["dp"], [Shard(0)]),
        shard(torch.zeros(6, 4), meshes["ep"], [Replicate(), Shard(1)]),
    ]
    srcs = [shard(torch.randn(d.shape), d.device_mesh, d.placements) for d in dsts]
    with pytest.raises(NotImplementedError, match="_foreach_copy_"):
        torch._foreach_copy_(dsts, srcs)
    fxmesh.ops.foreach_copy_(dsts, srcs)
    assert all(torch.equal(d.to_local(), s.to_local()) for d, s in zip(dsts, srcs))
    plain_dsts, plain_srcs = [torch.zeros(3), torch.zeros(2, 2)], [torch.randn(3), torch.randn(2, 2)]
    fxmesh.ops.foreach_copy_(plain_dsts, plain_srcs)
    assert all(torch.equal(d, s) for d, s in zip(plain_dsts, plain_srcs))
