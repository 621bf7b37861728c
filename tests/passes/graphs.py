"""Hand-built graphs holding one fused optimizer call, for the pass tests.

p0 g0 m0 v0 s0 ... pN gN mN vN sN [lr] [grad_scale] [found_inf]   (placeholders)
        \\  |  |  |  /
    torch._fused_adamw_([p..], [g..], [m..], [v..], [], [s..], lr=..., ...)
"""

from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

ADAM_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


SGD_LISTS = ("params", "grads", "momentum_buffer_list")
ADAGRAD_LISTS = ("params", "grads", "state_sums", "state_steps")


def fused_graph(target, lists: dict[str, list[torch.Tensor]], list_names=ADAM_LISTS, **kwargs):
    """A GraphModule calling ``target`` on placeholders, and the real inputs in placeholder order."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    graph = torch.fx.Graph()
    inputs = []

    def placeholder(name, value):
        node = graph.placeholder(name)
        node.meta["example_value"] = fake_mode.from_tensor(value)
        inputs.append(value)
        return node

    arg_lists = tuple([placeholder(f"{name}_{i}", t) for i, t in enumerate(lists.get(name, []))] for name in list_names)
    node_kwargs = {k: placeholder(k, v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    graph.call_function(target, arg_lists, node_kwargs)
    graph.output(None)
    return torch.fx.GraphModule(torch.nn.Module(), graph), inputs


def fused_nodes(gm, targets=(torch._fused_adam_, torch._fused_adamw_)):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def adam_lists(params, seed=0, amsgrad=False, step=3.0):
    """Gradients and states shaped like ``params`` (DTensor or plain)."""
    torch.manual_seed(seed)
    return {
        "params": [p.detach() for p in params],
        "grads": [torch.randn_like(p) for p in params],
        "exp_avgs": [torch.randn_like(p) * 0.1 for p in params],
        "exp_avg_sqs": [torch.rand_like(p) * 0.01 for p in params],
        "max_exp_avg_sqs": [torch.rand_like(p) * 0.02 for p in params] if amsgrad else [],
        "state_steps": [torch.tensor(step + i) for i in range(len(params))],
    }


def clone_lists(lists):
    return {k: [t.clone() for t in v] for k, v in lists.items()}
