"""Reward models: a `Transformer` whose head gives `num_labels` scores (transformers' `score`).

    scores = sequence_scores(model, ids, pad_token_id)     # [B, num_labels]

As transformers' *ForSequenceClassification, a sequence's score is read at its last token
that is not padding (so right padding is allowed), and a classifier made from a language
model gets a fresh head, normal with the model's `initializer_range`.
"""

from __future__ import annotations

import torch
from torch import nn


def add_score_head(model: nn.Module, cfg) -> None:
    """Replace `model`'s LM head by a new `cfg.num_labels`-score head; `model.cfg` becomes `cfg`."""
    weight = model.model.embed_tokens.weight
    head = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False, device=weight.device, dtype=weight.dtype)
    nn.init.normal_(head.weight, std=cfg.initializer_range)
    model.lm_head, model.cfg = head, cfg


def last_tokens(ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Index [B] of each row's last token that is not `pad_token_id` (transformers' rule)."""
    if pad_token_id is None:
        return torch.full(ids.shape[:1], ids.shape[1] - 1, device=ids.device)
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions * (ids != pad_token_id)).argmax(-1)


def sequence_scores(forward, ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Scores [B, num_labels] of the rows of `ids` by a classifier (`forward(ids).logits`)."""
    logits = forward(ids).logits
    return logits[torch.arange(len(ids), device=ids.device), last_tokens(ids, pad_token_id)]
