"""Corpus reading (formats, document splits, invalid UTF-8) and token shards."""

from __future__ import annotations

import gzip
import io
import json
import sys

import numpy as np
import pytest

from llmctl.core import data
from llmctl.core.data import Corpus, ShardWriter, TokenShards, in_val, split_lines, split_paragraphs, token_dtype
from llmctl.errors import DataError, UsageError

TEXT = "First paragraph\nstill first.\n\n\nSecond one.\n  \nThird\n"


def docs_of(tmp_path, name, content, **kw) -> list[str]:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return list(Corpus([str(path)], **kw).documents())


def test_doc_splits(tmp_path):
    assert docs_of(tmp_path, "a.txt", TEXT) == ["First paragraph\nstill first.", "Second one.", "Third"]
    assert docs_of(tmp_path, "b.txt", TEXT, doc_split="line") == [
        "First paragraph", "still first.", "Second one.", "Third"]
    assert docs_of(tmp_path, "c.txt", TEXT, doc_split="file") == [TEXT]


@pytest.mark.parametrize("split", [split_paragraphs, split_lines])
def test_split_independent_of_chunk_boundaries(split):
    text = "alpha beta\n\ngamma\n \n\ndelta\nepsilon\n\n" * 7
    whole = [doc for docs in split(iter([text])) for doc in docs]
    for size in (1, 2, 3, 5, 8):
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        assert [doc for docs in split(iter(chunks)) for doc in docs] == whole


def test_long_document_is_streamed_in_pieces():
    text = "".join(f"line {i}\n" for i in range(100))
    for split in (split_paragraphs, split_lines, data.split_file):
        pieces = [doc for docs in split(iter([text[:333], text[333:]]), limit=50) for doc in docs]
        if split is split_lines:
            assert pieces == text.splitlines()
            continue
        assert all(len(p) <= 50 for p in pieces) and len(pieces) > 10
        assert "".join(pieces) == (text.strip() if split is split_paragraphs else text)
        assert [type(p) is data.Continued for p in pieces] == [True] * (len(pieces) - 1) + [False]


def test_cut_never_leaves_a_blank_final_piece():
    for split in (split_paragraphs, data.split_file):
        text = "x" * 40 + "\n" + " " * 30 + "\n\nnext\n"
        docs = [d for docs in split(iter([text[:45], text[45:]]), limit=50) for d in docs]
        assert type(docs[-1]) is not data.Continued and "next" in docs[-1]
        assert sum(type(d) is not data.Continued for d in docs) == (2 if split is split_paragraphs else 1)


def test_long_document_is_one_document_with_one_eos(tmp_path):
    from llmctl.core.data import encode_corpus
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer

    long = "".join(f"line {i} of a long document\n" for i in range(40))
    path = tmp_path / "c.txt"
    path.write_text("short one\n\n" + long + "\nshort two\n")
    tok = train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=300), [[long]])
    first = next(d for d in Corpus([str(path)], max_doc_chars=100).documents() if type(d) is data.Continued)
    seed = next(s for s in range(100) if in_val(first, 0.5, s) and not in_val("short one", 0.5, s))
    for fraction in (0.0, 0.5):
        corpus = Corpus([str(path)], max_doc_chars=100)
        out = tmp_path / f"out{fraction}"
        out.mkdir()
        m = encode_corpus(corpus, tok, out, val_fraction=fraction, seed=seed).manifest
        assert corpus.stats.documents == 3
        assert sum(m["splits"][s]["documents"] for s in ("train", "val")) == 3
        ids = np.concatenate([a for s in ("train", "val") for a in TokenShards(out).split(s)]).tolist()
        assert ids.count(tok.eos_id) == 3
        pieces = [d for d in Corpus([str(path)], max_doc_chars=100).documents()]
        assert len(pieces) > 5
        expected = [i for d in pieces for i in tok.encode(d) + ([] if type(d) is data.Continued else [tok.eos_id])]
        assert sorted(ids) == sorted(expected)
        if fraction == 0:
            assert ids == expected
        else:  # the whole long document went to val with its first piece
            val = np.concatenate(TokenShards(out).split("val")).tolist()
            assert [i for d in pieces[1:-1] for i in tok.encode(d)] == val[:len(val) - 1]


