"""Targets for ``fxmesh inspect`` in tests/test_cli_inspect.py (run inside its fake world of 8 ranks).

Five float32 parameters: two on ``dp`` (8,), three on ``ep`` (2, 4); rank 0's shards
hold 8 + 8 elements on dp and 16 + 12 + 4 on ep.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor


def _params_with_grads() -> list[torch.nn.Parameter]:
    dp = init_device_mesh("cpu", (8,), mesh_dim_names=("dp",))
    ep = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp_mod_ep", "ep"))
    layout = [
        (dp, (16, 4), [Shard(0)]),
        (dp, (8,), [Replicate()]),
        (ep, (4, 8, 4), [Shard(0), Shard(1)]),
        (ep, (6, 8), [Replicate(), Shard(1)]),
        (ep, (4,), [Replicate(), Replicate()]),
    ]
    torch.manual_seed(0)
    params = []
    for mesh, shape, placements in layout:
        # src_data_rank=None: each rank cuts its shard locally, no collective.
        p = torch.nn.Parameter(distribute_tensor(torch.randn(shape), mesh, placements, src_data_rank=None))
        p.grad = DTensor.from_local(torch.randn_like(p.to_local()), mesh, placements, shape=p.shape, stride=p.stride())
        params.append(p)
    return params


def fused_adamw() -> torch.optim.Optimizer:
    return torch.optim.AdamW(_params_with_grads(), lr=1e-2, weight_decay=0.1, fused=True)


def foreach_adam_step_with_graph_break():
    params = _params_with_grads()
    opt = torch.optim.Adam(params, lr=1e-2, foreach=True)

    def step() -> None:
        for p in params:
            p.grad.mul_(0.5)
        torch._dynamo.graph_break()
        opt.step()

    return step


def clip_with_error_if_nonfinite_and_step():
    params = _params_with_grads()
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)

    def step() -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
        opt.step()
        return norm

    return step


def step_that_raises():
    def step() -> None:
        raise RuntimeError("the step failed")

    return step


def returns_a_number() -> int:
    return 3


def raises() -> None:
    raise ValueError("no model here")
