"""Fused SGD compiled with backend="fxmesh" across meshes, against eager fused SGD on the local shards.

Upstream has no DTensor sharding rule for ``aten._fused_sgd_``, so eager fused SGD over DTensors
fails; its math is local to each shard, so eager fused SGD over plain copies of the local shards
is an exact reference.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.helpers import (
    DEVICE,
    assert_same_state,
    dtensor_params,
    grad_scaler_state,
    inductor_output_code,
    local,
    param_values,
    rtol_for,
    set_grads,
)
from tests.test_adam import assert_fully_compiled

STEPS = 5


def local_params(params):
    return [torch.nn.Parameter(local(p).detach().clone()) for p in params]


def run_local_parity(make_opt, params, *, steps=STEPS, before_step=None, make_ref=None, backend="fxmesh"):
    """Steps a compiled optimizer over ``params`` and an eager one (``make_ref``, default ``make_opt``) over
    their local shards."""
    ref_params = local_params(params)
    compiled_opt, eager_opt = make_opt(params), (make_ref or make_opt)(ref_params)
    step = torch.compile(compiled_opt.step, backend=backend)
    with inductor_output_code() as code:
        for s in range(steps):
            set_grads([params, ref_params], s)
            if before_step is not None:
                before_step(s, compiled_opt, eager_opt)
            before = param_values(compiled_opt), param_values(eager_opt)
            eager_opt.step()
            step()
            assert_same_state(compiled_opt, eager_opt, before=before)
    return compiled_opt, eager_opt, "\n".join(code)


def test_eager_fused_sgd_over_dtensors_fails_upstream(meshes):
    """The gap fxmesh fills: eager fused SGD has no DTensor sharding rule."""
    params = dtensor_params(meshes)
    set_grads([params], 0)
    with pytest.raises(Exception, match="_fused_sgd_"):
        torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True).step()


OPTIONS = [
    dict(momentum=m, nesterov=n, dampening=d, weight_decay=wd, maximize=mx)
    for m, n, d, wd, mx in itertools.product([0.0, 0.9], [False, True], [0.0, 0.1], [0.0, 0.01], [False, True])
    if not (n and (m == 0 or d != 0))  # nesterov needs momentum and zero dampening
]


@pytest.mark.parametrize("options", OPTIONS[::3] + [OPTIONS[-1]], ids=str)
def test_sgd_three_meshes(meshes, options):
    """SGD options over 1-D and 2-D meshes with uneven shards; first step and later steps."""
    params = dtensor_params(meshes)
    compiled_opt, _, code = run_local_parity(lambda ps: torch.optim.SGD(ps, lr=0.05, fused=True, **options), params)
    # With momentum the first step (no buffers yet) and the later ones are two graphs, as upstream.
    assert_fully_compiled(code, op="_fused_sgd", graphs=2 if options["momentum"] else 1)
    assert all(("momentum_buffer" in compiled_opt.state[p]) == bool(options["momentum"]) for p in params)


def test_sgd_tensor_lr_grad_scaler(meshes):
    """Tensor lr and GradScaler's grad_scale/found_inf, a skipped step included."""
    params = dtensor_params(meshes)

    compiled_opt, eager_opt, code = run_local_parity(
        lambda ps: torch.optim.SGD(
            ps, lr=torch.tensor(0.05), momentum=0.9, nesterov=True, weight_decay=0.01, fused=True
        ),
        params,
        before_step=grad_scaler_state(skip_step=3),
    )
    assert_fully_compiled(code, op="_fused_sgd", graphs=2)
    for pc, pe in zip(compiled_opt.param_groups[0]["params"], eager_opt.param_groups[0]["params"]):
        assert torch.equal(local(pc.grad), pe.grad), "unscaled grads are written back as eager does"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_low_precision(meshes, dtype):
    """bf16/fp16 parameters with float32 math, against eager SGD on the local shards.

    Against eager *foreach* SGD always, to two ulps: foreach rounds every intermediate to the
    low-precision type.  Against eager *fused* SGD, whose math fxmesh's matches: exactly on the
    CPU, except where its CPU kernel's vectorized loop never stores bf16/fp16 parameters (torch
    2.11-2.13, fixed in 2.14; checked below); to one ulp on CUDA, where Triton's and nvcc's
    float32 arithmetic round differently (GPU run 5: a momentum buffer off by 2.7e-9 of its
    largest element, one bf16 rounding step in one of its small elements).
    """
    p, g = torch.randn(64).to(dtype), torch.randn(64).to(dtype)
    updated = p.to(DEVICE, copy=True)
    torch._fused_sgd_([updated], [g.to(DEVICE)], [], weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0,
                      nesterov=False, maximize=False, is_first_step=False)  # fmt: skip
    fused_stores = not torch.equal(updated.cpu(), p)
    if DEVICE != "cpu" or torch.__version__ >= "2.14":
        assert fused_stores, "upstream's fused SGD lost bf16/fp16 updates"

    params = dtensor_params(meshes, dtype=dtype)
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    opt = torch.optim.SGD(params, fused=True, **kwargs)
    foreach = torch.optim.SGD(local_params(params), foreach=True, **kwargs)
    fused = torch.optim.SGD(local_params(params), fused=True, **kwargs) if fused_stores else None
    step = torch.compile(opt.step, backend="fxmesh")
    with inductor_output_code() as code:
        for s in range(STEPS):
            set_grads([params, foreach.param_groups[0]["params"]], s)
            step()
            foreach.step()
            assert_same_state(opt, foreach, rtol=2 * rtol_for(dtype))
            if fused is not None:
                set_grads([fused.param_groups[0]["params"]], s)
                fused.step()
                assert_same_state(opt, fused, rtol=0 if DEVICE == "cpu" else rtol_for(dtype))
    assert_fully_compiled("\n".join(code), op="_fused_sgd", graphs=2)
