"""End to end: fxmesh.backend(fused_kernels="aten"), aten's fused Adam kernel on each mesh's local shards.

The compiled step runs the very kernel eager fused runs on each rank's shards, so the states must match
eager fused bit for bit (tolerance 0), where the lowered step matches it to float32 rounding.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor, Shard

import fxmesh
from tests.helpers import (
    DEVICE,
    FP32_RTOL,
    SCALER_DEVICES,
    assert_rel_close,
    assert_same_state,
    clone_params,
    dtensor_params,
    grad_scaler_state,
    inductor_output_code,
    local,
    param_values,
    set_grads,
    without_comments,
)
from tests.test_adam import STEPS, adam_with_options, adamw_with_tensor_betas, run_parity, unexpected_graph_breaks
from tests.test_sgd import run_local_parity

ATEN = fxmesh.backend(fused_kernels="aten")
# The call and its five mutated lists (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs).
CALL = re.compile(r"torch\.ops\.fxmesh\.aten_fused_adamw?(?:_unscale)?_\.default\(" + ", ".join([r"\[([^\]]*)\]"] * 5))


def run_exact_parity(
    make_opt, params, *, steps=STEPS, before_step=None, grad_views=False, grads_written=False, backend=ATEN
):
    """A compiled (aten kernels) and an eager optimizer over the same DTensors, side by side; the generated code.

    The kernel writes the gradients only to unscale them: ``grads_written`` says whether their version
    counters must move.
    """
    eager_params = clone_params(params)
    compiled_opt, eager_opt = make_opt(params), make_opt(eager_params)
    step = torch.compile(compiled_opt.step, backend=backend)
    with inductor_output_code() as code:
        for s in range(steps):
            set_grads([params, eager_params], s, views=grad_views)
            if before_step is not None:
                before_step(s, compiled_opt, eager_opt)
            versions = [p._version for p in params]
            grad_versions = [(p.grad._version, local(p.grad)._version) for p in params]
            before = param_values(compiled_opt), param_values(eager_opt)
            eager_opt.step()
            step()
            assert_same_state(compiled_opt, eager_opt, rtol=0.0, before=before)
            # Autograd must see the in-place update of every parameter, as after any compiled step (AOT bumps
            # mutated inputs); eager fused's kernel bumps no version counter at all (torch 2.11-2.14 on the CPU).
            # A DTensor's local tensor keeps its counter, as under an eager in-place DTensor op.
            assert all(p._version > v for p, v in zip(params, versions)), f"step {s}: a version counter"
            for p, (v, local_v) in zip(params, grad_versions):
                moved = (p.grad._version > v, local(p.grad)._version > local_v)
                expected = (grads_written, grads_written and not isinstance(p.grad, DTensor))
                assert moved == expected, f"step {s}: gradient version counters {moved}"
    return compiled_opt, eager_opt, "\n".join(code)


def assert_aten_kernels(code: str, calls: int) -> None:
    """``calls`` custom-op calls, each updating the graph's inputs themselves: Inductor re-inplaced the kernel
    onto the optimizer's tensors (a copy would pass it new buffers and copy them back)."""
    body = without_comments(code)
    found = CALL.findall(body)
    assert len(found) == calls, body
    mutated = [name.strip() for lists in found for entries in lists for name in entries.split(",") if name.strip()]
    assert mutated and all(re.fullmatch(r"arg\d+_1", name) for name in mutated), mutated
    assert not unexpected_graph_breaks(), unexpected_graph_breaks()
    assert counters["fxmesh"]["graphs"] == 1 and counters["fxmesh"]["local_shard_graphs"] == 1
    assert counters["fxmesh"]["lowered_nodes"] == 0


@pytest.mark.parametrize("grad_views", [False, True], ids=["grads", "grad_views"])
def test_adamw_three_meshes(meshes, grad_views):
    """AdamW over 1-D and 2-D meshes with uneven shards: one kernel call per mesh, eager fused's states exactly.

    Also with gradients whose local tensors are views (Dynamo gives those symbolic sizes).
    """
    params = dtensor_params(meshes)
    _, _, code = run_exact_parity(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True), params, grad_views=grad_views
    )
    assert_aten_kernels(code, calls=3)
    assert counters["fxmesh"]["split_nodes"] == 1 and counters["fxmesh"]["aten_fused_calls"] == 3


