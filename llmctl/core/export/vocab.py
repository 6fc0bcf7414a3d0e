"""A checkpoint's tokenizer as GGUF `tokenizer.ggml.*` metadata.

Byte-level BPE becomes llama.cpp's `gpt2` model (tokens, merges, pre-tokenizer name);
Metaspace BPE and Unigram become its SentencePiece-style `llama` model (tokens, scores, types).
Embedding rows beyond the tokenizer are padded with unused `[PAD{id}]` tokens.
"""

from __future__ import annotations

import json
from typing import Any

from llmctl.core.report import Reporter
from llmctl.errors import UsageError

# Hugging Face pre-tokenizer split patterns llama.cpp knows by name ("gpt-2" is ByteLevel's own).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_LLAMA3: "llama-bpe", _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2"}

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _parts(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def _byte_level_pre(pre: dict | None, report: Reporter) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer's pre_tokenizer."""
    parts = _parts(pre)
    for p in parts:
        if p.get("type") == "ByteLevel" and p.get("add_prefix_space"):
            report.warn("the tokenizer adds a prefix space, llama.cpp's gpt2 tokenizer does not: "
                        "the first word may tokenize differently")
    splits = [p for p in parts if p.get("type") == "Split"]
    if not splits and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt-2"
    if len(splits) == 1 and (name := PRE_TOKENIZERS.get((splits[0].get("pattern") or {}).get("Regex"))):
        return name
    report.warn("llama.cpp does not know this tokenizer's pre-tokenizer; it will split text with its "
                "default pattern, so some texts may tokenize differently")
    return "default"


def _types_and_tokens(tok, data: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    vocab = tok.inner.get_vocab(with_added_tokens=True)
    n_tok = max(vocab.values()) + 1 if vocab else 0
    if n_tok > n_vocab:
        raise UsageError(f"the tokenizer has {n_tok} tokens but the model only {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, NORMAL
    for added in data.get("added_tokens") or []:
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if tok.unk_id is not None:
        types[tok.unk_id] = UNKNOWN
    return tokens, types


def add_vocab(writer, checkpoint, n_vocab: int, report: Reporter) -> str | None:
    """Write the tokenizer of `checkpoint` into `writer`; a short description, or None without one."""
    from llmctl.core.tokenizer import load_tokenizer
    from llmctl.errors import CheckpointError

    try:
        tok = load_tokenizer(checkpoint)
    except CheckpointError:
        report.warn("the checkpoint has no tokenizer: the GGUF file carries none (llama.cpp can then "
                    "only run token ids)")
        writer.add_tokenizer_model("no_vocab")
        return None
    data = json.loads(tok.inner.to_str())
    model: dict[str, Any] = data["model"]
    parts = {p.get("type") for p in _parts(data.get("pre_tokenizer"))}
    if data.get("normalizer"):
        report.warn(f"llama.cpp does not apply the tokenizer's normalizer ({data['normalizer'].get('type')}); "
                    "unnormalized text may tokenize differently")
    tokens, types = _types_and_tokens(tok, data, n_vocab)
    if model["type"] == "BPE" and "ByteLevel" in parts:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_byte_level_pre(data.get("pre_tokenizer"), report))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []])
        kind = "gpt2 (byte-level BPE)"
    elif model["type"] in ("BPE", "Unigram") and "Metaspace" in parts:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        scores = [0.0] * n_vocab
        if model["type"] == "Unigram":
            for i, (_, score) in enumerate(model["vocab"]):
                scores[i] = float(score)
        else:  # minus the merge rank: llama.cpp's SentencePiece merges the best-scoring pair first
            vocab, ranked = model["vocab"], set()
            for rank, m in enumerate(model.get("merges") or []):
                i = vocab.get("".join(m.split(" ") if isinstance(m, str) else m))
                if i is not None and i not in ranked:
                    scores[i] = -float(rank + 1)
                    ranked.add(i)
            if model.get("byte_fallback"):
                for b in range(256):
                    i = vocab.get(f"<0x{b:02X}>")
                    if i is not None:
                        types[i] = BYTE
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(True)
        kind = f"llama (SentencePiece-style {model['type']})"
    else:
        raise UsageError(f"cannot export a {model['type']} tokenizer with a {'/'.join(sorted(parts)) or 'missing'} "
                         "pre-tokenizer to GGUF: llama.cpp reads byte-level BPE, or Metaspace BPE and Unigram")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if (i := getattr(tok, f"{role}_id")) is not None:
            add(i)
    probe = tok.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(tok.bos_id is not None and probe[:1] == [tok.bos_id])
    writer.add_add_eos_token(tok.eos_id is not None and probe[-1:] == [tok.eos_id] and len(probe) > 1)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
    return f"{kind}, {len(tok.inner.get_vocab(with_added_tokens=True))} tokens"
