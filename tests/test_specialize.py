"""fxmesh.specialize: symbolic sizes of parameters, gradients and state made static, and guarded."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import fxmesh
from fxmesh.backend import FxmeshBackend
from tests.helpers import FP32_RTOL, assert_rel_close, grads_in_buffers


def _params(dp, rows: int, n: int = 3) -> list[torch.nn.Parameter]:
    """``n`` parameters of ``(8 * rows, 4)`` over ``dp``, with gradients that own their local tensors."""
    g = torch.Generator().manual_seed(rows)
    params = []
    for _ in range(n):
        full = torch.randn(8 * rows, 4, generator=g)
        p = torch.nn.Parameter(distribute_tensor(full, dp, [Shard(0)], src_data_rank=None))
        p.grad = distribute_tensor(torch.randn(8 * rows, 4, generator=g), dp, [Shard(0)], src_data_rank=None)
        params.append(p)
    return params


def _decay(params: list[torch.nn.Parameter]) -> None:
    with torch.no_grad():
        for p in params:
            p.mul_(0.5).add_(p.grad)


def _check(step, params: list[torch.nn.Parameter], *args) -> None:
    """One compiled step against the same math on the local shards."""
    expected = [p.to_local() * 0.5 + p.grad.to_local() for p in params]
    step(params, *args)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert_rel_close(p.to_local(), e, FP32_RTOL, f"parameter {i}")


def test_specialized_sizes_are_guarded(dp):
    """Parameters of a second shape: Dynamo makes their sizes symbolic, fxmesh makes them static and guards
    them.  A third shape then fails that graph's guards and compiles a graph of its own rather than run code
    Inductor built for the second; every shape seen before runs its own graph again, and all match."""
    step = torch.compile(_decay, backend="fxmesh")
    first, second, third = _params(dp, 2), _params(dp, 3), _params(dp, 5)
    for params, graphs in ((first, 1), (second, 2), (third, 3), (second, 3), (first, 3), (third, 3)):
        _check(step, params)
        assert counters["fxmesh"]["graphs"] == graphs
    assert counters["fxmesh"]["specialized_graphs"] == 2 and counters["fxmesh"]["symbolic_graphs"] == 0
    assert counters["fxmesh"]["local_shard_graphs"] == 3


def test_marked_dynamic_sizes_stay_symbolic(dp):
    """``torch._dynamo.mark_dynamic`` asks for a symbol: that graph keeps it, on the DTensors (compiled over the
    local shards, the size would be specialized, and Dynamo raises ``ConstraintViolationError``)."""
    step = torch.compile(_decay, backend=fxmesh.backend(compiler="aot_eager"))
    params = _params(dp, 2)
    torch._dynamo.mark_dynamic(params[0], 0)
    _check(step, params)
    assert counters["fxmesh"]["specialized_graphs"] == 0 and counters["fxmesh"]["symbolic_graphs"] == 1
    assert counters["fxmesh"]["local_shard_graphs"] == 0


def _decay_by(params: list[torch.nn.Parameter], batch: torch.Tensor) -> None:
    with torch.no_grad():
        scale = batch.mean()
        for p in params:
            p.mul_(0.5).add_(p.grad * scale)


def test_a_batch_of_another_length_stays_symbolic(dp):
    """A data input whose length changes is not optimizer state: its size stays symbolic, and a third length
    compiles nothing."""
    step = torch.compile(_decay_by, backend=fxmesh.backend(compiler="aot_eager"))
    params = _params(dp, 2)
    for length, graphs in ((4, 1), (6, 2), (9, 2)):
        batch = torch.full((length,), 1.0)
        _check(step, params, batch)
        assert counters["fxmesh"]["graphs"] == graphs
    assert counters["fxmesh"]["specialized_graphs"] == 0 and counters["fxmesh"]["symbolic_graphs"] == 1


@pytest.mark.parametrize("views", [False, True], ids=["own-grads", "view-grads"])
def test_a_second_optimizer_of_other_shapes_is_static(dp, views, caplog):
    """Fused AdamW over parameters of one shape, then another: the second compile (automatic dynamic shapes)
    is made static, lowered and run on the local shards, with no warning; both match eager on plain tensors.
    With gradients that are views (``DTensor.from_local``'s) too."""
    for rows in (2, 3):
        params = _params(dp, rows)
        ref = [torch.nn.Parameter(p.to_local().clone()) for p in params]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
        step = torch.compile(opt.step, backend=fxmesh.backend(compiler="aot_eager"))
        g = torch.Generator().manual_seed(7)
        for _ in range(3):
            for p, r in zip(params, ref):
                r.grad = torch.randn(r.shape, generator=g)
                grad = DTensor.from_local(r.grad.clone(), dp, [Shard(0)], shape=p.shape, stride=p.stride())
                p.grad = grad if views else grad.detach()
            step()
            ref_opt.step()
        for i, (p, r) in enumerate(zip(params, ref)):
            assert_rel_close(p.to_local(), r, FP32_RTOL, f"rows {rows}: parameter {i}")
            assert_rel_close(
                opt.state[p]["exp_avg_sq"].to_local(),
                ref_opt.state[r]["exp_avg_sq"],
                FP32_RTOL,
                f"rows {rows}: state {i}",
            )
    assert "symbolic sizes" not in caplog.text, caplog.text
    assert counters["fxmesh"]["symbolic_graphs"] == 0
    assert counters["fxmesh"]["specialized_graphs"] >= 1
    assert counters["fxmesh"]["local_shard_graphs"] == counters["fxmesh"]["graphs"] == 2
    assert counters["fxmesh"]["lowered_nodes"] == 2


def _clip_and_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    opt.step()
    return norm


def test_a_second_optimizer_split_at_the_nonfinite_check_is_static(dp, ep, caplog):
    """Clip (error_if_nonfinite=True) + fused AdamW over dp and ep, one compiled function for two optimizers of
    other shapes: the second compile (automatic dynamic shapes) is split at the check (fxmesh.checks), and both
    parts are made static, although the first part's guards already fixed the symbols the second part's sizes
    hold; all match eager over 3 steps."""
    step = torch.compile(_clip_and_step, backend=fxmesh.backend(compiler="aot_eager"))
    for rows in (2, 3):
        g = torch.Generator().manual_seed(rows)
        layout = [(dp, [Shard(0)]), (ep, [Shard(0), Shard(1)]), (dp, [Shard(0)])]
        fulls = [torch.randn(8 * rows, 8, generator=g) for _ in layout]
        params, ref = (
            [torch.nn.Parameter(distribute_tensor(f, m, pl, src_data_rank=None)) for f, (m, pl) in zip(fulls, layout)]
            for _ in range(2)
        )
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
        for _ in range(3):
            for p, r, (m, pl) in zip(params, ref, layout):
                p.grad = distribute_tensor(torch.randn(p.shape, generator=g), m, pl, src_data_rank=None)
                r.grad = p.grad.clone()
            norm = step(params, opt)
            ref_norm = fxmesh.clip_grad_norm_(ref, 1.0)
            ref_opt.step()
            assert_rel_close(norm, ref_norm, FP32_RTOL, f"rows {rows}: norm")
        for i, (p, r) in enumerate(zip(params, ref)):
            assert_rel_close(p.to_local(), r.to_local(), FP32_RTOL, f"rows {rows}: parameter {i}")
    assert "symbolic sizes" not in caplog.text, caplog.text
    assert counters["fxmesh"]["graphs"] == 2 and counters["fxmesh"]["split_at_checks"] == 2, dict(counters["fxmesh"])
    assert counters["fxmesh"]["specialized_graphs"] == 2 and counters["fxmesh"]["symbolic_graphs"] == 0
    assert counters["fxmesh"]["local_shard_graphs"] == 4 and counters["fxmesh"]["eager_fallbacks"] == 0


def _shape_env_symbols() -> int:
    shape_env = torch._guards.TracingContext.get().fake_mode.shape_env
    values = getattr(shape_env, "backed_var_to_val", None)  # var_to_val is deprecated
    return len(values if values is not None else shape_env.var_to_val)


class _CountingSymbols(FxmeshBackend):
    """fxmesh's backend, counting the symbols Dynamo's trace made (in ``symbols``) before it compiles."""

    def __init__(self, symbols: list[int]) -> None:
        super().__init__(compiler="aot_eager")
        self.symbols = symbols

    def __call__(self, gm, example_inputs):
        self.symbols.append(_shape_env_symbols())
        return super().__call__(gm, example_inputs)


@pytest.mark.parametrize("backend", ["fxmesh", "recording"])
def test_view_gradients_are_traced_with_static_sizes(dp, ep, backend):
    """Gradients that are views of one buffer per mesh, a new buffer each step (FSDP2's): Dynamo gives them
    symbolic sizes where it makes them with their parameter (all of them on torch 2.12-2.15, the base's size on
    2.11), and fxmesh has it make them first, as any input,
    so the graph is static from the start (nothing for ``fxmesh.specialize`` to do) and one graph serves every
    step.  Under another backend Dynamo's own path is unchanged: its graph takes the symbols (upstream's
    behaviour, torch 2.11-2.15: this test notices when that changes)."""
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(
            distribute_tensor(torch.randn(8 * rows, 6, generator=g), mesh, placements, src_data_rank=None)
        )
        for mesh, placements in ((dp, [Shard(0)]), (ep, [Shard(0), Shard(1)]))
        for rows in (2, 3, 2)
    ]
    symbols: list[int] = []

    def recording(gm, example_inputs):
        symbols.append(_shape_env_symbols())
        return gm.forward

    if backend == "fxmesh":
        chosen, kind = _CountingSymbols(symbols), {"fused": True}
    else:  # upstream's fused step takes no DTensors on several meshes: one mesh, foreach
        chosen, kind, params = recording, {"foreach": True}, params[:3]
    ref = [torch.nn.Parameter(p.to_local().clone()) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kind)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, **kind)
    step = torch.compile(opt.step, backend=chosen)
    for _ in range(3):
        for r, grad in zip(ref, grads_in_buffers(params, g, per_buffer=3)):  # a buffer per mesh
            r.grad = grad.clone()
        assert params[1].grad.to_local()._base is not None
        step()
        ref_opt.step()
    for i, (p, r) in enumerate(zip(params, ref)):
        assert_rel_close(p.to_local(), r, FP32_RTOL, f"parameter {i}")
    if backend == "fxmesh":
        assert symbols == [0]
        assert counters["fxmesh"]["graphs"] == counters["fxmesh"]["local_shard_graphs"] == 1
        assert counters["fxmesh"]["specialized_graphs"] == 0 and counters["fxmesh"]["symbolic_graphs"] == 0
    else:
        assert len(symbols) == 1 and symbols[0] > 0, symbols
