"""CUDA graphs for the one-token decode step.

At batch 1 a small model's decode step is a few hundred tiny kernels: on a GPU the time goes
to launching them from Python, not to running them. `GraphedStep` records
`Transformer.decode_step` (eager or compiled) once into a CUDA graph over static input
buffers and the KV cache's own tensors, then replays it each token: one launch per step.

The graph reads and writes the cache tensors it was captured with, so the cache must be
updated in place (`KVCache.reorder` copies rows into the same storage for a same-size batch).
"""

from __future__ import annotations

from typing import Callable

import torch

WARMUP_STEPS = 2  # eager (or compiled) runs on a side stream before capture, as CUDA graphs need


def graphable(model) -> bool:
    """Whether `model.decode_step` can be captured: no data-dependent shapes, host reads or
    host-to-device copies (MoE routing gathers a variable number of tokens per expert;
    dynamic-NTK RoPE reads the largest position on the host; ALiBi's slopes are copied in)."""
    cfg = model.cfg
    rope_type = (getattr(cfg, "rope_scaling", None) or {}).get("rope_type")
    return not cfg.num_experts and rope_type != "dynamic" and cfg.position != "alibi"


class GraphedStep:
    """`step(ids, positions, padding, keys, values, slot) -> logits` (or a tuple of tensors),
    captured for the shapes and cache tensors of its first call and replayed for every later one."""

    def __init__(self, step: Callable, ids: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor | None,
                 keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor):
        self.keys, self.values = keys, values
        self.inputs = [ids.clone(), positions.clone(), None if padding is None else padding.clone(), slot.clone()]
        ids_, positions_, padding_, slot_ = self.inputs
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step(ids_, positions_, padding_, keys, values, slot_)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(ids_, positions_, padding_, keys, values, slot_)

    def __call__(self, ids, positions, padding, keys, values, slot) -> torch.Tensor:
        if keys is not self.keys or values is not self.values:
            raise RuntimeError("a captured decode step must be replayed over the cache it was captured with")
        for static, new in zip(self.inputs, (ids, positions, padding, slot)):
            if static is not None:
                static.copy_(new, non_blocking=True)
        self.graph.replay()  # the next replay overwrites the static output: hand out copies
        return tuple(t.clone() for t in self.out) if isinstance(self.out, tuple) else self.out.clone()
