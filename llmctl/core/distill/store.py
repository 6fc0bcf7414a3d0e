"""Offline distillation: the teacher's top-k log-probabilities, computed once, read by every student.

    save_teacher_outputs(teacher, shards, out, top_k=32, seq_len=256)   # llmctl distill --save-teacher
    store = TeacherOutputs(out); ids, logprobs = store.lookup(windows)  # [n, seq_len, K] each

The store covers one epoch of sequential packing of the shards' train split: window w holds
input positions w·seq_len … w·seq_len + seq_len − 1, exactly the rows `llmctl train
sampling=sequential` makes, so the student (same shards, `seq_len`, `sampling=sequential`)
finds each of its rows' teacher outputs by window number. Files: `ids-NNNNN.bin` (uint16, or
uint32 above 65,536 tokens) and `logprobs-NNNNN.bin` (float16), each [windows, seq_len, K] in
row-major order, and `manifest.json` (k, seq_len, vocabulary, tokenizer hash, teacher and data).
The values are log-probabilities under the full vocabulary at temperature 1; the loss
renormalises them over the k ids (`criterion.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llmctl.core.outputs import OUTPUT_KINDS
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import ConfigError, DataError

FORMAT, VERSION, MANIFEST = "llmctl-teacher-topk", 1, "manifest.json"
FILE_BYTES = 256 * 1024**2  # at most this much per file


@OUTPUT_KINDS.register("teacher-outputs")
def _is_store(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def windows_of(shards, seq_len: int, batch_size: int = 1):
    """The sequential-packing source over `shards`' train split, as the trainer makes it."""
    from llmctl.core.train.data import ShardBatches

    return ShardBatches(shards.split("train"), [], seq_len=seq_len, batch_size=batch_size, seed=0,
                        sampling="sequential")


