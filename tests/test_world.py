"""fxmesh.world: a local gloo world, as the demo and the multi-rank tests run it."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist

from fxmesh import world


def _sum_of_ranks(rank: int, world_size: int, scale: int) -> tuple[int, float]:
    t = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(t)
    return rank, t.item()


def _second_rank_fails(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def test_ranks_join_one_group_and_return_in_rank_order():
    """Three ranks all-reduce over gloo; each returns its own rank and the sum, listed by rank."""
    assert world.run(_sum_of_ranks, 3, 10) == [(0, 60.0), (1, 60.0), (2, 60.0)]


def test_a_failing_rank_stops_the_world_with_its_traceback(tmp_path, monkeypatch):
    """A rank that raises: WorldError names the rank and carries its error; the rendezvous directory is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the world's rendezvous directory goes
    with pytest.raises(world.WorldError, match=r"(?s)rank 1 failed:.*ValueError: rank one is broken"):
        world.run(_second_rank_fails, 2)
    assert list(tmp_path.iterdir()) == []
