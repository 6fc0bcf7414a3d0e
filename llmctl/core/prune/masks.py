"""Sparsity masks shared by pruning (and, later, merging): True = keep.

    topk_mask(scores, 0.5)            # the largest half of the whole tensor
    topk_mask(scores, 0.5, dim=-1)    # the largest half of every row (Wanda's comparison group)
    nm_mask(scores, 2, 4)             # the 2 largest of every 4 consecutive inputs (2:4)

Ties are broken by position, so a mask always has exactly the requested number of zeros.
"""

from __future__ import annotations

import torch

from llmctl.errors import UsageError


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"N:M" → (n kept, m): e.g. "2:4" keeps 2 of every 4 weights."""
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        hint = " (in YAML or key=value, quote it: pattern='\"2:4\"')" if str(pattern).isdigit() else ""
        raise UsageError(f"--pattern {pattern!r}: expected N:M, e.g. 2:4{hint}") from None
    if not 0 < n < m:
        raise UsageError(f"--pattern {pattern!r}: expected 0 < N < M")
    return n, m


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a `sparsity` fraction removes (rounded down)."""
    return int(numel * sparsity)


def topk_mask(scores: torch.Tensor, sparsity: float, dim: int | None = None) -> torch.Tensor:
    """Keep all but the `sparsity` fraction of lowest scores, over the whole tensor (`dim`
    None) or within each slice along `dim`."""
    flat = scores.flatten() if dim is None else scores.movedim(dim, -1)
    mask = _drop_lowest(flat, pruned_count(flat.shape[-1], sparsity))
    return mask.view_as(scores) if dim is None else mask.movedim(-1, dim)


def _drop_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """False at the `k` lowest scores of every row (last dim)."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(-1, scores.float().topk(k, dim=-1, largest=False).indices, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` largest of every `m` consecutive scores along the last dim (inputs)."""
    if scores.shape[-1] % m:
        raise UsageError(f"an N:M pattern with M={m} needs input sizes divisible by {m}, got {scores.shape[-1]}")
    return _drop_lowest(scores.reshape(*scores.shape[:-1], -1, m), m - n).reshape(scores.shape)

