"""The ``fxmesh`` command.

``fxmesh demo`` trains a small dp2ep mixture-of-experts on local processes,
with clipping and the optimizer step compiled by fxmesh, next to eager.
``fxmesh inspect TARGET`` compiles one optimizer step with the fxmesh backend
and reports the meshes, the optimizer nodes the passes saw, and what Inductor
made of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

from fxmesh.demo import OPTIMIZERS, DemoConfig, DemoResult, run_demo
from fxmesh.inspection import Report, TargetError, error_line, inspect_target

__all__ = ["build_parser", "main"]

DEMO_EPILOG = """\
The dense weights are sharded on a dp mesh over all ranks, the experts on an ep
mesh (dp_mod_ep, ep) carved from the same ranks (ep degree 2; 1 on a single
rank, whose two meshes both hold it); one optimizer holds both.
Prints a per-step table (loss eager, loss compiled, max parameter difference),
the meshes, and a verdict; exit code 0 when the compiled run matches eager
within 1e-5 and the run resumed from the halfway checkpoint continues exactly.

examples:
  fxmesh demo
  fxmesh demo --world-size 4 --steps 40 --optimizer sgd
  fxmesh demo --device cuda --world-size 8
  fxmesh demo --device cuda --world-size 1    # one GPU
"""

INSPECT_EPILOG = """\
TARGET returns an optimizer whose parameters have gradients, or a zero-argument
train step.  It runs in a single-process fake process group of --world-size
ranks (unless one exists), so meshes of any size can be inspected here; element
and byte counts are rank 0's shards.

examples:
  fxmesh inspect tests/inspect_targets.py:fused_adamw
  fxmesh inspect tests.inspect_targets:foreach_adam_step_with_graph_break --json
  fxmesh inspect mypkg/train.py:make_optimizer --world-size 16 --strict --dump /tmp/fxmesh-dump
  fxmesh inspect tests/inspect_targets.py:fused_adamw --fused-kernels aten