def test_jsonl_gz_directory_glob_and_stdin(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    with gzip.open(tmp_path / "d" / "b.txt.gz", "wt") as f:
        f.write("three\n\nfour\n")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\0\1")
    corpus = Corpus([str(tmp_path / "d")])
    assert list(corpus.documents()) == ["one", "two", "three", "four"]
    assert corpus.stats.text_bytes == 15 and corpus.stats.files == 2
    assert corpus.stats.bytes == sum(p.stat().st_size for p in (tmp_path / "d").glob("[ab]*"))
    assert list(Corpus([str(tmp_path / "d" / "*.jsonl")]).documents()) == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"body": "five"}\n')
    assert list(Corpus([str(tmp_path / "c.jsonl")], text_field="body").documents()) == ["five"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"six\n\nseven\n")))
    corpus = Corpus(["-"])
    assert corpus.total_bytes is None and list(corpus.documents()) == ["six", "seven"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xe9 ok\n\n\xff\xfe end \xc3\xa9\n")
    corpus = Corpus([str(path)])
    assert list(corpus.documents()) == ["caf\ufffd ok", "\ufffd\ufffd end é"]
    assert corpus.stats.invalid_utf8 == 3 and corpus.stats.documents == 2
    assert corpus.stats.bytes == path.stat().st_size


@pytest.mark.parametrize("content, message", [
    ('{"text": 1}\n', "not text"), ('{"txt": "a"}\n', "--text-field"), ("{oops\n", "invalid JSON"),
])
def test_bad_jsonl(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        docs_of(tmp_path, "x.jsonl", content)


def test_missing_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        Corpus([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="no files match"):
        Corpus([str(tmp_path / "*.txt")])
    with pytest.raises(DataError, match="directory has no"):
        Corpus([str(tmp_path)])
    with pytest.raises(UsageError, match="document split"):
        Corpus(["-"], doc_split="sentence")


def test_val_assignment_is_deterministic():
    docs = [f"document {i}" for i in range(2000)]
    picked = [d for d in docs if in_val(d, 0.1, seed=0)]
    assert picked == [d for d in docs if in_val(d, 0.1, seed=0)]
    assert 140 < len(picked) < 260
    assert picked != [d for d in docs if in_val(d, 0.1, seed=1)]
    assert not any(in_val(d, 0.0, 0) for d in docs)


def test_token_dtype():
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def write_shards(tmp_path, arrays, shard_tokens, dtype="uint16", vocab=1000):
    writer = ShardWriter(tmp_path, "train", dtype, shard_tokens)
    for a in arrays:
        writer.write(np.asarray(a, dtype=dtype), [len(a)])
    manifest = {"format": "llmctl-tokens", "version": 1, "dtype": dtype, "tokenizer_hash": "abc",
                "vocab_size": vocab, "eos_id": 0, "bos_id": 0,
                "splits": {"train": writer.summary(), "val": {"tokens": 0, "documents": 0, "shards": []}}}
    (tmp_path / data.MANIFEST).write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_shards_roll_over_and_memmap_back(tmp_path, dtype):
    arrays = [np.arange(i * 10, i * 10 + 7) for i in range(6)]
    manifest = write_shards(tmp_path, arrays, shard_tokens=14, dtype=dtype)
    assert (tmp_path / "train-00002.bin").stat().st_size == 14 * np.dtype(dtype).itemsize
    assert [(s["tokens"], s["documents"]) for s in manifest["splits"]["train"]["shards"]] == [(14, 2), (14, 2), (14, 2)]
    shards = TokenShards(tmp_path)
    maps = shards.split("train")
    assert all(isinstance(m, np.memmap) and not m.flags.writeable for m in maps)
    assert np.concatenate(maps).tolist() == np.concatenate(arrays).tolist()
    assert shards.num_tokens("train") == 42 and shards.num_tokens("val") == 0 and shards.splits == ["train"]


def test_shard_checks(tmp_path):
    write_shards(tmp_path, [[1, 2, 3]], shard_tokens=100)
    shards = TokenShards(tmp_path)
    shards.check_tokenizer("abc", 1000)
    with pytest.raises(UsageError, match="encoded with tokenizer abc"):
        shards.check_tokenizer("def", 1000)
    with pytest.raises(UsageError, match="1000-token vocabulary"):
        shards.check_tokenizer("abc", 999)
    with pytest.raises(UsageError, match="no 'test' split"):
        shards.split("test")
    (tmp_path / "train-00000.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="manifest says 3 uint16 tokens"):
        TokenShards(tmp_path)
    (tmp_path / data.MANIFEST).write_text(json.dumps({"format": "llmctl-tokens", "version": 1, "dtype": "uint16"}))
    with pytest.raises(DataError, match="malformed manifest.*splits"):
        TokenShards(tmp_path)
    with pytest.raises(DataError, match="not a token-shard directory"):
        TokenShards(tmp_path / "nothing")


def test_documents_are_counted_where_they_end(tmp_path):
    writer = ShardWriter(tmp_path, "train", "uint16", 4)
    writer.write(np.arange(10, dtype="uint16"), [3, 3, 8, 10])
    shards = writer.summary()["shards"]
    assert [(s["tokens"], s["documents"]) for s in shards] == [(4, 2), (4, 1), (2, 1)]


def test_jsonl_lone_surrogates_and_corrupt_gzip(tmp_path):
    corpus = Corpus([str(_write(tmp_path / "s.jsonl", b'{"text": "a\\ud800b"}\n'))])
    assert list(corpus.documents()) == ["a\ufffdb"] and corpus.stats.invalid_utf8 == 1
    with pytest.raises(DataError, match="bad.txt.gz: cannot read"):
        list(Corpus([str(_write(tmp_path / "bad.txt.gz", gzip.compress(b"hello world" * 99)[:-30]))]).documents())
    with pytest.raises(DataError, match="cannot read"):
        list(Corpus([str(_write(tmp_path / "junk.txt.gz", b"not gzip at all"))]).documents())


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def test_worker_processes_write_the_same_shards(tmp_path):
    """Parallel encoding (worker processes, small batches, long documents in pieces) gives
    byte-identical shards and the same manifest as encoding in this process."""
    from llmctl.core.data import encode_corpus
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer

    paragraphs = [f"paragraph {i}: " + "word " * (i % 37) + "ünïcode ✓" for i in range(400)]
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    tok = train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=300), [paragraphs])
    manifests = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        corpus = Corpus([str(path)], max_doc_chars=60)
        manifests[workers] = encode_corpus(corpus, tok, out, val_fraction=0.2, batch_chars=500, workers=workers).manifest
    assert manifests[1]["splits"] == manifests[2]["splits"]
    for shard in (s["file"] for split in manifests[1]["splits"].values() for s in split["shards"]):
        assert (tmp_path / "w1" / shard).read_bytes() == (tmp_path / "w2" / shard).read_bytes()
