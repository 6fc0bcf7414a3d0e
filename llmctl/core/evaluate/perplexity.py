"""Perplexity of text files: strided sliding windows, streamed and batched.

Windows follow the transformers perplexity guide: windows of `max_length` tokens start
every `stride` tokens; in each window only the tokens not scored by an earlier window
count (the overlap is context only), and the very first token has no context. A token is
therefore scored once, with up to `max_length - stride` tokens of extra context.
Files are tokenized in chunks cut before lines that start with a non-space character, so
memory stays bounded on large files. For byte-level BPE the tokens equal those of the whole
text; a tokenizer that prefixes a space to every input (metaspace) may differ by a token at
each chunk start (one per 64K characters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from llmctl.core.evaluate.lm import ScoringModel
from llmctl.core.evaluate.tasks import TASK_TYPES, DocumentTask, Task
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import DataError, UsageError

CHUNK_CHARS = 1 << 16  # characters tokenized at a time (the progress bar moves per chunk)


@dataclass
class TextStats:
    bytes: int = 0
    words: int = 0


def read_chunks(path: Path, stats: TextStats, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Yield pieces of a text file, cut only before lines that start with a non-space."""
    parts: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for line in f:
            if size >= chunk_chars and line[:1].strip():
                yield "".join(parts)
                parts, size = [], 0
            parts.append(line)
            size += len(line)
            stats.bytes += len(line.encode("utf-8"))
            stats.words += len(line.split())
    if parts:
        yield "".join(parts)


def strided_windows(token_chunks: Iterable[Sequence[int]], max_length: int, stride: int
                    ) -> Iterator[tuple[list[int], int]]:
    """Yield (window tokens, number of scored targets) over a stream of token chunks."""
    buf: list[int] = []
    buf_start = begin = prev_end = 0  # absolute token positions

    def window(end: int) -> tuple[list[int], int]:
        row = buf[begin - buf_start : end - buf_start]
        return row, min(end - prev_end, len(row) - 1)

    for chunk in token_chunks:
        buf.extend(chunk)
        while begin + max_length <= buf_start + len(buf):
            end = begin + max_length
            yield window(end)
            prev_end, begin = end, begin + stride
            del buf[: begin - buf_start]
            buf_start = begin
    row, n = window(buf_start + len(buf))  # the last window, shorter: it ends the stream
    if n > 0:  # (none when the last full window ended it)
        yield row, n


def perplexity(lm: ScoringModel, paths: Sequence[str | Path], *, max_length: int | None = None,
               stride: int | None = None, report: Reporter = SILENT) -> dict[str, float]:
    """Perplexity, mean NLL, bits per byte, word perplexity and token count over `paths`
    (progress to `report`)."""
    max_length = max_length or lm.max_length
    stride = stride or max(max_length // 2, 1)
    if max_length < 2 or max_length > lm.max_length:
        raise UsageError(f"--max-length {max_length}: expected 2 … {lm.max_length} (the model's context)")
    if not 1 <= stride <= max_length:
        raise UsageError(f"--stride {stride}: expected 1 … --max-length ({max_length})")
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("the perplexity task needs --data FILE")
    for p in paths:
        if not p.is_file():
            raise DataError(f"data file {p}: no such file")
    stats = TextStats()
    nll, tokens = 0.0, 0
    total_bytes = sum(p.stat().st_size for p in paths)
    with report.progress("perplexity", total=total_bytes, unit="B") as bar:
        for path in paths:
            done = stats.bytes

            def chunks():
                for text in read_chunks(path, stats, CHUNK_CHARS):
                    yield lm.encode(text)
                    bar.update(completed=stats.bytes, tokens=tokens)

            batch: list[tuple[list[int], int]] = []
            for item in strided_windows(chunks(), max_length, stride):
                batch.append(item)
                if len(batch) == lm.batch_size:
                    nll, tokens = _add(lm, batch, nll, tokens)
                    batch = []
            if batch:
                nll, tokens = _add(lm, batch, nll, tokens)
            bar.update(completed=done + path.stat().st_size, tokens=tokens)
    if tokens == 0:
        raise DataError(f"no tokens to score in {', '.join(map(str, paths))} (empty or a single token)")
    mean = nll / tokens
    return {
        "perplexity": _exp(mean),
        "nll": mean,
        "bits_per_byte": nll / max(stats.bytes, 1) / math.log(2),
        "word_perplexity": _exp(nll / max(stats.words, 1)),
        "tokens": tokens,
    }


def _exp(x: float) -> float:
    """exp that saturates to inf instead of overflowing (huge word perplexities)."""
    return math.exp(x) if x < 709 else math.inf


def _add(lm: ScoringModel, batch: list[tuple[list[int], int]], nll: float, tokens: int) -> tuple[float, int]:
    scores = lm.score_rows([row for row, _ in batch], [n for _, n in batch], greedy=False)
    return nll - sum(s.logprob for s in scores), tokens + sum(s.tokens for s in scores)


@TASK_TYPES.register("perplexity")
@dataclass
class Perplexity(Task):
    """Strided perplexity of text files (`--data FILE…`)."""

    data: list[str] = field(default_factory=list)
    max_length: int | None = None  # window; default the model's context length
    stride: int | None = None  # default max_length // 2

    def run(self, lm: ScoringModel) -> dict[str, float]:
        base = Path(self.base_dir)  # `--data` is relative to the working directory, else to the task file
        paths = [Path(p) if Path(p).is_file() or not (base / p).is_file() else base / p for p in self.data]
        return perplexity(lm, paths, max_length=self.max_length, stride=self.stride, report=self.report)


@TASK_TYPES.register("loglikelihood_rolling")
@dataclass
class RollingLoglikelihood(DocumentTask):
    """Document perplexity in disjoint windows (lm-eval's wikitext metrics)."""

    prompt: str = "{{ text }}"  # the document text

    def run(self, lm: ScoringModel) -> dict[str, float]:
        texts = self.contexts(self.documents())
        with self.report.progress(self.name, unit="window") as bar:
            scores = lm.loglikelihood_rolling([lm.encode(t) for t in texts], bar)
        nll = -sum(s.logprob for s in scores)
        tokens = sum(s.tokens for s in scores)
        if tokens == 0:
            raise DataError(f"task {self.name}: the documents are empty")
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        words = sum(len(t.split()) for t in texts)
        return {
            "word_perplexity": _exp(nll / max(words, 1)),
            "byte_perplexity": _exp(nll / max(n_bytes, 1)),
            "bits_per_byte": nll / max(n_bytes, 1) / math.log(2),
            "token_perplexity": _exp(nll / tokens),
            "tokens": tokens,
            "examples": len(texts),
        }
