"""fxmesh.pieces: a lowered step compiled as independent pieces, each distinct piece once."""

from __future__ import annotations

import importlib
import inspect
import logging
import operator

import pytest
import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor, Shard

import fxmesh
from fxmesh.local import SHARD
from fxmesh.pieces import compile_in_pieces
from tests.helpers import (
    DEVICE,
    FP32_RTOL,
    assert_rel_close,
    assert_same_update,
    dtensor_params,
    grads_in_buffers,
    local,
    without_comments,
)
from tests.test_foreach import CASES as FOREACH_CASES
from tests.test_sgd import run_local_parity

pieces_module = importlib.import_module("fxmesh.pieces")


def _lowered(node: torch.fx.Node) -> torch.fx.Node:
    """``node``, marked as emitted by fxmesh's lowering."""
    node.meta["fxmesh_lowered_from"] = "fused"
    return node


def _graph(shared_scalar_written: bool) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """Two parameters' updates, written back as the lowering does, reading one 0-dim s.

    ::

        s ──┬── a * s ── a.copy_(.)
            └── b * s ── b.copy_(.)      (+ s.add_(1) when the scalar is written)
    """
    graph = torch.fx.Graph()
    a, b, s = (graph.placeholder(n) for n in "abs")
    for x in (a, b):
        _lowered(graph.call_method("copy_", (x, _lowered(graph.call_function(operator.mul, (x, s))))))
    if shared_scalar_written:
        _lowered(graph.call_method("add_", (s, 1)))
    graph.output(())
    return torch.fx.GraphModule(torch.nn.Module(), graph), [torch.ones(4), torch.ones(4), torch.tensor(2.0)]


def _eager(gm: torch.fx.GraphModule, inputs: list) -> object:
    return gm.forward


def test_a_shared_scalar_nothing_writes_does_not_tie_pieces(monkeypatch):
    """Two updates that read one scalar are two pieces (one component each) of one computation, compiled once."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    gm, inputs = _graph(shared_scalar_written=False)
    compiled = compile_in_pieces(gm, inputs, _eager)
    assert compiled is not None
    assert counters["fxmesh"]["pieces"] == 2 and counters["fxmesh"]["piece_compiles"] == 1
    a, b, s = torch.ones(4), torch.full((4,), 3.0), torch.tensor(2.0)
    compiled(a, b, s)
    assert a.tolist() == [2.0] * 4 and b.tolist() == [6.0] * 4


def test_a_written_scalar_keeps_the_graph_whole(monkeypatch):
    """If anything writes the shared scalar, its readers stay in one piece: the graph does not split."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    gm, inputs = _graph(shared_scalar_written=True)
    assert compile_in_pieces(gm, inputs, _eager) is None


def test_a_prologue_after_the_lowered_nodes_it_shares_a_tensor_with_keeps_the_graph_whole(monkeypatch):
    """A node fxmesh did not emit, after lowered nodes on the same tensor, cannot move to the front."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    for x in (a, b):
        _lowered(graph.call_method("copy_", (x, _lowered(graph.call_function(operator.mul, (x, 2.0))))))
    graph.call_method("add_", (a, 1.0))
    graph.output(())
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert compile_in_pieces(gm, [torch.ones(4), torch.ones(4)], _eager) is None


def test_a_local_shard_and_a_plain_tensor_are_other_inputs(monkeypatch):
    """The same update of a DTensor's local shard and of a plain tensor compiles twice: AOT is told to leave
    the shard's version counter alone (fxmesh.local.hide_shard_mutations), not the plain tensor's."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    graph = torch.fx.Graph()
    inputs = [graph.placeholder(n) for n in "abcd"]
    for x in inputs[:2]:
        x.meta[SHARD] = True
    for x in inputs:
        _lowered(graph.call_method("copy_", (x, _lowered(graph.call_function(operator.mul, (x, 2.0))))))
    graph.output(())
    compiled = []

    def compile_fn(gm, inputs):
        compiled.append([p.meta.get(SHARD, False) for p in gm.graph.find_nodes(op="placeholder")])
        return gm.forward

    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    run = compile_in_pieces(gm, [torch.ones(4) for _ in inputs], compile_fn)
    assert run is not None and compiled == [[True], [False]]
    assert counters["fxmesh"]["pieces"] == 4


