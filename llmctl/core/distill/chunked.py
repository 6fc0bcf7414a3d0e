"""A loss over a model's logits a few rows at a time, its gradient taken chunk by chunk.

    total, parts = fused_chunks(compute, features, params, rows=256)

`features` [N, H] are final hidden states; `compute(rows, start, stop)` turns rows
`features[start:stop]` into logits (the head) and returns (that chunk's share of the loss,
a vector of its parts). Each chunk's logits — the student's and the teacher's — live only
while that chunk is computed: under autograd the chunk's gradient (with respect to its rows and
to `params`, the head's weights) is taken at once and the logits freed, so the backward pass
only scales the stored gradients. That is as much work as the unchunked loss (no recomputation,
unlike activation checkpointing) with memory for one chunk of logits instead of [N, vocab].
"""

from __future__ import annotations

from typing import Callable

import torch


class _FusedChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compute: Callable, rows: int, features: torch.Tensor, *params: torch.Tensor):
        train = any(ctx.needs_input_grad[2:])
        grads: list[torch.Tensor | None] = [torch.zeros_like(features)] + [None] * len(params) if train else []
        total, parts = None, None
        for i in range(0, features.shape[0], rows):
            with torch.enable_grad() if train else torch.no_grad():
                chunk = features[i:i + rows].detach().requires_grad_(train)
                loss, part = compute(chunk, i, i + rows)
                if train:
                    found = torch.autograd.grad(loss, [chunk, *params], allow_unused=True)
                    grads[0][i:i + rows] = found[0]
                    for k, g in enumerate(found[1:], start=1):
                        if g is not None:
                            grads[k] = g if grads[k] is None else grads[k] + g
            total = loss.detach() if total is None else total + loss.detach()
            parts = part.detach() if parts is None else parts + part.detach()
        ctx.has = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, grad_parts: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if has else None for has in ctx.has]
        return None, None, *grads


def fused_chunks(compute: Callable, features: torch.Tensor, params: list[torch.Tensor], rows: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed loss, differentiable in `features` and `params`; its summed parts, not)."""
    params = [p for p in params if p.requires_grad]
    if not torch.is_grad_enabled():  # evaluation (torch.no_grad): no chunk gradients to take
        features, params = features.detach(), []
    if features.shape[0] == 0:
        raise ValueError("no positions to compute a loss over")
    return _FusedChunks.apply(compute, max(1, rows), features, *params)
