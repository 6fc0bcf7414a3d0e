"""The one place a `Transformer` is made: loading, training, exporting and tests all build here.

    model = build_model(cfg)                               # randomly initialised, ready to train
    model = build_model(cfg, transforms, device="meta")    # shapes only: then assign loaded tensors
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch

from llmctl.core.model.config import ModelConfig
from llmctl.core.model.transformer import Transformer


def build_model(cfg: ModelConfig, transforms: Iterable = (), *, device: torch.device | str | None = None
                ) -> Transformer:
    """A `Transformer(cfg)` created on `device` (default: torch's), then each transform applied
    in order. On "meta" nothing is allocated or initialised: the caller assigns real tensors
    with `load_state_dict(..., assign=True)`."""
    with torch.device(device) if device is not None else nullcontext():
        model = Transformer(cfg)
        for transform in transforms:
            transform.apply(model)
    return model
