"""What a document is in a text file: the `DOC_SPLITS` registry.

    blank  paragraphs separated by one or more blank lines (default), whitespace-trimmed
    line   every non-empty line
    file   the whole file
A document longer than `max_doc_chars` (256 Ki characters) is streamed in pieces cut at line
breaks: every piece but the last is a `Continued` string, so encoding adds no EOS between pieces,
counts one document and keeps it in one split. (The tokenizer needs some 400 bytes of memory per
character of a text, so this bounds peak memory whatever the input; a JSONL record is read whole.)
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

from llmctl.core.registry import Registry

MAX_DOC_CHARS = 1 << 18

# A splitter turns a file's text chunks into lists of documents (a list per chunk: the per-document
# work stays in C-level list operations, which matters at hundreds of MB/s).
DOC_SPLITS: Registry[Callable[[Iterator[str], int], Iterator[list[str]]]] = Registry("document split")
_BLANK = re.compile(r"\n[ \t\r\f\v]*\n\s*")


class Continued(str):
    """A piece of a long document whose text continues in the next document yielded."""


def _cut(text: str, limit: int) -> tuple[list[str], str]:
    """Cut `Continued` pieces of at most `limit` chars (at line breaks if possible) off `text`.

    The rest always holds non-whitespace, so it survives as the document's final piece.
    """
    pieces = []
    while len(text) > limit:
        at = text.rfind("\n", 0, limit) + 1 or limit
        if text[at:].isspace():
            break
        pieces.append(Continued(text[:at]))
        text = text[at:]
    return pieces, text


def _pieces(doc: str, limit: int) -> list[str]:
    pieces, rest = _cut(doc, limit)
    return [*pieces, rest]


def _split_on(split: Callable[[str], list[str]], strip: bool, chunks: Iterator[str],
              limit: int) -> Iterator[list[str]]:
    """Split the text of `chunks` into documents, whitespace-trimmed if `strip`, blank ones dropped.

    A document cut into pieces while streamed is trimmed at its two ends only, so its pieces
    join to the document the whole text gives.
    """
    def keep(parts: list[str]) -> list[str]:
        return [d.strip() if strip else d for d in parts if d and not d.isspace()]

    carry, cut = "", False  # cut: pieces of the document in `carry` were yielded
    for chunk in chunks:
        parts = split(carry + chunk)
        carry = parts.pop()
        if cut and parts:  # the cut document ends: only its tail is trimmed
            docs = [parts[0].rstrip() if strip else parts[0], *keep(parts[1:])]
            cut = False
        else:
            docs = keep(parts)
        if docs and max(map(len, docs)) > limit:
            docs = [piece for doc in docs for piece in _pieces(doc, limit)]
        if len(carry) > limit:
            pieces, carry = _cut(carry.lstrip() if strip and not cut else carry, limit)
            docs += pieces
            cut = cut or bool(pieces)
        yield docs
    yield [carry.rstrip() if strip else carry] if cut else keep([carry])


@DOC_SPLITS.register("blank")
def split_paragraphs(chunks: Iterator[str], limit: int = MAX_DOC_CHARS) -> Iterator[list[str]]:
    """Paragraphs separated by blank lines, trimmed; empty ones dropped."""
    return _split_on(_BLANK.split, True, chunks, limit)


@DOC_SPLITS.register("line")
def split_lines(chunks: Iterator[str], limit: int = MAX_DOC_CHARS) -> Iterator[list[str]]:
    """Every non-blank line (without its newline)."""
    return _split_on(lambda s: s.split("\n"), False, chunks, limit)


@DOC_SPLITS.register("file")
def split_file(chunks: Iterator[str], limit: int = MAX_DOC_CHARS) -> Iterator[list[str]]:
    """The whole file as one document."""
    text = ""
    for chunk in chunks:
        text += chunk
        if len(text) > limit:
            pieces, text = _cut(text, limit)
            yield pieces
    yield [text] if text.strip() else []


def batched(doc_lists: Iterable[list[str]], max_chars: int) -> Iterator[list[str]]:
    """Regroup lists of documents into batches of about `max_chars` characters."""
    batch: list[str] = []
    size = 0
    for docs in doc_lists:
        batch += docs
        size += sum(map(len, docs))
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