@pytest.mark.parametrize("with_dtensors", [False, True], ids=["plain", "mixed"])
def test_plain_tensors_and_mixed_groups(meshes, with_dtensors):
    """Plain parameters keep aten's kernel too: alone (no DTensor, nothing to localize), and as a param group
    of their own beside DTensors."""
    dtensors = dtensor_params(meshes)[:3] if with_dtensors else []
    plain = [torch.nn.Parameter(torch.randn(33, 17, device=DEVICE)), torch.nn.Parameter(torch.randn(5, device=DEVICE))]
    n = len(dtensors)

    def make(ps):
        return torch.optim.AdamW([*([{"params": ps[:n]}] if n else []), {"params": ps[n:], "lr": 3e-2}], fused=True)

    _, _, code = run_exact_parity(make, dtensors + plain, steps=3)
    found = CALL.findall(without_comments(code))
    assert len(found) == len({p.device_mesh for p in dtensors}) + 1, found  # a call per param group and mesh
    assert counters["fxmesh"]["lowered_nodes"] == 0


def test_passes_without_the_lowering(meshes):
    """With passes that leave out lower_fused_adam, the calls still keep aten's kernel (nothing is left to lower)."""
    backend = fxmesh.backend(fused_kernels="aten", passes=["split_by_mesh"])
    assert "aten_fused_adam" in repr(backend)
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)  # noqa: E731
    _, _, code = run_exact_parity(make, dtensor_params(meshes), steps=2, backend=backend)
    assert_aten_kernels(code, calls=3)


def test_adam_options_tensor_lr_param_groups(meshes):
    """Adam with amsgrad, maximize, L2 weight decay, a tensor lr and two param groups."""
    _, _, code = run_exact_parity(adam_with_options, dtensor_params(meshes))
    groups = counters["fxmesh"]["aten_fused_calls"]
    assert groups >= 4, groups  # two param groups, each over several meshes
    assert_aten_kernels(code, calls=groups)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adamw_low_precision(meshes, dtype):
    """bf16/fp16 parameters and states: the fused kernel's own float32 math, so eager's states exactly."""
    params = dtensor_params(meshes, dtype=dtype)
    _, _, code = run_exact_parity(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), params)
    assert_aten_kernels(code, calls=3)


@pytest.mark.parametrize("scaler_device", SCALER_DEVICES)
def test_grad_scaler_inputs(meshes, scaler_device):
    """grad_scale unscales the grads in place; found_inf=1 skips the update and the step count."""
    params = dtensor_params(meshes)
    compiled_opt, eager_opt, code = run_exact_parity(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, fused=True),
        params,
        before_step=grad_scaler_state(skip_step=2, device=scaler_device),
        grads_written=True,
    )
    assert_aten_kernels(code, calls=3)
    for pc, pe in zip(compiled_opt.param_groups[0]["params"], eager_opt.param_groups[0]["params"]):
        assert torch.equal(pc.grad.to_local(), pe.grad.to_local())
    assert compiled_opt.state[params[0]]["step"].item() == STEPS - 1


def test_scheduled_float_lr_is_lowered(meshes):
    """A float lr changed every step turns symbolic after one recompile: that graph's calls are lowered instead."""

    def new_lr(s, *opts):
        for opt in opts:
            opt.param_groups[0]["lr"] = 1e-2 / (s + 1)

    run_local_parity(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
        dtensor_params(meshes),
        before_step=new_lr,
        backend=ATEN,
    )
    assert counters["fxmesh"]["graphs"] == 2, dict(counters["fxmesh"])
    assert counters["fxmesh"]["aten_fused_calls"] == 3  # the first graph, with lr a constant
    assert counters["fxmesh"]["lowered_nodes"] == 3  # the recompiled one, one call per mesh
    assert counters["fxmesh"]["eager_fallbacks"] == 0


def test_tensor_betas_are_lowered(meshes):
    """Tensor betas: aten's kernel takes floats, which eager reads off the tensors on every call; such a call is
    lowered, and follows betas changed in place."""

    def new_betas(s, *opts):
        for opt in opts:
            opt.param_groups[1]["betas"][0].fill_(0.3 - 0.05 * s)

    run_parity(adamw_with_tensor_betas(torch.float32), dtensor_params(meshes), before_step=new_betas, backend=ATEN)
    assert counters["fxmesh"]["aten_fused_calls"] == 0 and counters["fxmesh"]["lowered_nodes"] >= 3
    assert counters["stats"]["unique_graphs"] == 1


