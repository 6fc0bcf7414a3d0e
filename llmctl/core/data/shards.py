"""Token shards: a directory with `manifest.json` and flat little-endian uint16/uint32 `.bin`
files per split (`train-00000.bin`, `val-00000.bin`, …), written by `ShardWriter` and read
by `TokenShards`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmctl.core.io import inside
from llmctl.errors import DataError, UsageError

MANIFEST = "manifest.json"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT, VERSION = "llmctl-tokens", 1


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


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
        if tokens.size == 0:  # documents of no tokens (no EOS appended) count where the next token goes
            self._shard()["documents"] += int(ends.size)
        pos = 0
        while pos < tokens.size:
            shard = self._shard()
            end = pos + min(tokens.size - pos, self.shard_tokens - shard["tokens"])
            self._file.write(tokens[pos:end].tobytes())
            shard["tokens"] += end - pos
            first = np.searchsorted(ends, pos, "left" if pos == 0 else "right")
            shard["documents"] += int(np.searchsorted(ends, end, "right") - first)
            pos = end
            if shard["tokens"] >= self.shard_tokens:
                self.close()

    def _shard(self) -> dict[str, Any]:
        """The shard being written, opened if none is."""
        if self._file is None:
            name = f"{self.split}-{len(self.shards):05d}.bin"
            self._file = open(self.directory / name, "wb")
            self.shards.append({"file": name, "tokens": 0, "documents": 0})
        return self.shards[-1]

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