@torch.no_grad()
def save_teacher_outputs(teacher_path: str | Path, shards_path: str | Path, out: str | Path, *, top_k: int,
                         seq_len: int, batch_size: int = 8, device: torch.device | str = "cpu",
                         force: bool = False, report: Reporter = SILENT) -> dict:
    """Run the teacher over every sequential window of the shards' train split; write the store."""
    from llmctl.core.adapters.files import lineage_hash
    from llmctl.core.data.shards import TokenShards
    from llmctl.core.io import atomic_dir
    from llmctl.core.model.io import load_model
    from llmctl.core.tokenizer import load_tokenizer

    shards = TokenShards(shards_path)
    tok = load_tokenizer(teacher_path)
    shards.check_tokenizer(tok.hash, tok.vocab_size)
    teacher, cfg = load_model(teacher_path, device=device, dtype=torch.float32)
    if not 0 < top_k <= cfg.vocab_size:
        raise ConfigError(f"--top-k: must be in 1…{cfg.vocab_size} (the teacher's vocabulary), got {top_k}")
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the teacher's context ({cfg.max_seq_len})")
    source = windows_of(shards, seq_len, batch_size)
    total = source.windows
    id_dtype = np.uint16 if cfg.vocab_size <= 1 << 16 else np.uint32
    per_window = seq_len * top_k * (np.dtype(id_dtype).itemsize + 2)
    per_file = max(1, FILE_BYTES // per_window)
    files, handles = [], None
    with atomic_dir(out, force=force) as tmp, report.progress("teacher top-k", total=total, unit="window") as bar:
        written = 0
        for index in range(-(-total // batch_size)):
            rows = source.batch(index)[: total - written, :-1].to(device)
            features = teacher(rows, skip_head=True).features
            logprobs = torch.log_softmax(teacher.head(features), -1)
            values, ids = logprobs.topk(top_k, dim=-1, sorted=True)
            ids, values = ids.cpu().numpy().astype(id_dtype), values.cpu().numpy().astype(np.float16)
            done = 0
            while done < len(rows):  # into the open file, a new one every `per_file` windows
                if (written + done) % per_file == 0:
                    if handles:
                        [h.close() for h in handles]
                    n = len(files)
                    files.append({"ids": f"ids-{n:05d}.bin", "logprobs": f"logprobs-{n:05d}.bin", "windows": 0})
                    handles = [open(tmp / files[-1]["ids"], "wb"), open(tmp / files[-1]["logprobs"], "wb")]
                take = min(len(rows) - done, per_file - (written + done) % per_file)
                handles[0].write(ids[done:done + take].tobytes())
                handles[1].write(values[done:done + take].tobytes())
                files[-1]["windows"] += take
                done += take
            written += len(rows)
            bar.update(completed=written)
        if handles:
            [h.close() for h in handles]
        manifest = {"format": FORMAT, "version": VERSION, "top_k": top_k, "seq_len": seq_len,
                    "vocab_size": cfg.vocab_size, "id_dtype": np.dtype(id_dtype).name, "windows": total,
                    "tokenizer_hash": tok.hash, "teacher": {"path": str(Path(teacher_path).resolve()),
                                                            "hash": lineage_hash(teacher_path)},
                    "data": {"path": str(shards.path.resolve()), "train_tokens": shards.num_tokens("train")},
                    "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


class TeacherOutputs:
    """A store written by `save_teacher_outputs`, memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path}: not a teacher-outputs directory ({exc})") from None
        m = self.manifest
        if not isinstance(m, dict) or (m.get("format"), m.get("version")) != (FORMAT, VERSION):
            raise DataError(f"{self.path}: not a teacher-outputs directory (make one with llmctl distill --save-teacher)")
        from llmctl.core.io import inside

        self.k, self.seq_len, self.windows = m["top_k"], m["seq_len"], m["windows"]
        shape = (self.seq_len, self.k)
        self._ids, self._values = [], []
        for f in m["files"]:
            for key, dtype, out in (("ids", m["id_dtype"], self._ids), ("logprobs", "float16", self._values)):
                file = inside(self.path, f[key], str(self.path / MANIFEST), DataError)
                size = f["windows"] * self.seq_len * self.k * np.dtype(dtype).itemsize
                if not file.is_file() or file.stat().st_size != size:
                    raise DataError(f"{file}: missing or not {size} bytes as the manifest says")
                out.append(np.memmap(file, dtype=np.dtype(dtype).newbyteorder("<"), mode="r").reshape(-1, *shape))
        self._starts = np.cumsum([0] + [f["windows"] for f in m["files"]])

    def check(self, *, tokenizer_hash: str, seq_len: int, vocab_size: int, train_tokens: int) -> None:
        """ConfigError unless a run with these settings reads windows this store holds."""
        m = self.manifest
        if tokenizer_hash != m["tokenizer_hash"]:
            raise ConfigError(f"teacher outputs {self.path} are of tokenizer {m['tokenizer_hash']}, the data's is "
                              f"{tokenizer_hash}")
        if seq_len != self.seq_len:
            raise ConfigError(f"config key 'seq_len': the teacher outputs {self.path} hold windows of {self.seq_len} "
                              f"tokens, not {seq_len}")
        if vocab_size != m["vocab_size"]:
            raise ConfigError(f"teacher outputs {self.path} are over {m['vocab_size']} tokens; the student has "
                              f"vocab_size {vocab_size}")
        if train_tokens != m["data"]["train_tokens"]:
            raise ConfigError(f"config key 'data': {train_tokens} train tokens, but the teacher outputs {self.path} "
                              f"were made from {m['data']['train_tokens']} ({m['data']['path']})")

    def lookup(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64, log-probs float32) [len(windows), seq_len, K] of those window numbers."""
        windows = np.asarray(windows)
        file = np.searchsorted(self._starts, windows, side="right") - 1
        at = windows - self._starts[file]
        ids = np.stack([self._ids[f][a] for f, a in zip(file, at)]).astype(np.int64)
        values = np.stack([self._values[f][a] for f, a in zip(file, at)]).astype(np.float32)
        return torch.from_numpy(ids), torch.from_numpy(values)
