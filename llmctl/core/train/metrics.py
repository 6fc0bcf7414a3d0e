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
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
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


# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, by a substring
# of torch.cuda.get_device_name(), most specific first: (16-bit, TF32, plain float32).
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("H200", (989.4, 494.7, 66.9)),
    ("H800", (989.4, 494.7, 66.9)),
    ("B200", (2250.0, 1100.0, 80.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10G", (70.0, 35.0, 31.2)),
    ("A10", (125.0, 62.5, 31.2)),
    ("V100", (125.0, 15.7, 15.7)),
]


def peak_flops(dtype: torch.dtype, device: torch.device) -> float:
    """The device's peak dense matmul FLOP/s at `dtype`, the denominator of MFU: the datasheet
    figure for known GPUs, else measured (`measure_matmul_peak`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32, fp32) in GPU_PEAK_TFLOPS:
            if key in name:
                if dtype in (torch.float16, torch.bfloat16):
                    return half * 1e12
                return (tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32) * 1e12
        return measure_matmul_peak(dtype, device, size=8192, seconds=1.0)
    return measure_matmul_peak(dtype, device)


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 1024, seconds: float = 0.3) -> float:
    """Achievable dense matmul FLOP/s at `dtype` on `device` (a short square-matmul benchmark;
    on a GPU the products are queued back to back, timed between two syncs)."""
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)  # no RNG draws: resuming stays exact
    b = torch.full((size, size), 0.25, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = 1 if device.type == "cpu" else 10
        for _ in range(batch):
            a @ b
        reps += batch
        _sync(device)
    return 2.0 * size**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
