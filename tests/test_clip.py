"""Cross-mesh gradient clipping in a real 4-rank gloo world, against a single-process reference.

Meshes ``dp`` (4,) and ``ep`` (2, 2) over the same four ranks.  Every rank
builds the same full tensors, keeps its shards, and compares what it gets
with ``torch.nn.utils.clip_grad_norm_`` on the full tensors.  The world runs
once per module; the tests read its results.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import fxmesh
from fxmesh import world
from tests.helpers import (
    FP32_RTOL,
    assert_rel_close,
    assert_same_state,
    clone_params,
    dtensor_params,
    inductor_output_code,
    param_values,
    rel_error,
    set_grads,
    shard,
    titan_clip,
)

WORLD_SIZE = 4
COMPILED_NORM_TYPES = (2.0, 1.0, math.inf, 3.0)
NORM_TYPES = (*COMPILED_NORM_TYPES, 0.0, -math.inf, 0.5)
# (mesh, shape, placements of the gradient); None: a plain tensor, the same on every rank.
LAYOUT = [
    ("dp", (16, 8), [Shard(0)]),
    ("dp", (13, 5), [Shard(0)]),  # uneven: 4, 4, 4, 1 rows
    ("dp", (3, 5), [Shard(0)]),  # rank 3's shard is empty
    ("dp", (7,), [Replicate()]),
    ("ep", (8, 6, 4), [Shard(0), Shard(1)]),
    ("ep", (6, 10), [Replicate(), Shard(1)]),
    ("ep", (4, 4), [Replicate(), Replicate()]),
    ("ep", (6, 3), [Partial(), Shard(0)]),  # not yet reduced over dp_mod_ep
    ("ep", (8, 3), [_StridedShard(0, split_factor=2), Shard(0)]),  # FSDP2 over ep-sharded experts
    (None, (9,), None),
]
# Fused AdamW has no use for Partial gradients or plain tensors beside DTensors.
STEP_LAYOUT = [(mesh, shape, pl) for mesh, shape, pl in LAYOUT if mesh and not any(p.is_partial() for p in pl)]
PARTIAL_WEIGHTS = (0.25, 0.75)  # each dp_mod_ep coordinate's share of a Partial gradient


def _meshes():
    return {
        "dp": init_device_mesh("cpu", (4,), mesh_dim_names=("dp",)),
        "ep": init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_mod_ep", "ep")),
    }


def _distribute(full: torch.Tensor, meshes, mesh: str | None, placements) -> torch.Tensor:
    if mesh is None:
        return full.clone()
    if not any(p.is_partial() for p in placements):
        return shard(full, meshes[mesh], placements)
    m = meshes[mesh]
    resolved = [Replicate() if p.is_partial() else p for p in placements]
    local = shard(full, m, resolved).to_local() * PARTIAL_WEIGHTS[m.get_coordinate()[0]]
    return DTensor.from_local(local, m, placements, shape=full.shape, stride=full.stride())


def _problem(meshes, layout, seed: int):
    """Parameters with gradients on the meshes, and the same as full plain tensors."""
    g = torch.Generator().manual_seed(seed)
    params, ref = [], []
    for mesh, shape, placements in layout:
        full, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        param_placements = [Replicate() if q.is_partial() else q for q in placements or []]
        p = torch.nn.Parameter(_distribute(full, meshes, mesh, param_placements))
        p.grad = _distribute(grad, meshes, mesh, placements)
        params.append(p)
        r = torch.nn.Parameter(full.clone())
        r.grad = grad.clone()
        ref.append(r)
    return params, ref


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_clip(clip, meshes, norm_type: float) -> dict:
    params, ref = _problem(meshes, LAYOUT, seed=0)
    max_norm = torch.nn.utils.get_total_norm([r.grad for r in ref], norm_type).item() / 2
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    norm = clip(params, max_norm, norm_type)
    return {
        "norm": norm.item(),
        "plain": type(norm) is torch.Tensor,
        "norm_err": rel_error(norm, ref_norm),
        "grad_err": max(rel_error(_full(p.grad), r.grad) for p, r in zip(params, ref)),
        "graph_breaks": dict(counters["graph_break"]),
    }


def _check_group(rank: int, meshes, compiled: bool) -> float:
    """Each rank stands for a pipeline stage with its own plain gradients; ``group`` folds them in."""
    stages = [torch.randn(10, generator=torch.Generator().manual_seed(s)) for s in range(WORLD_SIZE)]
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = stages[rank].clone()
    clip = fxmesh.clip_grad_norm_
    if compiled:
        torch._dynamo.reset()
        clip = torch.compile(clip, backend="fxmesh")
    norm = clip([p], 1.0, 2.0, group=meshes["dp"])
    return rel_error(norm, torch.linalg.vector_norm(torch.cat(stages)))


def _clip_and_step(meshes, seed: int, error_if_nonfinite: bool = False) -> tuple:
    """Parameters over STEP_LAYOUT and eager copies, a fused AdamW for each, and clip + step over the first
    compiled with fxmesh (Dynamo reset): ``(params, ref, opt, ref_opt, step)``."""
    params, _ = _problem(meshes, STEP_LAYOUT, seed=seed)
    ref, _ = _problem(meshes, STEP_LAYOUT, seed=seed)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)

    def train_step():
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=error_if_nonfinite)
        opt.step()
        return norm

    torch._dynamo.reset()
    counters.clear()
    return params, ref, opt, ref_opt, torch.compile(train_step, backend="fxmesh")


def _check_clip_then_step(meshes) -> dict:
    params, ref, _, ref_opt, step = _clip_and_step(meshes, seed=1)
    g = torch.Generator().manual_seed(2)
    norm_err = param_err = 0.0
    with torch._inductor.config.patch(kernel_name_max_ops=1000), inductor_output_code() as codes:
        for _ in range(5):
            for (mesh, shape, placements), p, r in zip(STEP_LAYOUT, params, ref):
                grad = torch.randn(shape, generator=g)
                p.grad = _distribute(grad, meshes, mesh, placements)
                r.grad = _distribute(grad.clone(), meshes, mesh, placements)  # shards may alias `grad`
            norm = step()
            ref_norm = fxmesh.clip_grad_norm_(ref, 1.0)
            ref_opt.step()
            norm_err = max(norm_err, rel_error(norm, ref_norm))
            param_err = max(param_err, max(rel_error(_full(p), _full(r)) for p, r in zip(params, ref)))
    kernels = [line.split(" = ")[0] for code in codes for line in code.splitlines() if "= async_compile.cpp" in line]
    return {
        "norm_err": norm_err,
        "param_err": param_err,
        "graph_breaks": dict(counters["graph_break"]),
        "graphs": counters["fxmesh"]["graphs"],
        "kernels": kernels,
    }


def _snapshot(params, opt) -> list[torch.Tensor]:
    """Every local tensor a step could change: parameters, gradients, optimizer states (step counts too)."""
    tensors = [t for p in params for t in (p, p.grad, *opt.state.get(p, {}).values())]
    return [(t.to_local() if isinstance(t, DTensor) else t).clone() for t in tensors]


def _assert_unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    assert len(before) == len(after)
    for i, (b, a) in enumerate(zip(before, after)):
        torch.testing.assert_close(
            a, b, rtol=0, atol=0, equal_nan=True, msg=f"tensor {i} changed by a step that raised"
        )


def _check_nonfinite_on_one_rank(rank: int, meshes) -> dict:
    """clip (error_if_nonfinite=True) + fused AdamW compiled; at step 1 only rank 1's shard of one gradient is
    inf. The norm is all-reduced, so every rank must raise and keep its state; steps 0 and 2 as eager."""
    params, ref, opt, ref_opt, step = _clip_and_step(meshes, seed=3, error_if_nonfinite=True)
    g = torch.Generator().manual_seed(4)
    raised, unchanged, param_err = [], True, 0.0
    for s in range(3):
        for (mesh, shape, placements), p, r in zip(STEP_LAYOUT, params, ref):
            grad = torch.randn(shape, generator=g)
            p.grad = _distribute(grad, meshes, mesh, placements)
            r.grad = _distribute(grad.clone(), meshes, mesh, placements)
        if s == 1 and rank == 1:
            for ps in (params, ref):
                ps[0].grad.to_local().view(-1)[0] = math.inf
        before = _snapshot(params, opt)
        try:
            step()
        except RuntimeError as e:
            raised.append("non-finite" in str(e))
            after = _snapshot(params, opt)
            unchanged = unchanged and len(before) == len(after) and all(map(torch.equal, before, after))
        else:
            raised.append(False)
        try:
            fxmesh.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
        except RuntimeError:
            continue
        ref_opt.step()
        param_err = max(param_err, max(rel_error(_full(p), _full(r)) for p, r in zip(params, ref)))
    return {
        "raised": raised,
        "unchanged": unchanged,
        "param_err": param_err,
        "splits": counters["fxmesh"]["split_at_checks"],
    }


def _rank_checks(rank: int, world_size: int) -> dict:
    meshes = _meshes()
    results = {"eager": {}, "compiled": {}}
    for norm_type in NORM_TYPES:
        results["eager"][norm_type] = _check_clip(fxmesh.clip_grad_norm_, meshes, norm_type)
    for norm_type in COMPILED_NORM_TYPES:
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(torch.nn.utils.clip_grad_norm_, backend="fxmesh")
        results["compiled"][norm_type] = _check_clip(compiled, meshes, norm_type)
    results["group"] = {mode: _check_group(rank, meshes, mode == "compiled") for mode in ("eager", "compiled")}
    results["step"] = _check_clip_then_step(meshes)
    results["nonfinite"] = _check_nonfinite_on_one_rank(rank, meshes)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return world.run(_rank_checks, WORLD_SIZE)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_eager_clip_matches_full_tensors(ranks, norm_type):
    """fxmesh.clip_grad_norm_ gives torch's norm and clipped gradients of the unsharded tensors on every rank."""
    for rank, r in enumerate(ranks):
        got = r["eager"][norm_type]
        assert got["plain"], f"rank {rank}: the norm is not a plain tensor"
        assert got["norm_err"] <= FP32_RTOL, f"rank {rank}: norm off by {got['norm_err']:.2e}"
        assert got["grad_err"] <= FP32_RTOL, f"rank {rank}: clipped gradient off by {got['grad_err']:.2e}"
    assert len({r["eager"][norm_type]["norm"] for r in ranks}) == 1, "ranks disagree on the norm"