exit codes: 0 done; 1 --strict and the step is not fully compiled, or the step
failed to compile or run; 2 bad TARGET or usage.
"""


def _world_size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of ranks, at least 1, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxmesh", description="fxmesh: compile optimizer steps whose parameters span several DeviceMeshes."
    )
    # Options every subcommand takes.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="train a small dp2ep mixture-of-experts with fxmesh next to eager",
        description="Train a small mixture-of-experts laid out as dp2ep expert parallelism on local processes\n"
        "(gloo on 127.0.0.1; nccl with --device cuda), clipping and stepping compiled with\n"
        "backend='fxmesh', next to the same run in eager.",
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = DemoConfig()
    demo.add_argument(
        "--world-size", type=_world_size, default=defaults.world_size, metavar="N", help="processes (default: 2)"
    )
    demo.add_argument(
        "--steps", type=_world_size, default=defaults.steps, metavar="N", help="training steps (default: 30)"
    )
    demo.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=defaults.optimizer, help="(default: adamw)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device, help="(default: cpu)")
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="compile one optimizer step with fxmesh and report what it found and made",
        # Raw text (for the epilog's layout): the line breaks are written here.
        description="Compile TARGET's optimizer step with the fxmesh backend, run it once, and report\n"
        "the meshes, the optimizer nodes the passes saw, and the kernels, fallbacks, graph\n"
        "breaks and recompiles of the result.",
        epilog=INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("target", metavar="TARGET", help="path/to/file.py:function or package.module:function")
    inspect.add_argument(
        "--world-size", type=_world_size, default=8, metavar="N", help="ranks of the fake process group (default: 8)"
    )
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect.add_argument(
        "--dump",
        type=Path,
        metavar="DIR",
        help="write each graph before and after the passes, as compiled (over the local shards where it "
        "can be; one file per distinct piece, see fxmesh.pieces), and Inductor's output code, into DIR",
    )
    inspect.add_argument("--strict", action="store_true", help="exit 1, saying why, unless the step is fully compiled")
    inspect.add_argument(
        "--fused-kernels",
        choices=("inductor", "aten"),
        default="inductor",
        help="fxmesh.backend(fused_kernels=...): lower fused Adam to generated kernels (default), or keep aten's "
        "kernel per mesh on the local shards",
    )
    inspect.set_defaults(run=_inspect)
    return parser


def _fail(args: argparse.Namespace, e: BaseException, message: str, code: int) -> int:
    if args.verbose:
        traceback.print_exception(e)
    print(f"fxmesh {args.command}: error: {message}", file=sys.stderr)
    return code


def _inspect(args: argparse.Namespace) -> int:
    # As with ``python -m``: package.module targets are found from the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        report = inspect_target(
            args.target, world_size=args.world_size, dump_dir=args.dump, fused_kernels=args.fused_kernels
        )
    except TargetError as e:
        return _fail(args, e, str(e), 2)
    except Exception as e:
        # Dynamo wraps a backend's error; the wrapped one says what went wrong.
        cause = getattr(e, "inner_exception", None) or e
        return _fail(args, e, f"compiling or running the step of {args.target} failed: {error_line(cause)}", 1)
    print(json.dumps(report.to_json(), indent=2) if args.json else _format_report(report))
    problems = report.problems() if args.strict else []
    for problem in problems:
        print(f"fxmesh inspect: not fully compiled: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _demo(args: argparse.Namespace) -> int:
    config = DemoConfig(world_size=args.world_size, steps=args.steps, optimizer=args.optimizer, device=args.device)
    try:
        result = run_demo(config)
    except ValueError as e:
        return _fail(args, e, str(e), 2)
    print(_format_demo(result))
    return 0 if result.ok else 1


def _format_demo(result: DemoResult) -> str:
    c = result.config
    out = [
        f"\n{c.optimizer} over {len(result.meshes)} meshes, {c.world_size} ranks: eager "
        f"({result.eager_implementation}) next to clip_grad_norm_ + step compiled with backend='fxmesh' (fused)"
    ]
    rows = [
        (i, f"{r['loss_eager']:.6f}", f"{r['loss_compiled']:.6f}", f"{r['max_diff']:.1e}", f"{r['norm']:.4f}")
        for i, r in enumerate(result.rows, start=1)
    ]
    out.append(tabulate(rows, headers=("step", "loss eager", "loss compiled", "max param diff (rel)", "grad norm")))
    out.append("\nMeshes (one optimizer over all of them)")
    out.append(tabulate([list(m.values()) for m in result.meshes], headers=list(result.meshes[0])))
    out.append(
        f"fxmesh compiled {result.graphs} graph(s) with {result.graph_breaks} graph break(s) in "
        f"{result.compile_seconds:.1f} s; the fused step was split into {result.mesh_groups} per-mesh groups"
    )
    half = c.steps // 2
    same = sum(r["loss_compiled"] == r["loss_resumed"] for r in result.resumed)
    out.append(
        f"\nResumed from the step-{half} checkpoint: {same}/{len(result.resumed)} losses identical, "
        f"final parameters differ by {result.resumed_max_diff:.1e}"
    )
    problems = result.problems()
    if problems:
        out.append("\nMISMATCH: " + "; ".join(problems))
    else:
        out.append(
            f"\nOK: {c.steps} compiled steps matched eager (max relative difference {result.max_rel_diff:.1e} <= "
            f"{result.rtol:.0e}) and the resumed run continued exactly"
        )
    return "\n".join(out)


def _format_report(report: Report) -> str:
    graphs = f"{report.graphs} graph{'s' if report.graphs != 1 else ''}"
    out = [f"fxmesh inspect {report.target} (world of {report.world_size} ranks, {graphs})"]

    out.append("\nMeshes (elements and bytes: this rank's shards)")
    if report.meshes:
        rows = [
            (m.name, ", ".join(m.dim_names or ["-"]), "x".join(map(str, m.shape)), m.tensors, m.numel, m.bytes)
            for m in report.meshes
        ]
        out.append(tabulate(rows, headers=("mesh", "dims", "shape", "tensors", "elements", "bytes")))
    else:
        out.append("no DTensor found")

    out.append("\nOptimizer nodes")
    if report.nodes:
        rows = [
            (
                n.graph,
                n.name,
                n.target,
                n.tensors,
                "\n".join(n.meshes),
                "\n".join(f"{g.mesh}: {g.tensors}" for g in n.groups) or "-",
            )
            for n in report.nodes
        ]
        out.append(tabulate(rows, headers=("graph", "node", "op", "tensors", "meshes", "groups (mesh: tensors)")))
    else:
        out.append("none")

    if report.graph_breaks:
        out.append("\nGraph breaks")
        rows = [
            (b.count, b.location, b.reason.splitlines()[0] + (" (optimizer base class)" if b.optimizer_base else ""))
            for b in report.graph_breaks
        ]
        out.append(tabulate(rows, headers=("count", "where", "reason")))

    if report.extern_calls:
        out.append("\nExtern and fallback calls")
        out.append(tabulate(sorted(report.extern_calls.items()), headers=("call", "count")))

    expected = sum(b.count for b in report.graph_breaks if b.optimizer_base)
    breaks = sum(b.count for b in report.graph_breaks)
    out.append("\nResult")
    summary = [
        ("kernels", report.kernels),
        ("extern/fallback calls", report.fallbacks),
        ("graph breaks", f"{breaks} ({expected} from the optimizer base class)" if expected else breaks),
        ("recompiles", report.recompiles),
        ("graphs split at a host-side check", report.check_splits),
        ("graphs on local shards", f"{report.local_shard_graphs} of {report.compiled_graphs}"),
        ("graphs with symbolic sizes", f"{report.symbolic_graphs} of {report.compiled_graphs}"),
        ("graphs made static", f"{report.specialized_graphs} of {report.compiled_graphs}"),
        ("pieces (compiled)", f"{report.pieces} ({report.piece_compiles})"),
        ("compile seconds", f"{report.compile_seconds:.2f}"),
    ]
    out.append(tabulate(summary, tablefmt="plain"))
    problems = report.problems()
    out.append("\nfully compiled" if not problems else "\nNot fully compiled:")
    out += [f"  {p}" for p in problems]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxmesh`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("fxmesh").setLevel(logging.DEBUG)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
