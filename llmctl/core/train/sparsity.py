"""`keep_sparsity`: a pruned model's zero weights stay zero while it trains.

The masks are the exact zeros of the blocks' 2-D weights when training starts (every
checkpoint of the run keeps them, so a resumed run finds the same masks); the Trainer applies
them after each optimizer step. Works on the local shard of an FSDP parameter.
"""

from __future__ import annotations

import torch
from torch import nn


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # an FSDP DTensor's own shard


class SparsityMasks:
    """Keep-masks of the zero-holding weights of `model`'s blocks (`…layers.N…weight`, 2-D)."""

    def __init__(self, model: nn.Module):
        self.masks: list[tuple[nn.Parameter, torch.Tensor]] = []
        for name, p in model.named_parameters():
            if ".layers." in name and name.endswith("weight") and p.dim() == 2 and p.requires_grad:
                keep = _local(p.detach()) != 0
                if not bool(keep.all()):
                    self.masks.append((p, keep))

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def zeros(self) -> int:
        return sum(int((~keep).sum()) for _, keep in self.masks)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights again (after an optimizer step moved them)."""
        for p, keep in self.masks:
            _local(p).mul_(keep)