@pytest.mark.parametrize("norm_type", COMPILED_NORM_TYPES)
def test_compiled_torch_clip_matches_full_tensors(ranks, norm_type):
    """torch.nn.utils.clip_grad_norm_ compiled with backend="fxmesh" works across meshes, with no graph break."""
    for rank, r in enumerate(ranks):
        got = r["compiled"][norm_type]
        assert got["norm_err"] <= FP32_RTOL, f"rank {rank}: norm off by {got['norm_err']:.2e}"
        assert got["grad_err"] <= FP32_RTOL, f"rank {rank}: clipped gradient off by {got['grad_err']:.2e}"
        assert not got["graph_breaks"], got["graph_breaks"]
    assert len({r["compiled"][norm_type]["norm"] for r in ranks}) == 1, "ranks disagree on the norm"


def test_group_folds_in_other_stages(ranks):
    """``group=`` combines the norms of the other ranks' gradients, eager and compiled."""
    for rank, r in enumerate(ranks):
        for mode, err in r["group"].items():
            assert err <= FP32_RTOL, f"rank {rank}, {mode}: norm off by {err:.2e}"


def test_clip_then_step_is_one_graph(ranks):
    """clip_grad_norm_ + fused AdamW step compile into one graph that matches eager over 5 steps.

    The clip coefficient is applied inside the kernel that updates the
    parameters: no kernel scales the gradients on its own.
    """
    for rank, r in enumerate(ranks):
        got = r["step"]
        assert got["norm_err"] <= FP32_RTOL, f"rank {rank}: norm off by {got['norm_err']:.2e}"
        assert got["param_err"] <= FP32_RTOL, f"rank {rank}: parameters off by {got['param_err']:.2e}"
        assert not got["graph_breaks"], got["graph_breaks"]
        assert got["graphs"] == 1, f"rank {rank}: {got['graphs']} graphs"
        scaling = [k for k in got["kernels"] if "_foreach_mul" in k]
        assert scaling and all("lerp" in k for k in scaling), got["kernels"]


