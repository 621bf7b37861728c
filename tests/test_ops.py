"""fxmesh.ops: the fused-op stand-ins that fxmesh's capture records, where they run for real.

A graph runs them where nothing lowers the call they stand for (a backend without the lowering
passes, an eager fallback).
"""

from __future__ import annotations

import pytest
import torch

import fxmesh.ops


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
