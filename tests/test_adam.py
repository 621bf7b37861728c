"""End to end: fused Adam/AdamW compiled with backend="fxmesh" against eager fused."""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.distributed.tensor import Replicate, Shard

from fxmesh.lowering import TABLE_ROWS
from tests.helpers import (
    DEVICE,
    KERNEL_PREFIX,
    SCALER_DEVICES,
    assert_same_state,
    clone_params,
    dtensor_params,
    grad_scaler_state,
    param_values,
    set_grads,
    shard,
    without_comments,
)

STEPS = 5


def unexpected_graph_breaks() -> list[str]:
    """Graph breaks other than the optimizer base class's own ``torch._dynamo.graph_break()``.

    fxmesh keeps those where ``opt.step`` itself is compiled (see fxmesh.capture).
    """
    return [reason for reason in counters["graph_break"] if "User-inserted graph break" not in reason]


def run_parity(make_opt, params, *, steps=STEPS, none_at=(), before_step=None, grad_views=False, backend="fxmesh"):
    """Steps a compiled and an eager optimizer side by side; returns the generated code."""
    eager_params = clone_params(params)
    compiled_opt, eager_opt = make_opt(params), make_opt(eager_params)
    step = torch.compile(compiled_opt.step, backend=backend)
    code = []
    for s in range(steps):
        set_grads([params, eager_params], s, none_at, views=grad_views)
        if before_step is not None:
            before_step(s, compiled_opt, eager_opt)
        before = param_values(compiled_opt), param_values(eager_opt)
        eager_opt.step()
        if s == 0:
            _, code = run_and_get_code(step)
        else:
            step()
        assert_same_state(compiled_opt, eager_opt, before=before)
    return compiled_opt, eager_opt, "\n".join(code)


def assert_fully_compiled(code: str, op: str = "_fused_adam", graphs: int = 1) -> None:
    assert KERNEL_PREFIX in code, f"Inductor generated no {KERNEL_PREFIX} kernel"
    assert op not in without_comments(code), f"an aten {op} kernel is still called"
    assert not unexpected_graph_breaks(), unexpected_graph_breaks()
    assert counters["fxmesh"]["graphs"] == graphs, f"the step compiled {counters['fxmesh']['graphs']} times"


@pytest.mark.parametrize("grad_views", [False, True], ids=["grads", "grad_views"])
def test_adamw_three_meshes(meshes, grad_views):
    """AdamW over 1-D and 2-D meshes with uneven shards matches eager fused and leaves no aten call.

    Also with gradients whose local tensors are views (Dynamo alone traces those with symbolic sizes).
    """
    params = dtensor_params(meshes)
    _, _, code = run_parity(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True), params, grad_views=grad_views
    )
    assert_fully_compiled(code)
    assert counters["fxmesh"]["split_nodes"] == 1
    assert counters["fxmesh"]["mesh_groups"] == 3


def test_scalars_computed_once_per_mesh_group(dp, ep, tp):
    """Per-parameter float64 scalars (pow(beta, step), step size) go into tables of TABLE_ROWS rows at most.

    Inlined, Inductor would recompute them in every vectorized iteration of each parameter's loop.
    Groups of 1, 9 and 9 + TABLE_ROWS parameters: below and above the inputs Inductor lowers as a
    pointwise cat, and more than one table.
    """
    params = [torch.nn.Parameter(shard(torch.randn(16, 4), dp, [Shard(0)]))]
    params += [torch.nn.Parameter(shard(torch.randn(4, 6), ep, [Shard(0), Shard(1)])) for _ in range(9)]
    params += [torch.nn.Parameter(shard(torch.randn(8, 3), tp, [Shard(0), Replicate()])) for _ in range(9 + TABLE_ROWS)]
    _, _, code = run_parity(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), params, steps=2)
    assert_fully_compiled(code)
    tables = re.findall(rf"empty_strided_{DEVICE}\(\((\d+), 2\), \(2, 1\), torch\.float(?:32|64)\)", code)
    assert sorted(map(int, tables)) == sorted([1, 9, TABLE_ROWS, 9]), tables


