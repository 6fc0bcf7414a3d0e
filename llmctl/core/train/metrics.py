"""Training metrics: OUTDIR/metrics.jsonl (one JSON object per line), optional TensorBoard,
and the FLOP estimates behind MFU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to metrics.jsonl (flushed per line) and mirrors scalars to TensorBoard."""

    def __init__(self, outdir: Path, tensorboard: bool):
        self.path = Path(outdir) / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tb = SummaryWriter(str(Path(outdir) / "tensorboard"))

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(outdir: Path, step: int) -> None:
    """Drop records after `step` (written by a run that died after its last checkpoint)."""
    path = Path(outdir) / METRICS_FILE
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _step_of(line) <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


def read_metrics(outdir: Path) -> list[dict]:
    """All records of OUTDIR/metrics.jsonl (skipping a torn last line)."""
    path = Path(outdir) / METRICS_FILE
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·layers·d·seq (attention scores), PaLM appendix B.

    N counts every parameter that does a matmul: all but an untied input embedding table.
    """
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 1024, seconds: float = 0.3) -> float:
    """Achievable dense matmul FLOP/s at `dtype` on `device` (a short square-matmul benchmark)."""
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)  # no RNG draws: resuming stays exact
    b = torch.full((size, size), 0.25, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        _sync(device)
    return 2.0 * size**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
