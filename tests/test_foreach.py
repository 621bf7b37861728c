"""The foreach and for-loop implementations compiled across meshes with backend="fxmesh".

The passes leave these graphs alone: the math is DTensor ops that Dynamo, AOT and Inductor handle
as for any model.  Where a ``torch._foreach_*`` call mixes DTensors on several meshes with plain
tensors (Adam's step counts and bias corrections), DTensor would put the plain ones on one mesh and
fail; fxmesh's capture records a per-mesh stand-in instead (``fxmesh.ops.foreach_per_mesh``).
Checked: equal to eager on the local shards over 5 steps.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

import fxmesh
from fxmesh import capture, scalars
from fxmesh import meshes as meshes_module
from tests.helpers import DEVICE, KERNEL_PREFIX, dtensor_params, set_grads, without_comments
from tests.test_adam import unexpected_graph_breaks
from tests.test_sgd import run_local_parity

CASES = {
    "sgd-foreach": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True)),
    "sgd-for-loop": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False)),
    "rmsprop-foreach": (torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True, foreach=True)),
    "rmsprop-for-loop": (torch.optim.RMSprop, dict(lr=0.01, foreach=False)),
    "adam-for-loop": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.01, foreach=False)),
    "adagrad-for-loop": (torch.optim.Adagrad, dict(lr=0.05, foreach=False)),
    "adam-foreach": (torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01, foreach=True)),
    "adamw-foreach": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, maximize=True, foreach=True)),
    "adagrad-foreach": (torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01, foreach=True)),
    "nadam-foreach": (torch.optim.NAdam, dict(lr=0.01, foreach=True)),
    "radam-foreach": (torch.optim.RAdam, dict(lr=0.01, foreach=True)),
    "adamax-foreach": (torch.optim.Adamax, dict(lr=0.01, foreach=True)),
    "adadelta-foreach": (torch.optim.Adadelta, dict(lr=0.5, foreach=True)),
    "asgd-foreach": (torch.optim.ASGD, dict(lr=0.01, foreach=True)),
    "nadam-for-loop": (torch.optim.NAdam, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.01, foreach=False)),
    "radam-for-loop": (torch.optim.RAdam, dict(lr=0.01, foreach=False)),
    "adamax-for-loop": (torch.optim.Adamax, dict(lr=0.01, foreach=False)),
    "adadelta-for-loop": (torch.optim.Adadelta, dict(lr=0.5, foreach=False)),
    "asgd-for-loop": (torch.optim.ASGD, dict(lr=0.01, foreach=False)),
    # Upstream runs neither eagerly over DTensors: no sharding rule for aten._foreach_copy_ (foreach) and for the
    # masked assignment of the for-loop (aten.index_put_ on a Shard(0) DTensor).
    "rprop-foreach": (torch.optim.Rprop, dict(lr=0.01, maximize=True, foreach=True)),
    "rprop-for-loop": (torch.optim.Rprop, dict(lr=0.01, etas=(0.4, 1.3), foreach=False)),
}
# capturable=True keeps the step counts on the device and computes the bias corrections there as
# tensors.  Eagerly torch.optim refuses it for CPU tensors; compiled it runs, so on the CPU the
# reference is the same optimizer without capturable (same math, scalars on the host).  On a GPU,
# Dynamo turns capturable on in every group whose state is not yet created
# (OptimizerVariable._set_capturable), so there the compiled step is the capturable one whatever
# the options say, and so is its reference.
CASES |= {
    f"{name}-foreach-capturable": (cls, dict(lr=lr, foreach=True, capturable=True))
    for name, cls, lr in [
        ("adam", torch.optim.Adam, 0.01),
        ("adamw", torch.optim.AdamW, 0.01),
        ("rmsprop", torch.optim.RMSprop, 0.01),
        ("nadam", torch.optim.NAdam, 0.01),
        ("radam", torch.optim.RAdam, 0.01),
        ("adamax", torch.optim.Adamax, 0.01),
        ("adadelta", torch.optim.Adadelta, 0.5),
        ("asgd", torch.optim.ASGD, 0.01),
    ]
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager_on_local_shards(meshes, case):
    """Five steps with fresh grads over three meshes equal eager on the local shards (1e-5)."""
    cls, options = CASES[case]
    params = dtensor_params(meshes)
    ref_options = options
    if "capturable" in inspect.signature(cls).parameters:
        ref_options = {**options, "capturable": DEVICE != "cpu"}
    _, _, code = run_local_parity(lambda ps: cls(ps, **options), params, make_ref=lambda ps: cls(ps, **ref_options))
    assert KERNEL_PREFIX in code, "Inductor generated no kernel"
    calls = without_comments(code)
    assert "aten._foreach" not in calls and "aten._fused" not in calls, "an aten optimizer op is called"
    assert not unexpected_graph_breaks(), unexpected_graph_breaks()


def test_capturable_foreach_with_tensor_betas(meshes):
    """Capturable foreach AdamW (what Dynamo makes of foreach on a GPU) with a tensor lr and tensor betas, changed
    in place between steps: compiled once, equal to the for-loop step on the local shards.

    Dynamo rewrites ``_foreach_lerp_`` with a tensor weight (beta1) into other foreach calls; fxmesh's per-mesh
    recording used to skip that rewrite, and the op then read the weight with ``.item()``, at which Dynamo ran
    the whole step eagerly (on the CPU, torch.optim's capturable check then failed).
    """

    def make(foreach):
        tensors = lambda: dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.99)))  # noqa: E731
        options = dict(foreach=True, capturable=True) if foreach else dict(foreach=False)
        return lambda ps: torch.optim.AdamW(ps, weight_decay=0.1, amsgrad=True, **tensors(), **options)

    def schedule(s, *opts):
        for opt in opts:
            beta1, beta2 = opt.param_groups[0]["betas"]
            beta1.fill_(0.9 - 0.2 * s)
            beta2.fill_(0.99 - 0.01 * s)
            opt.param_groups[0]["lr"].mul_(0.7)

    _, _, code = run_local_parity(make(True), dtensor_params(meshes), before_step=schedule, make_ref=make(False))
    assert KERNEL_PREFIX in code, "Inductor generated no kernel"
    assert not unexpected_graph_breaks(), unexpected_graph_breaks()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


AOT_EAGER = fxmesh.backend(compiler="aot_eager")
SCHEDULED = {
    # _foreach_mul_(params, 1 - lr * weight_decay) and the step sizes' _foreach_div_; compiled with Inductor.
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, foreach=True), "fxmesh"),
    "adam-capturable": (torch.optim.Adam, dict(lr=0.01, foreach=True, capturable=True), AOT_EAGER),
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, foreach=True), AOT_EAGER),  # alpha=-lr
    "rmsprop": (torch.optim.RMSprop, dict(lr=0.01, foreach=True), AOT_EAGER),  # _foreach_addcdiv_'s value=-lr
}


@pytest.mark.parametrize("case", list(SCHEDULED))
def test_float_lr_changed_every_step_recompiles_once(meshes, case):
    """A float lr that a scheduler changes every step: Dynamo recompiles once and then passes it as a symbolic
    float; fxmesh hands it to the foreach calls as a 0-dim tensor, so later values run that graph (upstream, on
    plain tensors too, specializes it in every foreach Scalar and recompiles on every step until Dynamo's limit).
    Six steps, equal to the for-loop step on the local shards."""
    cls, options, backend = SCHEDULED[case]
    ref_options = {**{k: v for k, v in options.items() if k != "capturable"}, "foreach": False}

    def schedule(s, *opts):
        for opt in opts:
            opt.param_groups[0]["lr"] *= 0.7

    run_local_parity(
        lambda ps: cls(ps, **options),
        dtensor_params(meshes),
        steps=6,
        before_step=schedule,
        make_ref=lambda ps: cls(ps, **ref_options),
        backend=backend,
    )
    counts = torch._dynamo.utils.counters
    assert counts["fxmesh"]["tensorified_scalars"] >= 1, dict(counts["fxmesh"])
    # On torch 2.11 DTensor's sharding propagation, which Dynamo runs while tracing, guards on the value of a
    # float passed to a foreach op over DTensors (AdamW's 1 - lr * weight_decay, RMSprop's -lr), before any
    # fxmesh pass: those two still recompile on every step there.
    every_step = torch.__version__.startswith("2.11") and case in ("adamw", "rmsprop")
    assert counts["stats"]["unique_graphs"] == (6 if every_step else 2), dict(counts["stats"])


class Lion(torch.optim.Optimizer):
    """A user's own foreach optimizer (Lion, Chen et al. 2023), not torch.optim's; ``lr`` may be a tensor."""

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            exp_avgs = [self.state[p].setdefault("exp_avg", torch.zeros_like(p)) for p in params]
            beta1, beta2 = group["betas"]
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            update = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_mul_(update, group["lr"])
            torch._foreach_sub_(params, update)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)


class FlooredAdam(torch.optim.Optimizer):
    """Adam without bias correction, its denominator floored at eps by ``_foreach_maximum`` with a scalar, for
    which DTensor has no sharding rule (torch 2.11-2.15)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            exp_avgs = [s.setdefault("exp_avg", torch.zeros_like(p)) for s, p in zip(states, params)]
            exp_avg_sqs = [s.setdefault("exp_avg_sq", torch.zeros_like(p)) for s, p in zip(states, params)]
            beta1, beta2 = group["betas"]
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            denominators = torch._foreach_maximum(torch._foreach_sqrt(exp_avg_sqs), group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denominators, value=-group["lr"])


USERS_OWN = {
    # 0-dim plain tensors beside DTensors on three meshes; on torch 2.11-2.12 no DTensor rule for _foreach_lerp
    # with a float weight or _foreach_sign_ either.
    "lion-tensor-lr": (lambda ps: Lion(ps, lr=torch.tensor(0.01), weight_decay=0.1), "different mesh"),
    "floored-adam": (lambda ps: FlooredAdam(ps, lr=0.01), "sharding strategy"),
}


@pytest.mark.parametrize("case", list(USERS_OWN))
def test_users_own_foreach_optimizer(meshes, case):
    """fxmesh's capture is not limited to torch.optim: a user's foreach optimizer that upstream cannot run over
    these DTensors eagerly compiles under fxmesh (per mesh, and one call per entry where DTensor has no rule for
    the foreach op), equal to the same step eagerly on the local shards over 5 steps."""
    make, upstream_error = USERS_OWN[case]
    params = dtensor_params(meshes)
    set_grads([params], 0)
    with pytest.raises(Exception, match=upstream_error):
        make(params).step()
    run_local_parity(make, dtensor_params(meshes))
    assert not unexpected_graph_breaks(), unexpected_graph_breaks()


class SqrtLrSGD(torch.optim.Optimizer):
    """Plain SGD stepping by sqrt(lr): a scheduled float reaching a foreach Scalar through ``math.sqrt``."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            torch._foreach_add_(params, [p.grad for p in params], alpha=-math.sqrt(group["lr"]))


def test_float_lr_through_a_math_function_recompiles_once(meshes, monkeypatch):
    """A symbolic float that fxmesh does not write as tensor math on its source (``math.sqrt`` of it) reaches the
    foreach call as ``zeros((), float64) + s``, which AOT turns into tensor math: one recompile, as for
    torch.optim's steps above (without it, one per step), equal to eager on the local shards over 6 steps.
    AOT learned that for ``sqrt`` (and ``min``, ``max``, ``abs``) in torch 2.13: before, one recompile per step."""
    untraced = []

    def spy(graph, value, *args):
        expression = tensor_expression(graph, value, *args)
        untraced.extend([value] if expression is None else [])
        return expression

    tensor_expression = scalars._tensor_expression
    monkeypatch.setattr(scalars, "_tensor_expression", spy)

    def schedule(s, *opts):
        for opt in opts:
            opt.param_groups[0]["lr"] *= 0.7

    run_local_parity(lambda ps: SqrtLrSGD(ps, lr=0.1), dtensor_params(meshes), steps=6, before_step=schedule)
    counts = torch._dynamo.utils.counters
    assert untraced and counts["fxmesh"]["tensorified_scalars"] >= 1, dict(counts["fxmesh"])
    assert counts["stats"]["unique_graphs"] == (6 if torch.__version__ < "2.13" else 2), dict(counts["stats"])


@pytest.mark.parametrize(
    "cls, match", [(torch.optim.Adam, "different mesh"), (torch.optim.Rprop, "_foreach_copy_")], ids=["adam", "rprop"]
)
def test_other_backends_still_fail_across_meshes(meshes, cls, match):
    """The foreach stand-ins exist only under fxmesh: the eager backend fails as upstream."""
    params = dtensor_params(meshes)
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(Exception, match=match):
        torch.compile(cls(params, foreach=True).step, backend="eager")()


def _local_meta(value):
    return [(v.placements, v.to_local().shape, v.dtype) if isinstance(v, DTensor) else v for v in tree_leaves(value)]


def test_foreach_example_values_traced_one_entry_at_a_time(meshes, monkeypatch):
    """Under fxmesh, Dynamo computes a foreach op's example value over DTensors one list entry at a time
    (DTensor's rule for a whole list takes time quadratic in its length); each must equal the whole list's
    (placements, local shapes, dtypes).  Under another backend Dynamo's own run is untouched."""
    compared, mismatches = [], []

    def both(op, args, kwargs):
        whole = _local_meta(op(*args, **kwargs))
        value = per_entry(op, args, kwargs)
        if meshes_module._foreach_length(op, args, kwargs) is not None:
            compared.append(op.__name__)
            if _local_meta(value) != whole:
                mismatches.append(op.__name__)
        return value

    per_entry = capture.call_foreach_per_entry
    monkeypatch.setattr(capture, "call_foreach_per_entry", both)
    params = dtensor_params(meshes)
    for p in params:
        p.grad = torch.randn_like(p)
    torch.compile(torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, foreach=True).step, backend="fxmesh")()
    assert {"_foreach_mul_", "_foreach_addcdiv_", "_foreach_sqrt"} <= set(compared), compared
    assert not mismatches, mismatches

    compared.clear()
    one_mesh = [p for p in params if p.device_mesh == params[0].device_mesh]
    torch.compile(torch.optim.AdamW(one_mesh, lr=0.01, foreach=True).step, backend="eager")()
    assert not compared, compared
