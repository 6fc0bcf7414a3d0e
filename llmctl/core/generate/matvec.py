"""A torch.compile back end for batch-1 decoding on CPU: matrix-vector products as streaming reductions.

At batch 1 a decode step is a chain of matrix-vector products, and its speed is how fast the
weights stream from memory. torch's float32 `x @ Wᵀ` on CPU (MKL's sgemv, or oneDNN's packed GEMM
after inductor freezing) reads them at ~40 % of this machine's read bandwidth. Written as
`(x · W).sum(-1)` the same product is one loop inductor generates itself: each output row a
vectorised dot product over a contiguous row of W, rows spread over the threads, nothing
materialised, and it reads the weights 1.5–1.7× faster (BENCHMARKS.md, Quantize → Speed).

`DECOMPOSITIONS` replaces aten's `mm` / `addmm` with one input row before inductor lowers the
graph: by llmctl's native kernel (`core/native`, float32 or bf16, faster still) where it is built,
else, for float32, by that reduction; every other product (prefill, batches; bf16 without the
native kernel, where oneDNN's packed kernels are faster than the reduction) keeps aten's. Sums
run in float32 in another order than sgemv's, so logits agree to rounding, not bit for bit.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _one_row(x: torch.Tensor, w_t: torch.Tensor) -> bool:
    """One input row against a matrix of its dtype, on CPU (shapes are static when compiled)."""
    return x.device.type == "cpu" and x.dim() == 2 and x.shape[0] == 1 and w_t.dim() == 2 and x.dtype == w_t.dtype


def _rows_dot(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x [1, K] · w_tᵀ as a reduction over each of W's contiguous rows: [1, N]."""
    return (x.unsqueeze(1) * w_t.t().unsqueeze(0)).sum(-1)


def _product(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor | None:
    """x · w_t by llmctl's native kernel where it takes the dtype, else float32's rewrite, else None."""
    from llmctl.core import native

    if not _one_row(x, w_t):
        return None
    need = {torch.float32: native.F32, torch.bfloat16: native.BF16}.get(x.dtype)
    if need is not None and x.shape[1] % 32 == 0 and native.has(need):
        return native.ops().mv_float(x, w_t.t().contiguous())
    return _rows_dot(x, w_t) if x.dtype == torch.float32 else None


def mm(x: torch.Tensor, w_t: torch.Tensor, out_dtype=None):
    y = None if out_dtype is not None else _product(x, w_t)
    return NotImplemented if y is None else y


def addmm(bias: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, *, beta=1, alpha=1):
    y = None if beta != 1 or alpha != 1 else _product(x, w_t)
    return NotImplemented if y is None else bias + y


DECOMPOSITIONS = {aten.mm.default: mm, aten.addmm.default: addmm}


def backend(graph, example_inputs):
    """inductor, with `DECOMPOSITIONS` ahead of its own table. AOTAutograd's on-disk cache is keyed
    on the graph before decomposition, so it would hand back a graph lowered without them (by
    another back end, or with the native kernels off): it is bypassed; inductor's own cache, keyed
    on the decomposed graph, still applies."""
    import torch._functorch.config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(graph, example_inputs, decompositions={**select_decomp_table(), **DECOMPOSITIONS})
