"""A causal language model wrapped for scoring: batched log-likelihoods of token spans.

Every evaluation reduces to `score_rows`: for a token row `r`, the model reads `r[:-1]` and
the last `n` targets of `r[1:]` are scored. Rows are sorted by length and right-padded, so
a causal model needs no attention mask (real tokens never see the padding after them) and
positions start at 0 in every row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from llmctl.core.report import Bar
from llmctl.core.model.logprobs import CHUNK, MIN_ROWS, token_logprobs
from llmctl.core.parallel import parallel_map
from llmctl.errors import CheckpointError, DataError


@dataclass
class Score:
    logprob: float  # sum of the scored tokens' log-probabilities (nats)
    greedy: bool | None  # every scored token is the model's argmax (None: not computed)
    tokens: int  # number of scored tokens


HEAD_CHUNK = CHUNK  # logits made at a time while scoring (16 MB in float32) …
HEAD_CHUNK_ROWS = MIN_ROWS  # … but at least this many rows, so the head's weight is read few times
SHARE_MIN_TOKENS = 64  # share a context's KV cache when that saves at least this many token positions


class ScoringModel:
    """A model (`model(ids).logits`) and tokenizer (`encode`/`decode`, `bos_id`/`eos_id`);
    `seed` seeds the generation tasks' sampling."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int, batch_size: int | None = None,
                 max_batch_tokens: int | None = None, device: torch.device | str = "cpu", seed: int = 1234):
        self.model = model.eval()
        self.seed = seed
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device)
        cpu = self.device.type == "cpu"
        self.batch_size = batch_size or (16 if cpu else 128)  # rows per forward pass, at most
        # and at most this many padded tokens: on CPU, activations that stay in cache beat
        # bigger matrix products (measured: 1K tokens per pass ran 10-25% faster than 4K);
        # a GPU wants large batches
        self.max_batch_tokens = max_batch_tokens or (1024 if cpu else 65536)
        self.can_share = hasattr(model, "make_cache") and getattr(getattr(model, "cfg", None), "is_causal", False)
        self.has_head = self.can_share and hasattr(model, "head")
        self.projection = onednn_projection(model.lm_head, self.device) if self.has_head else None

    @property
    def prefix_token(self) -> int:
        """The token a document is conditioned on: BOS, else EOS (lm-eval's `prefix_token_id`)."""
        token = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        if token is None:
            raise CheckpointError("the tokenizer has neither a BOS nor an EOS token to condition documents on")
        return token

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation as lm-eval splits them.

        Trailing spaces of the context move to the continuation; the pair is encoded whole
        and split, so merges across the boundary match what the model sees.
        """
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context) if context else []
        return whole[: len(context_ids)], whole[len(context_ids) :]

    @torch.inference_mode()
    def features(self, input_ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """What becomes the logits, for every position or the last `keep`: an llmctl model's
        final hidden states (its `head` then runs in pieces), any other model's logits."""
        kwargs = {"logits_to_keep": keep} if 0 < keep < input_ids.shape[1] else {}
        if self.has_head:
            return self.model(input_ids.to(self.device), skip_head=True, **kwargs).features
        out = self.model(input_ids.to(self.device), **kwargs)
        return out.logits if hasattr(out, "logits") else out

    @torch.inference_mode()
    def score_rows(self, rows: Sequence[Sequence[int]], n_scored: Sequence[int],
                   progress: Bar | None = None, greedy: bool = True) -> list[Score]:
        """Score the last `n_scored[i]` targets of each row (longest rows batched first).

        `greedy=False` skips the argmax check (`Score.greedy` is then None).
        """
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        batches, start = [], 0
        while start < len(order):  # the first row of a batch is its widest
            size = max(1, min(self.batch_size, self.max_batch_tokens // len(rows[order[start]])))
            batches.append(order[start : start + size])
            start += size

        def score(batch: list[int]) -> list[Score]:
            return self._score_batch([rows[i] for i in batch], [n_scored[i] for i in batch], greedy)

        results: list[Score | None] = [None] * len(rows)
        for batch, scores in zip(batches, parallel_map(score, batches, self.device)):  # CPU: passes side by side
            for i, score_ in zip(batch, scores):
                results[i] = score_
            if progress is not None:
                progress.advance(len(batch))
        return results  # type: ignore[return-value]

    def _score_batch(self, rows: list[Sequence[int]], n_scored: list[int], greedy: bool) -> list[Score]:
        width = max(len(r) for r in rows)
        if width - 1 > self.max_length:
            raise ValueError(f"row of {width} tokens exceeds max_length + 1 = {self.max_length + 1}")
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        # targets of row b: tokens[b, len_b - n_b : len_b], predicted at the positions before
        lengths, n = torch.tensor([len(r) for r in rows]), torch.tensor(n_scored)
        keep = int((width - lengths + n).max())  # logits needed, counted from the end
        feats = self.features(tokens[:, :-1], keep)
        first_kept = width - 1 - feats.shape[1]
        starts = lengths - n
        if bool((starts == starts[0]).all() and (n == n[0]).all()):  # one span for all rows: a view
            s, k = int(starts[0]), int(n[0])
            picked = feats[:, s - 1 - first_kept : s - 1 - first_kept + k]
            targets = tokens[:, s : s + k].to(feats.device)
            valid = torch.ones_like(targets, dtype=torch.bool)
        else:  # gather every row's span into [B, n_max], padded with a valid position
            offsets = torch.arange(int(n.max()))
            valid = offsets.unsqueeze(0) < n.unsqueeze(1)
            target_pos = torch.where(valid, starts.unsqueeze(1) + offsets, lengths.unsqueeze(1) - 1)
            rows_idx = torch.arange(len(rows)).unsqueeze(1)
            picked = feats[rows_idx.to(feats.device), (target_pos - 1 - first_kept).to(feats.device)]
            targets = tokens[rows_idx, target_pos].to(feats.device)
            valid = valid.to(feats.device)
        return self._span_scores(picked, targets, valid, n_scored, greedy)

    def _span_scores(self, features: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                     n_scored: Sequence[int], greedy: bool, are_logits: bool = False) -> list[Score]:
        """Scores from `features` [B, K, ·] (see `features`; logits if `are_logits`) predicting
        targets [B, K] where `valid`.

        Logits are made a few rows at a time (`token_logprobs`: HEAD_CHUNK values, at least
        HEAD_CHUNK_ROWS rows), so a large vocabulary's logits never all exist at once.
        """
        head = None
        if self.has_head and not are_logits:
            head = functools.partial(self.model.head, projection=self.projection)
        vocab = self.model.cfg.vocab_size if self.has_head else features.shape[-1]
        logprobs, hits = token_logprobs(features, targets, head, vocab=vocab, greedy=greedy, chunk=HEAD_CHUNK,
                                        min_rows=HEAD_CHUNK_ROWS)
        sums = logprobs.view_as(targets).masked_fill(~valid, 0.0).sum(-1).tolist()
        if not greedy:
            return [Score(total, None, k) for total, k in zip(sums, n_scored)]
        all_greedy = (hits.view_as(targets) | ~valid).all(-1).tolist()
        return [Score(total, g, k) for total, g, k in zip(sums, all_greedy, n_scored)]

    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]],
                      progress: Bar | None = None, share_min_tokens: int = SHARE_MIN_TOKENS) -> list[Score]:
        """log P(continuation | context) per (context ids, continuation ids) request.

        An empty context is replaced by the prefix token; rows are truncated on the left to
        fit `max_length` (as lm-eval), so a continuation longer than that is scored in part.
        Requests whose rows share their context (the choices of a multiple-choice question)
        run that context once and its KV cache serves every continuation, when that saves at
        least `share_min_tokens` token positions; the others are batched as whole rows.
        """
        rows, n_scored = [], []
        for context, continuation in requests:
            if not continuation:
                raise DataError("a continuation (choice) encodes to no tokens")
            row = (list(context or [self.prefix_token]) + list(continuation))[-(self.max_length + 1) :]
            rows.append(row)
            n_scored.append(min(len(continuation), len(row) - 1))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (row, n) in enumerate(zip(rows, n_scored)):
            groups.setdefault(tuple(row[: len(row) - n]), []).append(i)
        results: list[Score | None] = [None] * len(rows)
        shared, plain = [], []
        for prefix, members in groups.items():
            if self.can_share and (len(members) - 1) * len(prefix) >= share_min_tokens:
                shared.append((list(prefix), members))
            else:
                plain += members

        def score_chunk(chunk: list[tuple[list[int], list[int]]]) -> list[list[Score]]:
            conts = [[rows[i][len(prefix) :] for i in members] for prefix, members in chunk]
            return self._score_shared([prefix for prefix, _ in chunk], conts)

        chunks = list(self._share_batches(shared, n_scored))
        for chunk, scores in zip(chunks, parallel_map(score_chunk, chunks, self.device)):
            for (_, members), group_scores in zip(chunk, scores):
                for i, score in zip(members, group_scores):
                    results[i] = score
                if progress is not None:
                    progress.advance(len(members))
        for i, score in zip(plain, self.score_rows([rows[i] for i in plain], [n_scored[i] for i in plain], progress)):
            results[i] = score
        return results  # type: ignore[return-value]

    def _share_batches(self, shared: list[tuple[list[int], list[int]]], n_scored: Sequence[int]):
        """Groups of (context, request indices), longest contexts first, batched so that both the
        padded contexts and the padded continuations stay within `max_batch_tokens`."""
        chunk: list = []
        rows = longest = 0
        for prefix, members in sorted(shared, key=lambda group: -len(group[0])):
            grown_rows, grown_longest = rows + len(members), max(longest, *(n_scored[i] for i in members))
            if chunk and ((len(chunk) + 1) * len(chunk[0][0]) > self.max_batch_tokens
                          or grown_rows * grown_longest > self.max_batch_tokens):
                yield chunk
                chunk, grown_rows, grown_longest = [], len(members), max(n_scored[i] for i in members)
            chunk.append((prefix, members))
            rows, longest = grown_rows, grown_longest
        if chunk:
            yield chunk

    @torch.inference_mode()
    def _score_shared(self, prefixes: list[list[int]], continuations: list[list[list[int]]]) -> list[list[Score]]:
        """Score `continuations[g]` after `prefixes[g]`: one left-padded pass over the prefixes
        with a KV cache, whose rows are then copied to one per continuation, and one pass over
        the right-padded continuations (real tokens never see the padding after them)."""
        from llmctl.core.generate.search import Runner

        flat = [c for group in continuations for c in group]
        owner = torch.tensor([g for g, group in enumerate(continuations) for _ in group])
        longest = max(len(c) for c in flat)
        runner = Runner(self.model, prefixes, max(map(len, prefixes)) + longest - 1, self.device)
        logits = runner.prefill(keep=1)[owner.to(self.device)]  # predicts each continuation's first token
        targets = torch.zeros(len(flat), longest, dtype=torch.long)
        valid = torch.zeros(len(flat), longest, dtype=torch.bool)
        for r, c in enumerate(flat):
            targets[r, : len(c)] = torch.as_tensor(c, dtype=torch.long)
            valid[r, : len(c)] = True
        if longest > 1:
            runner.reorder(owner.to(self.device))
            logits = torch.cat([logits, runner.forward(targets[:, :-1].to(self.device))], dim=1)
        scores = self._span_scores(logits, targets.to(logits.device), valid.to(logits.device),
                                   [len(c) for c in flat], greedy=True, are_logits=True)
        grouped, start = [], 0
        for group in continuations:
            grouped.append(scores[start : start + len(group)])
            start += len(group)
        return grouped

    def loglikelihood_rolling(self, documents: Sequence[list[int]], progress: Bar | None = None) -> list[Score]:
        """Log-likelihood of whole token documents in disjoint windows (lm-eval's rolling)."""
        requests, owner = [], []
        for d, tokens in enumerate(documents):
            for window in rolling_windows(tokens, self.prefix_token, self.max_length):
                requests.append(window)
                owner.append(d)
        if progress is not None:
            progress.update(total=len(requests))
        scores = self.loglikelihood(requests, progress)
        totals = [Score(0.0, True, 0) for _ in documents]
        for d, s in zip(owner, scores):
            t = totals[d]
            totals[d] = Score(t.logprob + s.logprob, t.greedy and s.greedy, t.tokens + s.tokens)
        return totals


