"""A small local multi-process world, for the demo and the tests.

:func:`run` spawns ``world_size`` processes on this machine, joins them into
one process group (gloo by default) over 127.0.0.1 and returns what each
rank's function returned.  A rank that raises stops the world; its traceback is in the error.
The ranks meet through a file in a temporary directory, not a TCP port: worlds
started side by side (parallel test workers) cannot race for one port.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["WorldError", "run"]


class WorldError(RuntimeError):
    """A rank of a local world failed, died or timed out."""


def _rank_main(
    fn: Callable[..., Any], rank: int, world_size: int, rendezvous: str, backend: str, results: Any, args: tuple
) -> None:
    # Ranks share the machine's cores: one intra-op thread each, and Inductor
    # compiles in-process instead of starting a pool of workers per rank.
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1
    try:
        dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(
    fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout: float = 900.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local ranks; return each rank's result.

    The ranks join a ``backend`` process group (gloo by default; ``fn`` picks
    its own GPU for nccl).
    ``fn`` and its arguments and results must be picklable (``fn`` defined at
    module level).  Raises :class:`WorldError` if a rank raises, dies, or the
    world is not done after ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # Gloo connects the ranks through the interface its hostname resolves to;
    # pin it to loopback so the world needs no network.
    env = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", _loopback_interface())}
    with tempfile.TemporaryDirectory(prefix="fxmesh-world-") as tmp, _environ(env):
        rendezvous = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_rank_main, args=(fn, rank, world_size, rendezvous, backend, results, args), daemon=True)
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _gather(procs, results, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()


def _gather(procs: list[Any], results: Any, timeout: float) -> list[Any]:
    """Each rank's result, in rank order, once every rank has put one."""
    world_size = len(procs)
    done: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(done) < world_size:
        try:
            rank, ok, value = results.get(timeout=1.0)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in done]
            if dead:
                raise WorldError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
            if time.monotonic() > deadline:
                raise WorldError(f"the world of {world_size} ranks did not finish in {timeout:.0f} s") from None
            continue
        if not ok:
            raise WorldError(f"rank {rank} failed:\n{value}")
        done[rank] = value
    for p in procs:
        p.join()
    return [done[rank] for rank in range(world_size)]


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else (names[0] if names else "lo")


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
