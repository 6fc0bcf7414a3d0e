"""Calibration: token windows from text, and the block-by-block run that prunes as it goes.

    tokens = calibration_tokens(["data.txt"], tokenizer, samples=64, seq_len=256)
    for_each_block(model, tokens, visit)   # visit(index, block, inputs, ctx), then the changed
                                            # block runs: its output is the next block's input
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llmctl.core.report import SILENT, Reporter
from llmctl.errors import DataError


def calibration_tokens(sources: list[str], tokenizer, *, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows [samples, seq_len] drawn (seeded) from the text of `sources`,
    documents joined by EOS; fewer when the text holds fewer distinct windows."""
    from llmctl.core.data import Corpus

    ids: list[int] = []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    enough = 4 * samples * seq_len
    for docs in Corpus(list(sources)).batches():
        for doc, encoded in zip(docs, tokenizer.encode_batch(docs)):
            ids.extend(encoded + eos)
        if len(ids) >= enough:
            break
    if len(ids) < seq_len:
        raise DataError(f"calibration data holds {len(ids)} tokens, fewer than one window of seq_len={seq_len} "
                        "(give more text or a smaller seq_len)")
    stream = torch.tensor(ids[:enough])
    starts = torch.randperm(len(stream) - seq_len + 1, generator=torch.Generator().manual_seed(seed))[:samples]
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def for_each_block(model: nn.Module, tokens: torch.Tensor,
                   visit: Callable[[int, nn.Module, torch.Tensor, object], None],
                   report: Reporter = SILENT, description: str = "calibrate") -> torch.Tensor:
    """Run `tokens` through the model one block at a time: `visit(i, block, inputs, ctx)`
    sees (and may change) block i before it runs on its inputs, so a pruned block's output
    feeds the next. Returns the last block's output."""
    from llmctl.core.model.layerwise import LayerwiseRun

    run = LayerwiseRun(model, tokens.to(model.model.embed_tokens.weight.device))
    with report.progress(description, total=len(run.blocks), unit="layer") as bar:
        for i, block in enumerate(run.blocks):
            visit(i, block, run.hidden, run.ctx)
            run.step()
            bar.advance()
    return run.hidden