def adam_with_options(ps) -> torch.optim.Adam:
    """Fused Adam with amsgrad, L2 weight decay, custom betas and eps, a tensor lr, and a second param group
    with its own tensor lr and betas that maximizes."""
    return torch.optim.Adam(
        [
            {"params": ps[:4]},
            {"params": ps[4:], "lr": torch.tensor(3e-3), "betas": (0.8, 0.95), "maximize": True},
        ],
        lr=torch.tensor(1e-2),
        betas=(0.85, 0.99),
        eps=1e-6,
        weight_decay=0.05,
        amsgrad=True,
        fused=True,
    )


def test_adam_options_tensor_lr_param_groups(meshes):
    """Adam with amsgrad, maximize, L2 weight decay, custom betas, tensor lr and two param groups."""
    _, _, code = run_parity(adam_with_options, dtensor_params(meshes))
    assert_fully_compiled(code)
    assert counters["fxmesh"]["lowered_nodes"] >= 2


def adamw_with_tensor_betas(dtype: torch.dtype):
    """AdamW whose two param groups hold tensor betas of ``dtype`` (torch.optim takes a tensor lr and betas)."""

    def make(ps):
        betas = lambda b1, b2: (torch.tensor(b1, dtype=dtype), torch.tensor(b2, dtype=dtype))  # noqa: E731
        return torch.optim.AdamW(
            [{"params": ps[:4], "betas": betas(0.9, 0.999)}, {"params": ps[4:], "betas": betas(0.3, 0.95)}],
            lr=1e-2,
            weight_decay=0.1,
            fused=True,
        )

    return make


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_betas_changed_in_place_are_followed(meshes, dtype):
    """Tensor betas, changed in place by a schedule between steps: read on every call, no recompile.

    Before, the lowering mixed the betas (made mesh-local DTensors) with the local step counts and failed.
    """

    def new_betas(s, *opts):
        for opt in opts:
            beta1, beta2 = opt.param_groups[1]["betas"]
            beta1.fill_(0.3 - 0.05 * s)
            beta2.fill_(0.95 - 0.01 * s)

    _, _, code = run_parity(adamw_with_tensor_betas(dtype), dtensor_params(meshes), before_step=new_betas)
    assert KERNEL_PREFIX in code and "_fused_adam" not in without_comments(code)
    assert not unexpected_graph_breaks(), unexpected_graph_breaks()
    # Compiled once.  (For a float64 0-dim CPU input Dynamo restarts the trace once, under any backend: AOT
    # specializes the float Dynamo records for it.  So fxmesh's graph count says nothing here.)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["fxmesh"]["lowered_nodes"] >= 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adamw_low_precision(meshes, dtype):
    """bf16/fp16 parameters and states: float32 math as the fused kernel does, within one ulp."""
    params = dtensor_params(meshes, dtype=dtype)
    _, _, code = run_parity(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), params)
    assert_fully_compiled(code)


@pytest.mark.parametrize("scaler_device", SCALER_DEVICES)
def test_grad_scaler_inputs(meshes, scaler_device):
    """grad_scale unscales (and writes back) the grads; found_inf=1 skips the update and the step count."""
    params = dtensor_params(meshes)

    compiled_opt, eager_opt, code = run_parity(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, fused=True),
        params,
        before_step=grad_scaler_state(skip_step=2, device=scaler_device),
    )
    assert_fully_compiled(code)
    for pc, pe in zip(compiled_opt.param_groups[0]["params"], eager_opt.param_groups[0]["params"]):
        assert torch.allclose(pc.grad.to_local(), pe.grad.to_local(), rtol=1e-6, atol=0)
    assert compiled_opt.state[params[0]]["step"].item() == STEPS - 1


def test_plain_params_and_mixed_groups(meshes):
    """Plain tensors alone, and a plain param group beside a DTensor group, in one optimizer."""
    plain = [torch.nn.Parameter(torch.randn(33, 17, device=DEVICE)), torch.nn.Parameter(torch.randn(5, device=DEVICE))]
    params = dtensor_params(meshes)[:3] + plain
    _, _, code = run_parity(
        lambda ps: torch.optim.AdamW([{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-2}], fused=True),
        params,
    )
    assert_fully_compiled(code)


def test_none_grad_in_middle_of_group(meshes):
    """A parameter without a grad is skipped as in eager: unchanged, and no state is created."""
    params = dtensor_params(meshes)
    before = params[3].detach().clone()
    compiled_opt, _, _ = run_parity(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), params, steps=3, none_at=(3,)
    )
    assert torch.equal(params[3].to_local(), before.to_local())
    assert params[3] not in compiled_opt.state
