"""An FSDP2 output weight in the fused loss: a `DTensor` gathered once per call, its gradient averaged back.

FSDP2 (`fully_shard`) keeps each parameter as a `DTensor` split over a device mesh, and gathers it itself inside
the module's forward. A loss that takes the output weight from outside that forward (a fused linear loss does)
sees the sharded `DTensor`. `full_weight` gathers it into one ordinary tensor, once per call (the chunk loop then
reads it per chunk), and declares the gradient as `Partial("avg")` on every mesh dimension: each rank's gradient
is its own tokens' part, and the backward reduce-scatters their average into each rank's shard, which is what
FSDP2 does for every other parameter (its gradients are averaged over the data-parallel ranks). Communicated per
call: the weight once (an all-gather of `V x H`) and its gradient once (a reduce-scatter), no logit.
"""
from __future__ import annotations

import torch


def is_dtensor(x) -> bool:
    if x is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(x, DTensor)


def full_weight(weight) -> torch.Tensor:
    """The whole weight as a plain tensor (module docstring); gradients reach the `DTensor`'s shards."""
    from torch.distributed.tensor import Partial
    return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
