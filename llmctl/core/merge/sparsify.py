"""Sparsifiers of a task vector (fine-tuned minus base): which entries of a delta to keep.

    sparsify("magnitude", delta, density=0.3)                      # TIES: the largest 30 %
    sparsify("random", delta, density=0.3, generator=g)            # DARE: a seeded random 30 %
    sparsify("magnitude_outliers", delta, density=0.9, gamma=0.01) # breadcrumbs: drop both tails
    sparsify("della_magprune", delta, density=0.5, epsilon=0.15, generator=g)  # DELLA

Each masks `delta` in place and returns it; `rescale=True` scales it back to the delta's L1 norm (DARE's
1/density rescale, in expectation). Magnitudes are selected, not sorted (`largest_magnitudes`: a k-th value
and the ties at it broken by position), so the memory a mask takes is about two tensors' size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from llmctl.core.registry import Registry

if TYPE_CHECKING:
    import torch

SPARSIFIERS: Registry[Callable[..., torch.Tensor]] = Registry("sparsification method")


def sparsify(method: str, delta: torch.Tensor, *, density: float, rescale: bool = False,
             **options) -> torch.Tensor:
    """`delta`, masked in place by the sparsifier `method` (a no-op at density >= 1)."""
    if density >= 1:
        return delta
    mask = SPARSIFIERS.get(method)(delta, density, **options)
    before = delta.abs().sum() if rescale else None
    delta.mul_(mask)
    del mask
    if rescale:
        after = delta.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            delta.mul_(before / after)
    return delta


def largest_magnitudes(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the `k` entries of `values` largest in magnitude; of equal magnitudes at
    the k-th, the first in position are kept, so exactly k are (mergekit's argsort breaks such
    ties in whatever order its sort leaves them). Work space: one magnitude tensor at a time."""
    import torch

    n = values.numel()
    if k <= 0 or k >= n:
        return torch.full(values.shape, k > 0, dtype=torch.bool)
    threshold = _kth_smallest(values.abs().reshape(-1), n - k)
    mask = values.abs() > threshold
    missing = k - int(mask.count_nonzero())
    if missing:
        mask.view(-1)[(values.abs() == threshold).view(-1).nonzero().squeeze(1)[:missing]] = True
    return mask


def _kth_smallest(work: torch.Tensor, index: int) -> torch.Tensor:
    """The value at `index` of the ascending order of `work` (non-negative; reordered in place
    by numpy's selection — torch's kthvalue would copy it and add an int64 index per entry).
    Non-negative 16-bit floats order as their bit patterns do: bfloat16 / float16 are selected as int16."""
    import torch

    bits = work.view(torch.int16) if work.dtype in (torch.bfloat16, torch.float16) else work
    bits.numpy().partition(index)
    return work[index].clone()


@SPARSIFIERS.register("magnitude")
def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of largest magnitudes (at least one entry)."""
    import torch

    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return largest_magnitudes(delta, max(1, int(density * delta.numel())))


@SPARSIFIERS.register("magnitude_outliers")
def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01) -> torch.Tensor:
    """Drop the `gamma` fraction of largest magnitudes, then the smallest, keeping `density`."""
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    return largest_magnitudes(delta, n - bottom) & ~largest_magnitudes(delta, n - bottom - keep)


@SPARSIFIERS.register("random")
def random(delta: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE)."""
    import torch

    return torch.empty(delta.shape, dtype=delta.dtype).bernoulli_(float(density), generator=generator)


@SPARSIFIERS.register("della_magprune")
def della_magprune(delta: torch.Tensor, density: float, epsilon: float = 0.15,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with a probability rising with its magnitude's rank in its row, from
    `density - epsilon` (smallest) to `density + epsilon` (largest) (DELLA's MagPrune)."""
    import torch

    if density <= 0:
        return torch.zeros_like(delta)
    if not 0 < density - epsilon and density + epsilon < 1:
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got {density} ± {epsilon}")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().float().argsort(dim=1).argsort(dim=1).float()
    rank_norm = ranks / max(rows.shape[1] - 1, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return torch.bernoulli(probs, generator=generator).to(delta.dtype).reshape(delta.shape)
