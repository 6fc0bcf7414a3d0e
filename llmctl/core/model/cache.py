"""A pre-allocated key/value cache for incremental decoding.

    cache = model.make_cache(batch_size, max_len)
    model(prompt_ids, cache=cache)          # prefill: keys/values of every layer stored
    model(next_ids, cache=cache)            # decode: attends to everything cached so far
    cache.truncate(n); cache.reorder(beam_index)

Storage is one [B, kv_heads, max_len, head_dim] tensor pair per layer, allocated once (a
pruned model's layers may have different kv_heads). With a sliding window (one for all layers
or each layer's own), `update` hands attention only the last window + T - 1 keys, so decoding cost
stays bounded by the window (the storage still spans max_len, which keeps `truncate` exact).
"""

from __future__ import annotations

import torch

from llmctl.errors import LlmctlError


class KVCache:
    """Per-layer key/value tensors plus the number of positions filled (`length`)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int | list[int],
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        sliding_window: int | None | list[int | None] = None,
    ):
        heads = [num_kv_heads] * num_layers if isinstance(num_kv_heads, int) else num_kv_heads
        shapes = [(batch_size, h, max_len, head_dim) for h in heads]
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.max_len = max_len
        # a list: each layer's window (None: full attention); `sliding_window` is then None (the keys every layer sees)
        self.windows = sliding_window if isinstance(sliding_window, list) else [sliding_window] * num_layers
        self.sliding_window = None if isinstance(sliding_window, list) else sliding_window
        self.length = 0
        self.prefix = None  # a prefix/prompt adapter's keys/values, made once per cache (`Transformer.kv_prefix`)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def window_start(self, new_tokens: int, layer: int | None = None) -> int:
        """First cached position any of the next `new_tokens` queries can see (in `layer`; None: in any)."""
        window = self.sliding_window if layer is None else self.windows[layer]
        if window is None:
            return 0
        return max(0, self.length + new_tokens - (window + new_tokens - 1))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, H, T, D] after the cached positions; return the visible keys/values."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise LlmctlError(f"KV cache overflow: {end} positions needed, cache holds {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        first = self.window_start(k.shape[2], layer)
        return self.keys[layer][:, :, first:end], self.values[layer][:, :, first:end]

    def advance(self, new_tokens: int) -> None:
        """Commit `new_tokens` positions written by `update` in every layer."""
        self.length += new_tokens

    def truncate(self, n: int) -> None:
        """Forget every position from `n` on (e.g. rejected speculative tokens)."""
        if not 0 <= n <= self.length:
            raise LlmctlError(f"cannot truncate a KV cache of length {self.length} to {n}")
        self.length = n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (LongTensor [B']), e.g. the surviving beams; a same-size
        batch is reordered in place (a captured CUDA graph keeps reading the same tensors)."""
        index = index.to(self.keys[0].device)
        if len(index) == self.batch_size:
            for t in (*self.keys, *self.values):
                t.copy_(t.index_select(0, index))
        else:
            self.keys = [k.index_select(0, index) for k in self.keys]
            self.values = [v.index_select(0, index) for v in self.values]


class StaticSlot:
    """A fixed-shape view of a KVCache for a compiled decode step.

    `update` writes the step's keys/values at `position` (a LongTensor [1], so the value is
    data, not a compile-time constant) and returns the whole pre-allocated buffers; the
    caller masks the positions not filled yet. Nothing in it depends on the cache length.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], position: torch.Tensor):
        self.keys, self.values, self.position = keys, values, position

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer].index_copy_(2, self.position, k)
        self.values[layer].index_copy_(2, self.position, v)
        return self.keys[layer], self.values[layer]