class OneDNNLinear:
    """A float32 CPU `nn.Linear` computed by oneDNN, from a copy of its weight in oneDNN's layout.

    For vocabulary-wide products (the LM head) oneDNN ran 1.4-1.7x faster than the MKL path
    of `F.linear` here (median GFLOP/s, 128-512 rows: 151 vs 96 for 256x8192, 183 vs 112 for
    768x32000, 198 vs 117 for 2048x32000); for narrow layers it is not faster, so only the
    head uses it. Same float32 arithmetic (1e-6-level differences in accumulation order).
    """

    def __init__(self, linear: nn.Linear):
        self.weight = linear.weight.detach().to_mkldnn()
        self.bias = linear.bias.detach().to_mkldnn() if linear.bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn()
        out = torch.ops.aten.mkldnn_linear(rows, self.weight, self.bias).to_dense()
        return out.view(*x.shape[:-1], out.shape[-1])


def onednn_projection(linear: Any, device: torch.device) -> OneDNNLinear | None:
    """`linear` run by oneDNN when it is a plain float32 `nn.Linear` on CPU and torch has
    oneDNN; else None (use the module itself). The copy costs vocab × hidden × 4 bytes."""
    if (device.type != "cpu" or type(linear) is not nn.Linear or linear.weight.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        return OneDNNLinear(linear)
    except RuntimeError:  # a build whose oneDNN lacks the op: the plain path is as correct
        return None


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows covering every token once.

    Equal to lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`:
    the first window is conditioned on `prefix_token`, each later one on the `max_length`
    tokens before it.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        context = tokens[max(end - max_length - 1, 0) : end - 1]
        windows.append((context[: len(context) - (n - 1)], tokens[end - n : end]))
        predicted = end
    return windows