def _params(meshes: list, n: int, shapes: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    """``n`` parameters, their local shards of ``shapes`` in turn, on ``meshes`` in turn."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for i in range(n):
        mesh = meshes[i % len(meshes)]
        local = torch.randn(shapes[i % len(shapes)], generator=gen).to(DEVICE)
        placements = [Shard(0)] * mesh.ndim
        params.append(torch.nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False)))
    return params


def _step_and_compare(params, opt, ref_opt, ref, step, steps=3, per_buffer=0) -> None:
    """``steps`` steps with fresh gradients; the shards match eager fused on plain tensors (fp32: 1e-5).

    ``per_buffer``: the local tensors of each ``per_buffer`` gradients in turn are views of one flat
    buffer, as FSDP2's reduce-scatter leaves a module's gradients.
    """
    initial = [local(r).detach().clone() for r in ref]  # the parameters start alike
    for k in range(steps):
        gen = torch.Generator().manual_seed(100 + k)
        if per_buffer:
            grads = grads_in_buffers(params, gen, per_buffer)
        else:
            grads = [torch.randn(p.to_local().shape, generator=gen).to(DEVICE) for p in params]
            for p, g in zip(params, grads):
                p.grad = DTensor.from_local(g.clone(), p.device_mesh, p.placements, run_check=False)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        step()
        ref_opt.step()
    for i, (p, r) in enumerate(zip(params, ref)):
        assert_rel_close(p.to_local(), r, FP32_RTOL, f"parameter {i}")
        assert_same_update(initial[i], p, initial[i], r, FP32_RTOL, f"parameter {i}, over every step")
    assert [opt.state[p]["step"].item() for p in params] == [steps] * len(params)


def _reference(params, cls, **kw):
    ref = [torch.nn.Parameter(p.to_local().detach().clone()) for p in params]
    return ref, cls(ref, fused=True, **kw)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_parameters_of_one_layout_share_a_table_and_a_compile(dp, ep, compiler, monkeypatch):
    """48 parameters in 3 local shapes interleaved on 2 meshes: one compile per shape, eager fused AdamW's results."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)  # one component per piece
    params = _params([dp, ep], 48, [(4, 4), (2, 8), (8, 3)])
    ref, ref_opt = _reference(params, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    _step_and_compare(params, opt, ref_opt, ref, torch.compile(opt.step, backend=fxmesh.backend(compiler=compiler)))
    # Per mesh, 8 parameters of each shape: sorted by layout, one table and one component each, with
    # their step counts; the two meshes' components of one shape are the same computation on local shards.
    assert counters["fxmesh"]["pieces"] == 6 and counters["fxmesh"]["piece_compiles"] == 3


def test_nothing_repeated_stays_one_graph(meshes):
    """Seven parameters of seven layouts: no piece repeats, so the step compiles as one graph."""
    params = dtensor_params(meshes)
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    torch.compile(opt.step, backend=fxmesh.backend(compiler="aot_eager"))()
    assert counters["fxmesh"]["local_shard_graphs"] == 1 and counters["fxmesh"]["pieces"] == 0


def test_one_compiled_piece_runs_every_piece(dp, monkeypatch):
    """With one component per piece, 64 parameters of one shape are four pieces compiled once."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    params = _params([dp], 64, [(4, 4)])
    ref, ref_opt = _reference(params, torch.optim.Adam, lr=torch.tensor(1e-2))
    opt = torch.optim.Adam(params, lr=torch.tensor(1e-2), fused=True)  # a tensor lr: one input every piece reads
    _step_and_compare(params, opt, ref_opt, ref, torch.compile(opt.step, backend="fxmesh"))
    assert counters["fxmesh"]["pieces"] == 4 and counters["fxmesh"]["piece_compiles"] == 1


def test_pieces_keep_parameters_and_states_static_where_aligned(dp, monkeypatch):
    """A compiled piece's parameters and optimizer states are Inductor's static inputs, as in a step compiled
    whole, where they are aligned in every piece it serves; gradients are not.  (Inductor checks a non-static
    GPU input's alignment on every call: a data_ptr() read each, about 1.4 us on an H100 host, GPU run 4.)

    64 Adam parameters of one shape, four pieces compiled once; parameter 5's local tensor is a view 4 bytes
    into its storage, so its position, in the piece that holds it, is not static in the compiled piece.
    """
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    compile_fx = importlib.import_module("torch._inductor.compile_fx")
    checked = compile_fx.get_input_idxs_to_check
    static_inputs = []

    def record(inputs, static_input_idxs):
        static_inputs.append(list(static_input_idxs))
        return checked(inputs, static_input_idxs)

    monkeypatch.setattr(compile_fx, "get_input_idxs_to_check", record)
    params = _params([dp], 64, [(4, 4)])
    misaligned = torch.randn(17).to(DEVICE)[1:].view(4, 4)
    params[5] = torch.nn.Parameter(DTensor.from_local(misaligned, dp, [Shard(0)], run_check=False))
    assert params[5].to_local().storage_offset() == 1
    ref, ref_opt = _reference(params, torch.optim.Adam, lr=torch.tensor(1e-2))
    opt = torch.optim.Adam(params, lr=torch.tensor(1e-2), fused=True)
    # A cached compile would not reach Inductor's check.
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        _step_and_compare(params, opt, ref_opt, ref, torch.compile(opt.step, backend="fxmesh"))
    assert counters["fxmesh"]["pieces"] == 4 and counters["fxmesh"]["piece_compiles"] == 1
    # Each piece: 16 parameters, their exp_avg, exp_avg_sq and step count static, less the misaligned
    # parameter's place; the 16 gradients and the lr are not.
    assert [len(idxs) for idxs in static_inputs] == [16 * 4 - 1], static_inputs


def test_gradients_in_shared_buffers_compile_in_pieces(dp, monkeypatch):
    """Gradients that are views of a buffer per 16 of them (FSDP2's: a buffer per module).

    From torch 2.13 Dynamo traces them with symbolic sizes (their view base is not the parameter's) and
    passes each buffer's size as an input, which nothing reads once the lowering has equated the
    gradients' sizes with the parameters'.  The step still compiles in pieces (1000 such parameters on
    the CPU box: 90 s against 401 s whole) and matches eager.
    """
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    params = _params([dp], 64, [(4, 4)])
    ref, ref_opt = _reference(params, torch.optim.Adam, lr=torch.tensor(1e-2))
    opt = torch.optim.Adam(params, lr=torch.tensor(1e-2), fused=True)
    step = torch.compile(opt.step, backend=fxmesh.backend(compiler="aot_eager"))
    _step_and_compare(params, opt, ref_opt, ref, step, per_buffer=16)
    assert params[0].grad.to_local()._is_view()
    assert counters["fxmesh"]["pieces"] == 4 and counters["fxmesh"]["piece_compiles"] == 1


def test_a_recompile_for_other_shapes_splits_too(dp, monkeypatch, caplog):
    """A second optimizer of other shapes: Dynamo recompiles the step with symbolic sizes, which fxmesh makes
    static (fxmesh.specialize), so that step splits into pieces too, with no warning; so does a third one
    compiled with ``dynamic=False``.  Every optimizer's steps match eager fused Adam on plain tensors.
    (The pieces' keys cannot hold symbolic sizes: such a step used to compile whole.)
    """
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    monkeypatch.setattr(importlib.import_module("fxmesh.lowering"), "TABLE_ROWS", 2)  # a component per 2 parameters
    for shape, dynamic, specialized in (((4, 4), None, 0), ((2, 8), None, 1), ((8, 2), False, 0)):
        counters.clear()
        caplog.clear()
        params = _params([dp], 4, [shape])
        ref, ref_opt = _reference(params, torch.optim.Adam, lr=1e-2)
        opt = torch.optim.Adam(params, lr=1e-2, fused=True)
        step = torch.compile(opt.step, backend=fxmesh.backend(compiler="aot_eager"), dynamic=dynamic)
        with caplog.at_level(logging.WARNING, logger="fxmesh.lowering"):
            _step_and_compare(params, opt, ref_opt, ref, step)
        assert counters["fxmesh"]["local_shard_graphs"] == 1 and counters["fxmesh"]["pieces"] == 2
        assert "dynamic=False" not in caplog.text, caplog.text
        assert counters["fxmesh"]["specialized_graphs"] == specialized and counters["fxmesh"]["symbolic_graphs"] == 0


def test_local_shards_and_plain_tensors_compile_apart(dp, monkeypatch):
    """32 DTensor and 32 plain parameters of one local shape: the same math, but a local shard's version
    counter stays where it was (as under an eager DTensor op) and a plain tensor's moves, so each kind
    compiles pieces of its own.  Eager fused AdamW's results on plain copies, 1e-5."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    gen = torch.Generator().manual_seed(1)
    params = _params([dp], 32, [(4, 4)]) + [
        torch.nn.Parameter(torch.randn(4, 4, generator=gen).to(DEVICE)) for _ in range(32)
    ]
    ref = [torch.nn.Parameter(local(p).detach().clone()) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    step = torch.compile(opt.step, backend="fxmesh")
    initial = [local(r).detach().clone() for r in ref]  # the parameters start alike
    for k in range(3):
        for p, r in zip(params, ref):
            r.grad = torch.randn(4, 4, generator=gen).to(DEVICE)
            p.grad = DTensor.from_local(r.grad.clone(), dp, p.placements) if isinstance(p, DTensor) else r.grad.clone()
        versions = [(p._version, local(p)._version) for p in params]
        step()
        ref_opt.step()
        for i, (p, (v, local_v)) in enumerate(zip(params, versions)):
            moved = (p._version > v, local(p)._version > local_v)
            assert moved == (True, not isinstance(p, DTensor)), f"step {k}, parameter {i}: {moved}"
    for i, (p, r) in enumerate(zip(params, ref)):
        assert_rel_close(local(p), r, FP32_RTOL, f"parameter {i}")
        assert_same_update(initial[i], p, initial[i], r, FP32_RTOL, f"parameter {i}, over every step")
    assert counters["fxmesh"]["pieces"] == 4 and counters["fxmesh"]["piece_compiles"] == 2


def test_pieces_off(dp):
    """fxmesh.backend(pieces=False) compiles the step as one graph."""
    params = _params([dp], 32, [(4, 4)])
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    torch.compile(opt.step, backend=fxmesh.backend(compiler="aot_eager", pieces=False))()
    assert counters["fxmesh"]["local_shard_graphs"] == 1 and counters["fxmesh"]["pieces"] == 0


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_a_scheduled_lr_is_copied_into_every_piece(dp, compiler, monkeypatch):
    """A float lr changed every step (Dynamo recompiles once with it symbolic): the recompiled step splits too.

    The lr then enters as a float64 tensor read with ``.item()``; that scalar math is copied into each piece.
    """
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    params = _params([dp], 32, [(4, 4)])
    ref, ref_opt = _reference(params, torch.optim.AdamW, lr=1e-2)
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    step = torch.compile(opt.step, backend=fxmesh.backend(compiler=compiler))

    def scheduled_step():
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] *= 0.9
        step()

    _step_and_compare(params, opt, ref_opt, ref, scheduled_step, steps=4)
    # Two compiles (the constant lr, then the symbolic one), two pieces each, one compile of a piece each.
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["fxmesh"]["pieces"] == 4 and counters["fxmesh"]["piece_compiles"] == 2


def test_a_prologue_value_is_passed_to_the_pieces(monkeypatch):
    """A 0-dim value the prologue computes from every input (a clip coefficient) goes to each piece as an input,
    the in-place foreach product with it moves, entry by entry, into the pieces, and the graph returns what the
    prologue computed.

    ::

        s = a.sum() + b.sum();  c = s * 0.5;  _foreach_mul_([a, b], c)  ── prologue / lanes
        a.copy_(a * 2);  b.copy_(b * 2)                                  ── lowered, one piece each
        return (s,)
    """
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    s = graph.call_function(operator.add, (graph.call_method("sum", (a,)), graph.call_method("sum", (b,))))
    c = graph.call_function(operator.mul, (s, 0.5))
    for node in (s, c):
        node.meta["example_value"] = torch.tensor(0.0)
    graph.call_function(torch._foreach_mul_, ([a, b], c))
    for x in (a, b):
        _lowered(graph.call_method("copy_", (x, _lowered(graph.call_function(operator.mul, (x, 2.0))))))
    graph.output((s,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    compiled = compile_in_pieces(gm, [torch.ones(4), torch.ones(4)], _eager)
    assert compiled is not None
    assert counters["fxmesh"]["pieces"] == 3 and counters["fxmesh"]["piece_compiles"] == 2
    a, b = torch.ones(4), torch.full((4,), 3.0)
    (total,) = compiled(a, b)
    assert total.item() == 16.0  # before the product: the prologue runs first
    assert a.tolist() == [16.0] * 4 and b.tolist() == [48.0] * 4  # x * (16 * 0.5) * 2


def test_a_prologue_reading_scalar_math_on_an_input(monkeypatch):
    """Where the total norm is an input (fxmesh.checks split the graph at its check), the clip coefficient is
    scalar math on it that the prologue reads too: the prologue computes it as well, and the graph returns
    the input itself.

    ::

        c = clamp(1.0 / (n + 1e-6), max=1.0);  _foreach_mul_([a, b], c)  ── prologue / lanes
        a.copy_(a * 2);  b.copy_(b * 2)                                   ── lowered, one piece each
        return (n,)
    """
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    graph = torch.fx.Graph()
    a, b, n = graph.placeholder("a"), graph.placeholder("b"), graph.placeholder("n")
    inverse = graph.call_function(operator.truediv, (1.0, graph.call_function(operator.add, (n, 1e-6))))
    coef = graph.call_function(torch.clamp, (inverse,), {"max": 1.0})
    for node in (*inverse.all_input_nodes, inverse, coef):
        node.meta["example_value"] = torch.tensor(0.0)
    graph.call_function(torch._foreach_mul_, ([a, b], coef))
    for x in (a, b):
        _lowered(graph.call_method("copy_", (x, _lowered(graph.call_function(operator.mul, (x, 2.0))))))
    graph.output((n,))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    compiled = compile_in_pieces(gm, [torch.ones(4), torch.ones(4), torch.tensor(3.0)], _eager)
    assert compiled is not None
    assert counters["fxmesh"]["pieces"] == 3 and counters["fxmesh"]["piece_compiles"] == 2
    a, b, norm = torch.ones(4), torch.full((4,), 3.0), torch.tensor(4.0)
    (out,) = compiled(a, b, norm)
    assert out is norm
    coefficient = 1.0 / (4.0 + 1e-6)
    torch.testing.assert_close(a, torch.full((4,), 2 * coefficient))
    torch.testing.assert_close(b, torch.full((4,), 6 * coefficient))


def test_an_unrestored_grad_mode_keeps_the_graph_whole(monkeypatch):
    """A graph that leaves grad mode other than it found it cannot drop its ``_set_grad_enabled`` calls."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    gm, inputs = _graph(shared_scalar_written=False)
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(first):
        gm.graph.call_function(torch._C._set_grad_enabled, (not torch.is_grad_enabled(),))
    gm.recompile()
    assert compile_in_pieces(gm, inputs, _eager) is None


# How an optimizer computes its step: its torch.optim options.
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


@pytest.mark.parametrize(
    "compiler, implementation, error_if_nonfinite",
    [
        ("aot_eager", "fused", False),
        ("inductor", "fused", False),
        ("aot_eager", "foreach", False),
        ("inductor", "foreach", False),
        ("aot_eager", "for-loop", False),
        ("inductor", "fused", True),
        ("aot_eager", "foreach", True),
    ],
)
def test_clip_and_step_compile_in_pieces(dp, ep, compiler, implementation, error_if_nonfinite, monkeypatch):
    """Clipping + AdamW as one graph (the norm reads every gradient) still splits: the norm and the clip
    coefficient are the prologue, each piece scales its gradients by the coefficient and updates its parameters.
    With ``error_if_nonfinite`` the graph is first split at the check (fxmesh.checks): the norm is a graph of
    its own, and the clip coefficient, computed from it as an input, is the prologue.
    Against fxmesh's eager clipping and eager AdamW of the same implementation on the same DTensors, over 3
    steps (fp32: 1e-5)."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    params = _params([dp, ep], 32, [(4, 4), (4, 4), (2, 8), (2, 8)])  # per mesh, 8 of each shape
    ref = [torch.nn.Parameter(DTensor.from_local(p.to_local().clone(), p.device_mesh, p.placements)) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **IMPLEMENTATIONS[implementation])
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, **IMPLEMENTATIONS[implementation])

    @torch.compile(backend=fxmesh.backend(compiler=compiler))
    def clip_and_step():
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5, error_if_nonfinite=error_if_nonfinite)
        opt.step()
        return norm

    initial = [local(r).detach().clone() for r in ref]  # the parameters start alike
    for k in range(3):
        gen = torch.Generator().manual_seed(100 + k)
        for p, r in zip(params, ref):
            g = torch.randn(p.to_local().shape, generator=gen).to(DEVICE)
            p.grad = DTensor.from_local(g.clone(), p.device_mesh, p.placements).detach()
            r.grad = DTensor.from_local(g, r.device_mesh, r.placements).detach()
        norm = clip_and_step()
        ref_norm = fxmesh.clip_grad_norm_(ref, 0.5)
        ref_opt.step()
        assert_rel_close(norm, ref_norm, FP32_RTOL, f"step {k}: the norm")
    for i, (p, r) in enumerate(zip(params, ref)):
        assert_rel_close(p.to_local(), r.to_local(), FP32_RTOL, f"parameter {i}")
        assert_same_update(initial[i], p, initial[i], r, FP32_RTOL, f"parameter {i}, over every step")
    assert counters["stats"]["unique_graphs"] == 1
    # The prologue (norm, coefficient) first; then, fused, one piece per mesh and shape (a scalar table), else one
    # per parameter; the pieces of a shape are alike on both meshes.
    pieces = 1 + (4 if implementation == "fused" else len(params))
    assert counters["fxmesh"]["pieces"] == pieces and counters["fxmesh"]["piece_compiles"] == 3
    assert counters["fxmesh"]["split_at_checks"] == int(error_if_nonfinite)


def test_constants_of_other_types_are_other_computations(monkeypatch):
    """``x * 2`` and ``x * 2.0`` (equal, and hashing alike) are different pieces: never compiled as one."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    graph = torch.fx.Graph()
    xs = [graph.placeholder(f"x{i}") for i in range(4)]
    for i, x in enumerate(xs):
        _lowered(graph.call_method("copy_", (x, _lowered(graph.call_function(operator.mul, (x, 2 if i < 2 else 2.0))))))
    graph.output(())
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert compile_in_pieces(gm, [torch.ones(4, dtype=torch.int64) for _ in xs], _eager) is not None
    assert counters["fxmesh"]["pieces"] == 4 and counters["fxmesh"]["piece_compiles"] == 2


def test_clip_and_step_in_pieces_with_parameters_without_gradients(dp, ep, monkeypatch):
    """Clip (inf-norm, per-tensor products) + AdamW where every fifth parameter has no gradient: still split, and
    against fxmesh's eager clipping and eager fused AdamW over 3 steps (fp32: 1e-5)."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    params = _params([dp, ep], 32, [(4, 4), (4, 4), (2, 8), (2, 8)])
    ref = [torch.nn.Parameter(DTensor.from_local(p.to_local().clone(), p.device_mesh, p.placements)) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, fused=True)
    clip = {"max_norm": 0.5, "norm_type": float("inf"), "foreach": False}

    @torch.compile(backend=fxmesh.backend(compiler="aot_eager"))
    def clip_and_step():
        norm = torch.nn.utils.clip_grad_norm_(params, **clip)
        opt.step()
        return norm

    initial = [local(r).detach().clone() for r in ref]  # the parameters start alike
    for k in range(3):
        gen = torch.Generator().manual_seed(100 + k)
        for i, (p, r) in enumerate(zip(params, ref)):
            if i % 5 == 0:
                continue
            g = torch.randn(p.to_local().shape, generator=gen).to(DEVICE)
            p.grad = DTensor.from_local(g.clone(), p.device_mesh, p.placements).detach()
            r.grad = DTensor.from_local(g, r.device_mesh, r.placements).detach()
        norm = clip_and_step()
        ref_norm = fxmesh.clip_grad_norm_(ref, **clip)
        ref_opt.step()
        assert_rel_close(norm, ref_norm, FP32_RTOL, f"step {k}: the norm")
    for i, (p, r) in enumerate(zip(params, ref)):
        assert_rel_close(p.to_local(), r.to_local(), FP32_RTOL, f"parameter {i}")
        assert_same_update(initial[i], p, initial[i], r, FP32_RTOL, f"parameter {i}, over every step")
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["fxmesh"]["pieces"] > 1 and counters["fxmesh"]["piece_compiles"] < counters["fxmesh"]["pieces"]


# Rprop's steps stay on the DTensors (a masked assignment, and foreach copies DTensor has no rule for): no pieces.
_PER_ENTRY_CASES = [c for c in FOREACH_CASES if not c.startswith("rprop")]


def _stays_on_dtensors(case: str) -> bool:
    """Torch 2.11's DTensor rule for ``_foreach_mul(scalars, grads)`` (foreach NAdam, its scalars first) makes the
    products Replicate, all-gathering the gradients (eagerly too): that step is no local math, so no pieces."""
    return case.startswith("nadam-foreach") and torch.__version__ < "2.12"


def _foreach_parity(meshes, case: str, backend="fxmesh") -> tuple[list[torch.nn.Parameter], str]:
    """test_foreach's ``case`` over the seven parameters of tests.helpers.dtensor_params twice over, against
    eager on the local shards over 5 steps (1e-5); the parameters and Inductor's code."""
    cls, options = FOREACH_CASES[case]
    params = dtensor_params(meshes) + dtensor_params(meshes, seed=1)
    ref_options = options
    if "capturable" in inspect.signature(cls).parameters:
        ref_options = {**options, "capturable": DEVICE != "cpu"}
    _, _, code = run_local_parity(
        lambda ps: cls(ps, **options), params, make_ref=lambda ps: cls(ps, **ref_options), backend=backend
    )
    return params, code


@pytest.mark.parametrize("case", _PER_ENTRY_CASES)
def test_foreach_and_for_loop_steps_compile_in_pieces(meshes, case, monkeypatch):
    """Every foreach and for-loop optimizer of test_foreach splits into one piece per parameter, its foreach calls
    written one call per entry (fxmesh.unroll), each of the seven layouts compiled once, and matches eager."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    params, _ = _foreach_parity(meshes, case, fxmesh.backend(compiler="aot_eager"))
    if _stays_on_dtensors(case):
        assert counters["fxmesh"]["local_shard_graphs"] == 0 and counters["fxmesh"]["pieces"] == 0
        return
    # RMSprop and Adadelta never read their step counts: each count's increment is a piece of its own.
    counts_apart = FOREACH_CASES[case][0] in (torch.optim.RMSprop, torch.optim.Adadelta)
    assert counters["fxmesh"]["pieces"] == len(params) * (1 + counts_apart)
    assert counters["fxmesh"]["piece_compiles"] == len(params) // 2 + counts_apart


@pytest.mark.parametrize("case", ["adamw-foreach", "adam-for-loop", "nadam-foreach-capturable"])
def test_foreach_and_for_loop_pieces_with_inductor(meshes, case, monkeypatch):
    """The same with Inductor's kernels, which call no aten foreach op."""
    monkeypatch.setattr(pieces_module, "PIECE_NODES", 1)
    params, code = _foreach_parity(meshes, case)
    if _stays_on_dtensors(case):
        assert counters["fxmesh"]["local_shard_graphs"] == 0 and counters["fxmesh"]["pieces"] == 0
        return
    assert "aten._foreach" not in without_comments(code)
    assert counters["fxmesh"]["pieces"] == len(params) and counters["fxmesh"]["piece_compiles"] == len(params) // 2
