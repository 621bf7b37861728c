"""One optimizer step over parameters on several meshes: fxmesh against what users run today.

Every variant runs in this one process, on the same workload, one after another (each
variant's parameters and states are freed before the next is built), or with --rounds R all
resident, their timed steps split into R rounds whose order alternates.  Meshes come from a
single-process fake process group: the process stands for one rank of a large job, and its
tensors are that rank's local shards.

Variants:
  eager_fused        upstream eager fused optimizer over the DTensors (what torchtitan runs)
  eager_foreach      upstream eager foreach over the DTensors
  per_mesh_eager     one eager fused optimizer per mesh
  eager_fused_plain  eager fused over plain tensors of the same local shapes (no DTensor)
  torch_compile      upstream torch.compile(opt.step) of the fused optimizer, default backend
  torch_compile_foreach  the same with foreach=True (the path upstream compiles)
  torch_compile_foreach_plain  upstream compiled foreach over plain tensors (compile-time reference)
  fxmesh             torch.compile(opt.step, backend="fxmesh") (on CUDA with combo kernels)
  fxmesh_whole       fxmesh.backend(pieces=False): the step compiled as one graph, not in pieces
  fxmesh_foreach     torch.compile of the foreach optimizer's step with backend="fxmesh" (torch.optim's
                     default on CUDA; fxmesh writes its foreach calls per entry and compiles it in pieces)
  fxmesh_foreach_whole  the same with fxmesh.backend(pieces=False): upstream's foreach graph compiled whole
  fxmesh_no_combo    fxmesh.backend(combo_kernels=False) (GPU: a launch per parameter)
  fxmesh_cudagraphs  fxmesh.backend(cudagraphs=True) (GPU)
  fxmesh_aten        fxmesh.backend(fused_kernels="aten"): aten's fused kernel on each mesh's local
                     shards, called in place from the compiled step
  fxmesh_aten_cudagraphs  the same with cudagraphs=True (GPU)
  fxmesh_cpp_wrapper fxmesh with Inductor's cpp_wrapper: kernels launched from C++ with raw pointers
                     (Inductor's static launcher, by pytorch main's source, calls data_ptr() and
                     the driver's cuPointerGetAttribute for every tensor argument of every launch)
  fxmesh_skip_spec_guards  fxmesh with fxmesh.skip_guard_on_dtensor_specs_unsafe as guard_filter_fn
  eager_clip         fxmesh.clip_grad_norm_ then the eager fused step (torch's clip_grad_norm_ fails
                     across meshes; this is what torchtitan's per-mesh clipping amounts to)
  fxmesh_clip        torch.nn.utils.clip_grad_norm_ + opt.step() compiled with fxmesh as one graph
  fxmesh_clip_whole  the same with fxmesh.backend(pieces=False)
  eager_clip_checked   eager_clip with error_if_nonfinite=True (reads the norm on the host: a sync)
  fxmesh_clip_checked  fxmesh_clip with error_if_nonfinite=True: one Dynamo graph, compiled in two
                     parts around the check, which runs on the host in between (fxmesh.checks)

Workloads (--workload): moe-shard, one rank's shard of a MoE model (200 tensors of 1024x1280,
262M fp32 params, dense weights on `dp` and experts on `ep`; --scale scales the rows, 0.01 on
the CPU); moe-shard-bf16, the same with bf16 parameters and gradients, and bf16 states as
torch.optim creates them (eager fused Adam refuses float32 states beside bf16 parameters:
"expected scalar type BFloat16 but found Float"); overhead, 1000 tensors of 64x64 on `dp`,
`ep` and `tp`, where per-tensor dispatch, not bytes, bounds the step.

Columns: median ms per step and its spread (interquartile range), percent of the
memory-bandwidth floor (the bytes one step must move, e.g. 28 B/param for fp32 AdamW, over a
device-to-device copy bandwidth measured in the same run), speedup over eager_fused (with
--rounds, the median of the rounds' ratios of medians), compile seconds (no compiled-graph
cache: each variant compiles its graphs afresh, though C++/Triton kernels an earlier variant
built are reused; with --rounds, the earlier variants stay resident meanwhile), recompiles
after the first compiled call, peak memory increase over the parameters, grads and states
(CUDA), kernels launched per step and their summed time with its percent of the floor (CUDA,
one profiled step: the wall-clock minus this is where the host kept the GPU waiting), and the
relative error of the parameters after the run against eager_fused's (eager_clip's for the
other clip variants), max |a - e| / max |e| per tensor: every variant takes the same steps with the
same gradients.

Examples:
  python bench/optim_step.py --workload moe-shard --scale 0.01      # CPU, 2.6M params
  python bench/optim_step.py --device cuda --workload moe-shard --json out.json
  python bench/optim_step.py --workload overhead --variants eager_fused,fxmesh
  python bench/optim_step.py --workload overhead --variants eager_fused,fxmesh --steps 200 --rounds 10
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable

VARIANTS = (
    "eager_fused",
    "eager_foreach",
    "per_mesh_eager",
    "eager_fused_plain",
    "torch_compile",
    "torch_compile_foreach",
    "torch_compile_foreach_plain",
    "fxmesh",
    "fxmesh_whole",
    "fxmesh_foreach",
    "fxmesh_foreach_whole",
    "fxmesh_no_combo",
    "fxmesh_cudagraphs",
    "fxmesh_aten",
    "fxmesh_aten_cudagraphs",
    "fxmesh_cpp_wrapper",
    "fxmesh_skip_spec_guards",
    "eager_clip",
    "fxmesh_clip",
    "fxmesh_clip_whole",
    "eager_clip_checked",
    "fxmesh_clip_checked",
)
CLIP_VARIANTS = ("eager_clip", "fxmesh_clip", "fxmesh_clip_whole", "eager_clip_checked", "fxmesh_clip_checked")

# fxmesh.backend options of the fxmesh variants that differ from the default backend by options.
VARIANT_BACKEND = {
    "fxmesh_whole": {"pieces": False},
    "fxmesh_no_combo": {"combo_kernels": False},
    "fxmesh_cudagraphs": {"cudagraphs": True},
    "fxmesh_aten": {"fused_kernels": "aten"},
    "fxmesh_aten_cudagraphs": {"fused_kernels": "aten", "cudagraphs": True},
    "fxmesh_cpp_wrapper": {"inductor_config": {"cpp_wrapper": True}},
}
# fxmesh.backend options of the variants that compile the foreach optimizer's step.
FOREACH_BACKEND = {"fxmesh_foreach": {}, "fxmesh_foreach_whole": {"pieces": False}}
GPU_ONLY = ("fxmesh_no_combo", "fxmesh_cudagraphs", "fxmesh_aten_cudagraphs")


@dataclasses.dataclass
class Workload:
    name: str
    shapes: list[tuple[int, ...]]  # local shard shapes
    meshes: list[str]  # mesh name of each tensor
    dtype: str

    @property
    def numel(self) -> int:
        n = 0
        for shape in self.shapes:
            size = 1
            for d in shape:
                size *= d
            n += size
        return n


def make_workload(name: str, scale: float, tensors: int | None, shape: tuple[int, ...] | None) -> Workload:
    """The local shards of one rank.

    See the module docstring; ``tensors`` and ``shape`` override the count and the local shape.
    """
    if name.startswith("moe-shard"):
        n = tensors or 200
        rows = max(1, round(1024 * scale))
        shapes = [shape or (rows, 1280)] * n
        meshes = ["dp" if i % 2 == 0 else "ep" for i in range(n)]
        return Workload(name, shapes, meshes, "bfloat16" if name.endswith("bf16") else "float32")
    if name == "overhead":
        n = tensors or 1000
        return Workload(name, [shape or (64, 64)] * n, [("dp", "ep", "tp")[i % 3] for i in range(n)], "float32")
    raise ValueError(f"unknown workload {name!r}")


@dataclasses.dataclass
class Row:
    variant: str
    median_ms: float | None = None
    iqr_ms: float | None = None
    floor_pct: float | None = None
    speedup: float | None = None
    compile_s: float | None = None
    recompiles: int | None = None
    peak_mem_mb: float | None = None
    kernels: int | None = None
    gpu_ms: float | None = None
    gpu_floor_pct: float | None = None
    rel_err: float | None = None
    note: str = ""
    round_medians_ms: list[float] | None = None  # with --rounds: the median of each round


class Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def times(self, fn: Callable[[], object], steps: int) -> list[float]:
        """Milliseconds of each of ``steps`` calls of ``fn`` (CUDA events on the GPU)."""
        import torch

        times = []
        for _ in range(steps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    def measure(self, fn: Callable[[], object], steps: int, warmup: int) -> tuple[float, float]:
        """Median and interquartile range of ``steps`` calls after ``warmup`` untimed ones."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = self.times(fn, steps)
        q = statistics.quantiles(times, n=4)
        return statistics.median(times), q[2] - q[0]


