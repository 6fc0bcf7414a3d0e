"""Log-probabilities of target tokens, a few rows of logits at a time.

    logprobs, hits = token_logprobs(features, targets, head, vocab=V)   # [N], [N] or None

A large vocabulary's logits are big ([batch, seq, vocab] float32: 4 GB for 8 × 4096 × 32K),
so they are made `chunk` values at a time (at least `min_rows` rows, so the head's weight is
read few times) and reduced at once to one log-probability per target. Under autograd each
chunk is recomputed in the backward pass (activation checkpointing), so no chunk's logits
outlive it there either. Eval's scoring, preference losses and distillation share this.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

CHUNK = 1 << 22  # logits made at a time (16 MB in float32) …
MIN_ROWS = 256  # … but at least this many rows


def token_logprobs(features: torch.Tensor, targets: torch.Tensor, head: Callable | None = None, *,
                   vocab: int | None = None, greedy: bool = False, chunk: int = CHUNK, min_rows: int = MIN_ROWS
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target) [N], target is the argmax [N] bool or None) for the N = targets.numel()
    positions: `features` [..., H] become float32 logits by `head` (e.g. `Transformer.head`
    on final hidden states), or are the logits when `head` is None. `vocab` (the logits' width)
    sizes the chunks; it defaults to the features' width. Differentiable when autograd is on.
    """
    flat, wanted = features.reshape(-1, features.shape[-1]), targets.reshape(-1)
    to_logits = head or torch.Tensor.float
    step = max(min_rows, chunk // (vocab or features.shape[-1]))
    if torch.is_grad_enabled():
        pieces = [checkpoint(_logprobs, to_logits, flat[i : i + step], wanted[i : i + step], use_reentrant=False)
                  for i in range(0, len(wanted), step)]
        return torch.cat(pieces) if pieces else flat.new_zeros(0, dtype=torch.float32), None
    logprobs = torch.empty(len(wanted), device=features.device)
    hits = torch.empty(len(wanted), dtype=torch.bool, device=features.device) if greedy else None
    for i in range(0, len(wanted), step):
        logits = to_logits(flat[i : i + step])
        target = wanted[i : i + step, None]
        logprobs[i : i + step] = torch.log_softmax(logits, dim=-1).gather(-1, target)[:, 0]
        if greedy:
            hits[i : i + step] = logits.argmax(-1) == target[:, 0]
    return logprobs, hits


def _logprobs(to_logits: Callable, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(to_logits(rows), dim=-1).gather(-1, targets[:, None])[:, 0]
