"""Gradients that are still ``Partial`` when the step runs, on 2 real gloo ranks.

Under tensor parallelism a weight replicated over ``tp`` (a norm's, a bias)
gets a gradient that is a ``Partial`` sum over ``tp``: each rank holds its own
part, and the optimizer step's DTensor math reduces it.  The layout mixes such
gradients with sharded ones on two meshes.  Clip + fused AdamW compiled with
fxmesh, the step alone and the step under GradScaler (all on the local shards,
two norm weights' reductions in one bucket) must match eager
(``fxmesh.clip_grad_norm_``, then the optimizer on the same DTensors) and plain
fused AdamW on the full tensors with the summed gradients, over 4 steps with
fresh gradients.  A fake process group cannot check this: its all-reduce
leaves each rank's part as it is.  It counts the collectives in Inductor's code.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch._dynamo.utils import counters
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import fxmesh
from fxmesh import local, world
from tests.helpers import DEVICE, FP32_RTOL, inductor_output_code, shard, without_comments

WORLD_SIZE = 2
ALL_REDUCE = re.compile(r"\ball_reduce_?\.default\(")
STEPS = 4
MAX_NORM = 1.0


def _layout(dp, tp) -> list:
    """(mesh, shape, parameter placements, gradient placements)."""
    return [
        (dp, (16, 8), [Shard(0)], [Shard(0)]),
        (dp, (7,), [Replicate()], [Partial()]),
        (tp, (12, 6), [Replicate(), Shard(0)], [Replicate(), Shard(0)]),
        (tp, (6,), [Replicate(), Replicate()], [Replicate(), Partial()]),  # norm weights under TP
        (tp, (6,), [Replicate(), Replicate()], [Replicate(), Partial()]),
        (tp, (5, 4), [Replicate(), Shard(1)], [Replicate(), Shard(1)]),
    ]


def _grad(full: torch.Tensor, mesh, placements, rank: int, gen: torch.Generator) -> DTensor:
    """``full`` as a gradient laid out in ``placements``; a Partial one split into a random part per rank."""
    if any(isinstance(p, Partial) for p in placements):
        parts = [torch.randn(full.shape, generator=gen) for _ in range(WORLD_SIZE - 1)]
        parts.append(full - sum(parts))
        return DTensor.from_local(parts[rank].clone(), mesh, placements, shape=full.shape, stride=full.stride())
    return shard(full.clone(), mesh, placements)


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, fused=True),
}
if DEVICE == "cpu":  # upstream ships fused Adagrad for CPU only
    OPTIMIZERS["adagrad"] = lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=0.1, fused=True)
FOREACH_ADAMW = {"foreach_adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True)}


def _train(
    rank: int,
    layout: list,
    fulls: list,
    clip: bool,
    grad_scaler: bool = False,
    optimizer: str = "adamw",
    checkpoint_dir: str | None = None,
) -> dict:
    """Compiled (clip +) step against eager and the full tensors' over ``STEPS`` steps: the largest errors.

    With ``grad_scaler`` the gradients come scaled by 4 with GradScaler's ``grad_scale`` and
    ``found_inf`` on the optimizers (``found_inf`` 1 in the third step, which every tensor must
    survive unchanged), and the gradients the step unscales in place are compared with the full
    tensors' too.  Not with eager's: eager DTensor unscales a redistributed copy of a Partial
    gradient and leaves the gradient itself scaled.  Fused SGD has no eager run over DTensors
    (upstream has no sharding rule for it; ``eager_err`` stays 0); its momentum buffers' placements
    are returned, and with ``checkpoint_dir`` the buffers go through ``torch.distributed.checkpoint``
    and come back into fresh DTensors laid out like the parameters, compared with the full tensors'.
    """

    def params() -> list:
        return [torch.nn.Parameter(shard(f.clone(), m, pl)) for f, (m, _, pl, _) in zip(fulls, layout)]

    make = (OPTIMIZERS | FOREACH_ADAMW)[optimizer]
    eagerly = optimizer != "sgd"
    compiled_params, eager_params = params(), params()
    full_params = [torch.nn.Parameter(f.clone()) for f in fulls]
    opt, eager_opt, full_opt = make(compiled_params), make(eager_params), make(full_params)
    scale = 4.0 if grad_scaler else 1.0

    @torch.compile(backend="fxmesh")
    def clip_and_step() -> torch.Tensor | None:
        norm = torch.nn.utils.clip_grad_norm_(compiled_params, MAX_NORM) if clip else None
        opt.step()
        return norm

    torch._dynamo.reset()
    counters.clear()
    out: dict[str, Any] = {"norm_err": 0.0, "full_norm_err": 0.0, "eager_err": 0.0, "full_err": 0.0, "grad_err": 0.0}
    for s in range(STEPS):
        grads = [scale * torch.randn(f.shape, generator=torch.Generator().manual_seed(100 + s)) for f in fulls]
        if grad_scaler:
            for o in (opt, eager_opt, full_opt):
                o.grad_scale, o.found_inf = torch.tensor(scale), torch.tensor(1.0 if s == 2 else 0.0)
        for ps in (compiled_params, eager_params):
            gen = torch.Generator().manual_seed(200 + s)  # the same parts on both
            for p, grad, (m, _, _, grad_pl) in zip(ps, grads, layout):
                p.grad = _grad(grad, m, grad_pl, rank, gen)
        for p, grad in zip(full_params, grads):
            p.grad = grad.clone()
        norm = clip_and_step()
        if clip:
            eager_norm = fxmesh.clip_grad_norm_(eager_params, MAX_NORM)
            full_norm = torch.nn.utils.clip_grad_norm_(full_params, MAX_NORM)
            out["norm_err"] = max(out["norm_err"], abs(norm.item() / eager_norm.item() - 1))
            out["full_norm_err"] = max(out["full_norm_err"], abs(norm.item() / full_norm.item() - 1))
        if eagerly:
            eager_opt.step()
        full_opt.step()
        for p, eager, full in zip(compiled_params, eager_params, full_params):
            got = p.full_tensor()
            for key, want in (("eager_err", eager.full_tensor() if eagerly else None), ("full_err", full.detach())):
                if want is not None:
                    out[key] = max(out[key], _rel_err(got, want))
            if grad_scaler:  # a Partial gradient's full tensor sums the unscaled parts
                got, want = p.grad.full_tensor(), full.grad
                out["grad_err"] = max(out["grad_err"], _rel_err(got, want))
    if optimizer == "sgd":
        buffers = [opt.state[p]["momentum_buffer"] for p in compiled_params]
        out["buffer_placements"] = [(b.placements, p.placements) for b, p in zip(buffers, compiled_params)]
        fulls_buffers = [full_opt.state[f]["momentum_buffer"] for f in full_params]
        out["buffer_err"] = max(_rel_err(b.full_tensor(), want) for b, want in zip(buffers, fulls_buffers))
        if checkpoint_dir is not None:
            try:  # a failure here must not take the other cases' results with it
                dcp.save({f"buffer{i}": b for i, b in enumerate(buffers)}, checkpoint_id=checkpoint_dir)
                loaded = {f"buffer{i}": torch.zeros_like(p) for i, p in enumerate(compiled_params)}
                dcp.load(loaded, checkpoint_id=checkpoint_dir)
            except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                out["checkpoint_err"] = f"{type(e).__name__}: {e}"
            else:
                out["checkpoint_err"] = max(
                    _rel_err(loaded[f"buffer{i}"].full_tensor(), want) for i, want in enumerate(fulls_buffers)
                )
    for key in (
        "graphs",
        "eager_fallbacks",
        "lowered_nodes",
        "local_shard_graphs",
        "reduction_buckets",
        "partial_inputs_reduced",
    ):
        out[key] = counters["fxmesh"][key]
    return out


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _rank(rank: int, world_size: int, checkpoint_dir: str) -> dict:
    dp = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    tp = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp_mod_tp", "tp"))
    layout = _layout(dp, tp)
    g = torch.Generator().manual_seed(0)
    fulls = [torch.randn(shape, generator=g) for _, shape, _, _ in layout]
    return {
        "clip": _train(rank, layout, fulls, clip=True),
        "step": _train(rank, layout, fulls, clip=False),
        "grad_scaler": _train(rank, layout, fulls, clip=False, grad_scaler=True),
        "foreach": _train(rank, layout, fulls, clip=True, optimizer="foreach_adamw"),
        "sgd": _train(rank, layout, fulls, clip=True, optimizer="sgd", checkpoint_dir=checkpoint_dir),
        "sgd_grad_scaler": _train(rank, layout, fulls, clip=False, grad_scaler=True, optimizer="sgd"),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return world.run(_rank, WORLD_SIZE, str(tmp_path_factory.mktemp("checkpoint")))


def test_partial_gradients_clipped_and_stepped_as_eagerly(ranks):
    """Every rank: the compiled norm and parameters match eager on the DTensors and the full tensors' step with
    the summed gradients (1e-5), in one graph whose fused AdamW fxmesh lowered."""
    for rank, r in enumerate(ranks):
        r = r["clip"]
        for key in ("norm_err", "full_norm_err", "eager_err", "full_err"):
            assert r[key] < FP32_RTOL, (rank, key, r)
        assert r["graphs"] == 1 and r["eager_fallbacks"] == 0, (rank, r)
        assert r["lowered_nodes"] == 2, (rank, r)  # one call per mesh
        # Clipping reduces each Partial gradient for its norm and scales each rank's part: the graph
        # still runs on the local shards.  The two norm weights' gradients are reduced together,
        # once for the norm and once for the step.
        assert r["local_shard_graphs"] == 1 and r["reduction_buckets"] == 2, (rank, r)


def test_partial_gradients_stepped_on_local_shards(ranks):
    """The step alone: the lowering's one reduction per Partial gradient is the only DTensor op its math needs,
    so the graph runs on the local shards (a functional all-reduce per Partial mesh dim), and still matches
    eager and the full tensors (1e-5)."""
    for rank, r in enumerate(ranks):
        r = r["step"]
        for key in ("eager_err", "full_err"):
            assert r[key] < FP32_RTOL, (rank, key, r)
        assert r["graphs"] == 1 and r["eager_fallbacks"] == 0 and r["lowered_nodes"] == 2, (rank, r)
        assert r["local_shard_graphs"] == 1 and r["reduction_buckets"] == 1, (rank, r)


def test_partial_gradients_unscaled_on_local_shards(ranks):
    """The step under GradScaler (``grad_scale``/``found_inf``, one step skipped): parameters match eager and the
    full tensors, and each rank's part of a Partial gradient is unscaled in place, so the parts sum to the full
    tensors' unscaled gradient (1e-5).  The write-back runs on the rank's own part, so the graph still runs on
    the local shards."""
    for rank, r in enumerate(ranks):
        r = r["grad_scaler"]
        for key in ("eager_err", "full_err", "grad_err"):
            assert r[key] < FP32_RTOL, (rank, key, r)
        assert r["graphs"] == 1 and r["eager_fallbacks"] == 0 and r["lowered_nodes"] == 2, (rank, r)
        assert r["local_shard_graphs"] == 1 and r["reduction_buckets"] == 1, (rank, r)


def test_partial_gradients_clipped_and_stepped_with_foreach_adamw(ranks):
    """Clip + foreach AdamW: each Partial gradient is reduced once, after clipping scaled its parts, where DTensor
    would reduce it and what it became in three ops (fxmesh.passes.reduce_partial_reads); the graph runs on the
    local shards and matches eager and the full tensors (1e-5)."""
    for rank, r in enumerate(ranks):
        r = r["foreach"]
        for key in ("norm_err", "full_norm_err", "eager_err", "full_err"):
            assert r[key] < FP32_RTOL, (rank, key, r)
        assert r["graphs"] == 1 and r["eager_fallbacks"] == 0, (rank, r)
        assert r["partial_inputs_reduced"] == 3 and r["local_shard_graphs"] == 1, (rank, r)


def test_partial_gradients_clipped_and_stepped_with_fused_sgd(ranks):
    """Clip + fused SGD with momentum (which upstream cannot run over DTensors): parameters, norm and momentum
    buffers match the full tensors' (1e-5).  The buffers are laid out like their parameters, not like the
    Partial gradients torch.optim makes them from, so the state holds no per-rank parts: the steps after the
    first run on the local shards, and the buffers go through torch.distributed.checkpoint (which refuses
    Partial DTensors) and come back with the full tensors' values."""
    for rank, r in enumerate(ranks):
        r = r["sgd"]
        assert isinstance(r["checkpoint_err"], float), (rank, r["checkpoint_err"])
        for key in ("full_norm_err", "full_err", "buffer_err", "checkpoint_err"):
            assert r[key] < FP32_RTOL, (rank, key, r)
        for buffer_placements, param_placements in r["buffer_placements"]:
            assert buffer_placements == param_placements, (rank, r["buffer_placements"])
        # The first step returns new buffers, so it runs over the DTensors; the second graph is every later step's.
        assert r["graphs"] == 2 and r["eager_fallbacks"] == 0 and r["local_shard_graphs"] == 1, (rank, r)


