"""Switching adapters off: the base model's outputs from an adapted model, with no second copy.

    with adapters_disabled(model):      # e.g. a preference method's reference log-probs
        reference = model(ids).logits

Every adapter module (a LoRA layer, a prefix or prompt encoder) has `adapter_active` (class
default True) and, when it is False, computes what its base would.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every adapter switched off inside the block (restored on exit, even on error)."""
    switched = [m for m in model.modules() if getattr(m, "adapter_active", False)]
    for module in switched:
        module.adapter_active = False
    try:
        yield model
    finally:
        for module in switched:
            del module.adapter_active  # back to the class default
