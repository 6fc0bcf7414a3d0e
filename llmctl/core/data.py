"""Corpora in, token shards out.

Reading (`Corpus`): `.txt` (and any other text file), `.jsonl`/`.ndjson` (one document per
record, field `text_field`), any of those gzip-compressed (`.gz`), directories (recursively,
sorted), glob patterns, and `-` for stdin. Files are streamed in 1 Mi-character chunks; invalid UTF-8
is replaced by U+FFFD and counted, never fatal.

What a document is in a text file (`doc_split`):
    blank  paragraphs separated by one or more blank lines (default), whitespace-trimmed
    line   every non-empty line
    file   the whole file
A document longer than `max_doc_chars` (256 Ki characters) is streamed in pieces cut at line
breaks: every piece but the last is a `Continued` string, so encoding adds no EOS between pieces,
counts one document and keeps it in one split. (The tokenizer needs some 400 bytes of memory per
character of a text, so this bounds peak memory whatever the input; a JSONL record is read whole.)

Token shards (`ShardWriter`, `TokenShards`): a directory with `manifest.json` and flat
little-endian uint16/uint32 `.bin` files per split (`train-00000.bin`, `val-00000.bin`, …).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from llmctl.core.io import inside
from llmctl.core.registry import Registry
from llmctl.errors import DataError, UsageError

CHUNK_CHARS = 1 << 20
MAX_DOC_CHARS = 1 << 18
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
TEXT_SUFFIXES = {".txt", ".text", ".md"}
MANIFEST = "manifest.json"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT, VERSION = "llmctl-tokens", 1

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


# -- document splitting -------------------------------------------------------------------------
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


def _split_on(split: Callable[[str], list[str]], keep: Callable[[list[str]], list[str]],
              chunks: Iterator[str], limit: int) -> Iterator[list[str]]:
    """Split the text of `chunks` into documents; `keep` cleans and filters whole ones."""
    carry = ""
    for chunk in chunks:
        parts = split(carry + chunk)
        carry = parts.pop()
        docs = keep(parts)
        if docs and max(map(len, docs)) > limit:
            docs = [piece for doc in docs for piece in _pieces(doc, limit)]
        if len(carry) > limit:
            pieces, carry = _cut(carry, limit)
            docs += pieces
        yield docs
    yield keep([carry])


@DOC_SPLITS.register("blank")
def split_paragraphs(chunks: Iterator[str], limit: int = MAX_DOC_CHARS) -> Iterator[list[str]]:
    """Paragraphs separated by blank lines, trimmed; empty ones dropped."""
    return _split_on(_BLANK.split, lambda parts: [d for d in map(str.strip, parts) if d], chunks, limit)


@DOC_SPLITS.register("line")
def split_lines(chunks: Iterator[str], limit: int = MAX_DOC_CHARS) -> Iterator[list[str]]:
    """Every non-blank line (without its newline)."""
    return _split_on(lambda s: s.split("\n"), lambda parts: [d for d in parts if d and not d.isspace()],
                     chunks, limit)


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


# -- token shards ---------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def in_val(doc: str, fraction: float, seed: int) -> bool:
    """Deterministic validation membership from the document's content and `seed`."""
    return fraction > 0 and zlib.crc32(doc.encode("utf-8", "surrogatepass"), seed & 0xFFFFFFFF) < fraction * 2**32