def test_partial_gradients_unscaled_and_stepped_with_fused_sgd(ranks):
    """Fused SGD under GradScaler (one step skipped, the first step not): parameters, unscaled gradient parts and
    momentum buffers match the full tensors' (1e-5), the buffers laid out like their parameters."""
    for rank, r in enumerate(ranks):
        r = r["sgd_grad_scaler"]
        for key in ("full_err", "grad_err", "buffer_err"):
            assert r[key] < FP32_RTOL, (rank, key, r)
        for buffer_placements, param_placements in r["buffer_placements"]:
            assert buffer_placements == param_placements, (rank, r["buffer_placements"])
        assert r["graphs"] == 2 and r["eager_fallbacks"] == 0 and r["local_shard_graphs"] == 1, (rank, r)


def _count_layout(meshes) -> list[torch.nn.Parameter]:
    """Two Partial gradients (one over both dims of a 2-D mesh) beside a sharded one, for counting collectives."""
    dp, ep = meshes["dp"], meshes["ep"]
    layout = [  # (mesh, shape, parameter placements, gradient placements)
        (dp, (8, 4), [Replicate()], [Partial()]),
        (ep, (6,), [Replicate(), Replicate()], [Partial(), Partial()]),
        (ep, (8, 4), [Replicate(), Shard(0)], [Replicate(), Shard(0)]),
    ]
    params = []
    for mesh, shape, placements, grad_placements in layout:
        p = torch.nn.Parameter(shard(torch.randn(shape, device=DEVICE), mesh, placements))
        p.grad = DTensor.from_local(torch.randn(p.to_local().shape, device=DEVICE), mesh, grad_placements)
        params.append(p)
    return params


