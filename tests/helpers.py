"""Shared test helpers: DTensor parameter sets, eager references and parity checks."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

# Where the meshes live.  CI runs on the CPU; FXMESH_TEST_DEVICE=cuda runs the
# end-to-end tests on a GPU (Triton kernels instead of C++).
DEVICE = os.environ.get("FXMESH_TEST_DEVICE", "cpu")
# How Inductor names the kernels it generates on each device.
KERNEL_PREFIX = {"cpu": "cpp_fused", "cuda": "triton_"}[DEVICE]

FP32_RTOL = 1e-5
# One unit in the last place: the compiled and the eager kernel both compute in
# float32 and may round a low-precision result to neighbouring values.
LOW_PRECISION_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def rtol_for(dtype: torch.dtype) -> float:
    return LOW_PRECISION_RTOL.get(dtype, FP32_RTOL)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| over the local shards, in float64 (0 for empty shards)."""
    a, e = local(actual).double(), local(expected).double()
    if not e.numel():
        return 0.0
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_rel_close(actual, expected, rtol: float, what: str) -> None:
    assert local(actual).shape == local(expected).shape, what
    assert local(actual).dtype == local(expected).dtype, what
    err = rel_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


@contextlib.contextmanager
def inductor_output_code():
    """Collects the output code of every Inductor compile inside the block (without resetting Dynamo,
    unlike ``run_and_get_code``)."""
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        yield codes


def without_comments(code: str) -> str:
    """Inductor output code less its comment lines, which name the ATen ops a kernel was made from
    (on CUDA a foreach kernel's comment says ``Original ATen: [aten._foreach_add]``)."""
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))


def shard(full: torch.Tensor, mesh, placements) -> DTensor:
    """``full`` laid out on ``mesh``, this rank's part cut locally.

    No collective: under the fake process group a scatter or broadcast leaves
    the local shard uninitialized (torch 2.11 scatters; 2.13 happens not to).
    """
    return distribute_tensor(full, mesh, placements, src_data_rank=None)


def dtensor_params(meshes, dtype=torch.float32, seed=0) -> list[torch.nn.Parameter]:
    """Parameters on all three meshes: 1-D and 2-D meshes, Shard/Replicate, uneven shards."""
    g = torch.Generator().manual_seed(seed)
    specs = [
        ("dp", (16, 8), [Shard(0)]),
        ("dp", (13, 5), [Shard(0)]),  # uneven: 13 rows over 8 ranks
        ("dp", (7,), [Replicate()]),
        ("ep", (8, 6, 4), [Shard(0), Shard(1)]),
        ("ep", (6, 10), [Replicate(), Shard(1)]),
        ("tp", (12, 7), [Shard(0), Shard(1)]),  # uneven on tp
        ("tp", (9,), [Replicate(), Replicate()]),
    ]
    params = []
    for mesh, shape, placements in specs:
        full = torch.randn(shape, generator=g).to(dtype)
        params.append(torch.nn.Parameter(shard(full, meshes[mesh], placements)))
    return params


def clone_params(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params_lists, seed: int, none_at: tuple[int, ...] = (), views: bool = False) -> None:
    """The same fresh gradients on every parameter list (DTensor grads keep the param's layout).

    DTensor grads own their local tensor, as autograd's do; with ``views`` the local tensor is a
    view (as ``DTensor.from_local`` leaves it), which Dynamo alone traces with symbolic sizes.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    ref = params_lists[0]
    grads = []
    for i, p in enumerate(ref):
        grads.append(None if i in none_at else torch.randn(local(p).shape, generator=g).to(local(p).device, p.dtype))
    for params in params_lists:
        for p, grad in zip(params, grads):
            if grad is None:
                p.grad = None
            elif isinstance(p, DTensor):
                g = DTensor.from_local(grad.clone(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                p.grad = g if views else g.detach()
            else:
                p.grad = grad.clone()


def grads_in_buffers(params, gen: torch.Generator, per_buffer: int) -> list[torch.Tensor]:
    """Fresh gradients on DTensor ``params``, the local tensors of each ``per_buffer`` in turn views of one
    flat buffer, as FSDP2's reduce-scatter leaves a module's gradients.  Returns the local gradients."""
    out = []
    for i, p in enumerate(params):
        shard = p.to_local()
        if i % per_buffer == 0:
            size = sum(q.to_local().numel() for q in params[i : i + per_buffer])
            flat, offset = torch.randn(size, generator=gen).to(DEVICE), 0
        g = flat[offset : offset + shard.numel()].view(shard.shape)
        offset += shard.numel()
        p.grad = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        out.append(g)
    return out


# Where GradScaler's inputs live in the tests: GradScaler keeps them on the parameters' device; a user may
# hand the optimizer CPU ones, which eager torch.optim copies to the device.
SCALER_DEVICES = sorted({"cpu", DEVICE})


def grad_scaler_state(skip_step: int, device: str = "cpu"):
    """A ``before_step(s, *opts)`` hook that sets GradScaler's inputs: grad_scale 4, found_inf at ``skip_step``."""

    def before_step(s, *opts):
        for opt in opts:
            opt.grad_scale = torch.tensor(4.0, device=device)
            opt.found_inf = torch.tensor(1.0 if s == skip_step else 0.0, device=device)

    return before_step


