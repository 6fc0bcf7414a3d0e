"""`llmctl tokenize`: train tokenizers, encode corpora into token shards, chat templates.

A text file's documents are paragraphs separated by blank lines (`--doc-split blank`), or every
line (`line`), or the whole file (`file`); a JSONL record is one document (`--text-field`).
Documents over 256 Ki characters are read in pieces (still one document with one EOS: bounded memory).
"""


import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.console import console, emit, info, progress, table, warn
from llmctl.errors import UsageError
from llmctl.options import human_bytes
from llmctl.runtime import options

app = typer.Typer(help="Train tokenizers, encode corpora into token shards, chat templates.", no_args_is_help=True)

CorpusArg = Annotated[list[str], typer.Argument(help="Files (.txt, .jsonl, .gz), directories, globs, or - for stdin.")]
TokenizerOpt = Annotated[Path, typer.Option("--tokenizer", "-t", help="A tokenizer directory or a checkpoint.")]
TextField = Annotated[str, typer.Option("--text-field", help="The JSONL field holding the text.")]
DocSplit = Annotated[str, typer.Option("--doc-split", help="Documents in text files: blank (paragraphs), line, file.")]


def _corpus(sources: list[str], text_field: str, doc_split: str):
    from llmctl.core.data.corpus import Corpus

    return Corpus(sources, text_field=text_field, doc_split=doc_split)


def _report_invalid(stats) -> None:
    if stats.invalid_utf8:
        warn(f"{stats.invalid_utf8} invalid UTF-8 sequence(s) replaced with U+FFFD")


def _summary(title: str, facts: dict) -> None:
    console.print(table(title, ["", "value"], [[k, v] for k, v in facts.items()]))


@app.command()
def train(
    corpus: CorpusArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The tokenizer directory to write.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size, special tokens included.")],
    algo: Annotated[str, typer.Option(help="bytelevel, bpe, bpe_bytes (bpe with byte fallback), unigram, wordpiece or char.")] = "bytelevel",
    min_frequency: Annotated[int, typer.Option(help="Minimum pair frequency to merge (bpe, wordpiece).")] = 2,
    special_tokens: Annotated[
        Optional[list[str]], typer.Option("--special-tokens", help="Extra special tokens (repeat or comma-separate).")
    ] = None,
    lowercase: Annotated[bool, typer.Option(help="Lowercase all text.")] = False,
    normalize: Annotated[str, typer.Option(help="Unicode normalization: none, nfc, nfkc, nfd, nfkd.")] = "none",
    chat_template: Annotated[
        str, typer.Option(help="A built-in chat template (chatml, llama3) or a .jinja file.")
    ] = "chatml",
    text_field: TextField = "text",
    doc_split: DocSplit = "blank",
) -> None:
    """Train a tokenizer on a corpus (streamed) and write a transformers-loadable directory."""
    from llmctl.core.io import atomic_dir
    from llmctl.core.outputs import claim_output
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer

    with claim_output(output, "tokenizer", force=options.force, inputs=corpus):
        extra = [t for item in special_tokens or [] for t in item.split(",") if t]
        spec = TrainSpec(algo=algo, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=extra,
                         lowercase=lowercase, normalize=normalize, chat_template=chat_template)
        data = _corpus(corpus, text_field, doc_split)
        sample: list[str] = []  # the first batch (~1 MB), to measure compression afterwards
        start = time.perf_counter()
        with progress("train", total=data.total_bytes, unit="B") as bar:

            def batches():
                for batch in data.batches():
                    if not sample:
                        sample.extend(batch)
                    bar.update(completed=data.stats.bytes, docs=data.stats.documents)
                    yield batch
                bar.update(completed=data.stats.bytes, docs=data.stats.documents)

            tok = train_tokenizer(spec, batches())
        seconds = time.perf_counter() - start
        with atomic_dir(output, options.force) as tmp:
            tok.save(tmp)
    _report_invalid(data.stats)
    if tok.vocab_size < vocab_size:
        warn(f"--vocab-size {vocab_size:,} is more than this corpus supports: the vocabulary reached "
             f"{tok.vocab_size:,} tokens (a larger corpus or a lower --min-frequency gives more)")
    sample_tokens = sum(len(ids) for ids in tok.encode_batch(sample))
    sample_bytes = sum(len(s.encode("utf-8")) for s in sample)
    result = {
        "output": str(output), "algo": algo, "vocab_size": tok.vocab_size, "documents": data.stats.documents,
        "bytes": data.stats.bytes, "invalid_utf8": data.stats.invalid_utf8,
        "bytes_per_token": round(sample_bytes / max(sample_tokens, 1), 3), "seconds": round(seconds, 3),
        "tokenizer_hash": tok.hash,
    }
    emit(result, report=True, render=lambda: _summary(f"tokenizer → {output}", {
        "algorithm": algo, "vocab size": f"{tok.vocab_size:,}", "documents": f"{data.stats.documents:,}",
        "corpus": human_bytes(data.stats.bytes, decimal=True), "bytes/token": f"{result['bytes_per_token']:.2f} (on the first MB)",
        "time": f"{seconds:.1f} s", "hash": tok.hash,
    }))