class ShardWriter:
    """Appends token arrays of one split to `{split}-NNNNN.bin` files of about `shard_tokens`."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None

    def write(self, tokens, ends) -> None:
        """Append `tokens`, in which documents end at the (ascending) offsets `ends`.

        Shards hold exactly `shard_tokens` tokens (the last fewer); a document is counted in
        the shard where it ends.
        """
        import numpy as np

        tokens = tokens.astype(np.dtype(self.dtype).newbyteorder("<"), copy=False)
        ends = np.asarray(ends)
        pos = 0
        while pos < tokens.size:
            if self._file is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self._file = open(self.directory / name, "wb")
                self.shards.append({"file": name, "tokens": 0, "documents": 0})
            shard = self.shards[-1]
            end = pos + min(tokens.size - pos, self.shard_tokens - shard["tokens"])
            self._file.write(tokens[pos:end].tobytes())
            shard["tokens"] += end - pos
            first = np.searchsorted(ends, pos, "left" if pos == 0 else "right")
            shard["documents"] += int(np.searchsorted(ends, end, "right") - first)
            pos = end
            if shard["tokens"] >= self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict[str, Any]:
        self.close()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }


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
    """`parse_jsonl` over a file, streamed; DataError naming the line if it is not UTF-8."""
    with open(path, "rb") as f:
        yield from parse_jsonl((_utf8(raw, f"{path}:{number}") for number, raw in enumerate(f, 1)), path)


def read_stdin() -> str:
    """All of stdin as text; DataError if it is not UTF-8."""
    stream = getattr(sys.stdin, "buffer", None)  # a text-only stdin (tests, embedding) has no bytes to check
    raw = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    return _utf8(raw, "stdin")


class TokenShards:
    """A token-shard directory: `manifest`, `split(name)` → read-only memmaps, size checks,
    and `tokenizer_dir`, the copy of the tokenizer that encoded it (None for older shards)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory)
        file = self.path / MANIFEST
        if not file.is_file():
            raise DataError(f"{self.path}: not a token-shard directory (no {MANIFEST}; "
                            "make one with llmctl tokenize encode)")
        try:
            self.manifest = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{file}: unreadable manifest ({exc})") from None
        m = self.manifest
        found = (m.get("format"), m.get("version")) if isinstance(m, dict) else (type(m).__name__, None)
        if found != (FORMAT, VERSION):
            raise DataError(f"{file}: expected format {FORMAT} version {VERSION}, found {found[0]} version {found[1]}")
        try:
            self._check_files()
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{file}: malformed manifest ({type(exc).__name__}: {exc})") from None

    def _check_files(self) -> None:
        self.dtype = self.manifest["dtype"]
        if self.dtype not in ("uint16", "uint32"):
            raise DataError(f"{self.path / MANIFEST}: unsupported dtype {self.dtype}")
        itemsize = 2 if self.dtype == "uint16" else 4
        if self.manifest.get("tokenizer") is not None:
            inside(self.path, self.manifest["tokenizer"], str(self.path / MANIFEST), DataError)
        for info in self.manifest["splits"].values():
            for shard in info["shards"]:
                path = inside(self.path, shard["file"], str(self.path / MANIFEST), DataError)
                if not path.is_file():
                    raise DataError(f"{path}: shard listed in the manifest is missing")
                if path.stat().st_size != shard["tokens"] * itemsize:
                    raise DataError(f"{path}: {path.stat().st_size} bytes, the manifest says "
                                    f"{shard['tokens']} {self.dtype} tokens ({shard['tokens'] * itemsize} bytes)")

    @property
    def tokenizer_dir(self) -> Path | None:
        sub = self.manifest.get("tokenizer")
        return self.path / sub if sub and (self.path / sub / "tokenizer.json").is_file() else None

    @property
    def splits(self) -> list[str]:
        return [s for s, info in self.manifest["splits"].items() if info["tokens"] > 0]

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer_hash"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def split(self, name: str) -> list:
        """The shards of a split as read-only little-endian numpy memmaps."""
        import numpy as np

        if name not in self.manifest["splits"]:
            raise UsageError(f"{self.path}: no '{name}' split (have: {', '.join(self.manifest['splits'])})")
        dtype = np.dtype(self.dtype).newbyteorder("<")
        return [np.memmap(self.path / s["file"], dtype=dtype, mode="r")
                for s in self.manifest["splits"][name]["shards"] if s["tokens"] > 0]

    def num_tokens(self, split: str = "train") -> int:
        return self.manifest["splits"].get(split, {}).get("tokens", 0)

    def check_tokenizer(self, tok_hash: str | None, vocab_size: int) -> None:
        """Raise UsageError unless these shards were encoded by this tokenizer and ids fit the vocab."""
        if tok_hash is not None and tok_hash != self.tokenizer_hash:
            raise UsageError(
                f"{self.path} was encoded with tokenizer {self.tokenizer_hash}, but the tokenizer in use is "
                f"{tok_hash}; re-encode with llmctl tokenize encode --tokenizer …"
            )
        if vocab_size < self.vocab_size:
            raise UsageError(
                f"{self.path} holds ids of a {self.vocab_size}-token vocabulary; the model has only {vocab_size}"
            )


# -- encoding a corpus -----------------------------------------------------------------------------
@dataclass
class EncodeResult:
    manifest: dict[str, Any]
    stats: ReadStats
    seconds: float


