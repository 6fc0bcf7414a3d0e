"""GGML's k-quants Q4_K and Q6_K in numpy (the `gguf` package only reads them).

Both work on super-blocks of 256 values along the last axis. Q4_K: 8 sub-blocks of 32, each
x ≈ d·sc·q − dmin·m with q in 0…15 and 6-bit sc, m; Q6_K: 16 sub-blocks of 16, x ≈ d·sc·(q − 32)
with q in 0…63 and int8 sc. Byte layouts are those of ggml's `block_q4_K` / `block_q6_K`.
"""

from __future__ import annotations

import numpy as np

QK = 256


def _blocks(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] % QK:
        raise ValueError(f"rows of {x.shape[-1]} values are not a multiple of {QK}")
    return np.asarray(x, dtype=np.float32).reshape(-1, QK)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, 0.0, a / b)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 rows → Q4_K bytes (144 per 256 values)."""
    shape = x.shape
    b = _blocks(x).reshape(-1, 8, 32)
    low = np.minimum(b.min(-1), 0.0)
    scale = (b.max(-1) - low) / 15
    q = np.clip(np.rint(_ratio(b - low[..., None], scale[..., None])), 0, 15)
    for _ in range(2):  # refit scale and offset of each sub-block by least squares on its codes
        n, sq, sx = 32.0, q.sum(-1), b.sum(-1)
        sqq, sqx = (q * q).sum(-1), (q * b).sum(-1)
        det = n * sqq - sq * sq
        fit = det > 0
        new_scale = np.where(fit, _ratio(n * sqx - sq * sx, det), scale)
        new_low = np.where(fit, (sx - new_scale * sq) / n, low)
        ok = fit & (new_scale > 0) & (new_low <= 0)
        scale, low = np.where(ok, new_scale, scale), np.where(ok, new_low, low)
        q = np.clip(np.rint(_ratio(b - low[..., None], scale[..., None])), 0, 15)
    d = _f16(scale.max(-1) / 63)
    dmin = _f16(np.abs(low).max(-1) / 63)  # low ≤ 0; abs: +0, not -0, for a zero block
    sc = np.clip(np.rint(_ratio(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_ratio(-low, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint(_ratio(b + offset[..., None], step[..., None])), 0, 15).astype(np.uint8)
    scales = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        m[:, :4] | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
    ], axis=-1)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=-1)
    return out.reshape(*shape[:-1], shape[-1] // QK * 144)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 rows → Q6_K bytes (210 per 256 values)."""
    shape = x.shape
    b = _blocks(x).reshape(-1, 16, 16)
    extreme = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
    scale = extreme / -32  # the largest magnitude maps to code -32
    d = _f16(np.abs(scale).max(-1) / 127)
    sc = np.clip(np.rint(_ratio(scale, d.astype(np.float32)[:, None])), -128, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    q = (np.clip(np.rint(_ratio(b, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    low, high = q & 0x0F, q >> 4
    ql = low.reshape(-1, 2, 2, 64)
    ql = (ql[:, :, 0] | (ql[:, :, 1] << 4)).reshape(-1, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=-1)
    return out.reshape(*shape[:-1], shape[-1] // QK * 210)


def _in_chunks(fn, bytes_per_block: int, rows: int = 64):
    """`fn` applied `rows` rows at a time into one output, so its float temporaries stay small."""

    def run(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(-1, x.shape[-1])
        out = np.empty((flat.shape[0], x.shape[-1] // QK * bytes_per_block), dtype=np.uint8)
        for i in range(0, flat.shape[0], rows):
            out[i:i + rows] = fn(flat[i:i + rows])
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return run


QUANTIZERS = {"Q4_K": _in_chunks(quantize_q4_k, 144), "Q6_K": _in_chunks(quantize_q6_k, 210)}
