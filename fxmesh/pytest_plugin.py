"""pytest plugin: ``pytest --fxmesh-compile`` runs every optimizer step through fxmesh.

With ``--fxmesh-compile``, every ``Optimizer.step()`` that a test function calls
without a closure runs compiled with ``backend="fxmesh"`` (one compiled step per
optimizer object, tracing the same frames as ``torch.compile(opt.step)``), and is
checked against an eager shadow step taken on copies of the parameters, their
gradients, the optimizer state and the param groups made just before it.  The
test fails at that step, naming the optimizer, the parameter index and the
error, when:

- a parameter or a state tensor differs from the shadow's by more than
  ``--fxmesh-rtol`` (max |compiled - eager| / max |eager| over the local shards,
  in float64; bf16/fp16 tensors allow at least one ulp, 2**-7 / 2**-10),
- the compiled step raises,
- Dynamo breaks the graph inside the step (torch.optim's own
  ``torch._dynamo.graph_break()`` around every step does not count) or gives
  up on a frame of it and runs that eagerly (from then on Dynamo skips that
  code until ``torch._dynamo.reset()``, which compile mode calls before every
  test: each test's optimizers compile afresh, and Dynamo's recompile limit of
  8 per code object counts one test's optimizers of a class),
- more than ``--fxmesh-max-recompiles`` of the optimizer's steps after its
  first compile new graphs.

The shadow runs on copies with the parameters' layout; where upstream eager
cannot run the optimizer over DTensors (fused SGD/Adagrad have no sharding
rule) it runs on plain copies of the local shards, an exact reference for
optimizers whose math is elementwise.  It calls the class's step without the
step hooks, which run once, in the compiled step.  If the shadow cannot step
either, the optimizer is rejecting its input: the real step runs eagerly,
unchecked, so that the test sees the optimizer's own error.

Steps with a closure run eagerly, unchecked: the closure recomputes the loss
and the real parameters' gradients, which no copy can reproduce.

At the end pytest prints ``fxmesh compile-mode: N optimizer steps compiled and
checked, M failed``.  Without the flag the plugin only adds its options.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest

from fxmesh.numerics import rel_error

if TYPE_CHECKING:
    import torch

__all__ = ["CompileMode", "pytest_addoption", "pytest_configure"]

log = logging.getLogger(__name__)

# Keyed by name: importing the plugin (every pytest run) must not import torch.
_LOW_PRECISION_ULP = {"torch.bfloat16": 2**-7, "torch.float16": 2**-10}
_OPTIMIZER_OWN_GRAPH_BREAK = "User-inserted graph break"
_GENERATOR_FRAME = "Attempt to trace generator"
_MAX_LISTED_PROBLEMS = 10


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fxmesh")
    group.addoption(
        "--fxmesh-compile",
        action="store_true",
        help='run every Optimizer.step() through torch.compile(backend="fxmesh") and check it against eager',
    )
    group.addoption(
        "--fxmesh-rtol",
        type=float,
        default=1e-5,
        metavar="RTOL",
        help="largest max|compiled - eager| / max|eager| per tensor; bf16/fp16 allow one ulp (default: 1e-5)",
    )
    group.addoption(
        "--fxmesh-max-recompiles",
        type=int,
        default=1,
        metavar="N",
        help="how many of an optimizer's steps after its first may compile new graphs; 1 allows a first step "
        "that creates state, as SGD's momentum buffers (default: 1)",
    )
    group.addoption(
        "--fxmesh-fused-kernels",
        choices=("inductor", "aten"),
        default="inductor",
        help="compile with fxmesh.backend(fused_kernels=...): fused Adam lowered to generated kernels (default), "
        "or aten's kernel kept per mesh on the local shards",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("fxmesh_compile"):
        mode = CompileMode(
            config.getoption("fxmesh_rtol"),
            config.getoption("fxmesh_max_recompiles"),
            config.getoption("fxmesh_fused_kernels"),
        )
        config.pluginmanager.register(mode, "fxmesh-compile-mode")


class _Compiled:
    """One optimizer's compiled step and what it has compiled so far."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.steps = 0
        self.recompiles = 0


