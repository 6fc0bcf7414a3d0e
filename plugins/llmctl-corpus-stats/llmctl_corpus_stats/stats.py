"""Corpus statistics in one streaming pass and bounded memory."""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class CorpusStats:
    """Counts for one input. Documents are lines of a .jsonl file, or blank-line-separated
    paragraphs of a text file. Word counts stay in a table of at most `capacity` entries:
    once it overflows, the rarest half is dropped and the top words become approximate."""

    name: str
    capacity: int = 200_000
    documents: int = 0
    lines: int = 0
    characters: int = 0
    bytes: int = 0
    words: int = 0
    approximate: bool = False
    counts: Counter = field(default_factory=Counter, repr=False)

    def add_words(self, text: str) -> None:
        found = WORD.findall(text.lower())
        self.words += len(found)
        self.counts.update(found)
        if len(self.counts) > self.capacity:
            self.counts = Counter(dict(self.counts.most_common(self.capacity // 2)))
            self.approximate = True

    def top(self, n: int) -> list[tuple[str, int]]:
        return self.counts.most_common(n)

    def to_dict(self, top: int) -> dict:
        return {
            "name": self.name,
            "documents": self.documents,
            "lines": self.lines,
            "characters": self.characters,
            "bytes": self.bytes,
            "words": self.words,
            "top_words": [[w, c] for w, c in self.top(top)],
            "top_words_approximate": self.approximate,
        }


def _open(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def scan(path: str, on_bytes: Callable[[int], None] | None = None, capacity: int = 200_000) -> CorpusStats:
    """Stream one file (`-` for stdin) and return its statistics."""
    stats = CorpusStats(Path(path).name if path != "-" else "<stdin>", capacity=capacity)
    is_jsonl = path.removesuffix(".gz").endswith(".jsonl")
    in_paragraph = False
    pending = 0  # bytes not yet reported to on_bytes (reported per MiB: callbacks are slow)
    stream = _open(path)
    try:
        for raw in stream:
            stats.bytes += len(raw)
            pending += len(raw)
            if on_bytes and pending >= 1 << 20:
                on_bytes(pending)
                pending = 0
            line = raw.decode("utf-8", errors="replace")
            stats.lines += 1
            if is_jsonl:
                if not line.strip():
                    continue
                try:
                    text = json.loads(line).get("text", "")
                except (json.JSONDecodeError, AttributeError):
                    raise ValueError(f"{path}:{stats.lines}: not a JSON object") from None
                stats.documents += 1
            else:
                text = line.rstrip("\r\n")
                if text.strip():
                    stats.documents += not in_paragraph
                    in_paragraph = True
                else:
                    in_paragraph = False
            stats.characters += len(text)
            stats.add_words(text)
    finally:
        if on_bytes and pending:
            on_bytes(pending)
        if stream is not sys.stdin.buffer:
            stream.close()
    return stats