def encode_corpus(
    corpus: Corpus,
    tok,
    out_dir: Path,
    *,
    val_fraction: float = 0.0,
    append_eos: bool = True,
    seed: int = 0,
    shard_tokens: int = 1 << 28,
    batch_chars: int = 1 << 20,
    workers: int = 1,
    on_batch: Callable[[ReadStats], None] | None = None,
) -> EncodeResult:
    """Stream `corpus` through `tok` into token shards in `out_dir`; with `workers` > 1,
    that many processes encode batches in parallel while this one reads and writes.

    Memory is bounded by a few batches of text and their ids. The caller owns `out_dir`
    (normally an `atomic_dir`) and writes nothing else into it; the manifest is written here.
    """
    import time

    import numpy as np

    from llmctl.core.io import write_json

    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    eos = tok.eos_id
    if append_eos and eos is None:
        raise UsageError("the tokenizer has no eos token; use --no-append-eos or set eos_token")
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out_dir, s, dtype, shard_tokens) for s in ("train", "val")}

    route = False  # the split of the document being read (pieces of a long one stay together)
    continues = False

    def store(batch: list[str], ids, lengths) -> None:
        nonlocal route, continues
        routes = np.zeros(len(batch), dtype=bool)
        if val_fraction > 0:
            for i, doc in enumerate(batch):
                route = route if continues else in_val(doc, val_fraction, seed)
                routes[i], continues = route, type(doc) is Continued
        complete = np.fromiter((type(doc) is not Continued for doc in batch), dtype=bool, count=len(batch))
        for split, wanted in (("train", False), ("val", True)):
            picked = routes == wanted
            if picked.any():
                writers[split].write(*_flatten(ids, lengths, picked, complete, eos if append_eos else None, dtype))
        if on_batch is not None:
            on_batch(corpus.stats)

    start = time.perf_counter()
    for batch, (ids, lengths) in _encode_batches(corpus.batches(batch_chars), tok, workers):
        store(batch, ids, lengths)
    seconds = time.perf_counter() - start
    stats = corpus.stats
    splits = {s: w.summary() for s, w in writers.items()}
    if splits["train"]["documents"] == 0 and splits["val"]["documents"] == 0:
        raise DataError(f"empty corpus: no text in {', '.join(corpus.paths)}")
    if splits["train"]["documents"] == 0:
        raise DataError(f"--val-fraction {val_fraction} left no training documents")
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": dtype,
        "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": eos, "bos_id": tok.bos_id,
        "append_eos": append_eos, "val_fraction": val_fraction, "seed": seed,
        "doc_split": corpus.doc_split, "sources": corpus.paths,
        "bytes": stats.bytes, "text_bytes": stats.text_bytes, "invalid_utf8": stats.invalid_utf8,
        "splits": splits, "tokenizer": TOKENIZER_SUBDIR,
    }
    tok.save(out_dir / TOKENIZER_SUBDIR)  # shards carry their tokenizer: training needs no tokenizer=
    write_json(out_dir / MANIFEST, manifest)
    return EncodeResult(manifest, stats, seconds)


def _flatten(ids, lengths, picked, complete, eos: int | None, dtype: str):
    """The ids of the `picked` documents of a batch concatenated, `eos` after each complete one
    (a `Continued` piece's document goes on), and the offsets where documents end."""
    import numpy as np

    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    pieces, ends, size = [], [], 0
    for start, length, done in zip(starts[picked], lengths[picked], complete[picked]):
        pieces.append(ids[start:start + length])
        size += int(length)
        if done:
            if eos is not None:
                pieces.append(np.array([eos], dtype=ids.dtype))
                size += 1
            ends.append(size)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=ids.dtype)
    return flat.astype(dtype, copy=False), ends


# -- parallel encoding: `tokenizers` parallelises poorly on small machines, so each worker
#    process encodes whole batches single-threaded and the parent writes them in order.
_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _ids_of(tokenizer, batch: list[str]):
    """(every document's ids concatenated as uint32, per-document lengths)."""
    import itertools

    import numpy as np

    encodings = tokenizer.encode_batch_fast(batch, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.uint32,
                      count=int(lengths.sum()))
    return ids, lengths


def _encode_in_worker(batch: list[str]):
    return _ids_of(_worker_tokenizer, batch)


def _encode_batches(batches: Iterable[list[str]], tok, workers: int):
    """(batch, (ids, lengths)) in input order; at most 2 × `workers` batches in flight."""
    if workers <= 1:
        for batch in batches:
            yield batch, _ids_of(tok.inner, batch)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
    with ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(tok.inner.to_str(),)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode_in_worker, batch)))
            if len(pending) >= 2 * workers:
                batch, future = pending.popleft()
                yield batch, future.result()
        while pending:
            batch, future = pending.popleft()
            yield batch, future.result()


def count_tokens(corpus: Corpus, tok, on_batch: Callable[[ReadStats], None] | None = None,
                 batch_chars: int = 1 << 20) -> list[dict[str, Any]]:
    """Tokens, documents, input bytes and text bytes per file of `corpus` (encoded in parallel batches)."""
    rows = []
    stats = corpus.stats
    for name, doc_lists in corpus.files():
        before = (stats.documents, stats.bytes, stats.text_bytes)
        tokens = 0
        for batch in batched(doc_lists, batch_chars):
            tokens += sum(len(e.ids) for e in tok.inner.encode_batch_fast(batch, add_special_tokens=False))
            if on_batch is not None:
                on_batch(stats)
        rows.append({"file": name, "documents": stats.documents - before[0], "bytes": stats.bytes - before[1],
                     "text_bytes": stats.text_bytes - before[2], "tokens": tokens})
    return rows
