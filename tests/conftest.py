"""Fixtures: a single-process fake process group of world size 8 and the three test meshes.

``dp`` (8,), ``ep`` (2, 4) named (dp_mod_ep, ep), ``tp`` (4, 2) named (dp_shard, tp),
on the CPU unless ``FXMESH_TEST_DEVICE`` names another device type (on CUDA, fxmesh's graphs get
Inductor's combo kernels by default).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from tests.helpers import DEVICE

WORLD_SIZE = 8


@pytest.fixture(scope="session")
def fake_world():
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD_SIZE)
    yield WORLD_SIZE
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def dp(fake_world):
    return init_device_mesh(DEVICE, (8,), mesh_dim_names=("dp",))


@pytest.fixture(scope="session")
def ep(fake_world):
    return init_device_mesh(DEVICE, (2, 4), mesh_dim_names=("dp_mod_ep", "ep"))


@pytest.fixture(scope="session")
def tp(fake_world):
    return init_device_mesh(DEVICE, (4, 2), mesh_dim_names=("dp_shard", "tp"))


@pytest.fixture(scope="session")
def meshes(dp, ep, tp):
    return {"dp": dp, "ep": ep, "tp": tp}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and reads only its own counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
