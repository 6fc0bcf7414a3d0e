"""Sparsifiers of a task vector (fine-tuned minus base): which entries of a delta to keep.

    sparsify("magnitude", delta, density=0.3)                      # TIES: the largest 30 %
    sparsify("random", delta, density=0.3, generator=g)            # DARE: a seeded random 30 %
    sparsify("magnitude_outliers", delta, density=0.9, gamma=0.01) # breadcrumbs: drop both tails
    sparsify("della_magprune", delta, density=0.5, epsilon=0.15, generator=g)  # DELLA

Each returns the masked delta; `rescale=True` scales it back to the delta's L1 norm (DARE's
1/density rescale, in expectation). Magnitudes are ranked in float32.
"""

from __future__ import annotations

from typing import Callable

import torch

from llmctl.core.registry import Registry

SPARSIFIERS: Registry[Callable[..., torch.Tensor]] = Registry("sparsification method")


def sparsify(method: str, delta: torch.Tensor, *, density: float, rescale: bool = False,
             **options) -> torch.Tensor:
    """`delta` masked by the sparsifier `method` (a no-op at density >= 1)."""
    if density >= 1:
        return delta
    mask = SPARSIFIERS.get(method)(delta, density, **options)
    masked = delta * mask
    if rescale:
        before, after = delta.abs().sum(), masked.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            masked = masked * (before / after)
    return masked


def _keep(delta: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[indices] = 1
    return mask.reshape(delta.shape)


@SPARSIFIERS.register("magnitude")
def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of largest magnitudes (at least one entry)."""
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    return _keep(delta, delta.abs().reshape(-1).float().argsort(descending=True)[:k])  # ties as mergekit breaks them


@SPARSIFIERS.register("magnitude_outliers")
def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01) -> torch.Tensor:
    """Drop the `gamma` fraction of largest magnitudes, then the smallest, keeping `density`."""
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = delta.abs().reshape(-1).float().sort().indices
    return _keep(delta, order[bottom:bottom + keep])


@SPARSIFIERS.register("random")
def random(delta: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE)."""
    return torch.bernoulli(torch.full(delta.shape, float(density)), generator=generator).to(delta.dtype)


@SPARSIFIERS.register("della_magprune")
def della_magprune(delta: torch.Tensor, density: float, epsilon: float = 0.15,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with a probability rising with its magnitude's rank in its row, from
    `density - epsilon` (smallest) to `density + epsilon` (largest) (DELLA's MagPrune)."""
    if density <= 0:
        return torch.zeros_like(delta)
    if not 0 < density - epsilon and density + epsilon < 1:
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got {density} ± {epsilon}")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().float().argsort(dim=1).argsort(dim=1).float()
    rank_norm = ranks / max(rows.shape[1] - 1, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return torch.bernoulli(probs, generator=generator).to(delta.dtype).reshape(delta.shape)
