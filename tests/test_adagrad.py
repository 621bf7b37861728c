"""Fused Adagrad compiled with backend="fxmesh" across meshes, against eager fused Adagrad on the local shards.

Upstream has no DTensor sharding rule for ``aten._fused_adagrad_`` and ships the fused kernel for
CPU only; its math is local to each shard, so eager fused Adagrad over plain copies of the local
shards is an exact reference.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Shard

from fxmesh.lowering import TABLE_ROWS
from tests.helpers import DEVICE, dtensor_params, grad_scaler_state, local, set_grads, shard
from tests.test_adam import assert_fully_compiled
from tests.test_sgd import run_local_parity

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="upstream's fused Adagrad exists for CPU only")


def test_eager_fused_adagrad_over_dtensors_fails_upstream(meshes):
    """The gap fxmesh fills: eager fused Adagrad has no DTensor sharding rule."""
    params = dtensor_params(meshes)
    set_grads([params], 0)
    with pytest.raises(Exception, match="_fused_adagrad_"):
        torch.optim.Adagrad(params, lr=0.1, fused=True).step()


@pytest.mark.parametrize(
    "options",
    [
        dict(lr=0.05),
        dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, eps=1e-6),
        dict(lr=torch.tensor(0.05), maximize=True, weight_decay=0.01),
    ],
    ids=["defaults", "decays", "tensor-lr-maximize"],
)
def test_adagrad_three_meshes(meshes, options):
    """Adagrad over 1-D and 2-D meshes with uneven shards, 5 steps with fresh grads."""
    params = dtensor_params(meshes)
    compiled_opt, _, code = run_local_parity(lambda ps: torch.optim.Adagrad(ps, fused=True, **options), params)
    assert_fully_compiled(code, op="_fused_adagrad")
    assert all(compiled_opt.state[p]["step"].item() == 5 for p in params)


def test_adagrad_grad_scaler(meshes):
    """GradScaler's grad_scale/found_inf: unscaled grads written back, a skipped step changes nothing."""
    params = dtensor_params(meshes)
    compiled_opt, eager_opt, code = run_local_parity(
        lambda ps: torch.optim.Adagrad(ps, lr=0.05, weight_decay=0.01, fused=True),
        params,
        before_step=grad_scaler_state(skip_step=2),
    )
    assert_fully_compiled(code, op="_fused_adagrad")
    for pc, pe in zip(compiled_opt.param_groups[0]["params"], eager_opt.param_groups[0]["params"]):
        assert torch.equal(local(pc.grad), pe.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adagrad_low_precision(meshes, dtype):
    """bf16/fp16 parameters and states, float32 math with hyperparameters held as the kernel holds them."""
    params = dtensor_params(meshes, dtype=dtype)
    _, _, code = run_local_parity(lambda ps: torch.optim.Adagrad(ps, lr=0.05, weight_decay=0.01, fused=True), params)
    assert_fully_compiled(code, op="_fused_adagrad")


def test_adagrad_more_parameters_than_a_table(dp):
    """More parameters on one mesh than fit one scalar table (TABLE_ROWS): every row lands on its parameter."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(shard(torch.randn(16, 3, generator=g), dp, [Shard(0)])) for _ in range(TABLE_ROWS + 3)]

    def skip_some_at_first(s, *opts):
        # Different step counts per parameter: each update must read its own row of its own table.
        for opt in opts:
            for i in (2, TABLE_ROWS + 1) if s == 0 else ():
                opt.param_groups[0]["params"][i].grad = None

    run_local_parity(
        lambda ps: torch.optim.Adagrad(ps, lr=0.05, lr_decay=0.1, fused=True), params, before_step=skip_some_at_first
    )
