"""Batch-1 matrix-vector products: how fast each way of computing x·Wᵀ reads the weights.

    python -m benchmarks.matvec [--threads 2]

Sweeps the 84 weights of the 97.5M decode shape (benchmarks.quantize.SHAPE: 12 layers of q, k, v,
o 768×768, gate/up 2048×768, down 768×2048) in turn, so nothing stays in L3, and prints GB/s of
weight bytes read for: `F.linear` (MKL sgemv / oneDNN bf16), `_weight_int8pack_mm` (bf16 x), the
inductor-compiled `(x·W).sum(-1)` of `llmctl/core/generate/matvec.py`, and hand-written AVX-512
kernels (`benchmarks/matvec_kernels.cpp`, built here with g++; skipped without g++ or AVX-512).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]
SHAPES = LAYER * 12


def sweep(fn, weights) -> float:
    """GB/s of weight bytes read by `fn(w)` over every weight, best of 5 passes."""
    for w in weights:
        fn(w)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        best = min(best, time.perf_counter() - start)
    return sum(w.numel() * w.element_size() for w in weights) / best / 1e9


def hand_kernels():
    """The C kernels as ctypes functions, or None when they cannot be built here."""
    out = Path(tempfile.mkdtemp()) / "matvec.so"
    src = Path(__file__).with_name("matvec_kernels.cpp")
    try:
        subprocess.run(["g++", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(out), str(src)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    lib = ctypes.CDLL(str(out))
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.mv_f32.argtypes = lib.mv_bf16.argtypes = [p, p, p, i, i]
    lib.mv_i8.argtypes = [p, p, p, p, i, i]
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the hand kernels' OpenMP pool
    torch.set_num_threads(args.threads)
    from llmctl.core.generate import matvec

    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(1, k, generator=g) for k in (768, 2048)}
    y = {n: torch.empty(n) for n in (768, 2048)}
    rows_dot = torch.compile(lambda x, w: matvec._rows_dot(x, w.t()), dynamic=False)
    lib = hand_kernels()
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        ws = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
        xd = {k: v.to(dtype) for k, v in x.items()}
        yd = {n: v.to(dtype) for n, v in y.items()}
        rows[("F.linear", dtype)] = sweep(lambda w: F.linear(xd[w.shape[1]], w), ws)
        rows[("inductor (x·W).sum(-1)", dtype)] = sweep(lambda w: rows_dot(xd[w.shape[1]], w), ws)
        if lib is not None:
            kernel = lib.mv_f32 if dtype == torch.float32 else lib.mv_bf16

            def hand(w):
                kernel(w.data_ptr(), xd[w.shape[1]].data_ptr(), yd[w.shape[0]].data_ptr(), *w.shape)
            w = ws[4]
            hand(w)
            torch.testing.assert_close(yd[w.shape[0]].float(), F.linear(xd[768].float(), w.float())[0],
                                       rtol=2e-2, atol=0.5)
            rows[("hand-written AVX-512", dtype)] = sweep(hand, ws)
    q = [torch.randint(-127, 128, s, dtype=torch.int8, generator=g) for s in SHAPES]
    scale = {n: torch.rand(n, generator=g) for n in (768, 2048)}
    xb = {k: v.bfloat16() for k, v in x.items()}
    rows[("_weight_int8pack_mm", torch.int8)] = sweep(
        lambda w: torch._weight_int8pack_mm(xb[w.shape[1]], w, scale[w.shape[0]].bfloat16()), q)
    if lib is not None:
        rows[("hand-written AVX-512", torch.int8)] = sweep(
            lambda w: lib.mv_i8(w.data_ptr(), x[w.shape[1]].data_ptr(), scale[w.shape[0]].data_ptr(),
                                y[w.shape[0]].data_ptr(), *w.shape), q)
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}; GB/s of weight bytes read\n")
    print("| product | float32 W | bf16 W | int8 W |\n|---|---:|---:|---:|")
    for name in dict.fromkeys(n for n, _ in rows):
        cells = [f"{rows[(name, d)]:.1f}" if (name, d) in rows else "—"
                 for d in (torch.float32, torch.bfloat16, torch.int8)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
