"""One AdamW step over DTensor parameters on two meshes: fxmesh against what users run today.

Prints, side by side: eager fused over the DTensors, eager fused over plain tensors of the
same local shapes, the fxmesh-compiled step, and (unless --skip-upstream) upstream
torch.compile of a foreach AdamW over the plain tensors.  Compile times are cold: Inductor's
caches point at a fresh directory.  Memory: the buffers the compiled step allocates, read
from Inductor's output code (parameters and states must be updated in place).

    python bench/step_cpu.py --tensors 200 --shape 64 64
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import time

import torch


def median_ms(fn, steps: int, warmup: int = 5) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=200, help="number of parameters (default 200)")
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 64], help="local shard shape")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--skip-upstream", action="store_true", help="skip upstream compiled foreach")
    args = parser.parse_args(argv)

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxmesh-bench-")
    import torch.distributed as dist
    from tabulate import tabulate
    from torch._inductor.utils import run_and_get_code
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import fxmesh  # noqa: F401

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    dp = init_device_mesh("cpu", (8,), mesh_dim_names=("dp",))
    ep = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp_mod_ep", "ep"))
    shape = tuple(args.shape)
    torch.manual_seed(0)
    local = [torch.randn(shape) for _ in range(args.tensors)]

    def dtensor(t, i):
        mesh, placements = (dp, [Shard(0)]) if i % 2 == 0 else (ep, [Replicate(), Shard(0)])
        global_shape = (t.shape[0] * (8 if i % 2 == 0 else 4), *t.shape[1:])
        return DTensor.from_local(t, mesh, placements, shape=global_shape, stride=torch.empty(global_shape).stride())

    def make(kind):
        params = [
            torch.nn.Parameter(dtensor(t.clone(), i) if kind == "dtensor" else t.clone()) for i, t in enumerate(local)
        ]
        for p in params:
            p.grad = torch.randn_like(p)
        return params

    rows = []
    numel = args.tensors * torch.Size(shape).numel()

    def record(name, step, compile_s=None, note=""):
        ms, iqr = median_ms(step, args.steps)
        rows.append([name, f"{ms:.3f}", f"{iqr:.3f}", "" if compile_s is None else f"{compile_s:.1f}", note])
        return ms

    eager_dt = torch.optim.AdamW(make("dtensor"), lr=1e-3, fused=True)
    base = record("eager fused, DTensor (2 meshes)", eager_dt.step)
    eager_plain = torch.optim.AdamW(make("plain"), lr=1e-3, fused=True)
    record("eager fused, plain tensors", eager_plain.step)

    fx_opt = torch.optim.AdamW(make("dtensor"), lr=1e-3, fused=True)
    fx_step = torch.compile(fx_opt.step, backend="fxmesh")
    t0 = time.perf_counter()
    _, code = run_and_get_code(fx_step)
    compile_s = time.perf_counter() - t0
    code = "\n".join(code)
    buffers = re.findall(r"empty_strided_cpu\(\((.*?)\)", code)
    kernels = code.count("async_compile.cpp_pybinding(")
    fx_ms = record(
        "fxmesh compiled, DTensor (2 meshes)",
        fx_step,
        compile_s,
        f"{len(buffers)} buffers allocated, {kernels} kernels, aten fused call: {'_fused_adam' in code}",
    )

    if not args.skip_upstream:
        up_opt = torch.optim.AdamW(make("plain"), lr=1e-3, foreach=True)
        up_step = torch.compile(up_opt.step)
        t0 = time.perf_counter()
        up_step()
        record("upstream compile foreach, plain tensors", up_step, time.perf_counter() - t0)

    print(
        f"AdamW step, {args.tensors} tensors of local shape {shape} ({numel / 1e6:.2f}M fp32 params), "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads"
    )
    print(tabulate(rows, headers=["variant", "median ms", "IQR ms", "compile s", "notes"]))
    print(f"fxmesh speedup over eager fused on DTensors: {base / fx_ms:.2f}x")
    if buffers:
        print("buffers allocated by the compiled step:", buffers[:5])
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
