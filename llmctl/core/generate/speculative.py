"""Speculative decoding: a cheap proposer guesses k tokens, the target checks them in one pass.

Lossless: greedy output equals the target's greedy output, and sampling uses the standard
accept/reject rule (accept x with probability min(1, p(x)/q(x)), otherwise draw from
normalize(max(0, p − q))), so tokens are distributed exactly as the target's. Proposers:
a draft model (`--draft`) or prompt lookup (`--prompt-lookup N`, n-gram matches in the text
so far, q = a point mass). One prompt at a time (acceptance lengths differ per row).
"""

from __future__ import annotations

import time

import torch

from llmctl.core.generate.search import SEARCHES, Job, Runner, _sync
from llmctl.core.generate.sampling import History


class DraftProposer:
    """Proposes with a smaller model sharing the target's vocabulary; keeps its own KV cache."""

    def __init__(self, draft, job: Job, prompt: list[int], max_len: int):
        self.job = job
        self.runner = Runner(draft, [prompt], max_len, job.device, job.cfg.compile, job.cfg.cuda_graph)
        self.runner.prefill()

    def propose(self, tokens: list[int], history: History | None, k: int) -> tuple[list[int], torch.Tensor | None]:
        """`k` draft tokens after `tokens` and the distributions they were drawn from [k, V]."""
        unfed = tokens[self.runner.length :]  # the pending token, plus the last draft if all were accepted
        out, dists = [], []
        for _ in range(k):
            logits = self.runner.forward(torch.tensor([unfed], device=self.job.device))[:, -1]
            scores = self.job.process(logits.float(), history)
            if self.job.sampling:
                dists.append(scores.softmax(-1)[0])
                token = int(torch.multinomial(dists[-1], 1, generator=self.job.generators[0]))
            else:
                token = int(scores.argmax(-1))
            out.append(token)
            unfed = [token]
            if history is not None:
                history.append([token])
        return out, (torch.stack(dists) if dists else None)

    def rollback(self, length: int) -> None:
        """Keep only the first `length` tokens of the draft's cache."""
        self.runner.truncate(min(length, self.runner.length))


class PromptLookupProposer:
    """Proposes the tokens that followed the latest earlier occurrence of the last n-gram."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram

    def propose(self, tokens: list[int], history: History | None, k: int) -> tuple[list[int], None]:
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:  # at most len - n - 1: a token follows
                    return tokens[start + n : start + n + k], None
        return [], None

    def rollback(self, length: int) -> None:
        pass


def _accept(p: torch.Tensor, q: torch.Tensor | None, token: int, generator) -> tuple[bool, int | None]:
    """Standard speculative sampling rule for one position; returns (accepted, replacement)."""
    q_x = 1.0 if q is None else float(q[token])
    if float(torch.rand((), generator=generator, device=p.device)) * q_x < float(p[token]):
        return True, None
    residual = (p - q).clamp_(min=0) if q is not None else p.clone()
    if q is None:
        residual[token] = 0
    if float(residual.sum()) <= 0:
        residual = p
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


@SEARCHES.register("speculative")
def speculative_search(model, job: Job) -> None:
    """Draft-model or prompt-lookup speculation, prompt by prompt."""
    for prompt, seq in zip(job.prompts, job.seqs):
        _speculate_one(model, job, prompt, seq)


def _speculate_one(model, job: Job, prompt: list[int], seq) -> None:
    cfg, k = job.cfg, job.cfg.speculate_k
    max_len = len(prompt) + cfg.max_new_tokens + k + 1
    start = time.perf_counter()
    target = Runner(model, [prompt], max_len, job.device)
    logits = target.prefill()[:, -1]
    if job.draft is not None:
        proposer = DraftProposer(job.draft, job, prompt, max_len)
    else:
        proposer = PromptLookupProposer(cfg.prompt_lookup)
    _sync(job.device)
    job.prefill_s += time.perf_counter() - start
    start = time.perf_counter()
    history = _row_history(job, len(prompt))
    tokens = list(prompt)
    token = _pick(job, logits, history(tokens))
    while True:
        tokens.append(token)
        if seq.push(token):
            break
        room = cfg.max_new_tokens - len(seq.tokens)
        drafts, q = proposer.propose(tokens, history(tokens), min(k, room))
        fed = target.length
        out = target.forward(torch.tensor([[token] + drafts], device=job.device))[0]
        job.proposed += len(drafts)
        new = _verify(job, out, drafts, q, tokens, history)
        job.accepted += len(new) - 1
        target.truncate(fed + len(new))
        proposer.rollback(fed + len(new))
        for t in new[:-1]:
            tokens.append(t)
            if seq.push(t):
                break
        if seq.done:
            break
        token = new[-1]
    job.decode_s += time.perf_counter() - start


def _row_history(job: Job, prompt_len: int):
    """`rows -> History` for the processors (None when no processor is active)."""
    if not job.processors:
        return lambda rows: None
    return lambda rows: History([rows], job.vocab_size, job.device, [prompt_len])


def _pick(job: Job, logits: torch.Tensor, history: History | None) -> int:
    scores = job.process(logits.float(), history)
    if not job.sampling:
        return int(scores.argmax(-1))
    return int(torch.multinomial(scores.softmax(-1)[0], 1, generator=job.generators[0]))


def _verify(job: Job, out: torch.Tensor, drafts: list[int], q, tokens: list[int], history) -> list[int]:
    """Accepted draft tokens followed by one token from the target (correction or bonus).

    `history(rows)` builds the processors' view of a row (None when no processor is active)."""
    if not job.processors and not job.sampling:
        best = out.argmax(-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == best[n]:
            n += 1
        return drafts[:n] + [best[n]]
    rows = list(tokens)
    accepted: list[int] = []
    for i, d in enumerate(drafts):
        scores = job.process(out[i : i + 1].float(), history(rows))
        if not job.sampling:
            best = int(scores.argmax(-1))
            if best != d:
                return accepted + [best]
        else:
            ok, replacement = _accept(scores.softmax(-1)[0], None if q is None else q[i], d, job.generators[0])
            if not ok:
                return accepted + [replacement]
        accepted.append(d)
        rows.append(d)
    return accepted + [_pick(job, out[len(drafts) : len(drafts) + 1], history(rows))]
