"""Batch-1 matrix-vector products: how fast each way of computing x·Wᵀ reads the weights.

    python -m benchmarks.matvec [--threads 2]

Sweeps the 84 weights of the 97.5M decode shape (benchmarks.quantize.SHAPE: 12 layers of q, k, v,
o 768×768, gate/up 2048×768, down 768×2048) in turn, so nothing stays in L3, and prints GB/s of
weight bytes read (best of 7 passes) for: `F.linear` (MKL sgemv / oneDNN bf16), the
inductor-compiled `(x·W).sum(-1)` of `llmctl/core/generate/matvec.py`, torch's weight-only
int8/int4 kernels (bf16 x), and llmctl's native kernels (`llmctl/core/native`; skipped where
they cannot be built). int4 is g128 and counts its scales.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

LAYER = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]
SHAPES = LAYER * 12


def sweep(fn, weights, nbytes: int | None = None) -> float:
    """GB/s of weight bytes read by `fn(w)` over every weight, best of 7 passes."""
    for w in weights:
        fn(w)
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        best = min(best, time.perf_counter() - start)
    return (nbytes or sum(w.numel() * w.element_size() for w in weights)) / best / 1e9


def quantized(bits: int, group: int | None, x: dict) -> dict[str, float]:
    """GB/s of each kernel of core/quant/kernels.py that takes these int `bits` weights, bf16 x."""
    from llmctl.core.quant import kernels
    from llmctl.core.quant.linear import PackedLinear
    from llmctl.core.quant.scheme import Scheme

    modules = [PackedLinear.from_linear(torch.nn.Linear(k, n, bias=False), Scheme(bits, group)) for n, k in SHAPES]
    nbytes = sum(m.weight_packed.nbytes + m.weight_scale.nbytes for m in modules)
    out = {}
    for name in ("int8pack", "int4pack_cpu", "native"):
        made = [kernels.KERNELS[name](m, x[m.in_features]) for m in modules]
        if all(k is not None for k in made):
            run = dict(zip(map(id, modules), made))
            out[name] = sweep(lambda m, run=run: run[id(m)](x[m.in_features]), modules, nbytes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llmctl.core import native
    from llmctl.core.generate import matvec

    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(1, k, generator=g) for k in (768, 2048)}
    rows_dot = torch.compile(lambda x, w: matvec._rows_dot(x, w.t()), dynamic=False)
    ops = native.ops()
    rows: dict[tuple[str, str], float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        ws = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
        xd = {k: v.to(dtype) for k, v in x.items()}
        col = "float32" if dtype == torch.float32 else "bf16"
        rows[("F.linear", col)] = sweep(lambda w, xd=xd: F.linear(xd[w.shape[1]], w), ws)
        rows[("inductor (x·W).sum(-1)", col)] = sweep(lambda w, xd=xd: rows_dot(xd[w.shape[1]], w), ws)
        if ops is not None:
            w = ws[4]
            torch.testing.assert_close(ops.mv_float(xd[768], w).float(), F.linear(xd[768].float(), w.float()),
                                       rtol=2e-2, atol=0.5)
            rows[("llmctl native", col)] = sweep(lambda w, xd=xd: ops.mv_float(xd[w.shape[1]], w), ws)
    xb = {k: v.bfloat16() for k, v in x.items()}
    names = {"int8pack": "_weight_int8pack_mm", "int4pack_cpu": "_weight_int4pack_mm_for_cpu",
             "native": "llmctl native"}
    for bits, group, col in ((8, None, "int8"), (4, 128, "int4 g128")):
        for name, rate in quantized(bits, group, xb).items():
            rows[(names[name], col)] = rate
    columns = ("float32", "bf16", "int8", "int4 g128")
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}; GB/s of weight bytes read\n")
    print("| product | " + " | ".join(f"{c} W" for c in columns) + " |\n|---|" + "---:|" * len(columns))
    for name in dict.fromkeys(n for n, _ in rows):
        cells = [f"{rows[(name, c)]:.1f}" if (name, c) in rows else "—" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