def test_nonfinite_norm_on_one_rank_raises_on_every_rank(ranks):
    """An inf in one rank's shard makes the all-reduced norm inf everywhere: the compiled clip + step
    (error_if_nonfinite=True, one graph split at the check) raises on every rank at that step, before any rank
    changes a parameter or state, and the steps around it match eager on the unsharded values."""
    for rank, r in enumerate(ranks):
        got = r["nonfinite"]
        assert got["raised"] == [False, True, False], f"rank {rank}: raised at steps {got['raised']}"
        assert got["unchanged"], f"rank {rank}: the step that raised changed a parameter or state"
        assert got["param_err"] <= FP32_RTOL, f"rank {rank}: parameters off by {got['param_err']:.2e}"
        assert got["splits"] == 1, f"rank {rank}: {got['splits']} splits"


# Single-process checks under the fake process group (tests/conftest.py): its
# collectives move no data, so each rank's norm is that of its local shards.


def _fake_pg_params(meshes, grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    placements = {"dp": [Shard(0)], "ep": [Shard(0), Replicate()]}
    params = []
    for name, grad in zip(("dp", "ep"), grads):
        p = torch.nn.Parameter(shard(torch.zeros_like(grad), meshes[name], placements[name]))
        p.grad = shard(grad, meshes[name], placements[name])
        params.append(p)
    return params


@pytest.mark.parametrize("error_if_nonfinite", [False, True])
def test_nonfinite_norm_follows_torch(meshes, error_if_nonfinite):
    """A non-finite norm raises with error_if_nonfinite=True, else scales the gradients by it as torch does."""
    grads = [torch.randn(16, 4), torch.randn(4, 6)]
    grads[1][0, 0] = math.inf
    params = _fake_pg_params(meshes, grads)
    ref = [torch.nn.Parameter(p.to_local().clone()) for p in params]
    for r, p in zip(ref, params):
        r.grad = p.grad.to_local().clone()
    if error_if_nonfinite:
        with pytest.raises(RuntimeError, match="non-finite"):
            fxmesh.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
        return
    norm = fxmesh.clip_grad_norm_(params, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(norm, ref_norm)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad.to_local(), r.grad, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(params[1].grad.to_local()[0, 0])


@pytest.mark.parametrize(
    ("clip", "implementation", "compiler"),
    [
        ("torch", "fused", "inductor"),
        ("torch", "foreach", "aot_eager"),
        ("fxmesh", "fused", "aot_eager"),
    ],
)
def test_error_if_nonfinite_compiles_with_the_step(meshes, clip, implementation, compiler):
    """clip_grad_norm_(..., error_if_nonfinite=True) + AdamW across three meshes: one Dynamo graph
    (fullgraph), compiled in two parts around the check, as eager on the steps with a finite norm
    (the same clip eagerly, then eager AdamW of the same arithmetic: fused for the fused step, whose
    CUDA kernel keeps the betas in float32 and so puts exp_avg_sq 1.3e-5 away from for-loop AdamW's,
    GPU run 5; for-loop for foreach); where the norm is infinite it raises
    torch's error before anything changes (parameters, gradients, states, step counts), and later
    steps go on as eager's."""
    params = dtensor_params(meshes)
    ref = clone_params(params)
    kwargs = {"fused": True} if implementation == "fused" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kwargs)
    ref_kwargs = kwargs if implementation == "fused" else {"foreach": False}
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, **ref_kwargs)
    clip_grad_norm_ = torch.nn.utils.clip_grad_norm_ if clip == "torch" else fxmesh.clip_grad_norm_

    @torch.compile(backend=fxmesh.backend(compiler=compiler), fullgraph=True)
    def clip_and_step() -> torch.Tensor:
        norm = clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
        opt.step()
        return norm

    nonfinite_step = 2
    for step in range(5):
        set_grads([params, ref], seed=step)
        if step == nonfinite_step:
            for ps in (params, ref):
                ps[4].grad.to_local().view(-1)[0] = math.inf
            before = _snapshot(params, opt)
            with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
                clip_and_step()
            assert torch.is_grad_enabled(), "the step that raised left grad mode off"
            with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
                fxmesh.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
            _assert_unchanged(before, _snapshot(params, opt))
            continue
        before = param_values(opt), param_values(ref_opt)
        norm = clip_and_step()
        ref_norm = fxmesh.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
        ref_opt.step()
        assert_rel_close(norm, ref_norm, FP32_RTOL, f"step {step}: norm")
        assert_same_state(opt, ref_opt, before=before)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["fxmesh"]["split_at_checks"] == 1, dict(counters["fxmesh"])
    assert counters["fxmesh"]["eager_fallbacks"] == 0, dict(counters["fxmesh"])