@pytest.mark.parametrize("grad_scaler", [False, True], ids=["", "grad-scaler"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_partial_gradient_reduced_once_per_step(meshes, name, grad_scaler):
    """The lowered step all-reduces each Partial gradient once, before its math, as eager's fused op
    redistributes it; not in every op that reads it beside a parameter or state (AdamW: four times), and
    the states are laid out like the parameters, so the second step's graph (every later step's) runs on
    the local shards with the same reductions.  A fake process group: this counts the collectives in
    Inductor's code, the gloo tests check values."""
    params = _count_layout(meshes)
    opt = OPTIMIZERS[name](params)
    if grad_scaler:  # the unscaled gradients are written back in their own placements
        opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    step = torch.compile(opt.step, backend="fxmesh")
    reductions = 1 + 2  # dp's gradient over its one dimension, ep's over both of its
    # Dynamo makes Adam's and Adagrad's states before tracing, so their first graph serves every step; SGD's
    # first step makes its momentum buffers in the graph and returns them (so it runs over the DTensors),
    # and its second graph serves every later step.
    graphs = 2 if name == "sgd" else 1
    for s in range(3):
        counters.clear()
        with inductor_output_code() as codes:
            step()
        if s >= graphs:
            assert not codes and not counters["fxmesh"]["graphs"], (s, dict(counters["fxmesh"]))
            continue
        calls = ALL_REDUCE.findall(without_comments("\n".join(codes)))
        # As DTensor math GradScaler's write-back (a where) reduced each gradient twice more: 9 here.  SGD's
        # buffers, made like the Partial gradients, were Partial, reduced again in the second step (6 here).
        assert len(calls) == reductions, (s, calls)
        assert counters["fxmesh"]["lowered_nodes"] == 2, (s, dict(counters["fxmesh"]))
        on_local_shards = s == graphs - 1
        assert counters["fxmesh"]["local_shard_graphs"] == on_local_shards, (s, dict(counters["fxmesh"]))
    for p in params:
        for key, state in opt.state[p].items():
            if isinstance(state, DTensor):
                assert state.placements == p.placements, (key, state.placements, p.placements)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_foreach_partial_gradients_reduced_once(meshes, name):
    """A foreach step reduces each Partial gradient once, before its math, on the local shards; DTensor reduces
    the gradient and the values computed from it in every op that meets them with a state (AdamW: 3 per mesh
    dim, 9 here).  SGD's first step clones the gradients into new momentum buffers (graph outputs, so it stays
    on the DTensors), and DTensor reduces each once either way: at the clone (torch 2.13, where the pass then
    moves that reduction up front) or where the buffer meets its parameter (2.11, 2.14, where the buffers stay
    Partial and the pass leaves them).  A fake process group: counts."""
    params = _count_layout(meshes)
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    else:
        opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=True)
    with inductor_output_code() as codes:
        torch.compile(opt.step, backend="fxmesh")()
    calls = ALL_REDUCE.findall(without_comments("\n".join(codes)))
    assert len(calls) == 1 + 2, calls  # dp's gradient over its one dimension, ep's over both of its
    if name == "adamw":
        assert counters["fxmesh"]["partial_inputs_reduced"] == 2, dict(counters["fxmesh"])
    assert counters["fxmesh"]["local_shard_graphs"] == (name == "adamw"), dict(counters["fxmesh"])


def test_partial_value_added_into_a_partial_state_stays_partial(meshes):
    """A Partial gradient added into a Partial buffer (SGD's momentum buffer on torch 2.11 and 2.14, made with
    clone) is a sum of parts that DTensor never reduces: the pass must not add a reduction there."""
    dp = meshes["dp"]
    buf = DTensor.from_local(torch.zeros(4, device=DEVICE), dp, [Partial()])
    grad = DTensor.from_local(torch.randn(4, device=DEVICE), dp, [Partial()])

    def accumulate() -> None:
        buf.mul_(0.9).add_(grad * 2)

    with inductor_output_code() as codes:
        torch.compile(accumulate, backend="fxmesh")()
    assert counters["fxmesh"]["partial_inputs_reduced"] == 0, dict(counters["fxmesh"])
    assert not ALL_REDUCE.findall(without_comments("\n".join(codes)))


def test_partial_reads_left_to_dtensor_where_the_rewrite_fails(meshes, monkeypatch, caplog):
    """Where the pass cannot compute the rewritten graph's example values, it puts the graph back as it was,
    says so, and the step compiles over the DTensors with DTensor's own reductions (9)."""
    rewrite = importlib.import_module("fxmesh.passes.reduce_partial_reads")

    def fail(node, fake_mode):
        raise RuntimeError("no example value")

    monkeypatch.setattr(rewrite, "propagate_example_value", fail)
    params = _count_layout(meshes)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    with caplog.at_level(logging.WARNING, logger=rewrite.__name__), inductor_output_code() as codes:
        torch.compile(opt.step, backend="fxmesh")()
    assert "Partial inputs left to DTensor: no example value" in caplog.text
    assert counters["fxmesh"]["partial_inputs_reduced"] == 0, dict(counters["fxmesh"])
    assert counters["fxmesh"]["local_shard_graphs"] == 0, dict(counters["fxmesh"])
    assert len(ALL_REDUCE.findall(without_comments("\n".join(codes)))) == 9


@pytest.mark.parametrize("capped", [False, True], ids=["", "capped"])
def test_partial_gradients_reduced_in_buckets(meshes, monkeypatch, capped):
    """Clip + step over 20 norm weights whose gradients are Partial over tp, beside sharded ones: on the local
    shards the gradients' reductions run as one all-reduce of one buffer for the norm and one per scalar table
    (16 parameters) for the step, not one per gradient each time (41 all-reduces); with buckets capped at 8
    gradients' bytes, in buckets of at most 8.  A fake process group: the gloo tests check the values of
    buckets."""
    if capped:
        monkeypatch.setattr(local, "BUCKET_BYTES", 8 * 6 * 4)  # 8 gradients of 6 fp32 values
    dp, tp = meshes["dp"], meshes["tp"]
    params = []
    for _ in range(20):
        p = torch.nn.Parameter(shard(torch.randn(6, device=DEVICE), tp, [Replicate(), Replicate()]))
        p.grad = DTensor.from_local(torch.randn(6, device=DEVICE), tp, [Replicate(), Partial()])
        params.append(p)
    for _ in range(2):
        p = torch.nn.Parameter(shard(torch.randn(16, 4, device=DEVICE), dp, [Shard(0)]))
        p.grad = shard(torch.randn(16, 4, device=DEVICE), dp, [Shard(0)])
        params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)

    def clip_and_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()

    with inductor_output_code() as codes:
        torch.compile(clip_and_step, backend="fxmesh")()
    calls = ALL_REDUCE.findall(without_comments("\n".join(codes)))
    assert counters["fxmesh"]["local_shard_graphs"] == 1, dict(counters["fxmesh"])
    # The norm's buckets (20 gradients), the sharded gradients' norm, the step's buckets (tables of 16 and 4).
    buckets = [3, 2 + 1] if capped else [1, 2]
    assert counters["fxmesh"]["reduction_buckets"] == sum(buckets), dict(counters["fxmesh"])
    assert len(calls) == buckets[0] + 1 + buckets[1], calls
