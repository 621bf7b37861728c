"""Compile one fused AdamW step over DTensor parameters on three meshes and check it against eager.

Runs on one CPU process: a fake process group of world size 8 stands in for the job,
so each DTensor holds rank 0's shard.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore

import fxmesh  # noqa: F401  (registers backend="fxmesh"; the entry point does too)


def main() -> None:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    dp = init_device_mesh("cpu", (8,), mesh_dim_names=("dp",))
    ep = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp_mod_ep", "ep"))
    tp = init_device_mesh("cpu", (4, 2), mesh_dim_names=("dp_shard", "tp"))
    torch.manual_seed(0)
    layout = [
        (dp, (256, 64), [Shard(0)]),
        (ep, (8, 64, 32), [Shard(0), Shard(1)]),
        (tp, (96, 48), [Shard(0), Shard(1)]),
    ]
    # src_data_rank=None: each rank cuts its shard locally (a fake process group moves no data).
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(s), m, p, src_data_rank=None)) for m, s, p in layout]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-2), weight_decay=0.1, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=torch.tensor(1e-2), weight_decay=0.1, fused=True)
    step = torch.compile(opt.step, backend="fxmesh")
    worst = 0.0
    for i in range(5):
        for p, q in zip(params, ref):
            g = torch.randn_like(p.to_local())
            p.grad = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            q.grad = DTensor.from_local(g.clone(), q.device_mesh, q.placements, shape=q.shape, stride=q.stride())
        step()
        ref_opt.step()
        for p, q in zip(params, ref):
            a, b = p.to_local(), q.to_local()
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
        print(f"step {i}: max relative difference to eager fused AdamW {worst:.2e}")
    meshes = ", ".join(str(m.mesh_dim_names) for m in (dp, ep, tp))
    ok = worst <= 1e-5
    print(f"{'OK' if ok else 'MISMATCH'}: compiled fxmesh AdamW over meshes {meshes} matched eager (<= 1e-5)")
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
