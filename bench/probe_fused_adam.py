"""Which arithmetic does this torch's fused Adam(W) kernel use on a device?

fxmesh lowers fused Adam to pointwise math that must match aten's kernel for the
parameters' device.  This runs ``torch._fused_adamw_``/``torch._fused_adam_`` for a few
steps and prints, per state, the largest relative difference from two written-out models:

  host   float64 hyperparameters and bias corrections, exp_avg by lerp (aten's CPU kernel)
  float  float32 hyperparameters and bias corrections, exp_avg = b1 * m + (1 - b1) * g

    python bench/probe_fused_adam.py --device cuda
"""

from __future__ import annotations

import argparse
import struct

import torch


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def model(p, g, m, v, step, *, lr, beta1, beta2, wd, eps, adamw, host):
    if not host:
        lr, beta1, beta2, wd, eps = map(f32, (lr, beta1, beta2, wd, eps))
    if wd:
        if not adamw:
            g = g + p * wd
        elif host:
            p = p * (1 - lr * wd)
        else:
            p = p - f32(lr * wd) * p
    m = torch.lerp(m, g, 1 - beta1) if host else m * beta1 + f32(1 - beta1) * g
    v = v * beta2 + ((1 - beta2) if host else f32(1 - beta2)) * g * g
    dtype = torch.float64 if host else torch.float32
    s = torch.tensor(step, dtype=dtype)
    step_size = (lr / (1 - torch.pow(beta1, s))).float()
    bc2_sqrt = (1 - torch.pow(beta2, s)).sqrt().float()
    p = p - step_size * m / (v.sqrt() / bc2_sqrt + eps)
    return p, m, v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator(device=args.device).manual_seed(0)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, wd=0.1, eps=1e-8)
    print(f"torch {torch.__version__}, device {args.device}")
    for adamw in (True, False):
        p = torch.randn(4096, device=args.device, generator=gen)
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        step = torch.zeros((), device=args.device)
        models = {"host": (p.clone(), m.clone(), v.clone()), "float": (p.clone(), m.clone(), v.clone())}
        fused = torch._fused_adamw_ if adamw else torch._fused_adam_
        for s in range(1, args.steps + 1):
            g = torch.randn(p.shape, device=args.device, generator=gen)
            step += 1
            fused(
                [p],
                [g],
                [m],
                [v],
                [],
                [step],
                lr=hyper["lr"],
                beta1=hyper["beta1"],
                beta2=hyper["beta2"],
                weight_decay=hyper["wd"],
                eps=hyper["eps"],
                amsgrad=False,
                maximize=False,
            )
            for name, state in models.items():
                models[name] = model(*state[:1], g, *state[1:], s, adamw=adamw, host=name == "host", **hyper)
        for name, (mp, mm, mv) in models.items():
            errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in ((mp, p), (mm, m), (mv, v))]
            print(
                f"{'adamw' if adamw else 'adam ':5} model {name:5}: rel. diff param {errs[0]:.2e}, "
                f"exp_avg {errs[1]:.2e}, exp_avg_sq {errs[2]:.2e}"
            )


if __name__ == "__main__":
    main()