@app.command()
def encode(
    corpus: CorpusArg,
    tokenizer: TokenizerOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="The token-shard directory to write.")],
    val_fraction: Annotated[
        float, typer.Option(help="Fraction of documents for the val split (by content hash and --seed).")
    ] = 0.0,
    append_eos: Annotated[
        bool, typer.Option("--append-eos/--no-append-eos", help="End each document with EOS.")
    ] = True,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file (the last holds the rest).")] = 1 << 28,
    workers: Annotated[int, typer.Option(help="Encoding processes (>1 pays off on machines with idle cores).")] = 1,
    text_field: TextField = "text",
    doc_split: DocSplit = "blank",
) -> None:
    """Encode a corpus into memory-mappable token shards (batched, bounded memory)."""
    from llmctl.core.data.encode import encode_corpus
    from llmctl.core.io import atomic_dir
    from llmctl.core.outputs import claim_output
    from llmctl.core.tokenizer import load_tokenizer

    if shard_tokens < 1 or workers < 1:
        raise UsageError(f"--shard-tokens {shard_tokens} / --workers {workers}: must be positive")
    with claim_output(output, "shards", force=options.force, inputs=[*corpus, tokenizer]):
        tok = load_tokenizer(tokenizer)
        data = _corpus(corpus, text_field, doc_split)
        with atomic_dir(output, options.force) as tmp, progress("encode", total=data.total_bytes, unit="B") as bar:
            result = encode_corpus(
                data, tok, tmp, val_fraction=val_fraction, append_eos=append_eos, seed=options.seed or 0,
                shard_tokens=shard_tokens, workers=workers,
                on_batch=lambda s: bar.update(completed=s.bytes, docs=s.documents),
            )
    _report_invalid(result.stats)
    m, stats = result.manifest, result.stats
    if val_fraction > 0 and m["splits"]["val"]["documents"] == 0:
        warn(f"--val-fraction {val_fraction} selected no documents: the val split is empty")
    tokens = sum(s["tokens"] for s in m["splits"].values())
    content_tokens = tokens - (stats.documents if append_eos else 0)
    facts = {
        "output": str(output), "tokenizer_hash": m["tokenizer_hash"], "dtype": m["dtype"],
        "documents": stats.documents, "tokens": tokens, "bytes": stats.bytes, "text_bytes": stats.text_bytes,
        "bytes_per_token": round(stats.text_bytes / max(content_tokens, 1), 3), "invalid_utf8": stats.invalid_utf8,
        "seconds": round(result.seconds, 3), "mb_per_s": round(stats.text_bytes / 1e6 / max(result.seconds, 1e-9), 2),
        "splits": {s: {"tokens": v["tokens"], "documents": v["documents"], "shards": len(v["shards"])}
                   for s, v in m["splits"].items()},
    }

    def render() -> None:
        rows = [[s, f"{v['documents']:,}", f"{v['tokens']:,}", v["shards"]] for s, v in facts["splits"].items()]
        console.print(table(f"token shards → {output}", ["split", "documents", "tokens", "shards"], rows))
        info(f"{human_bytes(stats.text_bytes, decimal=True)} of text in {result.seconds:.1f} s ({facts['mb_per_s']} MB/s), "
             f"{facts['bytes_per_token']:.2f} bytes/token, {m['dtype']}, tokenizer {m['tokenizer_hash']}")

    emit(facts, render, report=True)


def _parse_ids(words: list[str]) -> list[int]:
    import re

    ids = []
    for word in words:
        for item in re.split(r"[\s,\[\]]+", word):
            if not item:
                continue
            try:
                ids.append(int(item))
            except ValueError:
                raise UsageError(f"not a token id: '{item}'") from None
    return ids


def _shard_ids(path: Path, split: str, offset: int, limit: int | None) -> list[int]:
    """Ids [offset, offset+limit) of a .bin shard or of a split of a token-shard directory."""
    import numpy as np

    from llmctl.core.data.shards import TokenShards

    if not path.exists():
        raise UsageError(f"--shard {path}: no such file or directory")
    shards = TokenShards(path if path.is_dir() else path.parent)
    if path.is_dir():
        arrays = shards.split(split)
    else:
        arrays = [np.memmap(path, dtype=np.dtype(shards.dtype).newbyteorder("<"), mode="r")]
    out: list[int] = []
    for array in arrays:
        if offset >= len(array):
            offset -= len(array)
            continue
        end = None if limit is None else offset + limit - len(out)
        out.extend(array[offset:end].tolist())
        offset = 0
        if limit is not None and len(out) >= limit:
            break
    return out


