"""The foreach and for-loop implementations that already compile across meshes under backend="fxmesh".

fxmesh's passes leave these graphs alone (the math is DTensor ops Dynamo and AOT trace as for any
model); what is checked here is that the result equals eager on the local shards.  Adam and
Adagrad foreach still fail across meshes (see test_foreach_adam_fails_across_meshes).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import dtensor_params
from tests.test_adam import unexpected_graph_breaks
from tests.test_sgd import run_local_parity

CASES = {
    "sgd-foreach": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True)),
    "sgd-for-loop": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False)),
    "rmsprop-foreach": (torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True, foreach=True)),
    "rmsprop-for-loop": (torch.optim.RMSprop, dict(lr=0.01, foreach=False)),
    "adam-for-loop": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.01, foreach=False)),
    "adagrad-for-loop": (torch.optim.Adagrad, dict(lr=0.05, foreach=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager_on_local_shards(meshes, case):
    """Five steps with fresh grads over three meshes equal eager on the local shards (1e-5)."""
    cls, options = CASES[case]
    params = dtensor_params(meshes)
    _, _, code = run_local_parity(lambda ps: cls(ps, **options), params)
    assert code, "nothing was compiled"
    assert not unexpected_graph_breaks(), unexpected_graph_breaks()


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad])
def test_foreach_fails_across_meshes(meshes, cls):
    """Not covered yet: Dynamo's fake-tensor run puts the plain step tensors on the first mesh."""
    params = dtensor_params(meshes)
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(Exception, match="different mesh"):
        torch.compile(cls(params, foreach=True).step, backend="fxmesh")()
