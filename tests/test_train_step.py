"""Optimizer steps called from a user function compiled with ``backend="fxmesh"`` (a train step).

There fxmesh skips torch.optim's own graph breaks around the step, so the step
shares a graph with what the function does around it.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import fxmesh
from tests.helpers import DEVICE, assert_same_state, clone_params, dtensor_params, local, param_values, set_grads
from tests.test_sgd import run_local_parity

STEPS = 5

# Upstream ships fused Adagrad for CPU only.
CPU_ONLY = pytest.mark.skipif(DEVICE != "cpu", reason="upstream's fused Adagrad exists for CPU only")


def _run(meshes, make_opt, before_step=None, fullgraph=False):
    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    opt, eager_opt = make_opt(params), make_opt(eager_params)

    @torch.compile(backend="fxmesh", fullgraph=fullgraph)
    def train_step():
        opt.step()

    for s in range(STEPS):
        set_grads([params, eager_params], s)
        if before_step is not None:
            before_step(s, opt, eager_opt)
        before = param_values(opt), param_values(eager_opt)
        train_step()
        eager_opt.step()
        assert_same_state(opt, eager_opt, before=before)
    return opt


def test_step_is_one_graph_with_its_caller(meshes):
    """No graph break at all: the step and the function around it are one graph."""
    _run(meshes, lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2), weight_decay=0.1, fused=True))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["fxmesh"]["graphs"] == 1


def test_step_compiles_with_fullgraph(meshes):
    """``fullgraph=True`` holds for a function that calls the step (not for ``opt.step`` itself, as upstream)."""
    _run(meshes, lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), fullgraph=True)
    assert counters["fxmesh"]["graphs"] == 1
    opt = torch.optim.AdamW(dtensor_params(meshes), fused=True)
    set_grads([opt.param_groups[0]["params"]], 0)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        torch.compile(opt.step, backend="fxmesh", fullgraph=True)()


def test_step_hook_that_records_autograd(meshes):
    """A post-step hook computing with grad on puts autograd into the graph; the step still lowers and matches."""
    seen = []

    def make_opt(ps):
        opt = torch.optim.AdamW(ps, lr=torch.tensor(1e-2), fused=True)
        opt.register_step_post_hook(lambda o, args, kwargs: seen.append(ps[0].to_local().sum()))
        return opt

    _run(meshes, make_opt)
    assert seen and all(t.requires_grad for t in seen)
    assert counters["fxmesh"]["lowered_nodes"] >= 1


def _schedule(**values):
    """A ``before_step`` that sets each hyperparameter to its value for the step (``betas`` as a pair)."""

    def before_step(s, *opts):
        for opt in opts:
            for key, per_step in values.items():
                opt.param_groups[0][key] = per_step[s % len(per_step)]

    return before_step


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, fused=True),
        pytest.param(lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=0.01, fused=True), marks=CPU_ONLY),
    ],
    ids=["adamw", "sgd", "adagrad"],
)
def test_float_lr_changed_every_step_is_compiled(meshes, caplog, make_opt):
    """A float lr that an LR scheduler changes every step turns symbolic in Dynamo; the step still lowers.

    Once lr is symbolic (after the first recompile) new values compile nothing.  Against eager on
    the local shards: upstream has no DTensor rule for fused SGD and Adagrad.
    """
    graphs_at = {}
    new_lr = _schedule(lr=[1e-2 / (s + 1) for s in range(STEPS)])

    def before_step(s, *opts):
        graphs_at[s] = counters["fxmesh"]["graphs"]
        new_lr(s, *opts)

    with caplog.at_level(logging.WARNING, logger="fxmesh.backend"):
        run_local_parity(make_opt, dtensor_params(meshes), steps=STEPS, before_step=before_step)
    assert counters["fxmesh"]["eager_fallbacks"] == 0, caplog.text
    assert counters["fxmesh"]["graphs"] == graphs_at[STEPS - 2], dict(counters["fxmesh"])
    assert counters["fxmesh"]["lowered_nodes"] == 3 * counters["fxmesh"]["graphs"]  # one call per mesh


# A weight decay of 0 on some steps: the kernels skip the decay term then, and so must the graph.
SCHEDULES = {
    "adamw-onecycle-betas": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
        _schedule(lr=[1e-2, 2e-2, 3e-2, 2e-2, 1e-2], betas=[(0.95, 0.999), (0.9, 0.999), (0.85, 0.999)]),
    ),
    "adamw-weight-decay-eps": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
        _schedule(weight_decay=[0.1, 0.05, 0.0, 0.02], eps=[1e-8, 1e-6, 1e-3]),
    ),
    "adam-l2-beta2": (
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, fused=True),
        _schedule(weight_decay=[0.1, 0.0, 0.05], betas=[(0.9, 0.999), (0.9, 0.99), (0.9, 0.95)]),
    ),
    "sgd-onecycle-momentum": (
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1, fused=True),
        _schedule(momentum=[0.95, 0.9, 0.85], dampening=[0.1, 0.2], weight_decay=[0.1, 0.0, 0.05]),
    ),
    "sgd-momentum-through-0": (
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
        _schedule(momentum=[0.9, 0.0, 0.5]),
    ),
    "adagrad": (
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=0.01, weight_decay=0.1, fused=True),
        _schedule(lr_decay=[0.01, 0.02, 0.03], weight_decay=[0.1, 0.0, 0.05], eps=[1e-10, 1e-6]),
    ),
}


@pytest.mark.parametrize(
    "name, local_shards",
    [pytest.param(name, True, marks=[CPU_ONLY] if name == "adagrad" else []) for name in SCHEDULES]
    + [("adamw-onecycle-betas", False), ("sgd-onecycle-momentum", False)],
    ids=lambda v: v if isinstance(v, str) else ("local" if v else "dtensor-graph"),
)
def test_hyperparameters_changed_every_step_are_compiled(meshes, caplog, name, local_shards):
    """Float hyperparameters a scheduler changes every step (OneCycleLR cycles beta1 or the momentum) turn
    symbolic in Dynamo and reach the lowering as float64 tensors: compiled, no recompile once symbolic,
    equal to eager on the local shards over 6 steps; also where the graph stays on the DTensors."""
    make_opt, schedule = SCHEDULES[name]
    graphs_at = {}

    def before_step(s, *opts):
        graphs_at[s] = counters["fxmesh"]["graphs"]
        schedule(s, *opts)

    with caplog.at_level(logging.WARNING, logger="fxmesh.backend"):
        run_local_parity(
            make_opt,
            dtensor_params(meshes),
            steps=6,
            before_step=before_step,
            backend=fxmesh.backend(local_shards=local_shards),
        )
    assert counters["fxmesh"]["eager_fallbacks"] == 0, caplog.text
    assert counters["fxmesh"]["graphs"] == graphs_at[4], dict(counters["fxmesh"])
    assert counters["fxmesh"]["lowered_nodes"] == 3 * counters["fxmesh"]["graphs"]  # one call per mesh
    # SGD's first momentum step returns new buffers, so its graph stays on the DTensors.
    on_local_shards = counters["fxmesh"]["graphs"] - (name.startswith("sgd") and local_shards)
    assert counters["fxmesh"]["local_shard_graphs"] == (on_local_shards if local_shards else 0)


# The CPU kernel's arithmetic takes its scalars in float64 host math.  On a GPU no step uses it, and
# there the symbolic form's float64 math runs in Triton, not on the host: 1 ulp apart in 8 of one
# parameter's 16 elements on an H100 (torch 2.11).
CPU_KERNEL_MATH = pytest.param(
    False, id="cpu-kernel-math", marks=pytest.mark.skipif(DEVICE != "cpu", reason="CPU kernels' arithmetic")
)


@pytest.mark.parametrize("gpu_math", [CPU_KERNEL_MATH, pytest.param(True, id="gpu-kernel-math")])
def test_symbolic_hyperparameters_compute_what_constants_do(meshes, monkeypatch, gpu_math):
    """The float64-tensor form of scheduled AdamW hyperparameters gives bit for bit the states the constant
    form gives, in the CPU kernel's arithmetic and in the GPU kernels' (which this runs on the CPU)."""
    adam_pass = importlib.import_module("fxmesh.passes.lower_fused_adam")  # the package exports the function
    monkeypatch.setattr(adam_pass, "_gpu_kernel", lambda device: gpu_math)
    schedule = _schedule(
        lr=[1e-2, 2e-2, 3e-2],
        betas=[(0.95, 0.999), (0.9, 0.99), (0.85, 0.999)],
        weight_decay=[0.1, 0.0, 0.05],
        eps=[1e-8, 1e-6],
    )
    states = {}
    for specialize in (True, False):  # True: every value a constant of its own graph
        torch._dynamo.reset()
        counters.clear()
        params = dtensor_params(meshes)
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        step = torch.compile(opt.step, backend="fxmesh")
        with torch._dynamo.config.patch(specialize_float=specialize):
            for s in range(STEPS):
                set_grads([params], s)
                schedule(s, opt)
                step()
        assert counters["fxmesh"]["eager_fallbacks"] == 0
        assert (counters["fxmesh"]["graphs"] > 3) == specialize, dict(counters["fxmesh"])
        states[specialize] = [
            t.to_local().clone() for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
        ]
    for i, (constant, symbolic) in enumerate(zip(states[True], states[False])):
        torch.testing.assert_close(symbolic, constant, rtol=0, atol=0, msg=lambda m, i=i: f"state tensor {i}: {m}")


# Two optimizers of one class in one process, the second with torch.optim's int defaults where the first has
# floats: Dynamo recompiles the shared step code with those ints as graph inputs.
SECOND_OPTIMIZERS = {
    "adam-weight-decay-0": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),  # weight_decay=0
    ),
    "sgd-dampening-0": (
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),  # dampening=0
    ),
    "adagrad-lr-decay-0": (
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=0.01, weight_decay=0.1, fused=True),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),  # lr_decay=0, weight_decay=0
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[CPU_ONLY] if n.startswith("adagrad") else []) for n in SECOND_OPTIMIZERS]
)
def test_int_hyperparameters_of_a_second_optimizer_are_compiled(meshes, caplog, name):
    """A second optimizer whose hyperparameters are ints where the first's were floats (torch.optim's defaults,
    ``Adam(weight_decay=0)``): Dynamo passes them as symbolic ints, which the lowering takes as float64 tensors.
    Both steps compile and match eager on the local shards (this ran eagerly before)."""
    first, second = SECOND_OPTIMIZERS[name]
    with caplog.at_level(logging.WARNING, logger="fxmesh.backend"):
        run_local_parity(first, dtensor_params(meshes), steps=2)
        graphs = counters["fxmesh"]["graphs"]
        run_local_parity(second, dtensor_params(meshes, seed=1), steps=3)
    assert counters["fxmesh"]["eager_fallbacks"] == 0, caplog.text
    assert counters["fxmesh"]["graphs"] > graphs
    assert counters["fxmesh"]["lowered_nodes"] == 3 * counters["fxmesh"]["graphs"]  # one call per mesh


def test_symbolic_hyperparameter_a_lowering_does_not_take_runs_eagerly(meshes, caplog):
    """A lowering that takes no symbolic hyperparameter leaves that graph to run eagerly, with one warning
    naming it, and the step still matches eager."""
    from fxmesh.lowering import lower_fused_calls

    adam = importlib.import_module("fxmesh.passes.lower_fused_adam")

    def constants_only(gm):
        return lower_fused_calls(gm, ("adamw",), adam._emit, scalar_lists=("state_steps",), tensor_hyperparameters=())

    with caplog.at_level(logging.WARNING, logger="fxmesh.backend"):
        run_local_parity(
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
            dtensor_params(meshes),
            steps=STEPS,
            before_step=_schedule(lr=[1e-2 / (s + 1) for s in range(STEPS)]),
            backend=fxmesh.backend(passes=["split_by_mesh", constants_only]),
        )
    assert counters["fxmesh"]["eager_fallbacks"] == 1, caplog.text
    assert "fused adamw: lr is a symbolic number" in caplog.text


@pytest.mark.parametrize("error_if_nonfinite", [False, True], ids=["", "error-if-nonfinite"])
def test_forward_backward_clip_and_step_in_one_compiled_function(meshes, error_if_nonfinite):
    """A whole train step compiled with fxmesh (forward, backward, clipping across three meshes, the step,
    zero_grad) keeps eager's parameters and states over several steps with fresh inputs. Upstream's graph breaks
    (``backward()``, ``zero_grad``) stay; the clip and the step compile, and nothing falls back to eager. With
    ``error_if_nonfinite`` the clip + step graph is compiled in two parts around the check (fxmesh.checks)."""
    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    make_opt = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, fused=True)  # noqa: E731
    opt, eager_opt = make_opt(params), make_opt(eager_params)

    def loss_of(ps, xs):
        # Local math only, so the fake process group's collectives never decide a value. Parameter 4 (Replicate,
        # Shard(1) on ep) takes no part: on torch 2.13-2.14 Dynamo fails on its to_local() beside a Shard(0)
        # DTensor's under any backend (aot_eager too: "SymNodeVariable() is not a constant" in
        # DTensorSpec._verify_shard_order); 2.11 compiles it. It keeps no gradient, as in eager.
        return sum(((p.to_local() * x - 0.5) ** 2).sum() for i, (p, x) in enumerate(zip(ps, xs)) if i != 4)

    @torch.compile(backend="fxmesh")
    def train_step(xs):
        loss = loss_of(params, xs)
        loss.backward()
        # torch's, as a user writes it: fxmesh traces it
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5, error_if_nonfinite=error_if_nonfinite)
        opt.step()
        opt.zero_grad()
        return loss.detach(), norm

    for s in range(4):
        g = torch.Generator().manual_seed(100 + s)
        xs = [torch.randn(local(p).shape, generator=g).to(DEVICE) for p in params]
        before = param_values(opt), param_values(eager_opt)
        loss, norm = train_step(xs)
        eager_loss = loss_of(eager_params, xs)
        eager_loss.backward()
        eager_norm = fxmesh.clip_grad_norm_(eager_params, 0.5)  # torch's fails across meshes in eager
        eager_opt.step()
        eager_opt.zero_grad()
        assert torch.allclose(loss, eager_loss.detach(), rtol=1e-5), (s, loss, eager_loss)
        assert torch.allclose(local(norm), local(eager_norm), rtol=1e-5), (s, norm, eager_norm)
        assert_same_state(opt, eager_opt, before=before)
    assert counters["fxmesh"]["eager_fallbacks"] == 0, dict(counters["fxmesh"])
    assert counters["fxmesh"]["lowered_nodes"] > 0, dict(counters["fxmesh"])
    assert counters["fxmesh"]["split_at_checks"] == int(error_if_nonfinite), dict(counters["fxmesh"])


@pytest.mark.parametrize("zero_grad_compiled", [False, True], ids=["zero-grad-eager", "zero-grad-compiled"])
def test_gradients_accumulated_in_place_between_steps(meshes, zero_grad_compiled):
    """Gradient accumulation: two backwards per step into gradients that ``zero_grad(set_to_none=False)`` keeps
    from step to step (the same DTensor objects, updated in place), then clip + step compiled with fxmesh. Each
    step reads the gradients' current values: parameters, states and the norm match eager over 4 steps, with one
    graph for all of them."""
    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    make_opt = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, fused=True)  # noqa: E731
    opt, eager_opt = make_opt(params), make_opt(eager_params)

    @torch.compile(backend="fxmesh")
    def clip_and_step():
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        if zero_grad_compiled:
            opt.zero_grad(set_to_none=False)
        return norm

    def accumulate(ps, s):
        for micro in range(2):
            g = torch.Generator().manual_seed(100 * s + micro)
            xs = [torch.randn(local(p).shape, generator=g).to(DEVICE) for p in ps]
            # Local math only, so the fake process group's collectives never decide a value.
            sum(((p.to_local() * x - 0.5) ** 2).sum() for p, x in zip(ps, xs)).backward()

    grads = None
    for s in range(4):
        accumulate(params, s)
        accumulate(eager_params, s)
        grads = grads or [p.grad for p in params]
        assert all(p.grad is g for p, g in zip(params, grads)), "zero_grad(set_to_none=False) keeps the gradients"
        before = param_values(opt), param_values(eager_opt)
        norm = clip_and_step()
        eager_norm = fxmesh.clip_grad_norm_(eager_params, 0.5)  # torch's fails across meshes in eager
        eager_opt.step()
        assert torch.allclose(local(norm), local(eager_norm), rtol=1e-5), (s, norm, eager_norm)
        assert_same_state(opt, eager_opt, before=before)
        if not zero_grad_compiled:
            opt.zero_grad(set_to_none=False)
        eager_opt.zero_grad(set_to_none=False)
        assert all(not local(p.grad).any() for p in params), "zeroed in place"
    assert counters["fxmesh"]["graphs"] == 1, dict(counters["fxmesh"])
    assert counters["fxmesh"]["eager_fallbacks"] == 0 and counters["fxmesh"]["lowered_nodes"] == 3