def _gist(message: str, width: int = 110) -> str:
    """The telling line of a long error or graph-break message: the first that names a mesh, else the first."""
    mesh = re.search(r"[A-Z][^\"\n(:]*\bmesh(?:es)?\b[^\"\n:]*", message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return (mesh.group(0) if mesh else lines[0] if lines else "")[:width]


def copy_bandwidth(device: str, timer: Timer) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    import torch

    n = (1 << 28) if device == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms, _ = timer.measure(lambda: dst.copy_(src), steps=20, warmup=3)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def device_kernels(events) -> list:
    """The kernels (and copies) among a profile's events on the GPU.

    With CPU activity recorded, each ``record_function`` range (the schedule's ``ProfilerStep*``)
    also shows on the GPU as a user annotation spanning its kernels and the idle time between
    them; GPU run 5's kernel counts and times over-counted by it.
    """
    import torch

    return [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not e.name.startswith("ProfilerStep")
    ]


def step_bytes(workload: Workload, optimizer: str, clip: bool = False) -> int:
    """Bytes one step must move: each tensor read once and each result written once."""
    import torch

    item = torch.empty((), dtype=getattr(torch, workload.dtype)).element_size()
    # AdamW: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq.
    tensors = {"adamw": 7, "adam": 7}[optimizer]
    # Clipping: read the grads once more for the norm, write them scaled.
    tensors += 2 if clip else 0
    return tensors * item * workload.numel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="moe-shard", choices=["moe-shard", "moe-shard-bf16", "overhead"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--scale", type=float, default=None, help="moe-shard size factor (default 1 on cuda, 0.01 on cpu)"
    )
    parser.add_argument("--tensors", type=int, default=None, help="override the workload's tensor count")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--shape", type=int, nargs="+", default=None, help="override the local shard shape")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"])
    parser.add_argument(
        "--grad-buffers",
        type=int,
        default=0,
        metavar="K",
        help="gradients as views of one buffer per K parameters, as FSDP2's reduce-scatter leaves them "
        "(Dynamo left to itself traces such gradients with symbolic sizes, as under upstream's "
        "torch_compile variants; fxmesh has them traced static); 0: each owns its storage",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="split each variant's timed steps into this many rounds, every variant resident and the "
        "order reversed each round; x eager_fused is then the median of the rounds' ratios (a noisy "
        "machine's drift cancels). 1: one variant after another, each freed before the next is built",
    )
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--plot", help="bar chart PNG of median ms (needs matplotlib)")
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table of one step of each variant"
    )
    parser.add_argument(
        "--trace-dir",
        help="with --profile, also write each profiled step as DIR/VARIANT.json (Chrome trace, with Python frames)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= args.steps:
        parser.error(f"--rounds must be from 1 to --steps ({args.steps}), not {args.rounds}")

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    scale = args.scale if args.scale is not None else (1.0 if args.device == "cuda" else 0.01)

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fxmesh-bench-"))
    import torch
    import torch.distributed as dist
    from tabulate import tabulate
    from torch._dynamo.utils import counters
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import fxmesh
    from fxmesh.numerics import rel_error

    # Every variant compiles its graphs from scratch: fxmesh_skip_spec_guards has fxmesh's graph,
    # which a per-process graph cache would hand it in seconds.
    for config, key in ((torch._inductor.config, "fx_graph_cache"), (torch._functorch.config, "enable_autograd_cache")):
        if hasattr(config, key):
            setattr(config, key, False)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    dev = args.device
    # name: (mesh, placements, how many shards each local dim is of the global one)
    meshes = {
        "dp": (init_device_mesh(dev, (8,), mesh_dim_names=("dp",)), [Shard(0)], (8, 1)),
        "ep": (init_device_mesh(dev, (2, 4), mesh_dim_names=("dp_mod_ep", "ep")), [Replicate(), Shard(0)], (4, 1)),
        "tp": (init_device_mesh(dev, (4, 2), mesh_dim_names=("dp_shard", "tp")), [Shard(0), Shard(1)], (4, 2)),
    }
    workload = make_workload(args.workload, scale, args.tensors, tuple(args.shape) if args.shape else None)
    dtype = getattr(torch, workload.dtype)
    timer = Timer(dev)
    bandwidth = copy_bandwidth(dev, timer)
    floor_ms = step_bytes(workload, args.optimizer) / bandwidth * 1e3
    clip_floor_ms = step_bytes(workload, args.optimizer, clip=True) / bandwidth * 1e3
    opt_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[args.optimizer]

    def params(kind: str) -> list[torch.nn.Parameter]:
        gen = torch.Generator(device=dev).manual_seed(0)
        out = []
        per_buffer = args.grad_buffers
        for i, (shape, mesh_name) in enumerate(zip(workload.shapes, workload.meshes)):
            local = torch.randn(shape, device=dev, generator=gen).to(dtype)
            grad = torch.randn(shape, device=dev, generator=gen).to(dtype) * 1e-2
            if per_buffer:
                if i % per_buffer == 0:
                    shapes = workload.shapes[i : i + per_buffer]
                    buffer, offset = torch.empty(sum(map(math.prod, shapes)), device=dev, dtype=dtype), 0
                grad = buffer[offset : offset + grad.numel()].view(shape).copy_(grad)
                offset += grad.numel()
            if kind == "plain":
                p = torch.nn.Parameter(local)
                p.grad = grad
            else:
                mesh, placements, shards = meshes[mesh_name]
                glob = tuple(d * k for d, k in zip(shape, shards))
                stride = torch.empty(glob, device="meta").stride()
                p = torch.nn.Parameter(DTensor.from_local(local, mesh, placements, shape=glob, stride=stride))
                # detach(): a grad whose local tensor is a view (as from_local makes it) gets
                # symbolic sizes from Dynamo under upstream's torch.compile (fxmesh.capture avoids
                # it).  Gradients of plain autograd are not views; FSDP2's are (--grad-buffers).
                grad = DTensor.from_local(grad, mesh, placements, shape=glob, stride=stride)
                p.grad = grad if per_buffer else grad.detach()
            out.append(p)
        return out

    def optimizer(ps, **kw):
        return opt_cls(ps, lr=1e-3, weight_decay=0.01, **kw)

    def build(variant: str) -> tuple[Callable[[], object], bool, list[torch.nn.Parameter]]:
        """The step function of ``variant``, whether it is compiled, and the parameters it updates."""
        ps = params("plain" if variant.endswith("_plain") else "dtensor")
        if variant == "eager_fused" or variant == "eager_fused_plain":
            return optimizer(ps, fused=True).step, False, ps
        if variant == "eager_foreach":
            return optimizer(ps, foreach=True).step, False, ps
        if variant == "per_mesh_eager":
            groups: dict[object, list] = {}
            for p in ps:
                groups.setdefault(p.device_mesh, []).append(p)
            opts = [optimizer(g, fused=True) for g in groups.values()]

            def step():
                for o in opts:
                    o.step()

            return step, False, ps
        if variant == "torch_compile":
            return torch.compile(optimizer(ps, fused=True).step), True, ps
        if variant in ("torch_compile_foreach", "torch_compile_foreach_plain"):
            return torch.compile(optimizer(ps, foreach=True).step), True, ps
        if variant == "fxmesh":
            return torch.compile(optimizer(ps, fused=True).step, backend="fxmesh"), True, ps
        if variant in FOREACH_BACKEND:
            backend = fxmesh.backend(**FOREACH_BACKEND[variant])
            return torch.compile(optimizer(ps, foreach=True).step, backend=backend), True, ps
        if variant == "fxmesh_skip_spec_guards":
            options = {"guard_filter_fn": fxmesh.skip_guard_on_dtensor_specs_unsafe}
            return torch.compile(optimizer(ps, fused=True).step, backend="fxmesh", options=options), True, ps
        if variant in CLIP_VARIANTS:
            opt = optimizer(ps, fused=True)
            checked = variant.endswith("_checked")
            if variant.startswith("eager_clip"):

                def clip_and_step():
                    fxmesh.clip_grad_norm_(ps, 1.0, error_if_nonfinite=checked)
                    opt.step()

                return clip_and_step, False, ps

            @torch.compile(backend=fxmesh.backend(pieces=variant != "fxmesh_clip_whole"))
            def compiled_clip_and_step():
                torch.nn.utils.clip_grad_norm_(ps, 1.0, error_if_nonfinite=checked)
                opt.step()

            return compiled_clip_and_step, True, ps
        if variant in VARIANT_BACKEND:
            if variant in GPU_ONLY and dev != "cuda":
                raise RuntimeError("GPU only")
            backend = fxmesh.backend(**VARIANT_BACKEND[variant])
            return torch.compile(optimizer(ps, fused=True).step, backend=backend), True, ps
        raise AssertionError(variant)

    def profile_step(variant: str, step) -> tuple[int | None, float | None]:
        """Kernels one step launches and their summed ms (CUDA); with --profile, also prints where the time goes.

        Runs two steps and records the second: a profiler's first CUDA activity costs the host
        ~1.7 ms ("Activity Buffer Request"), which the first step absorbs.  Every variant takes both.
        """
        if dev != "cuda" and not args.profile:
            return None, None
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] if args.profile else []
        if dev == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with_stack = bool(args.profile and args.trace_dir)
        with profile(
            activities=activities, schedule=schedule(wait=0, warmup=1, active=1), with_stack=with_stack
        ) as prof:
            step()
            timer.sync()
            prof.step()
            step()
            timer.sync()
        if args.profile:
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25 if with_stack else 15)
            print(f"[{variant}] one step under the profiler, by self CPU time:\n{table}", flush=True)
            if args.trace_dir:
                os.makedirs(args.trace_dir, exist_ok=True)
                prof.export_chrome_trace(os.path.join(args.trace_dir, f"{variant}.json"))
        if dev != "cuda":
            return None, None
        kernels = device_kernels(prof.events())
        return len(kernels), sum(e.time_range.elapsed_us() for e in kernels) / 1e3

    by_variant = {variant: Row(variant) for variant in variants}
    live: dict[str, tuple[Callable[[], object], list[torch.nn.Parameter]]] = {}  # built, not failed
    round_times: dict[str, list[list[float]]] = {variant: [] for variant in variants}
    final_params: dict[str, list[torch.Tensor]] = {}

    def failed(variant: str, e: Exception) -> None:  # a variant that fails is reported, not fatal
        by_variant[variant].note = f"fails: {type(e).__name__}: {_gist(str(e))}"
        by_variant[variant].median_ms = by_variant[variant].iqr_ms = None
        if os.environ.get("FXMESH_BENCH_TRACEBACK"):
            traceback.print_exc()
        live.pop(variant, None)

    def start(variant: str) -> None:
        """Build ``variant``, take its first step (a compiled variant's compile) and its warm-up steps."""
        row = by_variant[variant]
        if args.rounds == 1:
            torch._dynamo.reset()  # with rounds, the earlier variants' compiled steps must stay
        counters.clear()
        gc.collect()  # the previous variant's tensors and graphs; a full heap also slows compiles
        if dev == "cuda":
            torch.cuda.empty_cache()
        step, compiled, ps = build(variant)
        t0 = time.perf_counter()
        step()  # creates the states; compiles a compiled variant
        timer.sync()
        if compiled:
            row.compile_s = time.perf_counter() - t0
            row.recompiles = 0
            breaks = sum(counters["graph_break"].values())
            reasons = [r for r in counters["graph_break"] if "User-inserted graph break" not in r]
            if counters["inductor"].get("cudagraph_skips"):
                row.note = "CUDA graphs skipped (see TORCH_LOGS=perf_hints)"
            if reasons:
                row.note = f"{breaks} graph breaks, runs eager where it breaks: {_gist(reasons[0])}"
        for _ in range(args.warmup):
            step()
        timer.sync()
        live[variant] = step, ps

    def timed(variant: str, steps: int) -> None:
        """``steps`` timed steps of ``variant``: one round's share."""
        row, (step, _) = by_variant[variant], live[variant]
        graphs = counters["stats"]["unique_graphs"]
        if dev == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()  # the parameters, gradients and states
            torch.cuda.reset_peak_memory_stats()
        round_times[variant].append(timer.times(step, steps))
        if dev == "cuda":
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            row.peak_mem_mb = max(row.peak_mem_mb or 0.0, peak)
        if row.recompiles is not None:
            row.recompiles += counters["stats"]["unique_graphs"] - graphs

    def finish(variant: str) -> None:
        """Profile ``variant``'s step, then record its times and final parameters, and free it."""
        row, (step, ps) = by_variant[variant], live.pop(variant)
        times = [t for ts in round_times[variant] for t in ts]
        row.median_ms = statistics.median(times)
        row.round_medians_ms = [statistics.median(ts) for ts in round_times[variant]]
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        row.iqr_ms = q[2] - q[0]
        row.kernels, row.gpu_ms = profile_step(variant, step)
        variant_floor_ms = clip_floor_ms if variant in CLIP_VARIANTS else floor_ms
        row.floor_pct = 100 * variant_floor_ms / row.median_ms
        if row.gpu_ms:
            row.gpu_floor_pct = 100 * variant_floor_ms / row.gpu_ms
        # Every variant takes the same number of steps with the same gradients.
        final_params[variant] = [(p.to_local() if isinstance(p, DTensor) else p).detach().cpu() for p in ps]

    def report(variant: str) -> None:
        row = by_variant[variant]
        print(
            f"[{variant}] median {row.median_ms} ms (iqr {row.iqr_ms}), floor {row.floor_pct}%,"
            f" compile {row.compile_s} s, recompiles {row.recompiles}, kernels {row.kernels} ({row.gpu_ms} ms),"
            f" peak +{row.peak_mem_mb} MB {row.note}",
            flush=True,
        )

    def attempt(fn: Callable[..., None], variant: str, *extra: int) -> None:
        if fn is start or variant in live:  # a failed variant is left out from then on
            try:
                fn(variant, *extra)
            except Exception as e:
                failed(variant, e)

    # Each round's share of the timed steps, the first rounds taking the remainder.
    shares = [args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)]
    if args.rounds == 1:  # one variant at a time, each freed before the next is built
        for variant in variants:
            attempt(start, variant)
            attempt(timed, variant, shares[0])
            attempt(finish, variant)  # a failed or finished variant is no longer live: freed
            report(variant)
    else:  # every variant resident; rounds alternate the order, so a drift in the machine's speed hits all
        for variant in variants:
            attempt(start, variant)
            print(
                f"[{variant}] built: compile {by_variant[variant].compile_s} s {by_variant[variant].note}", flush=True
            )
        for r, share in enumerate(shares):
            for variant in variants if r % 2 == 0 else reversed(variants):
                attempt(timed, variant, share)
        for variant in variants:
            attempt(finish, variant)
            report(variant)
    rows = list(by_variant.values())
    for row in rows:
        reference = final_params.get("eager_clip" if row.variant in CLIP_VARIANTS else "eager_fused")
        if reference is not None and row.variant in final_params:
            errors = [rel_error(a, e) for a, e in zip(final_params[row.variant], reference)]
            row.rel_err = max(errors, key=lambda err: math.inf if math.isnan(err) else err)  # NaN wins

    def ratios(row: Row, reference: str) -> list[float]:
        """Per round: ``reference``'s median ms over ``row``'s, both timed in that round; [] if either failed."""
        ref = by_variant.get(reference)
        if ref is None or ref.median_ms is None or row.median_ms is None:
            return []
        return [a / b for a, b in zip(ref.round_medians_ms, row.round_medians_ms, strict=True)]

    def add_note(row: Row, text: str) -> None:
        row.note = text + (f"; {row.note}" if row.note else "")

    for row in rows:
        if rs := ratios(row, "eager_fused"):
            row.speedup = statistics.median(rs)
            if len(rs) > 1 and row.variant != "eager_fused":
                add_note(row, f"rounds: {min(rs):.2f}-{max(rs):.2f}x eager_fused")
        eager_clip = "eager_clip_checked" if row.variant.endswith("_checked") else "eager_clip"
        if row.variant in CLIP_VARIANTS and row.variant != eager_clip and (rs := ratios(row, eager_clip)):
            rounds = f" (rounds: {min(rs):.2f}-{max(rs):.2f}x)" if len(rs) > 1 else ""
            add_note(row, f"{statistics.median(rs):.2f}x {eager_clip}{rounds}")

    bandwidth_end = copy_bandwidth(dev, timer)  # the machine's speed may have drifted meanwhile
    if dev == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    header = (
        f"{args.optimizer} step, workload {workload.name}: {len(workload.shapes)} tensors, "
        f"{workload.numel / 1e6:.1f}M {workload.dtype} params on meshes {sorted(set(workload.meshes))}; "
        + (f"gradients as views of a buffer per {args.grad_buffers}; " if args.grad_buffers else "")
        + f"{machine}, torch {torch.__version__}, {datetime.date.today()}; "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s ({bandwidth_end / 1e9:.0f} at the end), "
        f"floor {floor_ms:.3f} ms ({clip_floor_ms:.3f} ms with clipping)"
        + (
            f"; {args.steps} timed steps per variant in {args.rounds} rounds of alternating order, "
            "x eager_fused the median of the rounds' ratios"
            if args.rounds > 1
            else ""
        )
    )

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    table = [
        [
            r.variant,
            fmt(r.median_ms, ".3f"),
            fmt(r.iqr_ms, ".3f"),
            fmt(r.floor_pct, ".0f"),
            fmt(r.speedup, ".2f"),
            fmt(r.compile_s, ".1f"),
            fmt(r.recompiles, "d"),
            fmt(r.peak_mem_mb, ".1f"),
            fmt(r.kernels, "d"),
            fmt(r.gpu_ms, ".3f"),
            fmt(r.gpu_floor_pct, ".0f"),
            fmt(r.rel_err, ".1e"),
            r.note,
        ]
        for r in rows
    ]
    print(header)
    print(
        tabulate(
            table,
            headers=[
                "variant",
                "median ms",
                "IQR ms",
                "% floor",
                "x eager_fused",
                "compile s",
                "recompiles",
                "peak +MB",
                "kernels",
                "GPU ms",
                "GPU % floor",
                "rel. err",
                "note",
            ],
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "header": header,
                    "machine": machine,
                    "torch": torch.__version__,
                    "workload": dataclasses.asdict(workload) | {"numel": workload.numel},
                    "grad_buffers": args.grad_buffers,
                    "bandwidth_bytes_per_s": bandwidth,
                    "bandwidth_end_bytes_per_s": bandwidth_end,
                    "rounds": args.rounds,
                    "floor_ms": floor_ms,
                    "clip_floor_ms": clip_floor_ms,
                    "rows": [dataclasses.asdict(r) for r in rows],
                },
                f,
                indent=1,
            )
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--plot: matplotlib is not installed; no chart written")
        else:
            done = [r for r in rows if r.median_ms]
            fig, ax = plt.subplots(figsize=(8, 3 + 0.3 * len(done)))
            ax.barh([r.variant for r in done], [r.median_ms for r in done])
            ax.axvline(floor_ms, color="k", linestyle="--", label="bandwidth floor")
            ax.set_xlabel("ms per step (median)")
            ax.set_title(header[:110], fontsize=8)
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
