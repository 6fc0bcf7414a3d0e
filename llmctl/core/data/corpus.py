"""Reading corpora (`Corpus`) and JSONL.

`Corpus` reads `.txt` (and any other text file), `.jsonl`/`.ndjson` (one document per
record, field `text_field`), any of those gzip-compressed (`.gz`), directories (recursively,
sorted), glob patterns, and `-` for stdin. Files are streamed in 1 Mi-character chunks; invalid UTF-8
is replaced by U+FFFD and counted, never fatal. Text files are cut into documents by a `DOC_SPLITS`
entry (`split.py`).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from llmctl.core.data.split import DOC_SPLITS, MAX_DOC_CHARS, Continued, batched
from llmctl.errors import DataError, UsageError

CHUNK_CHARS = 1 << 20
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
TEXT_SUFFIXES = {".txt", ".text", ".md"}

# -- invalid UTF-8: replaced and counted -----------------------------------------------------
_invalid = [0]


def _replace_and_count(exc: UnicodeDecodeError):
    _invalid[0] += 1
    return "\ufffd", exc.end


codecs.register_error("llmctl-replace-count", _replace_and_count)


@dataclass
class ReadStats:
    """What a read consumed: files, documents, input bytes (as stored: compressed for .gz),
    the documents' UTF-8 text bytes (what is tokenized), and invalid UTF-8 sequences replaced."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    text_bytes: int = 0
    invalid_utf8: int = 0


# -- corpora --------------------------------------------------------------------------------------
def _is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def _corpus_file(path: Path) -> bool:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return not path.name.startswith(".") and bool(set(suffixes[:1]) & (JSONL_SUFFIXES | TEXT_SUFFIXES))


