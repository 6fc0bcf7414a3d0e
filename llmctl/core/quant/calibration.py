"""Calibration windows: text read with the corpus readers, tokenized, cut into fixed-length rows.

    ids, record = calibration_windows(["wiki.txt"], tok, samples=128, seq_len=512, seed=0)

Documents are joined (EOS between them when the tokenizer has one) into one token stream and
`samples` windows of `seq_len` tokens are drawn from it at seeded random offsets, as GPTQ's
reference does. `record` is what lineage keeps: the files, sizes and a sha256 of the token ids.
"""

from __future__ import annotations

import hashlib

import torch

from llmctl.errors import DataError


def calibration_windows(sources: list[str], tok, samples: int, seq_len: int, seed: int = 0,
                        max_tokens: int = 1 << 24) -> tuple[torch.Tensor, dict]:
    from llmctl.core.data import Corpus

    corpus = Corpus(list(sources))
    eos = tok.eos_id
    stream: list[int] = []
    for batch in corpus.batches():
        for enc in tok.inner.encode_batch(batch, add_special_tokens=False):
            stream.extend(enc.ids)
            if eos is not None:
                stream.append(eos)
        if len(stream) >= max(max_tokens, samples * seq_len):
            break
    if len(stream) < seq_len:
        raise DataError(f"calibration data has {len(stream)} tokens, fewer than one window of --seq-len {seq_len}")
    tokens = torch.tensor(stream, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len + 1, (samples,), generator=g)
    ids = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
    record = {"files": list(corpus.paths), "tokens": len(stream), "samples": samples, "seq_len": seq_len,
              "seed": seed, "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
    return ids, record