def test_graph_on_dtensors_is_lowered(meshes):
    """With local_shards=False the graph stays on DTensors: their calls are lowered; a param group of plain
    tensors in the same graph keeps aten's kernel."""
    params = dtensor_params(meshes) + [torch.nn.Parameter(torch.randn(33, 17, device=DEVICE))]
    eager_params = clone_params(params)
    make = lambda ps: torch.optim.AdamW([{"params": ps[:-1]}, {"params": ps[-1:], "lr": 3e-2}], fused=True)  # noqa: E731
    compiled_opt, eager_opt = make(params), make(eager_params)
    step = torch.compile(compiled_opt.step, backend=fxmesh.backend(fused_kernels="aten", local_shards=False))
    for s in range(3):
        set_grads([params, eager_params], s)
        before = param_values(compiled_opt), param_values(eager_opt)
        eager_opt.step()
        step()
        assert_same_state(compiled_opt, eager_opt, before=before)
    assert counters["fxmesh"]["aten_fused_calls"] == 1 and counters["fxmesh"]["lowered_nodes"] == 3
    assert counters["fxmesh"]["local_shard_graphs"] == 0


@pytest.mark.parametrize("kernels", ["lowered", "aten"])
def test_gradients_laid_out_otherwise_than_their_parameters(dp, kernels):
    """A gradient transposed against its parameter (same shape, other strides): the step computes the update of
    its values, as for-loop AdamW does, over 3 steps.

    aten's CPU fused kernel reads such a gradient as if it were laid out like the parameter, with no error
    (torch 2.11-2.14; its CUDA kernel refuses it), so ``fused_kernels="aten"`` leaves that call to the lowering.
    """
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(DTensor.from_local(torch.randn(4, 4, generator=gen).to(DEVICE), dp, [Shard(0)]))
        for _ in range(3)
    ]
    ref = [torch.nn.Parameter(local(p).detach().clone()) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    step = torch.compile(opt.step, backend=ATEN if kernels == "aten" else "fxmesh")
    for s in range(3):
        for i, (p, r) in enumerate(zip(params, ref)):
            g = torch.randn(4, 4, generator=gen).to(DEVICE)
            g = g if i == 1 else g.t()  # parameter 1's gradient is laid out as the parameter
            p.grad = DTensor.from_local(g, dp, [Shard(0)], run_check=False)
            r.grad = g.clone()
        step()
        ref_opt.step()
        for i, (p, r) in enumerate(zip(params, ref)):
            assert_rel_close(local(p), r, FP32_RTOL, f"step {s}, parameter {i}")
    assert not local(params[0].grad).is_contiguous()
    assert counters["fxmesh"]["aten_fused_calls"] == 0 and counters["fxmesh"]["lowered_nodes"] == 1


def test_sgd_is_lowered(meshes):
    """Only Adam/AdamW keep aten's kernel: fused SGD (no DTensor rule upstream) is lowered as by default."""
    make = lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True)  # noqa: E731
    run_local_parity(make, dtensor_params(meshes), backend=ATEN)
    assert counters["fxmesh"]["aten_fused_calls"] == 0
    # One call per mesh in each graph (the first step, which creates the momentum buffers, is a graph of its own).
    assert counters["fxmesh"]["lowered_nodes"] == 3 * counters["fxmesh"]["graphs"] > 0


def test_clip_and_step(dp, ep):
    """Clipping + AdamW in one graph: the norm and the coefficient compiled, then aten's kernel per mesh.

    Against fxmesh's eager clipping and eager fused AdamW on the same DTensors over 3 steps (fp32: 1e-5).
    """
    params = dtensor_params({"dp": dp, "ep": ep, "tp": ep})
    ref = clone_params(params)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)

    @torch.compile(backend=ATEN)
    def clip_and_step():
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        return norm

    for s in range(3):
        set_grads([params, ref], s)
        before = param_values(opt), param_values(ref_opt)
        norm = clip_and_step()
        ref_norm = fxmesh.clip_grad_norm_(ref, 0.5)
        ref_opt.step()
        assert_rel_close(norm, ref_norm, FP32_RTOL, f"step {s}: the norm")
        assert_same_state(opt, ref_opt, before=before)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["fxmesh"]["aten_fused_calls"] == 2 and counters["fxmesh"]["lowered_nodes"] == 0
    assert all(isinstance(p, DTensor) for p in params)


def test_unknown_fused_kernels_value():
    with pytest.raises(ValueError, match="fused_kernels must be one of inductor, aten, not 'triton'"):
        fxmesh.backend(fused_kernels="triton")
