"""Encoding a corpus into token shards (`encode_corpus`, in parallel worker processes with
`workers` > 1), and counting its tokens per file (`count_tokens`)."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from llmctl.core.data.corpus import Corpus, ReadStats
from llmctl.core.data.shards import FORMAT, MANIFEST, TOKENIZER_SUBDIR, VERSION, ShardWriter, token_dtype
from llmctl.core.data.split import Continued, batched
from llmctl.errors import DataError, UsageError


def in_val(doc: str, fraction: float, seed: int) -> bool:
    """Deterministic validation membership from the document's content and `seed`."""
    return fraction > 0 and zlib.crc32(doc.encode("utf-8", "surrogatepass"), seed & 0xFFFFFFFF) < fraction * 2**32


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
                writers[split].write(*_flatten(ids, lengths, picked, complete, eos if append_eos else None))
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


def _flatten(ids, lengths, picked, complete, eos: int | None):
    """The ids of the `picked` (at least one) documents of a batch concatenated, `eos` after each
    complete one (a `Continued` piece's document goes on), and the offsets where documents end."""
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
    return np.concatenate(pieces), ends  # the shard writer stores them in its dtype


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
