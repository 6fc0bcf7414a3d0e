"""Encoder-only (masked) language models scored by pseudo-log-likelihood (Salazar et al., 2020).

A token's score is log P(token | every other token of its row), read at that position after
replacing the token by the mask token; a span's score is the sum over its tokens, one masked
copy of the row per token. `MaskedScoringModel` offers `score_rows` and `loglikelihood` as
`lm.ScoringModel` does, so perplexity tasks report pseudo-perplexity and multiple choice picks
the choice with the highest pseudo-log-likelihood. Rows are framed by the tokenizer's special
tokens ([CLS] … [SEP]). Each scored token costs a forward pass over its row (batched): a
document of N tokens costs N passes. In strided perplexity windows a token sees the window
around it, so `--stride` equal to `--max-length` (disjoint windows) gives each token both sides.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from llmctl.core.report import Bar
from llmctl.core.evaluate.lm import Score, ScoringModel
from llmctl.core.model.logprobs import token_logprobs
from llmctl.errors import CheckpointError, DataError


class MaskedScoringModel:
    """An encoder with an MLM head (`model(ids, attention_mask).logits`) and its tokenizer."""

    can_generate = False

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int, batch_size: int | None = None,
                 device: torch.device | str = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size or (16 if self.device.type == "cpu" else 128)  # masked copies per pass
        if tokenizer.mask_id is None:
            raise CheckpointError("an encoder-only model needs a tokenizer with a mask token to be scored")
        self.mask_id = tokenizer.mask_id
        probe = tokenizer.encode("a", add_special_tokens=False)
        framed = tokenizer.encode("a", add_special_tokens=True)
        at = next((i for i in range(len(framed)) if framed[i : i + len(probe)] == probe), 0)
        self.prefix, self.suffix = framed[:at], framed[at + len(probe) :]
        # a row of max_length + 1 tokens (the causal convention) plus the frame fits the model
        self.max_length = max_length - len(self.prefix) - len(self.suffix) - 1
        self.has_head = hasattr(model, "head") and hasattr(model, "cfg")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return ScoringModel.encode_pair(self, context, continuation)  # the same split of the text

    def score_rows(self, rows: Sequence[Sequence[int]], n_scored: Sequence[int], progress: Bar | None = None,
                   greedy: bool = True) -> list[Score]:
        """Pseudo-log-likelihood of the last `n_scored[i]` tokens of each row, the whole row visible."""
        jobs = [(r, len(row) - n + j) for r, (row, n) in enumerate(zip(rows, n_scored)) for j in range(n)]
        last = {r: i for i, (r, _) in enumerate(jobs)}  # a row is done at its last masked copy
        totals = [0.0] * len(rows)
        hits = [True] * len(rows)
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            for (r, _), (logprob, hit) in zip(batch, self._masked([(rows[r], p) for r, p in batch])):
                totals[r] += logprob
                hits[r] = hits[r] and hit
            if progress is not None:
                progress.advance(sum(last[r] == start + i for i, (r, _) in enumerate(batch)))
        return [Score(total, hit if greedy else None, n) for total, hit, n in zip(totals, hits, n_scored)]

    @torch.inference_mode()
    def _masked(self, items: list[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
        """(log P, is argmax) of row[p] with row[p] masked, for each (row, p)."""
        width = max(len(row) for row, _ in items) + len(self.prefix) + len(self.suffix)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        where = torch.tensor([len(self.prefix) + p for _, p in items])
        targets = torch.tensor([row[p] for row, p in items])
        for b, (row, _) in enumerate(items):
            framed = [*self.prefix, *row, *self.suffix]
            ids[b, : len(framed)] = torch.as_tensor(framed)
            mask[b, : len(framed)] = 1
        ids[torch.arange(len(items)), where] = self.mask_id
        ids, mask = ids.to(self.device), mask.to(self.device)
        where, targets = where.to(self.device), targets.to(self.device)
        rows = torch.arange(len(items), device=self.device)
        if self.has_head:  # the MLM head only at the masked positions
            feats = self.model(ids, mask, skip_head=True).features[rows, where]
            logprobs, hits = token_logprobs(feats, targets, self.model.head, vocab=self.model.cfg.vocab_size,
                                            greedy=True)
        else:
            out = self.model(input_ids=ids, attention_mask=mask)
            logprobs, hits = token_logprobs((out.logits if hasattr(out, "logits") else out)[rows, where], targets,
                                            greedy=True)
        return list(zip(logprobs.tolist(), hits.tolist()))

    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]],
                      progress: Bar | None = None) -> list[Score]:
        """Pseudo-log-likelihood of each continuation, context and continuation both visible;
        rows are cut on the left to fit the model."""
        rows, n_scored = [], []
        for context, continuation in requests:
            if not continuation:
                raise DataError("a continuation (choice) encodes to no tokens")
            row = (list(context) + list(continuation))[-(self.max_length + 1) :]
            rows.append(row)
            n_scored.append(min(len(continuation), len(row)))
        return self.score_rows(rows, n_scored, progress)


    def loglikelihood_rolling(self, documents: Sequence[list[int]], progress: Bar | None = None) -> list[Score]:
        """Pseudo-log-likelihood of whole documents in disjoint windows of `max_length` tokens."""
        rows, owner = [], []
        for d, tokens in enumerate(documents):
            for i in range(0, len(tokens), self.max_length):
                rows.append(list(tokens[i : i + self.max_length]))
                owner.append(d)
        if progress is not None:
            progress.update(total=len(rows))
        totals = [Score(0.0, True, 0) for _ in documents]
        for d, s in zip(owner, self.score_rows(rows, [len(r) for r in rows], progress)):
            t = totals[d]
            totals[d] = Score(t.logprob + s.logprob, t.greedy and s.greedy, t.tokens + s.tokens)
        return totals