@pytest.mark.parametrize("read_after", [False, True], ids=["returned", "read-after-the-check"])
def test_error_if_nonfinite_with_a_dtensor_made_before_the_check(meshes, caplog, read_after):
    """A DTensor computed before the check and returned as it is comes back from the first part: the graph is
    still split and compiled. One that the second part reads cannot cross the split: the graph runs eagerly,
    with one warning. Either way the values are eager's, and a non-finite norm raises before the step changes
    anything."""
    params = dtensor_params(meshes)
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)

    @torch.compile(backend=fxmesh.backend(compiler="aot_eager"))
    def clip_and_step() -> tuple[torch.Tensor, torch.Tensor]:
        doubled = params[0].grad * 2
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
        opt.step()
        return norm, doubled + 1 if read_after else doubled

    with caplog.at_level(logging.WARNING, logger="fxmesh"):
        set_grads([params], seed=0)
        want_norm = fxmesh.get_total_norm([p.grad for p in params])
        want_doubled = params[0].grad.to_local() * 2 + (1 if read_after else 0)
        norm, doubled = clip_and_step()
        set_grads([params], seed=1)
        params[4].grad.to_local().view(-1)[0] = math.nan
        before = _snapshot(params, opt)
        with pytest.raises(RuntimeError, match="non-finite"):
            clip_and_step()
    assert torch.is_grad_enabled(), "the step that raised left grad mode off"
    _assert_unchanged(before, _snapshot(params, opt))
    assert_rel_close(norm, want_norm, FP32_RTOL, "norm")
    assert isinstance(doubled, DTensor) and torch.equal(doubled.to_local(), want_doubled)
    warnings = [r.getMessage() for r in caplog.records if "cannot be split" in r.getMessage()]
    if read_after:
        assert len(warnings) == 1 and "not a plain tensor" in warnings[0], [r.getMessage() for r in caplog.records]
        assert counters["fxmesh"]["eager_fallbacks"] == 1
    else:
        assert not warnings and counters["fxmesh"]["eager_fallbacks"] == 0, warnings
        assert counters["fxmesh"]["split_at_checks"] == 1, dict(counters["fxmesh"])


