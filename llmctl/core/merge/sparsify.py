"""Sparsifiers of a task vector (fine-tuned minus base, a numpy array): which entries to keep.

    sparsify("magnitude", delta, density=0.3)                      # TIES: the largest 30 %
    sparsify("random", delta, density=0.3, generator=g)            # DARE: a seeded random 30 %
    sparsify("magnitude_outliers", delta, density=0.9, gamma=0.01) # breadcrumbs: drop both tails
    sparsify("della_magprune", delta, density=0.5, epsilon=0.15, generator=g)  # DELLA

Each masks `delta` in place and returns it; `rescale=True` scales it back to the delta's L1 norm (DARE's
1/density rescale, in expectation). Magnitudes are selected, not sorted (`largest_magnitudes`: a k-th value
by an in-place partition and the ties at it broken by position), so a mask takes about one array's size.
`g` is a `numpy.random.Generator`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from llmctl.core.registry import Registry

if TYPE_CHECKING:
    import numpy as np

SPARSIFIERS: Registry[Callable[..., np.ndarray]] = Registry("sparsification method")
CHUNK = 1 << 20  # random draws and L1 norms are made this many entries at a time


def sparsify(method: str, delta: np.ndarray, *, density: float, rescale: bool = False,
             narrow: Callable = lambda x: x, **options) -> np.ndarray:
    """`delta`, masked in place by the sparsifier `method` (a no-op at density >= 1); `narrow`
    rounds the rescaled values to the merge's precision."""
    import numpy as np

    if density >= 1:
        return delta
    mask = SPARSIFIERS.get(method)(delta, density, **options)
    before = _l1(delta, narrow) if rescale else None
    np.multiply(delta, mask, out=delta)
    del mask
    if rescale:
        after = _l1(delta, narrow)
        if before >= 1e-7 and after >= 1e-7:
            narrow(np.multiply(delta, narrow(np.array(before / after, dtype=delta.dtype)), out=delta))
    return delta


def _l1(x: np.ndarray, narrow: Callable) -> np.ndarray:
    """Σ|x| in x's dtype, rounded to the merge's precision (a chunk at a time: no full |x| array)."""
    import numpy as np

    flat = x.reshape(-1)
    total = sum(float(np.abs(flat[i:i + CHUNK]).sum()) for i in range(0, flat.size, CHUNK))
    return narrow(np.array(total, dtype=x.dtype))


def largest_magnitudes(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the `k` entries of `values` largest in magnitude; of equal magnitudes at
    the k-th, the first in position are kept, so exactly k are (mergekit's argsort breaks such
    ties in whatever order its sort leaves them). Work space: one magnitude array."""
    import numpy as np

    n = values.size
    if k <= 0 or k >= n:
        return np.full(values.shape, k > 0)
    magnitudes = np.abs(values).reshape(-1)
    magnitudes.partition(n - k)  # in place: the k-th largest at n - k
    threshold = magnitudes[n - k]
    np.abs(values.reshape(-1), out=magnitudes)
    mask = magnitudes >= threshold
    extra = int(np.count_nonzero(mask)) - k  # others equal to the k-th: the last in position are dropped
    if extra:
        mask[np.flatnonzero(magnitudes == threshold)[-extra:]] = False
    return mask.reshape(values.shape)


@SPARSIFIERS.register("magnitude")
def magnitude(delta: np.ndarray, density: float) -> np.ndarray:
    """Keep the `density` fraction of largest magnitudes (at least one entry)."""
    import numpy as np

    if density <= 0 or delta.size == 0:
        return np.zeros(delta.shape, dtype=bool)
    return largest_magnitudes(delta, max(1, int(density * delta.size)))


@SPARSIFIERS.register("magnitude_outliers")
def magnitude_outliers(delta: np.ndarray, density: float, gamma: float = 0.01) -> np.ndarray:
    """Drop the `gamma` fraction of largest magnitudes, then the smallest, keeping `density`."""
    n = delta.size
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    return largest_magnitudes(delta, n - bottom) & ~largest_magnitudes(delta, n - bottom - keep)


@SPARSIFIERS.register("random")
def random(delta: np.ndarray, density: float, generator: np.random.Generator | None = None) -> np.ndarray:
    """Keep each entry with probability `density` (DARE)."""
    import numpy as np

    generator = generator or np.random.default_rng()
    mask = np.empty(delta.size, dtype=bool)
    for start in range(0, delta.size, CHUNK):  # the same draws as one call, without a full-size float array
        part = mask[start:start + CHUNK]
        np.less(generator.random(part.size, dtype=np.float32), density, out=part)
    return mask.reshape(delta.shape)


@SPARSIFIERS.register("della_magprune")
def della_magprune(delta: np.ndarray, density: float, epsilon: float = 0.15,
                   generator: np.random.Generator | None = None) -> np.ndarray:
    """Keep each entry with a probability rising with its magnitude's rank in its row, from
    `density - epsilon` (smallest) to `density + epsilon` (largest) (DELLA's MagPrune)."""
    import numpy as np

    if density <= 0:
        return np.zeros(delta.shape, dtype=bool)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got {density} ± {epsilon}")
    generator = generator or np.random.default_rng()
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta.reshape(delta.shape[0], -1)
    ranks = np.abs(rows).argsort(axis=1).argsort(axis=1).astype(np.float32)
    probs = (density - epsilon) + ranks / max(rows.shape[1] - 1, 1) * 2 * epsilon
    return (generator.random(rows.shape, dtype=np.float32) < probs).reshape(delta.shape)
