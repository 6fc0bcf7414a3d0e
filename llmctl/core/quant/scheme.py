"""Integer weight grids: bits, symmetric or asymmetric, per output channel or per group of inputs.

    s = Scheme(bits=4, group_size=128, symmetric=True)
    scale, zero = s.params(w)            # [out, groups] each (zero is 0 when symmetric)
    q = s.quantize(w, scale, zero)       # int8 tensor in [-2^(b-1), 2^(b-1) - 1]
    w_hat = s.dequantize(q, scale, zero)

The arithmetic is compressed-tensors' (signed integers, `round(w / scale + zero)`, symmetric
scale = max|w| / ((qmax − qmin) / 2)), so a checkpoint we write dequantizes to the same weights
in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.errors import UsageError


@dataclass(frozen=True)
class Scheme:
    bits: int = 8
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise UsageError(f"--bits must be 4 or 8, not {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise UsageError(f"--group-size must be positive, not {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, columns: int) -> int:
        if self.group_size is None:
            return 1
        if columns % self.group_size:
            raise UsageError(f"--group-size {self.group_size} does not divide an input width of {columns}")
        return columns // self.group_size

    def width(self, columns: int) -> int:
        """Columns per group."""
        return columns // self.groups(columns)

    def params(self, w: torch.Tensor):
        """(scale, zero) [rows, groups] float32 for weight `w` [rows, columns]: each group's range,
        widened to hold 0 (so a zero weight stays exactly zero)."""
        rows, cols = w.shape
        g = w.float().reshape(rows, self.groups(cols), -1)
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        if self.symmetric:
            scale = torch.maximum(-lo, hi) / ((self.qmax - self.qmin) / 2)
            zero = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
        scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
        if not self.symmetric:
            zero = torch.clamp(self.qmin - torch.round(lo / scale), self.qmin, self.qmax)
        return scale, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integers (int8 storage) of `w` [rows, columns] on the grid of (scale, zero) [rows, groups]."""
        rows, cols = w.shape
        g = w.float().reshape(rows, scale.shape[1], -1)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1) + zero.unsqueeze(-1)), self.qmin, self.qmax)
        return q.reshape(rows, cols).to(torch.int8)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = q.shape
        g = q.to(dtype, copy=True).reshape(rows, scale.shape[1], -1)  # worked on in place: one tensor, two passes
        if not self.symmetric:  # a symmetric grid's zero is 0
            g.sub_(zero.to(dtype).unsqueeze(-1))
        return g.mul_(scale.to(dtype).unsqueeze(-1)).reshape(rows, cols)

    def nearest(self, w: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Round-to-nearest (scale, zero, integers), the scale first rounded to the `dtype` it is stored in."""
        scale, zero = self.params(w)
        scale = scale.to(dtype).float()
        return scale, zero, self.quantize(w, scale, zero)

    def fake(self, w: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest: `w` quantized and dequantized (float32)."""
        scale, zero = self.params(w)
        return self.dequantize(self.quantize(w, scale, zero), scale, zero)