def param_values(opt) -> list[torch.Tensor]:
    """A copy of every parameter's local values, in ``param_groups`` order: take it before a step and pass
    it to :func:`assert_same_state` as ``before``."""
    return [local(p).detach().clone() for group in opt.param_groups for p in group["params"]]


def assert_same_update(before_c, after_c, before_e, after_e, rtol: float, what: str) -> None:
    """A step changed a parameter alike: elementwise, |change_c - change_e| <= rtol * max|change_e| + 2 ulps of
    the parameter.

    Parameters compared to their largest element cannot see the step itself: with lr 1e-2, fused Adam's step
    size off by 1e-4 failed one test of 28 (parameters and states at 1e-5), and off by 2e-5 none.  A parameter's
    own rounding bounds how exactly its change can agree, hence the ulps.
    """
    after_c, after_e = local(after_c).double(), local(after_e).double()
    change_c, change_e = after_c - before_c.double(), after_e - before_e.double()
    if not change_e.numel():
        return
    ulp = torch.finfo(before_e.dtype).eps * torch.maximum(after_e.abs(), before_e.double().abs())
    bound = rtol * change_e.abs().max() + 2 * ulp
    excess = ((change_c - change_e).abs() - bound).max().item()
    worst = ((change_c - change_e).abs().max() / change_e.abs().max().clamp_min(1e-30)).item()
    assert excess <= 0, f"{what}: the step's change differs by {worst:.3e} of its largest (rtol {rtol:.1e})"


def assert_same_state(compiled_opt, eager_opt, rtol: float | None = None, before=None) -> None:
    """Parameters and every state tensor of two optimizers agree; steps exactly.  With ``before`` (the two
    optimizers' :func:`param_values` from before the step), each parameter's change agrees too."""
    compared = 0
    for gi, (gc, ge) in enumerate(zip(compiled_opt.param_groups, eager_opt.param_groups)):
        for i, (pc, pe) in enumerate(zip(gc["params"], ge["params"])):
            tol = rtol if rtol is not None else rtol_for(pe.dtype)
            assert_rel_close(pc, pe, tol, f"group {gi} param {i}")
            if before is not None:
                before_c, before_e = before[0][compared], before[1][compared]
                assert_same_update(before_c, pc, before_e, pe, tol, f"group {gi} param {i}")
            compared += 1
            sc, se = compiled_opt.state.get(pc, {}), eager_opt.state.get(pe, {})
            assert sc.keys() == se.keys(), f"group {gi} param {i}: state keys {sc.keys()} != {se.keys()}"
            for k in se:
                if k == "step":
                    # Compiled on a GPU, Dynamo moves a CPU step count to the parameter's device
                    # (OptimizerVariable.move_step_if_cpu); eager keeps it where torch.optim made it.
                    assert torch.equal(local(sc[k]).cpu(), local(se[k]).cpu()), f"group {gi} param {i}: step"
                    assert sc[k].dtype == se[k].dtype and type(sc[k]) is type(se[k])
                else:
                    assert_rel_close(sc[k], se[k], tol, f"group {gi} param {i} state {k}")
    assert before is None or len(before[0]) == len(before[1]) == compared, "snapshots of other parameters"


def titan_clip(params, max_norm: float) -> torch.Tensor:
    """torchtitan's clipping with expert parallelism: a norm per group of parameters on one mesh, combined.

    Experts are the parameters on 2-D meshes, dense weights those on 1-D ones.
    """
    experts = [p for p in params if p.device_mesh.ndim == 2]
    dense = [p for p in params if p.device_mesh.ndim == 1]
    expert_norm = torch.nn.utils.get_total_norm([p.grad for p in experts]).full_tensor()
    dense_norm = torch.nn.utils.get_total_norm([p.grad for p in dense]).full_tensor()
    total = (expert_norm**2 + dense_norm**2) ** 0.5
    torch.nn.utils.clip_grads_with_norm_(experts, max_norm, total)
    torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    return total