class CompileMode:
    """The hooks registered by ``--fxmesh-compile``: intercept, compile and check each step."""

    def __init__(self, rtol: float, max_recompiles: int, fused_kernels: str = "inductor") -> None:
        self.rtol = rtol
        self.max_recompiles = max_recompiles
        self.fused_kernels = fused_kernels
        self.checked = 0
        self.failed = 0
        # True while a step is being checked: the shadow's and the compiled step's
        # own calls to step() (super().step() in a subclass) run as they are.
        self._busy = False
        self._compiled: weakref.WeakKeyDictionary[Any, _Compiled] = weakref.WeakKeyDictionary()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        import torch

        # Dynamo keeps every compiled step of a code object until reset, and torch.optim's step functions
        # are shared by every optimizer of a class: past its recompile limit (8) Dynamo would run them
        # eagerly for the rest of the session, unchecked.  Each test's optimizers compile afresh.
        torch._dynamo.reset()
        with self._intercepting():
            return (yield)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.write_line(
            f"fxmesh compile-mode: {self.checked} optimizer steps compiled and checked, {self.failed} failed"
        )

    @contextlib.contextmanager
    def _intercepting(self) -> Iterator[None]:
        """Wraps ``step`` of every optimizer class for the duration of one test function."""
        from torch.optim import Optimizer

        with contextlib.ExitStack() as stack:

            def wrap(cls: type) -> None:
                step = vars(cls).get("step")
                # Only steps that torch.optim has already wrapped in its hooks: then
                # Optimizer._patch_step_function leaves ours alone (it copies `hooked`).
                if getattr(step, "hooked", False) and not getattr(step, "_fxmesh_intercepted", False):
                    stack.enter_context(mock.patch.object(cls, "step", self._intercept(step)))

            patch_step_function = Optimizer._patch_step_function

            def patch_step_function_and_wrap(opt: Optimizer) -> None:
                patch_step_function(opt)
                wrap(next(cls for cls in type(opt).__mro__ if "step" in vars(cls)))

            # Classes defined or first instantiated during the test get hooked in __init__.
            stack.enter_context(mock.patch.object(Optimizer, "_patch_step_function", patch_step_function_and_wrap))
            for cls in _subclasses(Optimizer):
                wrap(cls)
            stack.callback(self._compiled.clear)
            yield

    def _intercept(self, step: Callable[..., Any]) -> Callable[..., Any]:
        import torch

        @functools.wraps(step)
        def intercepted(opt: Any, *args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            closure = args[0] if args else kwargs.get("closure")
            # is_compiling first: a step that Dynamo traces (the test's own torch.compile)
            # must not read, and so guard on, self._busy.
            if torch.compiler.is_compiling() or self._busy or closure is not None:
                return step(opt, *args, **kwargs)
            return self._checked_step(opt, step, args, kwargs)

        intercepted._fxmesh_intercepted = True
        return intercepted

    def _checked_step(self, opt: Any, step: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        __tracebackhide__ = True
        import torch

        self._busy = True
        try:
            shadow = _eager_shadow(opt, step, args, kwargs)
            if shadow is None:
                return step(opt, *args, **kwargs)
            compiled = self._compiled.get(opt)
            if compiled is None:
                import fxmesh

                backend = "fxmesh" if self.fused_kernels == "inductor" else fxmesh.backend(fused_kernels="aten")
                compiled = self._compiled[opt] = _Compiled(torch.compile(step, backend=backend))
            compiled.steps += 1
            self.checked += 1
            before = _DynamoCounts()
            error = None
            try:
                out = compiled.fn(opt, *args, **kwargs)
            except Exception as e:
                error = e
            if error is not None:
                # Outside the except block, so that pytest does not print Dynamo's traceback as context.
                self._fail(opt, compiled, [f"the compiled step raised {type(error).__name__}: {error}"])
            after = _DynamoCounts()
            problems = after.problems_since(before)
            if compiled.steps > 1 and after.graphs > before.graphs:
                compiled.recompiles += 1
            if compiled.recompiles > self.max_recompiles:
                problems.append(
                    f"compiled again in {compiled.recompiles} steps after the first > --fxmesh-max-recompiles="
                    f"{self.max_recompiles} (TORCH_LOGS=recompiles says why)"
                )
            problems += _mismatches(opt, shadow, self.rtol)
            if problems:
                self._fail(opt, compiled, problems)
            return out
        finally:
            self._busy = False

    def _fail(self, opt: Any, compiled: _Compiled, problems: list[str]) -> None:
        __tracebackhide__ = True
        self.failed += 1
        listed = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(listed):
            listed.append(f"... and {len(problems) - len(listed)} more")
        lines = "".join("\n  " + problem.replace("\n", "\n    ") for problem in listed)
        pytest.fail(f"fxmesh compile-mode: {type(opt).__qualname__}, compiled step {compiled.steps}:{lines}")


class _DynamoCounts:
    """Dynamo's counters that say how a call compiled; they are global, so compare two snapshots."""

    def __init__(self) -> None:
        from torch._dynamo.utils import counters

        self.graphs = counters["fxmesh"]["graphs"]
        self.graph_breaks = counters["graph_break"].copy()
        self.unimplemented = counters["unimplemented"].copy()
        self.skipped_frames = counters["frames"]["total"] - counters["frames"]["ok"]

    def problems_since(self, before: _DynamoCounts) -> list[str]:
        problems = [
            f"graph break inside the step: {reason}"
            for reason in self.graph_breaks - before.graph_breaks
            if _OPTIMIZER_OWN_GRAPH_BREAK not in reason
        ]
        # A frame Dynamo gives up on runs eagerly without any graph break being recorded.  Generator
        # frames are never compiled; they run eagerly when their caller does, which has its own reason.
        if self.skipped_frames > before.skipped_frames:
            problems += [
                f"Dynamo ran part of the step eagerly: {reason}"
                for reason in self.unimplemented - before.unimplemented
                if _GENERATOR_FRAME not in reason
            ]
        return problems


def _subclasses(cls: type) -> list[type]:
    found: dict[type, None] = {}
    todo = [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found[sub] = None
                todo.append(sub)
    return list(found)


def _eager_shadow(opt: Any, step: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """A copy of ``opt`` stepped eagerly: with the parameters' layout, else on their local shards."""
    bare_step = step.__wrapped__  # the class's step inside torch.optim's hook wrapper
    for as_local in (False, True):
        shadow = _shadow_copy(opt, as_local)
        try:
            bare_step(shadow, *args, **kwargs)
        except Exception as e:
            log.debug("fxmesh compile-mode: eager %s step on copies (local=%s) failed: %s", type(opt), as_local, e)
            continue
        return shadow
    return None


def _shadow_copy(opt: Any, as_local: bool) -> Any:
    """``opt`` over detached copies of its parameters, gradients, state and tensor hyperparameters.

    The other attributes (GradScaler's ``grad_scale``/``found_inf``, say) are shared; the step hooks are not.
    """
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only

    def copy(t: torch.Tensor) -> torch.Tensor:
        if as_local and isinstance(t, DTensor):
            t = t.to_local()
        return t.detach().clone()

    copies: dict[int, torch.nn.Parameter] = {}
    groups = []
    for group in opt.param_groups:
        params = []
        for p in group["params"]:
            c = torch.nn.Parameter(copy(p), requires_grad=p.requires_grad)
            c.grad = None if p.grad is None else _laid_out_like(copy(p.grad), c)
            copies[id(p)] = c
            params.append(c)
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**tree_map_only(torch.Tensor, copy, hyper), "params": params})
    state = defaultdict(
        dict, {copies[id(p)]: tree_map_only(torch.Tensor, copy, s) for p, s in opt.state.items() if id(p) in copies}
    )
    shadow = object.__new__(type(opt))
    shadow.__dict__.update(opt.__dict__)
    shadow.__dict__.update(
        state=state,
        param_groups=groups,
        _optimizer_step_pre_hooks=OrderedDict(),
        _optimizer_step_post_hooks=OrderedDict(),
    )
    return shadow


def _laid_out_like(grad: Any, param: Any) -> Any:
    """``grad``, laid out like ``param``: aten's CPU fused optimizers read a gradient as if it were (torch 2.11-2.14).

    A gradient transposed against its parameter would make the eager shadow wrong, not the compiled step.
    """
    import torch

    from fxmesh.meshes import local_tensor

    if local_tensor(grad).stride() == local_tensor(param).stride():
        return grad
    return torch.empty_like(param).copy_(grad)


def _mismatches(opt: Any, shadow: Any, rtol: float) -> list[str]:
    """Every parameter and state tensor of ``opt`` that differs from the shadow's."""
    import torch

    problems = []
    params = [p for group in opt.param_groups for p in group["params"]]
    refs = [p for group in shadow.param_groups for p in group["params"]]
    for i, (p, ref) in enumerate(zip(params, refs)):
        name = f"param {i} ({_describe(p)})"
        pairs = [("", p, ref)]
        state, ref_state = opt.state.get(p, {}), shadow.state.get(ref, {})
        if state.keys() != ref_state.keys():
            problems.append(f"{name}: state keys {sorted(state)} != eager's {sorted(ref_state)}")
        else:
            pairs += [(f" state {k!r}", v, ref_state[k]) for k, v in state.items() if isinstance(v, torch.Tensor)]
        for what, actual, expected in pairs:
            tol = max(rtol, _LOW_PRECISION_ULP.get(str(actual.dtype), 0.0))
            err = rel_error(actual, expected)
            if not err <= tol:  # NaN included
                problems.append(f"{name}{what}: relative error {err:.3e} > {tol:.1e} against eager")
    return problems


def _describe(p: torch.Tensor) -> str:
    from torch.distributed.tensor import DTensor

    dtype = str(p.dtype).removeprefix("torch.")
    if isinstance(p, DTensor):
        return f"DTensor {tuple(p.shape)} {dtype}, {p.placements} on mesh {p.device_mesh.mesh_dim_names}"
    return f"{tuple(p.shape)} {dtype}"
