"""Training batches: windows of token ids, deterministic from the seed and resumable.

Two sources, one interface (`batch(index)`, `val_batches()`, `state()`, `load_state()`):

- `ShardBatches` reads memory-mapped token shards (`llmctl tokenize encode`). Micro-batch
  `index` is a pure function of (seed, index): random windows, or sequential packing of the
  document stream (documents already end in EOS). Resuming needs only the index.
- `TextBatches` streams raw text files, tokenizing blocks on the fly and packing them
  sequentially (EOS between files). Its position is (epoch, segment, byte offset, tokens to
  skip), so resuming re-reads one block instead of the whole corpus.

Under data parallelism every rank builds the same global micro-batch of `world * batch_size`
rows and takes its own slice, so the data seen by N processes equals one process with an N×
larger batch. A row holds `seq_len + 1` tokens: inputs `row[:-1]`, targets `row[1:]`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmctl.errors import DataError

BLOCK_BYTES = 1 << 20


class ShardBatches:
    """Windows over memory-mapped token shards (`split` lists of 1-D uint16/uint32 memmaps)."""

    def __init__(self, train: list[np.ndarray], val: list[np.ndarray], *, seq_len: int, batch_size: int,
                 seed: int, sampling: str, rank: int = 0, world: int = 1, eval_batches: int = 0):
        self.train = [a for a in train if len(a) > seq_len]
        self.val = [a for a in val if len(a) > seq_len]
        if not self.train:
            raise DataError(f"the train split has no document stream longer than seq_len={seq_len} tokens")
        self.seq_len, self.batch_size, self.seed, self.sampling = seq_len, batch_size, seed, sampling
        self.rank, self.world, self.eval_batches = rank, world, eval_batches
        # random: any start with a full window; sequential: windows at stride seq_len
        self._starts = np.cumsum([0] + [len(a) - seq_len for a in self.train])
        self._windows = np.cumsum([0] + [(len(a) - 1) // seq_len for a in self.train])
        self.index = 0

    def _rows(self, arrays: list[np.ndarray], cum: np.ndarray, positions: np.ndarray, stride: int) -> torch.Tensor:
        shard = np.searchsorted(cum, positions, side="right") - 1
        offsets = (positions - cum[shard]) * stride
        rows = [arrays[s][o:o + self.seq_len + 1] for s, o in zip(shard, offsets)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def _global_rows(self, index: int) -> np.ndarray:
        n = self.world * self.batch_size
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, index])
            return rng.integers(0, self._starts[-1], size=n)
        return (index * n + np.arange(n)) % self._windows[-1]

    @property
    def windows(self) -> int:
        """Sequential windows in the train split (one epoch of sequential packing)."""
        return int(self._windows[-1])

    def positions(self, index: int) -> np.ndarray:
        """Where this rank's rows of micro-batch `index` start: token offsets (random) or window
        numbers (sequential: window w holds tokens w·seq_len … of the train stream)."""
        return self._global_rows(index)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch(self, index: int) -> torch.Tensor:
        """This rank's rows of global micro-batch `index`: LongTensor [batch_size, seq_len + 1]."""
        positions = self.positions(index)
        stride = 1 if self.sampling == "random" else self.seq_len
        cum = self._starts if self.sampling == "random" else self._windows
        self.index = index + 1
        return self._rows(self.train, cum, positions, stride)

    def val_batches(self) -> list[torch.Tensor]:
        """This rank's share of the fixed validation set: the first windows of the val split."""
        if not self.val:
            return []
        cum = np.cumsum([0] + [(len(a) - 1) // self.seq_len for a in self.val])
        n = self.world * self.batch_size
        count = min(self.eval_batches, int(cum[-1]) // n)
        out = []
        for b in range(count):
            positions = b * n + np.arange(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            out.append(self._rows(self.val, cum, positions, self.seq_len))
        return out

    def state(self) -> dict:
        return {"kind": "shards", "index": self.index}

    def load_state(self, state: dict) -> None:
        self.index = int(state["index"])


@dataclass
class _Block:
    epoch: int
    segment: int
    start: int  # byte offset of the block in its file
    tokens: np.ndarray
    offset: int = 0  # first token not yet consumed


class TextStream:
    """Sequential rows of `seq_len + 1` tokens (stride `seq_len`) from byte ranges of text files.

    Blocks of about 1 MiB, cut after a newline, are tokenized independently, so a block can
    be re-read and re-tokenized identically when resuming.
    """

    def __init__(self, segments: list[tuple[Path, int, int]], encode, eos_id: int | None, seq_len: int):
        self.segments, self.encode, self.eos_id, self.seq_len = segments, encode, eos_id, seq_len
        self.epoch, self.seg, self.byte = 0, 0, segments[0][1]  # the next block to load
        self.pending: deque[_Block] = deque()

    def _load_block(self) -> None:
        path, _, end = self.segments[self.seg]
        with open(path, "rb") as f:
            f.seek(self.byte)
            data = f.read(min(BLOCK_BYTES, end - self.byte))
            while self.byte + len(data) < end and not data.endswith(b"\n"):
                more = f.read(min(4096, end - self.byte - len(data)))
                cut = more.find(b"\n")
                data += more if cut < 0 else more[:cut + 1]
        ids = self.encode(data.decode("utf-8", errors="replace")) if data else []
        block = _Block(self.epoch, self.seg, self.byte, np.asarray([], dtype=np.int64))
        self.byte += len(data)
        if self.byte >= end:  # end of a segment: a document boundary
            if self.eos_id is not None:
                ids = list(ids) + [self.eos_id]
            self.seg += 1
            if self.seg == len(self.segments):
                self.epoch, self.seg = self.epoch + 1, 0
            self.byte = self.segments[self.seg][1]
        block.tokens = np.asarray(ids, dtype=np.int64)
        self.pending.append(block)

    def position(self) -> dict:
        """Where the next row starts (JSON-able)."""
        if self.pending:
            b = self.pending[0]
            return {"epoch": b.epoch, "segment": b.segment, "byte": b.start, "skip": b.offset}
        return {"epoch": self.epoch, "segment": self.seg, "byte": self.byte, "skip": 0}

    def seek(self, position: dict) -> None:
        self.epoch, self.seg, self.byte = position["epoch"], position["segment"], position["byte"]
        self.pending.clear()
        self._load_block()
        self.pending[0].offset = position["skip"]

    def next_row(self) -> np.ndarray:
        need, start_epoch = self.seq_len + 1, self.epoch
        while sum(len(b.tokens) - b.offset for b in self.pending) < need:
            if self.epoch > start_epoch + 1:
                raise DataError(f"the text data holds fewer than seq_len+1={need} tokens")
            self._load_block()
        parts, remaining = [], need
        for b in self.pending:
            take = b.tokens[b.offset:b.offset + remaining]
            parts.append(take)
            remaining -= len(take)
            if not remaining:
                break
        consumed = self.seq_len
        while consumed:
            b = self.pending[0]
            step = min(consumed, len(b.tokens) - b.offset)
            b.offset += step
            consumed -= step
            if b.offset == len(b.tokens):
                self.pending.popleft()
        return np.concatenate(parts)


class TextBatches:
    """Global micro-batches from a `TextStream`, sliced per rank; a fixed validation stream."""

    def __init__(self, train: TextStream, val: TextStream | None, *, batch_size: int, rank: int = 0,
                 world: int = 1, eval_batches: int = 0):
        self.stream, self.val_stream = train, val
        self.batch_size, self.rank, self.world, self.eval_batches = batch_size, rank, world, eval_batches
        self.index = 0

    def _global(self, stream: TextStream) -> torch.Tensor:
        rows = [stream.next_row() for _ in range(self.world * self.batch_size)]
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return torch.from_numpy(np.stack(mine))

    def batch(self, index: int) -> torch.Tensor:
        if index != self.index:
            raise RuntimeError(f"text batches are sequential: asked for {index}, next is {self.index}")
        self.index += 1
        return self._global(self.stream)

    def val_batches(self) -> list[torch.Tensor]:
        stream, self.val_stream = self.val_stream, None  # the set is fixed once drawn; the caller keeps it
        out = []
        try:
            # batches that start within the first pass (the stream's `epoch` is the next block's:
            # a text shorter than a block has moved on as soon as it is loaded)
            while stream is not None and len(out) < self.eval_batches and (not out or stream.position()["epoch"] == 0):
                out.append(self._global(stream))
        except DataError:  # less validation text than one row: no evaluation
            return []
        return out

    def state(self) -> dict:
        return {"kind": "text", "index": self.index, "position": self.stream.position()}

    def load_state(self, state: dict) -> None:
        self.index = int(state["index"])
        self.stream.seek(state["position"])


def split_text(files: list[Path], val_fraction: float) -> tuple[list, list]:
    """Byte-range segments: the train part and the last `val_fraction` of the text (cut at a newline)."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    if total == 0:
        raise DataError(f"the text data {', '.join(map(str, files))} is empty")
    cut = int(total * (1 - val_fraction)) if val_fraction > 0 else total
    train, val, offset = [], [], 0
    for path, size in zip(files, sizes):
        if size == 0:
            continue
        if offset + size <= cut:
            train.append((path, 0, size))
        elif offset >= cut:
            val.append((path, 0, size))
        else:
            local = _next_newline(path, cut - offset)  # > 0: the cut is inside this file
            train.append((path, 0, local))
            if local < size:
                val.append((path, local, size))
        offset += size
    if not train:
        raise DataError("no training text left after holding out the validation part")
    return train, val


def _next_newline(path: Path, pos: int) -> int:
    with open(path, "rb") as f:
        f.seek(pos)
        rest = f.read(1 << 16)
    cut = rest.find(b"\n")
    return pos + (cut + 1 if cut >= 0 else len(rest))


def mask_tokens(rows: torch.Tensor, *, mask_id: int, vocab_size: int, prob: float,
                generator: torch.Generator, special_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `prob` of the positions (never special tokens); of those 80% → mask_id,
    10% → a random token, 10% unchanged. Returns (inputs, labels with -100 where not picked)."""
    inputs = rows.clone()
    picked = torch.rand(rows.shape, generator=generator) < prob
    for sid in special_ids:
        picked &= rows != sid
    labels = torch.where(picked, rows, torch.full_like(rows, -100))
    roll = torch.rand(rows.shape, generator=generator)
    inputs[picked & (roll < 0.8)] = mask_id
    random_pos = picked & (roll >= 0.8) & (roll < 0.9)
    inputs[random_pos] = torch.randint(vocab_size, rows.shape, generator=generator)[random_pos]
    return inputs, labels