def test_tensor_max_norm_is_read_on_every_call(meshes):
    """A tensor max_norm (torch's clip_grad_norm_ takes one), changed in place between calls: compiled once, and
    every call clips to its current value, as torch does over the local shards."""
    gen = torch.Generator().manual_seed(5)
    max_norm, ref_max_norm = torch.tensor(4.0), torch.tensor(4.0)
    clip = torch.compile(torch.nn.utils.clip_grad_norm_, backend="fxmesh")
    for call in range(3):
        params = _fake_pg_params(meshes, [torch.randn(16, 4, generator=gen), torch.randn(4, 6, generator=gen)])
        ref = [torch.nn.Parameter(p.to_local().clone()) for p in params]
        for r, p in zip(ref, params):
            r.grad = p.grad.to_local().clone()
        norm = clip(params, max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, ref_max_norm)
        assert_rel_close(norm, ref_norm, FP32_RTOL, f"call {call}: norm")
        for i, (p, r) in enumerate(zip(params, ref)):
            assert_rel_close(p.grad, r.grad, FP32_RTOL, f"call {call}: gradient {i}")
        max_norm.div_(2)
        ref_max_norm.div_(2)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_many_gradients_match_torch_on_local_shards(meshes, norm_type):
    """150 gradients (norms stacked in chunks per mesh), 50 of them plain, some all zero or with empty shards:
    fxmesh's total norm (eager and compiled) is torch's over the local shards.

    Under the fake process group the all-reduces move nothing, so each rank's total is that of its own shards.
    """
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(4 + i % 5, 3, generator=gen) * (i % 7) for i in range(150)]  # every 7th all zero
    grads[5] = torch.zeros(0, 3)
    tensors = [shard(g, meshes["dp"], [Shard(0)]) if i % 2 else shard(g, meshes["ep"], [Shard(0), Replicate()])
               for i, g in enumerate(grads[:100])] + grads[100:]  # fmt: skip
    shards = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    # torch has no identity for an empty tensor's inf-norm; an empty shard adds nothing to the total.
    want = torch.nn.utils.get_total_norm([t for t in shards if t.numel()], norm_type)
    assert_rel_close(fxmesh.get_total_norm(tensors, norm_type), want, FP32_RTOL, "eager")
    if norm_type in COMPILED_NORM_TYPES:
        got = torch.compile(torch.nn.utils.get_total_norm, backend="fxmesh")(tensors, norm_type)
        assert_rel_close(got, want, FP32_RTOL, "compiled")


