"""Distributed helpers shared by the stages' losses."""
from __future__ import annotations

import torch


def gather(x: torch.Tensor, accelerator, with_grad: bool) -> torch.Tensor:
    """[B, d] on each rank -> [world * B, d]; with_grad keeps this rank's slice in the graph."""
    if accelerator.num_processes == 1:
        return x
    if with_grad:
        import torch.distributed.nn

        return torch.cat(torch.distributed.nn.all_gather(x), dim=0)
    return accelerator.gather(x.detach())
