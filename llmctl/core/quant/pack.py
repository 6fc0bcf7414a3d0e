"""compressed-tensors' int32 packing: 32/bits signed integers per word, offset to unsigned.

Element i of a row sits at bits [i·b, (i+1)·b) of the row's little-endian bit stream (b = 4 or
8, so no value straddles two words); a row is padded with zeros to whole words. Zero points of
asymmetric schemes are packed the same way along the output dimension (`dim=0`).
"""

from __future__ import annotations

import torch


def packed_width(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """int8 values in [-2^(b-1), 2^(b-1)) [rows, n] → int32 [rows, ⌈n·b/32⌉] (dim=0: along rows)."""
    if dim == 0:
        return pack(q.T, bits).T.contiguous()
    rows, n = q.shape
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    per_word = 32 // bits
    u = torch.nn.functional.pad(u, (0, packed_width(n, bits) * per_word - n))
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return u.reshape(-1).view(torch.int32).reshape(rows, -1)  # reshape: size-1 dims may keep odd strides


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """The inverse of `pack`: int32 words → int8 [rows, n] (dim=0: [n, columns])."""
    if dim == 0:
        return unpack(packed.T.contiguous(), bits, n).T.contiguous()
    u = packed.reshape(-1).view(torch.uint8).reshape(packed.shape[0], -1)
    if bits == 4:  # nibbles 0..15 are the same bytes as int8: the offset comes off in place
        q = torch.stack((u & 0xF, u >> 4), dim=-1).view(torch.int8).sub_(8).flatten(-2)
    else:  # u − 128 in two's complement is u with its top bit flipped
        q = torch.bitwise_xor(u, 0x80).view(torch.int8)
    return q if q.shape[1] == n else q[:, :n].contiguous()
