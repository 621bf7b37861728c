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


# Foreach calls DTensor has no sharding rule for on some torch version, as (op, its arguments from three lists).
PER_ENTRY_CALLS = {
    "copy_": (torch._foreach_copy_, lambda a, b, c: (a, b)),  # Rprop; no rule on torch 2.11-2.15
    "sign_": (torch._foreach_sign_, lambda a, b, c: (a,)),  # Rprop; no rule on 2.11-2.12
    "maximum-scalar": (torch._foreach_maximum, lambda a, b, c: (a, 0.1)),  # no rule on 2.11-2.15
    "minimum_-scalar": (torch._foreach_minimum_, lambda a, b, c: (a, 0.1)),  # no rule on 2.11-2.15
    "lerp-scalar": (torch._foreach_lerp, lambda a, b, c: (a, b, 0.3)),  # no rule on 2.11-2.12
    "addcmul-scalar-list": (torch._foreach_addcmul, lambda a, b, c: (a, b, c, [0.5, -2.0])),  # none on 2.11-2.13
    "pow-scalar-and-tensor": (torch._foreach_pow, lambda a, b, c: (2.0, a)),  # no rule on 2.11-2.12
    "sigmoid": (torch._foreach_sigmoid, lambda a, b, c: (a,)),  # no rule on 2.11-2.12
    "log1p_": (torch._foreach_log1p_, lambda a, b, c: (a,)),
    # These two have rules; they check that keywords pass through and 0-dim plain tensors are replicated.
    "add_-alpha": (torch._foreach_add_, lambda a, b, c: (a, b)),
    "mul_-0-dim-tensor": (torch._foreach_mul_, lambda a, b, c: (a, torch.tensor(0.5))),
}


@pytest.mark.parametrize("case", list(PER_ENTRY_CALLS))
def test_per_entry_stand_ins_run_over_dtensors(meshes, case):
    """Where DTensor has no sharding rule for a foreach op, fxmesh's capture records a stand-in that calls the
    op's one-tensor form once per DTensor entry, on whatever mesh it sits (a 0-dim plain tensor replicated onto
    it), and the foreach op itself over plain tensors: the same values as the foreach op over the local
    tensors, out of place or in place."""
    op, arguments = PER_ENTRY_CALLS[case]
    kwargs = {"alpha": -0.5} if case == "add_-alpha" else {}
    lists = [
        [
            shard(torch.rand(8, 4) + 0.5, meshes["dp"], [Shard(0)]),
            shard(torch.rand(6, 4) + 0.5, meshes["ep"], [Replicate(), Shard(1)]),
        ]
        for _ in range(3)
    ]
    plain = [[t.to_local().clone() for t in ts] for ts in lists]
    expected = [[t.clone() for t in ts] for ts in plain]
    in_place = op.__name__.endswith("_")
    expected_out = op(*arguments(*expected), **kwargs)
    stand_in = fxmesh.ops.foreach_per_entry(op)
    assert stand_in.__name__ == f"{op.__name__}_per_entry" and stand_in.wrapped_op is op
    out = stand_in(*arguments(*lists), **kwargs)
    plain_out = stand_in(*arguments(*plain), **kwargs)
    assert (out, plain_out) == (None, None) if in_place else len(out) == len(plain_out) == 2
    got = lists[0] if in_place else out
    assert all(t.placements == d.placements for t, d in zip(got, lists[0]))
    assert all(torch.equal(t.to_local(), e) for t, e in zip(got, expected[0] if in_place else expected_out))
    assert all(torch.equal(p, e) for p, e in zip(*((plain[0], expected[0]) if in_place else (plain_out, expected_out))))


def test_per_entry_stand_in_refuses_an_op_it_has_no_form_for():
    """An op outside fxmesh.ops.PER_ENTRY gets no stand-in (capture then leaves Dynamo's error as it is)."""
    with pytest.raises(ValueError, match="_foreach_norm"):
        fxmesh.ops.foreach_per_entry(torch._foreach_norm)
