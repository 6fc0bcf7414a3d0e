"""A model run one block at a time (embed → each block → norm/head), equal to `forward`.

    run = LayerwiseRun(model, input_ids)                 # embeddings + attention context
    for block in run.blocks:
        with capture_inputs(block, lambda path, x: stats[path].add(x)):
            run.step()                                    # every Linear's input seen, by path
        ...                                               # change the block, re-run it, …
    logits = run.logits()

Calibration (GPTQ, AWQ, Wanda, SparseGPT) needs one block's Linear inputs at a time, and a
block changed before the next one runs: `run.hidden` is the input of block `run.index`, so
`run.step(hidden)` can run the same block again (on the changed weights) from a saved input.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class LayerwiseRun:
    """`model(input_ids, **kwargs).logits`, opened up block by block (inference: no cache,
    no labels). kwargs are `Transformer.embed`'s: attention_mask, position_ids,
    token_type_ids, document_ids."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, **kwargs):
        self.model = model
        self.hidden, self.ctx = model.embed(input_ids, **kwargs)
        self.index = 0  # the block `step` runs next

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def step(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run block `index` on `hidden` (default: the current hidden states); advance."""
        block = self.blocks[self.index]
        self.hidden, _ = block(self.hidden if hidden is None else hidden, self.ctx)
        self.index += 1
        return self.hidden

    def logits(self) -> torch.Tensor:
        """Float32 logits [B, T, vocab] after the last block (final norm, head)."""
        if self.index != len(self.blocks):
            raise RuntimeError(f"{len(self.blocks) - self.index} block(s) have not run yet")
        return self.model.head(self.hidden)


@contextmanager
def capture_inputs(module: nn.Module, callback: Callable[[str, torch.Tensor], None] | None = None,
                   kind: type[nn.Module] = nn.Linear) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, call `callback(path, input)` for every input of each `kind`
    submodule of `module` (path relative to `module`); without a callback, the inputs are
    collected (detached) in the yielded {path: [input, …]}."""
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(path: str):
        def record(_module, args):
            if callback is not None:
                callback(path, args[0])
            else:
                seen.setdefault(path, []).append(args[0].detach())
        return record

    handles = [m.register_forward_pre_hook(hook(p)) for p, m in module.named_modules() if isinstance(m, kind)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