@app.command()
def decode(
    tokenizer: TokenizerOpt,
    ids: Annotated[Optional[list[str]], typer.Argument(help="Token ids (default: read from stdin).")] = None,
    shard: Annotated[Optional[Path], typer.Option(help="Decode from a .bin shard or a token-shard directory.")] = None,
    split: Annotated[str, typer.Option(help="Split to read when --shard is a directory.")] = "train",
    offset: Annotated[int, typer.Option(help="First token of the shard to decode.")] = 0,
    limit: Annotated[int, typer.Option(help="Tokens to decode from a shard (0: all).")] = 4096,
    skip_special_tokens: Annotated[bool, typer.Option(help="Drop special tokens from the text.")] = False,
) -> None:
    """Turn token ids (arguments, stdin, or a shard) back into text on stdout."""
    from llmctl.core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if shard is not None:
        if ids:
            raise UsageError("give token ids or --shard, not both")
        values = _shard_ids(shard, split, offset, limit or None)
    else:
        from llmctl.core.data.corpus import read_stdin

        values = _parse_ids(ids if ids else [read_stdin()])
    bad = [i for i in values if not 0 <= i < tok.vocab_size]
    if bad:
        raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
    text = tok.decode(values, skip_special_tokens=skip_special_tokens)
    if options.json:
        emit({"text": text, "tokens": len(values)})
    else:
        sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
        sys.stdout.flush()


@app.command()
def count(
    corpus: CorpusArg,
    tokenizer: TokenizerOpt,
    text_field: TextField = "text",
    doc_split: DocSplit = "blank",
) -> None:
    """Count tokens per file and in total."""
    from llmctl.core.data.encode import count_tokens
    from llmctl.core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    data = _corpus(corpus, text_field, doc_split)
    with progress("count", total=data.total_bytes, unit="B") as bar:
        rows = count_tokens(data, tok, on_batch=lambda s: bar.update(completed=s.bytes))
    _report_invalid(data.stats)
    total = {key: sum(r[key] for r in rows) for key in ("documents", "bytes", "text_bytes", "tokens")}
    for row in [*rows, total]:
        row["bytes_per_token"] = round(row["text_bytes"] / row["tokens"], 3) if row["tokens"] else None
    result = {"files": rows, "total": total, "tokenizer_hash": tok.hash}

    def render() -> None:
        def line(name, r):
            return [name, f"{r['documents']:,}", human_bytes(r["text_bytes"], decimal=True), f"{r['tokens']:,}", r["bytes_per_token"]]

        body = [line(r["file"], r) for r in rows] + ([line("total", total)] if len(rows) > 1 else [])
        console.print(table(None, ["file", "documents", "text", "tokens", "bytes/token"], body))

    emit(result, render)


@app.command()
def inspect(
    text: Annotated[str, typer.Argument(help="The text to tokenize, or - for stdin.")],
    tokenizer: TokenizerOpt,
) -> None:
    """Show how a text splits into tokens: pieces in alternating colours, ids, bytes/token."""
    from rich.text import Text

    from llmctl.core.tokenizer import load_tokenizer

    if text == "-":
        from llmctl.core.data.corpus import read_stdin

        text = read_stdin()
    tok = load_tokenizer(tokenizer)
    pieces = tok.pieces(text)
    n_bytes = len(text.encode("utf-8"))
    result = {
        "ids": [p[0] for p in pieces], "tokens": [p[1] for p in pieces], "pieces": [p[2] for p in pieces],
        "bytes": n_bytes, "bytes_per_token": round(n_bytes / len(pieces), 3) if pieces else None,
    }

    def render() -> None:
        colours = ("black on bright_cyan", "black on bright_yellow")
        shown, listing = Text(), Text()
        for k, (i, token, piece) in enumerate(pieces):
            style = colours[k % 2]
            shown.append(piece.replace("\n", "↵\n"), style=style)
            listing.append(f"{token!r}", style=style).append(f" {i}  ")
        console.print(shown)
        console.print(listing)
        info(f"{len(pieces)} tokens, {n_bytes} bytes, {result['bytes_per_token'] or 0:.2f} bytes/token")

    emit(result, render)


@app.command("set-template")
def set_template(
    target: Annotated[Path, typer.Argument(help="A tokenizer directory or a checkpoint.")],
    template: Annotated[str, typer.Argument(help="A built-in template (chatml, llama3) or a .jinja file.")],
) -> None:
    """Set the chat template of a tokenizer (adding the special tokens it needs)."""
    from llmctl.core.outputs import output_lock
    from llmctl.core.tokenizer import set_template_in_dir

    with output_lock(target) if target.exists() else nullcontext():  # (a missing target is reported below)
        added = set_template_in_dir(target, template)
    emit({"target": str(target), "template": template, "added_tokens": added},
         lambda: info(f"chat template {template} set in {target}"
                      + (f" (added special tokens: {' '.join(added)})" if added else "")))
