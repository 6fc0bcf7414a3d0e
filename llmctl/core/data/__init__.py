"""Corpora in, token shards out.

Modules: `corpus` (streamed corpora: text, JSONL, gzip, directories, globs, stdin; JSONL
and stdin readers), `split` (what a document is: the `DOC_SPLITS` registry), `shards` (token
shard writer, manifest, `TokenShards`), `encode` (`encode_corpus`, the parallel encoder,
`count_tokens`). The public names of each are re-exported here.
"""

from llmctl.core.data.corpus import (
    CHUNK_CHARS, JSONL_SUFFIXES, TEXT_SUFFIXES, Corpus, ReadStats, expand_sources, iter_jsonl, parse_jsonl,
    read_stdin,
)
from llmctl.core.data.encode import EncodeResult, count_tokens, encode_corpus, in_val
from llmctl.core.data.shards import FORMAT, MANIFEST, TOKENIZER_SUBDIR, VERSION, ShardWriter, TokenShards, token_dtype
from llmctl.core.data.split import (
    DOC_SPLITS, MAX_DOC_CHARS, Continued, batched, split_file, split_lines, split_paragraphs,
)

__all__ = [
    "CHUNK_CHARS", "DOC_SPLITS", "FORMAT", "JSONL_SUFFIXES", "MANIFEST", "MAX_DOC_CHARS", "TEXT_SUFFIXES",
    "TOKENIZER_SUBDIR", "VERSION", "Continued", "Corpus", "EncodeResult", "ReadStats", "ShardWriter",
    "TokenShards", "batched", "count_tokens", "encode_corpus", "expand_sources", "in_val", "iter_jsonl",
    "parse_jsonl", "read_stdin", "split_file", "split_lines", "split_paragraphs", "token_dtype",
]
