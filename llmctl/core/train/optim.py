"""AdamW with decoupled weight decay and parameter groups.

Weight decay applies to matrices only: parameters whose name contains one of `no_decay`
(by default norms, biases and embeddings) or that are 1-D go in a group without decay.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """Two AdamW groups: decayed matrices and undecayed norms/biases/embeddings (named `params`)."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or any(part in name for part in no_decay)
        (keep if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, no_decay: list[str],
                    betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters, using the fused kernel where available."""
    groups = param_groups(model, weight_decay, no_decay)
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu") and not _has_dtensor(model)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def _has_dtensor(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
