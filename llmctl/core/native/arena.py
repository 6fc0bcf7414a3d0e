"""The weights a native decode step streams, moved into one buffer of 2 MB pages in reading order.

At batch 1 a decoded token reads every weight once, 4 KB page after 4 KB page: a 100M-parameter
model in bf16 touches some 45,000 pages per token, far more than the TLB holds, and the page walks
cost a fifth of the stream (one bf16 product over 182 MB on this machine: 27 GB/s from 4 KB pages,
33–34 GB/s from 2 MB pages, BENCHMARKS.md). `pack` copies the tensors into one 2 MB-aligned buffer
that asks the kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`, honoured where
/sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`) and points their holders —
a Parameter's `.data`, a kernel layout's attribute — at views of it: the same values and the same
Parameter objects, one copy of the weights.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

PAGE = 2 << 20  # a transparent huge page on x86-64
ALIGN = 64  # each tensor starts on a cache line
MADV_HUGEPAGE = 14


def pack(holder, slots: list[tuple[object, str]]) -> None:
    """Move the tensors `getattr(owner, name)` of `slots` into one huge-page buffer, in order, and
    rebind each slot to its view; a no-op when `holder` (the model) already had exactly these
    tensors packed."""
    tensors = [getattr(owner, name) for owner, name in slots]
    pointers = [t.data_ptr() for t in tensors]
    if getattr(holder, "_llmctl_packed", None) == pointers:
        return
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end = -(-(end + t.nbytes) // ALIGN) * ALIGN
    with torch.inference_mode(False), torch.no_grad():  # views a later training step may use
        buffer = huge_buffer(end)
        for (owner, name), t, start in zip(slots, tensors, offsets):
            view = buffer[start:start + t.nbytes].view(t.dtype).view(t.shape)
            view.copy_(t)
            setattr(owner, name, view)
    holder._llmctl_packed = [getattr(owner, name).data_ptr() for owner, name in slots]


def huge_buffer(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes], PAGE-aligned, advised to huge pages before its first touch."""
    span = -(-nbytes // PAGE) * PAGE  # whole pages, all inside `raw`
    raw = torch.empty(span + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    buffer = raw[start:start + nbytes]
    madvise = _madvise()
    if madvise is not None and nbytes:
        madvise(ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(span), MADV_HUGEPAGE)
    return buffer


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none (advice only: its failure changes nothing)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn
