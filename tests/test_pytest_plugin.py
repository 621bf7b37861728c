"""The ``--fxmesh-compile`` pytest plugin, run on small test files through ``pytester`` in a subprocess.

A subprocess per run: in-process pytester would drop the torch modules first imported by the inner
run from ``sys.modules`` afterwards, and share Dynamo's and the process group's global state.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from fxmesh.numerics import rel_error
from fxmesh.pytest_plugin import CompileMode, _eager_shadow, _mismatches, _shadow_copy
from tests.helpers import FP32_RTOL, local, shard

pytest_plugins = ["pytester"]

SUMMARY = "fxmesh compile-mode: {} optimizer steps compiled and checked, {} failed"

# tests/conftest.py's fixture: without it, Dynamo would skip SkipsFrames' code in later tests.
FRESH_DYNAMO = """
import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
"""

BROKEN = """
import torch

LR = 0.1


class PlainSGD(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"lr": LR})

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.param_groups[0]["params"]:
            p.add_(p.grad, alpha=-LR * self.scale(p))

    def scale(self, p):
        return 1.0


class Miscompiled(PlainSGD):
    def scale(self, p):
        return 1.01 if torch.compiler.is_compiling() else 1.0


class BreaksGraph(PlainSGD):
    def scale(self, p):
        return min(1.0, 10.0 / float(p.grad.norm()))


class SkipsFrames(PlainSGD):
    def scale(self, p):
        if torch.compiler.is_compiling():
            raise ValueError("refuses to compile")  # Dynamo gives up on the frame and runs it eagerly
        return 1.0


def run(make_opt, steps=3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = make_opt(params)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5) if isinstance(opt, torch.optim.SGD) else None
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def test_miscompiled():
    run(Miscompiled)


def test_breaks_graph():
    run(BreaksGraph)


def test_skips_frames():
    run(SkipsFrames)


def test_broken_pass(monkeypatch):
    import fxmesh

    def broken(gm):
        raise KeyError("boom")

    monkeypatch.setattr(fxmesh.fxmesh_backend, "passes", [("broken", broken)])
    run(PlainSGD)


def test_recompiles():
    run(lambda ps: torch.optim.SGD(ps, lr=LR), steps=4)
"""

CORRECT = """
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore


def grads(params, seed):
    torch.manual_seed(seed)
    for p in params:
        p.grad = torch.randn_like(p)


def test_adamw_and_sgd():
    params = [torch.nn.Parameter(torch.randn(6, 3)), torch.nn.Parameter(torch.randn(4))]
    adamw = torch.optim.AdamW(params[:1], lr=torch.tensor(0.01), fused=True)
    sgd = torch.optim.SGD(params[1:], lr=0.1, momentum=0.9, foreach=True)
    for s in range(3):
        grads(params, s)
        adamw.step()
        if s < 2:
            sgd.step()
    sgd.step(lambda: 0.0)
    assert adamw.state[params[0]]["step"].item() == 3


def test_fused_sgd_over_dtensors():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    mesh = init_device_mesh("cpu", (8,))
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(13, 4), mesh, [Shard(0)], src_data_rank=None))]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    for s in range(2):
        params[0].grad = DTensor.from_local(torch.randn(2, 4), mesh, [Shard(0)], shape=(13, 4), stride=(4, 1))
        opt.step()


def test_rejected_input_raises_the_optimizers_error():
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        torch.optim.Adam([p]).step()
"""


NOTHING_COMPILED = """

@pytest.fixture(autouse=True)
def nothing_compiled(fresh_dynamo):
    yield
    assert not torch._dynamo.utils.counters["frames"], "Dynamo compiled a frame"
"""


def run(pytester: pytest.Pytester, source: str, *args: str, conftest: str = FRESH_DYNAMO) -> pytest.RunResult:
    pytester.makeconftest(conftest)
    pytester.makepyfile(source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=300)


def test_broken_optimizers_fail_naming_optimizer_parameter_and_error(pytester):
    """A step that compiles to other numbers, graph-breaks, runs eagerly, raises or keeps recompiling fails."""
    result = run(pytester, BROKEN, "--fxmesh-compile")
    result.assert_outcomes(failed=5)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*fxmesh compile-mode: Miscompiled, compiled step 1:",
            "*param 0 ((6, 3) float32): relative error * > 1.0e-05 against eager",
            "*param 1 ((4,) float32): relative error * > 1.0e-05 against eager",
        ]
    )
    result.stdout.fnmatch_lines(["*BreaksGraph, compiled step 1:", "*graph break inside the step: *item()*"])
    result.stdout.fnmatch_lines(
        ["*SkipsFrames, compiled step 1:", "*Dynamo ran part of the step eagerly: Observed exception", "*refuses to*"]
    )
    result.stdout.fnmatch_lines(
        ["*PlainSGD, compiled step 1:", "*the compiled step raised BackendCompilerFailed: *", "*error in pass broken*"]
    )
    result.stdout.fnmatch_lines(
        ["*SGD, compiled step 3:", "*compiled again in 2 steps after the first > --fxmesh-max-recompiles=1*"]
    )
    assert "compiled step 2" not in out
    assert SUMMARY.format(7, 5) in out


def test_options_loosen_the_checks(pytester):
    """--fxmesh-rtol 0.1 accepts the 1% error; --fxmesh-max-recompiles 3 accepts a recompile per lr change."""
    result = run(
        pytester,
        BROKEN,
        "--fxmesh-compile",
        "--fxmesh-rtol=0.1",
        "--fxmesh-max-recompiles=3",
        "-k",
        "miscompiled or recompiles",
    )
    result.assert_outcomes(passed=2, deselected=3)
    assert SUMMARY.format(7, 0) in result.stdout.str()


def test_correct_optimizers_pass_and_are_counted(pytester):
    """Fused AdamW, foreach SGD and fused SGD over DTensors pass; closure steps and rejected input are not counted."""
    result = run(pytester, CORRECT, "--fxmesh-compile")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([SUMMARY.format(7, 0)])


def test_many_optimizers_of_one_class_in_a_session(pytester):
    """Twelve tests with an AdamW each and no conftest that resets Dynamo: every step compiles and is checked
    (compile mode resets Dynamo before each test; the 9th optimizer hit Dynamo's recompile limit before, and the
    later ones ran eagerly, counted as checked)."""
    many = """
import pytest
import torch


@pytest.mark.parametrize("i", range(12))
def test_adamw(i):
    torch.manual_seed(i)
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = torch.optim.AdamW(params, lr=0.01, fused=True)
    for _ in range(2):
        params[0].grad = torch.randn(4, 3)
        opt.step()
    print(f"fxmesh_graphs={torch._dynamo.utils.counters['fxmesh']['graphs']}")
"""
    result = run(pytester, many, "--fxmesh-compile", "-s", conftest="")
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines([SUMMARY.format(24, 0)])
    # The counters outlive Dynamo's reset: one more fxmesh graph in every test.
    assert "fxmesh_graphs=12" in result.stdout.str(), result.stdout.str()[-3000:]


def test_fused_kernels_aten(pytester):
    """--fxmesh-fused-kernels aten: the fused AdamW step compiles with aten's kernel and still matches eager."""
    report = """
@pytest.fixture(autouse=True)
def report_aten_calls(fresh_dynamo):
    yield
    print(f"aten_fused_calls={torch._dynamo.utils.counters['fxmesh']['aten_fused_calls']}")
"""
    result = run(
        pytester, CORRECT, "--fxmesh-compile", "--fxmesh-fused-kernels=aten", "-s", conftest=FRESH_DYNAMO + report
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([SUMMARY.format(7, 0)])
    assert result.stdout.str().count("aten_fused_calls=1") == 1, result.stdout.str()[-3000:]


def test_without_the_flag_nothing_is_compiled(pytester):
    """Without --fxmesh-compile Dynamo compiles no frame and the plugin prints nothing."""
    result = run(pytester, BROKEN, conftest=FRESH_DYNAMO + NOTHING_COMPILED)
    result.assert_outcomes(passed=5)
    assert "fxmesh compile-mode" not in result.stdout.str()


def test_interception_is_undone_after_each_test():
    """The wrapped steps and Optimizer._patch_step_function are restored, even when the test raises."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch.optim hooks SGD.step on first use
    before = dict(vars(torch.optim.SGD)), dict(vars(torch.optim.Optimizer))

    class Late(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    with pytest.raises(KeyError), CompileMode(rtol=1e-5, max_recompiles=1)._intercepting():
        Late([torch.zeros(1, requires_grad=True)])
        assert vars(torch.optim.SGD)["step"]._fxmesh_intercepted
        assert vars(Late)["step"]._fxmesh_intercepted
        raise KeyError

    assert (dict(vars(torch.optim.SGD)), dict(vars(torch.optim.Optimizer))) == before
    assert vars(Late)["step"].hooked and not hasattr(vars(Late)["step"], "_fxmesh_intercepted")


def test_relative_error_treats_nan_and_inf_positions_as_values():
    """NaN/inf where eager has them are no error; NaN where eager is finite is."""
    nan, inf = math.nan, math.inf
    assert rel_error(torch.tensor([nan, inf, 2.0]), torch.tensor([nan, inf, 2.0])) == 0
    assert rel_error(torch.tensor([1.0, 2.02]), torch.tensor([1.0, 2.0])) == pytest.approx(0.01)
    assert math.isnan(rel_error(torch.tensor([nan, 2.0]), torch.tensor([1.0, 2.0])))


def test_mismatches_name_parameter_layout_and_state(dp):
    """A local-shard shadow that differs in one parameter and one of its state tensors is reported as such."""
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(shard(torch.randn(16, 4), dp, [Shard(0)]))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    shadow = _shadow_copy(opt, as_local=True)
    assert _mismatches(opt, shadow, 1e-5) == []

    ref = shadow.param_groups[1]["params"][0]
    ref.data[0, 0] += 1.0
    shadow.state[ref]["exp_avg"].mul_(2)
    name = "param 1 (DTensor (16, 4) float32, (Shard(dim=0),) on mesh ('dp',))"
    problems = _mismatches(opt, shadow, 1e-5)
    assert [p.split(": relative error")[0] for p in problems] == [name, f"{name} state 'exp_avg'"]
    assert problems[1].endswith("relative error 5.000e-01 > 1.0e-05 against eager")


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("on_dtensors", [False, True], ids=["plain", "dtensor"])
def test_eager_shadow_reads_transposed_gradients_right(dp, cls, on_dtensors):
    """aten's CPU fused kernels read a gradient transposed against its parameter as if laid out like it (torch
    2.11-2.14, no error): the shadow gives its gradient copies the parameter's layout, so its step is the
    for-loop's, and fxmesh's correct step is not flagged."""
    full = torch.randn(8, 8)
    grad = torch.randn(8, 8).t()
    param = torch.nn.Parameter(shard(full.clone(), dp, [Replicate()]) if on_dtensors else full.clone())
    param.grad = DTensor.from_local(grad.clone(), dp, [Replicate()]) if on_dtensors else grad.clone()
    assert local(param.grad).stride() != local(param).stride(), "the gradient is laid out like its parameter"
    options = dict(lr=0.1, momentum=0.9) if cls is torch.optim.SGD else dict(lr=0.1)
    opt = cls([param], fused=True, **options)
    shadow = _eager_shadow(opt, type(opt).step, (), {})
    reference = torch.nn.Parameter(full.clone())
    reference.grad = grad.clone()
    cls([reference], foreach=False, **options).step()
    shadow_param = shadow.param_groups[0]["params"][0]
    assert rel_error(local(shadow_param).detach(), reference.detach()) <= FP32_RTOL
