"""Optimizer state under the compiled step: eager's format, checkpoints, switching, no recompiles."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor

from tests.helpers import assert_same_state, clone_params, dtensor_params, param_values, set_grads


def make_adamw(params, lr=1e-2):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.1, fused=True)


def test_state_format_and_state_dict_round_trip(meshes):
    """Compiled steps leave eager's state format; state_dict() -> load_state_dict() continues exactly."""
    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    opt, eager_opt = make_adamw(params), make_adamw(eager_params)
    step = torch.compile(opt.step, backend="fxmesh")
    for s in range(3):
        set_grads([params, eager_params], s)
        step()
        eager_opt.step()
    for p in params:
        st = opt.state[p]
        assert type(st["step"]) is torch.Tensor and st["step"].dim() == 0
        assert st["step"].dtype == torch.float32 and st["step"].item() == 3
        assert isinstance(st["exp_avg"], DTensor) and st["exp_avg"].placements == p.placements

    reloaded = make_adamw(params)
    reloaded.load_state_dict(opt.state_dict())
    step = torch.compile(reloaded.step, backend="fxmesh")
    for s in range(3, 6):
        set_grads([params, eager_params], s)
        before = param_values(reloaded), param_values(eager_opt)
        step()
        eager_opt.step()
        assert_same_state(reloaded, eager_opt, before=before)


def test_switch_between_eager_and_compiled(meshes):
    """Alternating eager and compiled steps on one optimizer gives the all-eager numbers."""
    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    opt, eager_opt = make_adamw(params), make_adamw(eager_params)
    compiled = torch.compile(opt.step, backend="fxmesh")
    for s, use_compiled in enumerate([True, True, False, False, True, False, True]):
        set_grads([params, eager_params], s)
        before = param_values(opt), param_values(eager_opt)
        (compiled if use_compiled else opt.step)()
        eager_opt.step()
        assert_same_state(opt, eager_opt, before=before)


def test_tensor_lr_scheduler_compiles_once(meshes):
    """20 steps with a tensor lr driven by an LR scheduler: one compile, eager's numbers."""
    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    opt = make_adamw(params, lr=torch.tensor(1e-2))
    eager_opt = make_adamw(eager_params, lr=torch.tensor(1e-2))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    eager_sched = torch.optim.lr_scheduler.CosineAnnealingLR(eager_opt, T_max=20)
    step = torch.compile(opt.step, backend="fxmesh")
    for s in range(20):
        set_grads([params, eager_params], s)
        step()
        eager_opt.step()
        sched.step()
        eager_sched.step()
    assert_same_state(opt, eager_opt)
    assert opt.param_groups[0]["lr"].item() != 1e-2
    assert counters["fxmesh"]["graphs"] == 1
