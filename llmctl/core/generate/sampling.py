"""Logits processors: composable callables `(scores [B, V], history) -> scores`.

Each processor is a registered `Processor` subclass with `from_config(cfg)` returning an instance, or `None`
when the setting is inactive (so an inactive processor costs nothing per token). `order` fixes
where it runs in the chain; `warper = True` marks processors that only shape a sampling
distribution (temperature, top-k, …) and are skipped by greedy and beam search, as in
`transformers`. Third parties add processors through the `llmctl.logits_processors` group.
"""

from __future__ import annotations

from typing import Any

import torch

from llmctl.core.registry import Registry
from llmctl.errors import UsageError

NEG_INF = -float("inf")


class History:
    """The tokens each row has seen (prompt + generated, no padding), for penalty processors.

    `seen()` (bool [B, V], prompt and generated) and `counts()` (float [B, V], generated only)
    are built on first use and then updated incrementally by `append`.
    """

    def __init__(
        self,
        rows: list[list[int]],
        vocab_size: int,
        device: torch.device | str = "cpu",
        prompt_lens: list[int] | None = None,
    ):
        self.rows = [list(r) for r in rows]
        self.prompt_lens = [len(r) for r in rows] if prompt_lens is None else list(prompt_lens)
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def seen(self) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(len(self.rows), self.vocab_size, dtype=torch.bool, device=self.device)
            for i, row in enumerate(self.rows):
                if row:
                    self._seen[i, torch.tensor(row, device=self.device)] = True
        return self._seen

    def counts(self) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.zeros(len(self.rows), self.vocab_size, device=self.device)
            for i, (row, start) in enumerate(zip(self.rows, self.prompt_lens)):
                if len(row) > start:
                    ids = torch.tensor(row[start:], device=self.device)
                    self._counts[i].index_add_(0, ids, torch.ones(len(ids), device=self.device))
        return self._counts

    def append(self, ids: list[int], ids_tensor: torch.Tensor | None = None) -> None:
        """Add one token per row (`ids_tensor`, if given, is the same ids on the device)."""
        for row, t in zip(self.rows, ids):
            row.append(t)
        if self._seen is None and self._counts is None:
            return
        index = (ids_tensor if ids_tensor is not None else torch.tensor(ids, device=self.device)).view(-1, 1)
        if self._seen is not None:
            self._seen.scatter_(1, index, True)
        if self._counts is not None:
            self._counts.scatter_add_(1, index, torch.ones(index.shape, device=self.device))

    def truncate(self, lengths: list[int]) -> None:
        """Cut each row back to `lengths[i]` tokens (speculative rejection)."""
        self.rows = [r[:n] for r, n in zip(self.rows, lengths)]
        self._seen = self._counts = None

    def reorder(self, index: list[int]) -> None:
        """Select rows (beam search)."""
        self.rows = [list(self.rows[i]) for i in index]
        self.prompt_lens = [self.prompt_lens[i] for i in index]
        if self._seen is not None or self._counts is not None:
            idx = torch.tensor(index, device=self.device)
            self._seen = None if self._seen is None else self._seen[idx]
            self._counts = None if self._counts is None else self._counts[idx]


class Processor:
    """Base class: subclasses set `order`/`warper` and implement `__call__` and `from_config`."""

    order: int = 100
    warper: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "Processor | None":
        raise NotImplementedError

    def __call__(self, scores: torch.Tensor, history: History) -> torch.Tensor:
        raise NotImplementedError


PROCESSORS: Registry[type[Processor]] = Registry("logits processor", "llmctl.logits_processors", base=Processor)


@PROCESSORS.register("repetition_penalty")
class RepetitionPenalty(Processor):
    """CTRL-style: divide positive / multiply negative logits of every token already seen."""

    order = 10

    def __init__(self, penalty: float):
        if penalty <= 0:
            raise UsageError(f"--repetition-penalty must be > 0, got {penalty}")
        self.penalty = penalty

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.repetition_penalty) if cfg.repetition_penalty != 1.0 else None

    def __call__(self, scores, history):
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(history.seen(), penalized, scores)


@PROCESSORS.register("frequency_penalty")
class FrequencyPenalty(Processor):
    """OpenAI-style: subtract `alpha × count` for each generated occurrence of a token."""

    order = 11

    def __init__(self, alpha: float):
        self.alpha = alpha

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.frequency_penalty) if cfg.frequency_penalty else None

    def __call__(self, scores, history):
        return scores - self.alpha * history.counts()


@PROCESSORS.register("presence_penalty")
class PresencePenalty(Processor):
    """OpenAI-style: subtract `alpha` once from every token generated so far."""

    order = 12

    def __init__(self, alpha: float):
        self.alpha = alpha

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.presence_penalty) if cfg.presence_penalty else None

    def __call__(self, scores, history):
        return scores - self.alpha * (history.counts() > 0).to(scores.dtype)


@PROCESSORS.register("no_repeat_ngram")
class NoRepeatNGram(Processor):
    """Forbid any token that would complete an n-gram already present in the row."""

    order = 20

    def __init__(self, n: int):
        if n < 1:
            raise UsageError(f"--no-repeat-ngram must be >= 1, got {n}")
        self.n = n

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.no_repeat_ngram_size) if cfg.no_repeat_ngram_size else None

    def banned(self, row: list[int]) -> list[int]:
        n = self.n
        if len(row) + 1 < n:
            return []
        prefix = tuple(row[len(row) - n + 1 :]) if n > 1 else ()
        return [row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i : i + n - 1]) == prefix]

    def __call__(self, scores, history):
        scores = scores.clone()
        for i, row in enumerate(history.rows):
            banned = self.banned(row)
            if banned:
                scores[i, banned] = NEG_INF
        return scores