def expand_sources(sources: list[str]) -> list[str]:
    """Files named by `sources` (paths, directories, globs, `-`), in a deterministic order."""
    if not sources:
        raise UsageError("no corpus given (a file, directory, glob or - for stdin)")
    files: list[str] = []
    for source in sources:
        source = str(source)
        path = Path(source)
        if source == "-":
            files.append("-")
        elif path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and _corpus_file(p))
            if not found:
                raise DataError(f"{source}: directory has no .txt/.md/.jsonl/.ndjson(.gz) files")
            files.extend(found)
        elif path.exists():
            files.append(source)
        elif _is_glob(source):
            found = sorted(p for p in glob.glob(source, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"{source}: no files match this pattern")
            files.extend(found)
        else:
            raise DataError(f"{source}: no such file or directory")
    return files


def _continued(docs: list[str]) -> int:
    return sum(type(d) is Continued for d in docs)


class _Counting(io.RawIOBase):
    """A raw reader counting the bytes it hands out (progress and stats, compressed or stdin)."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer) or 0
        self.count += n
        return n


class Corpus:
    """A streamed collection of documents from files, directories, globs or stdin.

    `batches()` yields lists of documents; `files()` yields `(name, lists of documents)` per
    file; `documents()` yields documents one by one.
    `stats` counts as it goes; `total_bytes` is the on-disk size (None when reading stdin).
    """

    def __init__(self, sources: list[str], text_field: str = "text", doc_split: str = "blank",
                 max_doc_chars: int = MAX_DOC_CHARS):
        self.paths = expand_sources(sources)
        self.text_field = text_field
        self.doc_split = doc_split
        self.split = DOC_SPLITS.get(doc_split)
        self.max_doc_chars = max_doc_chars
        self.stats = ReadStats()
        self.total_bytes = None if "-" in self.paths else sum(Path(p).stat().st_size for p in self.paths)

    def files(self) -> Iterator[tuple[str, Iterator[list[str]]]]:
        for path in self.paths:
            yield ("<stdin>" if path == "-" else path), self._read(path)

    def documents(self) -> Iterator[str]:
        for _, doc_lists in self.files():
            for docs in doc_lists:
                yield from docs

    def batches(self, max_chars: int = 1 << 20) -> Iterator[list[str]]:
        """Documents grouped into lists of about `max_chars` characters."""
        return batched((docs for _, doc_lists in self.files() for docs in doc_lists), max_chars)

    def _read(self, path: str) -> Iterator[list[str]]:
        name = "<stdin>" if path == "-" else path
        try:
            raw = sys.stdin.buffer if path == "-" else open(path, "rb")
        except OSError as exc:
            raise DataError(f"{name}: cannot read ({exc.strerror or exc})") from None
        stats, start = self.stats, self.stats.bytes
        stats.files += 1
        counted = _Counting(raw)
        try:
            binary = io.BufferedReader(counted, 1 << 16)
            if path.endswith(".gz") or (path == "-" and binary.peek(2)[:2] == b"\x1f\x8b"):
                binary = gzip.GzipFile(fileobj=binary)
            text = io.TextIOWrapper(binary, encoding="utf-8", errors="llmctl-replace-count")
            jsonl = Path(path.removesuffix(".gz")).suffix in JSONL_SUFFIXES

            def tick() -> None:
                stats.bytes = start + counted.count

            def chunks() -> Iterator[str]:
                while chunk := text.read(CHUNK_CHARS):
                    tick()
                    yield chunk

            doc_lists = self._jsonl(name, text, tick) if jsonl else self.split(chunks(), self.max_doc_chars)
            before = _invalid[0]
            try:
                for docs in doc_lists:
                    if docs:
                        stats.documents += len(docs) - _continued(docs)
                        stats.text_bytes += sum(map(len, map(str.encode, docs)))
                        yield docs
            finally:
                stats.invalid_utf8 += _invalid[0] - before
                stats.bytes = start + counted.count
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{name}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        finally:
            if path != "-":
                raw.close()

    def _jsonl(self, name: str, text, tick: Callable[[], None]) -> Iterator[list[str]]:
        docs = []
        for lineno, record in parse_jsonl(text, name):
            if len(docs) == 1024:
                tick()
                yield docs
                docs = []
            if self.text_field not in record:
                raise DataError(f"{name}:{lineno}: no '{self.text_field}' field (choose one with --text-field)")
            value = record[self.text_field]
            if not isinstance(value, str):
                raise DataError(f"{name}:{lineno}: field '{self.text_field}' is {type(value).__name__}, not text")
            if value:
                docs.append(_without_surrogates(value))
        yield docs


def _without_surrogates(text: str) -> str:
    """JSON may escape lone surrogates (invalid Unicode): replace them with U+FFFD and count them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        _invalid[0] += sum(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return re.sub("[\ud800-\udfff]", "\ufffd", text)


def parse_jsonl(lines: Iterable[str], name: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line; DataError naming `name`:line for invalid JSON
    or a line that is not an object."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{name}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{name}:{number}: expected a JSON object per line")
        yield number, record


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "convert it first, e.g. iconv -t UTF-8") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """`parse_jsonl` over a file (`-`: stdin), streamed; DataError naming the line if it is not UTF-8."""
    if str(path) == "-":
        stream = getattr(sys.stdin, "buffer", None)  # a text-only stdin (tests, embedding): its lines re-encoded
        lines = stream if stream is not None else (line.encode("utf-8", "surrogateescape") for line in sys.stdin)
        yield from parse_jsonl((_utf8(raw, f"stdin:{number}") for number, raw in enumerate(lines, 1)), "stdin")
        return
    with open(path, "rb") as f:
        yield from parse_jsonl((_utf8(raw, f"{path}:{number}") for number, raw in enumerate(f, 1)), path)


def read_stdin() -> str:
    """All of stdin as text; DataError if it is not UTF-8."""
    stream = getattr(sys.stdin, "buffer", None)  # a text-only stdin (tests, embedding) has no bytes to check
    raw = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    return _utf8(raw, "stdin")
