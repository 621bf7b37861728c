"""The opt-in guard filter that drops Dynamo's DTensor spec guards."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.distributed.tensor._dtensor_spec import DTensorSpec

import fxmesh
from tests.helpers import assert_same_state, clone_params, dtensor_params, set_grads


@pytest.mark.parametrize("skip", [False, True], ids=["default-guards", "skip-spec-guards"])
def test_skip_guard_on_dtensor_specs(meshes, skip):
    """With the filter no DTensor spec is checked on later calls; the step still matches eager and compiles once."""
    checks = []
    check_equals = DTensorSpec._check_equals

    def counting(self, other, skip_shapes=False):
        checks.append(skip_shapes)  # the guard compares with skip_shapes=True (torch 2.11-2.13)
        return check_equals(self, other, skip_shapes)

    params = dtensor_params(meshes)
    eager_params = clone_params(params)
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-2), fused=True)
    eager_opt = torch.optim.AdamW(eager_params, lr=torch.tensor(1e-2), fused=True)
    options = {"guard_filter_fn": fxmesh.skip_guard_on_dtensor_specs_unsafe} if skip else {}
    with mock.patch.object(DTensorSpec, "_check_equals", counting):
        step = torch.compile(opt.step, backend="fxmesh", options=options)
        for s in range(3):
            set_grads([params, eager_params], s)
            checks.clear()
            step()
            eager_opt.step()
            assert_same_state(opt, eager_opt)
    assert (checks.count(True) == 0) == skip, f"{checks.count(True)} DTensor spec guard checks on the last call"
    assert torch._dynamo.utils.counters["fxmesh"]["graphs"] == 1
