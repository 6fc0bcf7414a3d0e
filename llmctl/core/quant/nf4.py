r"""NF4: 4-bit NormalFloat weights with blockwise absmax and double quantization (QLoRA).

    q = quantize_nf4(weight)                 # NF4Weight: packed codes + quantized absmax
    w = dequantize_nf4(q, torch.bfloat16)    # the (out × in) matrix again
    model = load_model(ckpt, transforms=[NF4()])[0]   # every linear but the head as NF4Linear

Format (the tensors an `NF4Linear` stores under its module path):

| tensor                 | dtype   | shape              | meaning                                         |
| ---------------------- | ------- | ------------------ | ----------------------------------------------- |
| `weight`               | uint8   | (⌈n / 2⌉,)         | code indices, two per byte, first in the high nibble; n = out·in padded to a whole block |
| `weight_absmax`        | int8    | (n / 64,)          | each 64-value block's absmax, double-quantized  |
| `weight_absmax_scale`  | float32 | (⌈n / 64 / 256⌉,)  | per 256 absmax values: max \|absmax − offset\| / 127 |
| `weight_absmax_offset` | float32 | ()                 | the mean absmax, subtracted before the 8-bit step |
| `bias`                 | as base | (out,)             | unchanged                                       |

A weight is flattened row-major and cut into blocks of 64; each block is divided by its
absmax and every value replaced by the nearest of the 16 NF4 levels (`NF4_CODE`, the
published table: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero). Without
double quantization (`double_quant=false`) `weight_absmax` is float32 and the two scale
tensors are absent. The recorded `nf4` transform makes `load_model` rebuild these modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from llmctl.core.model.transforms import TRANSFORMS, Transform

BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmax values per 8-bit scale (double quantization)
# The 16 NF4 levels as published with QLoRA (Dettmers et al., 2023; bitsandbytes' table).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_CODE = torch.tensor(NF4_CODE)
_MIDPOINTS = (_CODE[1:] + _CODE[:-1]) / 2
_PAIRS = torch.stack([_CODE[torch.arange(256) >> 4], _CODE[torch.arange(256) & 15]], -1)  # a byte's two levels


class NF4Weight(NamedTuple):
    codes: torch.Tensor  # uint8, two 4-bit indices per byte
    absmax: torch.Tensor  # int8 (double-quantized) or float32, one per block
    absmax_scale: torch.Tensor | None  # float32, one per ABSMAX_BLOCK absmax values
    absmax_offset: torch.Tensor | None  # float32 scalar
    shape: tuple[int, ...]


def quantize_nf4(weight: torch.Tensor, *, double_quant: bool = True) -> NF4Weight:
    """`weight` as NF4 in blocks of 64 (the last padded with zeros), absmax 8-bit in blocks of 256."""
    flat = weight.detach().float().reshape(-1)
    pad = -flat.numel() % BLOCK
    blocks = F.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(1)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    index = torch.bucketize(scaled, _MIDPOINTS.to(scaled.device)).to(torch.uint8).view(-1)
    codes = (index[0::2] << 4) | index[1::2]
    if not double_quant:
        return NF4Weight(codes, absmax, None, None, tuple(weight.shape))
    offset = absmax.mean()
    centered = F.pad(absmax - offset, (0, -absmax.numel() % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    scale = centered.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(centered / scale[:, None]).clamp(-127, 127).to(torch.int8).view(-1)[: absmax.numel()]
    return NF4Weight(codes, q, scale, offset, tuple(weight.shape))


def dequantize_absmax(q: NF4Weight) -> torch.Tensor:
    if q.absmax_scale is None:
        return q.absmax.float()
    scale = q.absmax_scale.repeat_interleave(ABSMAX_BLOCK)[: q.absmax.numel()]
    return q.absmax.float() * scale + q.absmax_offset


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight `q` encodes, as `dtype` (one table lookup per byte, for both its levels)."""
    blocks = F.embedding(q.codes.long(), _PAIRS.to(q.codes.device)).view(-1, BLOCK)
    blocks.mul_(dequantize_absmax(q)[:, None])
    return blocks.view(-1)[: math.prod(q.shape)].view(q.shape).to(dtype)


class _Matmul(torch.autograd.Function):
    """x Wᵀ with W dequantized in forward and again in backward: only the packed weight is
    kept for backward, never a dense copy (QLoRA's memory)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return x @ module.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer stored as NF4 (see the module docstring); computes in the input's
    dtype. Made from an `nn.Linear` (real or on the meta device: shapes only)."""

    def __init__(self, linear: nn.Linear, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight
        if weight.is_meta:
            n = math.ceil(weight.numel() / BLOCK)
            q = NF4Weight(torch.empty((n * BLOCK) // 2, dtype=torch.uint8, device="meta"),
                          torch.empty(n, dtype=torch.int8 if double_quant else torch.float32, device="meta"),
                          torch.empty(math.ceil(n / ABSMAX_BLOCK), device="meta") if double_quant else None,
                          torch.empty((), device="meta") if double_quant else None, tuple(weight.shape))
        else:
            q = quantize_nf4(weight, double_quant=double_quant)
        self.register_buffer("weight", q.codes)
        self.register_buffer("weight_absmax", q.absmax)
        if double_quant:
            self.register_buffer("weight_absmax_scale", q.absmax_scale)
            self.register_buffer("weight_absmax_offset", q.absmax_offset)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def packed(self) -> NF4Weight:
        return NF4Weight(self.weight, self.weight_absmax, getattr(self, "weight_absmax_scale", None),
                         getattr(self, "weight_absmax_offset", None), (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.packed(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        out = _Matmul.apply(x.to(dtype), self)
        return out + self.bias.to(dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


@TRANSFORMS.register("nf4")
@dataclass(kw_only=True)
class NF4(Transform):
    """Linear layers (default: all but the output head) stored as NF4, frozen."""

    quant_method = "llmctl_nf4"  # config.json's quantization_config: transformers refuses it rather than misreading
    double_quant: bool = True

    def replace(self, path: str, module: nn.Module) -> nn.Module:
        return NF4Linear(module, self.double_quant)

    def apply(self, model: nn.Module) -> nn.Module:
        super().apply(model)
        _release_file_pages(model)
        return model


@torch.no_grad()
def _release_file_pages(model: nn.Module) -> None:
    """Copy the CPU tensors still backed by a checkpoint's memory map (a storage torch did not
    allocate) into the process's own memory, so the map goes, and with it the resident pages of
    the dense weights just quantized (~the whole file, counted in RSS: QLoRA's memory)."""
    for module in model.modules():
        for _, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.device.type == "cpu" and not tensor.untyped_storage().resizable():
                tensor.data = tensor.data.clone()