@PROCESSORS.register("min_new_tokens")
class MinNewTokens(Processor):
    """Forbid the EOS tokens until `min_new_tokens` tokens have been generated."""

    order = 30

    def __init__(self, min_new: int, eos_ids: list[int]):
        self.min_new, self.eos_ids = min_new, list(eos_ids)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.min_new_tokens, cfg.eos_ids) if cfg.min_new_tokens and cfg.eos_ids else None

    def __call__(self, scores, history):
        short = [i for i, (r, p) in enumerate(zip(history.rows, history.prompt_lens)) if len(r) - p < self.min_new]
        if not short:
            return scores
        scores = scores.clone()
        scores[torch.tensor(short)[:, None], torch.tensor(self.eos_ids)[None, :]] = NEG_INF
        return scores


@PROCESSORS.register("temperature")
class Temperature(Processor):
    order, warper = 50, True

    def __init__(self, temperature: float):
        if temperature <= 0:
            raise UsageError(f"--temperature must be >= 0, got {temperature}")
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.temperature) if cfg.temperature not in (0.0, 1.0) else None

    def __call__(self, scores, history):
        return scores / self.temperature


@PROCESSORS.register("top_k")
class TopK(Processor):
    """Keep the `k` highest-scoring tokens (ties with the k-th are kept)."""

    order, warper = 60, True

    def __init__(self, k: int, min_keep: int = 1):
        self.k = max(k, min_keep)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.top_k, cfg.min_tokens_to_keep) if cfg.top_k else None

    def __call__(self, scores, history):
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(scores < kth, NEG_INF)


@PROCESSORS.register("top_p")
class TopP(Processor):
    """Nucleus sampling: the smallest set of tokens whose probability mass reaches `p`."""

    order, warper = 70, True

    def __init__(self, p: float, min_keep: int = 1):
        if not 0 < p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {p}")
        self.p, self.min_keep = p, min_keep

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.top_p, cfg.min_tokens_to_keep) if cfg.top_p < 1.0 else None

    def __call__(self, scores, history):
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self.p)
        remove[..., -self.min_keep :] = False
        return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


@PROCESSORS.register("min_p")
class MinP(Processor):
    """Drop tokens whose probability is below `min_p` × the top token's probability."""

    order, warper = 80, True

    def __init__(self, min_p: float, min_keep: int = 1):
        if not 0 <= min_p <= 1:
            raise UsageError(f"--min-p must be in [0, 1], got {min_p}")
        self.min_p, self.min_keep = min_p, min_keep

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.min_p, cfg.min_tokens_to_keep) if cfg.min_p else None

    def __call__(self, scores, history):
        probs = scores.softmax(dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_keep, probs.shape[-1]), dim=-1).indices
        remove.scatter_(-1, keep, False)
        return scores.masked_fill(remove, NEG_INF)


@PROCESSORS.register("typical_p")
class TypicalP(Processor):
    """Locally typical sampling: keep tokens whose surprisal is closest to the entropy, up to mass `p`."""

    order, warper = 90, True

    def __init__(self, mass: float, min_keep: int = 1):
        if not 0 < mass < 1:
            raise UsageError(f"--typical-p must be in (0, 1), got {mass}")
        self.mass, self.min_keep = mass, min_keep

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.typical_p, cfg.min_tokens_to_keep) if cfg.typical_p < 1.0 else None

    def __call__(self, scores, history):
        logp = scores.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
        shifted, order = torch.sort((-logp - entropy).abs(), descending=False)
        cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.mass).sum(dim=1).clamp_(max=shifted.shape[-1] - 1)
        remove = shifted > shifted.gather(1, last.view(-1, 1))
        remove[..., : self.min_keep] = False
        return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def build_processors(cfg: Any, *, sampling: bool) -> list[Processor]:
    """The active processors for `cfg`, in application order (warpers only when `sampling`)."""
    active = []
    for name in PROCESSORS.names():
        cls = PROCESSORS.get(name)
        if cls.warper and not sampling:
            continue
        processor = cls.from_config(cfg)
        if processor is not None:
            active.append(processor)
    return sorted(active, key=lambda p: p.order)


def apply_processors(processors: list[Processor], scores: torch.Tensor, history: History) -> torch.Tensor:
    for processor in processors:
        scores = processor(scores, history)
    return scores


def choose(scores: torch.Tensor, sampling: bool, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row [B]: argmax, or a draw from softmax(scores) by each row's generator."""
    if not sampling:
        return scores.argmax(dim=-1)
    return draw(scores.softmax(dim=-1), 1, generators).squeeze(-1)


def draw(probs: torch.Tensor, n: int, generators: list[torch.Generator]) -> torch.Tensor:
    """`n` draws without replacement from each row of `probs` [B, V] → [B, n], row i by `generators[i]`."""
    if len(generators) == 1:
        return torch.multinomial(probs, n, generator=generators[0])
    return torch.stack([torch.multinomial(row, n, generator=g) for row, g in zip(probs, generators)])