def test_one_mesh_keeps_upstream_result(meshes):
    """Under backend="fxmesh", torch's clip_grad_norm_ over a single mesh still returns upstream's DTensor norm."""
    params = _fake_pg_params(meshes, [torch.randn(16, 4)])
    eager = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = torch.compile(torch.nn.utils.clip_grad_norm_, backend="fxmesh")(params, 1e6)
    assert isinstance(norm, DTensor) and norm.placements == eager.placements
    torch.testing.assert_close(norm.to_local(), eager.to_local())


def test_equal_meshes_are_one_mesh(meshes):
    """DTensors on equal meshes that are different objects (FSDP2 gives every parameter on a 2-D mesh
    a mesh object of its own) are on one mesh, as DTensor sees them: torch's norm over them keeps
    upstream's DTensor result, and torchtitan's per-mesh clipping compiles with the step in one graph.
    """
    ep_again = copy.copy(meshes["ep"])
    assert ep_again == meshes["ep"] and ep_again is not meshes["ep"]
    g = torch.Generator().manual_seed(3)
    layout = [(meshes["dp"], (16, 4), [Shard(0)]), (meshes["ep"], (8, 6), [Shard(0), Replicate()])]
    layout.append((ep_again, (8, 2), [Shard(0), Replicate()]))
    fulls = [torch.randn(shape, generator=g) for _, shape, _ in layout]
    params, ref = ([torch.nn.Parameter(shard(f, m, pl)) for f, (m, _, pl) in zip(fulls, layout)] for _ in range(2))
    expert_grads = [shard(torch.randn(shape, generator=g), m, pl) for m, shape, pl in layout[1:]]
    norm = torch.compile(torch.nn.utils.get_total_norm, backend="fxmesh")(expert_grads)
    eager = torch.nn.utils.get_total_norm(expert_grads)
    assert isinstance(norm, DTensor) and norm.placements == eager.placements
    torch.testing.assert_close(norm.to_local(), eager.to_local())

    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-2), fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=torch.tensor(1e-2), fused=True)
    counters.clear()

    @torch.compile(backend="fxmesh", fullgraph=True)
    def clip_and_step() -> torch.Tensor:
        total = titan_clip(params, 0.5)
        opt.step()
        return total

    for _ in range(3):
        for p, r, (m, shape, pl) in zip(params, ref, layout):
            p.grad = shard(torch.randn(shape, generator=g), m, pl)
            r.grad = p.grad.clone()
        total = clip_and_step()
        ref_total = titan_clip(ref, 0.5)
        ref_opt.step()
        assert_rel_close(total, ref_total, FP32_RTOL, "norm")
        for i, (p, r) in enumerate(zip(params, ref)):
            assert_rel_close(p, r, FP32_RTOL, f"parameter {i}")
    assert counters["fxmesh"]["graphs"] == 1


def test_other_backends_unchanged(meshes):
    """Importing fxmesh leaves torch's clip_grad_norm_ across meshes failing as before under other backends."""
    params = _fake_pg_params(meshes, [torch.randn(16, 4), torch.randn(4, 6)])
    with pytest.raises(RuntimeError, match="same mesh"):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    with pytest.raises(Exception, match="same mesh"):
        torch.compile(torch.nn.utils.clip_grad_norm_, backend="eager")(params, 1.0)


def test_compiled_norm_is_one_call_per_sharding_group(meshes):
    """Compiled, the norm is one ``fxmesh::clip_norm_part`` call per group of gradients sharded alike, not a
    value per gradient that Inductor's wrapper takes apart (bench/RESULTS.md CPU run T); gradients of two
    dtypes on one mesh still give torch's total over the local shards."""
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(8, 4, generator=gen).to(torch.bfloat16 if i % 3 == 0 else torch.float32) for i in range(40)]
    tensors = [shard(g, meshes["dp"], [Shard(0)]) if i % 2 else shard(g, meshes["ep"], [Shard(0), Replicate()])
               for i, g in enumerate(grads)]  # fmt: skip
    want = torch.nn.utils.get_total_norm([t.to_local() for t in tensors])
    with inductor_output_code() as codes:
        got = torch.compile(torch.nn.utils.get_total_norm, backend="fxmesh")(tensors)
    assert_rel_close(got, want, FP32_RTOL, "compiled")
    assert got.dtype == torch.float32
    code = "\n".join(codes)
    assert code.count("torch.ops.fxmesh.clip_norm_part.default(") == 2, code[-3000:]
    assert "_foreach_norm" not in code
