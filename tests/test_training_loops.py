"""Ordinary eager training loops: DTensor parameters on two meshes beside plain ones, and a plain model.

CI also runs this module with ``--fxmesh-compile`` (``.ci/run``): every ``opt.step()`` below is then
compiled with backend="fxmesh" and checked against an eager step (``fxmesh.pytest_plugin``).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from tests.helpers import local, shard

STEPS = 4


def regression_params(dp, ep) -> list[torch.nn.Parameter]:
    """Parameters on ``dp`` (one uneven), on ``ep`` (2-D mesh), and a plain one last."""
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(shard(torch.randn(16, 8, generator=g), dp, [Shard(0)])),
        torch.nn.Parameter(shard(torch.randn(13, 5, generator=g), dp, [Shard(0)])),
        torch.nn.Parameter(shard(torch.randn(8, 6, 4, generator=g), ep, [Shard(0), Shard(1)])),
        torch.nn.Parameter(shard(torch.randn(6, 10, generator=g), ep, [Replicate(), Shard(1)])),
        torch.nn.Parameter(torch.randn(5, 3, generator=g)),
    ]


def grad_shard(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``p``'s gradient, laid out as ``p`` (torch 2.11's autograd hands back
    Replicate gradients through ``to_local()`` of unevenly sharded parameters)."""
    g = p.grad
    if isinstance(g, DTensor) and g.placements != p.placements:
        g = g.redistribute(p.device_mesh, p.placements)
    return local(g)


def train(opt, params, targets, scheduler=None) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Steps 0.5 * ||p - target||^2 over this rank's shards; returns the losses and each step's local grads."""
    losses, grads = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = sum(0.5 * (local(p) - t).pow(2).sum() for p, t in zip(params, targets))
        loss.backward()
        grads.append([grad_shard(p).clone() for p in params])
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses, grads


def param_groups(params) -> list[dict]:
    # Eager foreach and fused kernels refuse a list mixing DTensors and plain tensors: own group for the plain one.
    return [{"params": params[:-1]}, {"params": params[-1:], "weight_decay": 0.0}]


def targets_for(params) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(local(p).shape, generator=g) for p in params]


def test_fused_adamw_two_meshes_tensor_lr_schedule(dp, ep):
    """Fused AdamW with a cosine-scheduled tensor lr: the loss falls, and step 1 is -lr * sign(grad) plus decay."""
    params = regression_params(dp, ep)
    start = [local(p).detach().clone() for p in params]
    lr, wd = 0.05, 0.01
    opt = torch.optim.AdamW(param_groups(params), lr=torch.tensor(lr), weight_decay=wd, fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    first_step = []

    def after_first_step(opt, args, kwargs):
        if not first_step:
            first_step.extend(local(p).detach().clone() for p in params)

    opt.register_step_post_hook(after_first_step)
    losses, grads = train(opt, params, targets_for(params), scheduler)

    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    decay = [1 - lr * wd] * (len(params) - 1) + [1.0]
    for i, (p0, p1, g) in enumerate(zip(start, first_step, grads[0])):
        # Adam's first bias-corrected update is g / (|g| + eps).
        expected = p0 * decay[i] - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p1, expected, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")
    assert opt.param_groups[0]["lr"].item() < lr


def test_foreach_adam_two_meshes(dp, ep):
    """Foreach Adam: the loss falls, and each exp_avg_sq is the running average of the squared grads."""
    params = regression_params(dp, ep)
    beta2 = 0.95
    opt = torch.optim.Adam(param_groups(params), lr=0.05, betas=(0.9, beta2), foreach=True)
    losses, grads = train(opt, params, targets_for(params))

    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    for i, p in enumerate(params):
        expected = torch.zeros_like(grads[0][i])
        for step_grads in grads:
            expected = beta2 * expected + (1 - beta2) * step_grads[i] ** 2
        torch.testing.assert_close(local(opt.state[p]["exp_avg_sq"]), expected, rtol=1e-5, atol=1e-7)
        assert opt.state[p]["step"].item() == STEPS


def test_fused_sgd_momentum_model():
    """Fused SGD with momentum on a small MLP: the loss falls and each update is lr times the momentum buffer.

    Plain parameters only: upstream eager fused SGD has no DTensor sharding rule.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x.sum(dim=1, keepdim=True).sin()
    lr, momentum = 0.1, 0.9
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, fused=True)
    bufs = [torch.zeros_like(p) for p in model.parameters()]
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        losses.append(loss.item())
        for buf, p, p0 in zip(bufs, model.parameters(), before):
            buf.mul_(momentum).add_(p.grad)
            torch.testing.assert_close(p.detach(), p0 - lr * buf, rtol=1e-5, atol=1e-6)

    assert all(b < a for a, b in zip(losses, losses[1:])), losses
