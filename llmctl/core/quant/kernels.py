"""How a `PackedLinear` multiplies: llmctl's or torch's fused weight-only kernels where one fits,
else the weight dequantized.

    int8/int4, one input row, CPU  llmctl::mv_quant (core/native, AVX512-VNNI or AVX2): integer dot
    (decoding)                     products against the input quantized per 64 (int8) or 128
                                   (int4) values, as llama.cpp's q8_0/q4_0 per 32; groups a
                                   multiple of that block
    int8/int4, CPU, bf16 from 64   F.linear on the weight dequantized at the call (`gemm`): torch's
    (int8) / 128 (int4) rows       fused CPU ops below cost about as much per row as a matrix-vector
    (prefill) where the CPU has    product, so past those rows the dequantization's fixed cost plus
    bf16 hardware; f16 always      one GEMM is less; for float16 they have only a reference path
    int8, symmetric, per channel   aten._weight_int8pack_mm (CPU: bf16 inputs; CUDA: 16-bit)
    int4, CPU, bf16 inputs         aten._weight_int4pack_mm_for_cpu: tiles from
                                   _convert_weight_to_int4pack_for_cpu, groups of 32–256
    int4, CUDA, bfloat16           aten._weight_int4pack_mm (tinygemm): _convert_weight_to_int4pack
                                   (in_features % 128 == 0, out_features % 8 == 0)
    float32 inputs on CPU          F.linear on the weight dequantized once and kept (`dense`)
    anything else                  F.linear(x, (q − zero) · scale), dequantized at every call

torch 2.13's CPU int8/int4 kernels are fast only for bf16 inputs: with float32 inputs they take a
reference path 60–200× slower than the float32 matrix-vector product (measured on a 768×2048
layer), with float16 ones one 2–20× slower than dequantizing for a GEMM. So float32 batches
(prefill) run on a dequantized copy (exact, float32's memory), float16 ones on `gemm`, and the
fused kernels serve `--dtype bfloat16` batches. The native kernel takes one float32 or bf16 row;
its input rounding (at most 0.4 % of each block's largest value) is about what a
bf16 input already costs.

The kernels compute w = (u − 8) · s + z on unsigned nibbles u = q + 8, so our (q − zero) · scale
becomes s = scale, z = −zero · scale. A per-channel int4 scale is repeated over groups of the
largest size the kernel takes. A kernel's weight layout is made on first use and kept on the
module (`module.kernels`), per device, dtype and row count (one, a few, or `gemm_rows` and more);
`.to()` drops them. KERNELS is in preference order; a kernel that raises when made or first run (an op this
build lacks, a shape it refuses) passes to the next. Inputs that need a gradient take the
dequantizing path (the fused ops have no backward).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor], torch.Tensor]
INT4_GROUPS = (256, 128, 64, 32)
HALF = (torch.bfloat16, torch.float16)
GEMM_ROWS = {8: 64, 4: 128}  # bits → bf16 input rows from which `_gemm` beats torch's fused CPU kernels (BENCHMARKS.md)


def rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


@functools.cache
def fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): without it oneDNN's bf16 GEMM
    is 2–3× slower than torch's fused int8/int4 ops, with it 2× faster from GEMM_ROWS rows."""
    from llmctl.core.native import _cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & set(_cpu_flags().split()))


def gemm_rows(module, x: torch.Tensor) -> int | None:
    """The input rows from which `gemm` serves `module` on `x`'s device and dtype, or None (never).
    float16: always — torch's fused CPU ops have only a reference path for it (1.1–44 ms a call where
    the GEMM takes 0.5–3 on a 2048×768 layer); bf16: from GEMM_ROWS where the CPU has bf16 hardware."""
    if x.device.type != "cpu" or x.dtype not in HALF:
        return None
    if x.dtype == torch.float16:
        return 1
    return GEMM_ROWS[module.scheme.bits] if fast_bf16_matmul() else None


def _int8(module, x: torch.Tensor) -> Kernel | None:
    s = module.scheme
    if s.bits != 8 or not s.symmetric or s.group_size is not None or x.device.type not in ("cpu", "cuda") \
            or x.dtype not in HALF:
        return None
    _, _, q = module.integers()
    scale = module.weight_scale.to(x.dtype).reshape(-1).contiguous()
    op, bias = torch.ops.aten._weight_int8pack_mm, module.bias

    def run(x):
        y = op(x.reshape(-1, x.shape[-1]), q, scale).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return run


def _int4_params(module, x: torch.Tensor) -> tuple | None:
    """(unsigned int32 nibbles [out, in], group size, scales_and_zeros [groups, out, 2]) or None."""
    s = module.scheme
    if s.bits != 4:
        return None
    scale, zero, q = module.integers()
    group = s.group_size or next((g for g in INT4_GROUPS if module.in_features % g == 0), None)
    if group not in INT4_GROUPS:
        return None
    repeat = module.in_features // group // scale.shape[1]
    scale, zero = scale.repeat_interleave(repeat, 1), zero.repeat_interleave(repeat, 1)
    sz = torch.stack([scale.T, (-zero * scale).T], -1).to(x.dtype).contiguous()
    return (q.to(torch.int32) + 8), group, sz


def _int4_run(op, w: torch.Tensor, group: int, sz: torch.Tensor, bias) -> Kernel:
    """A packed int4 matmul over the last dimension of any input, plus the bias."""
    def run(x):
        y = op(x.reshape(-1, x.shape[-1]), w, group, sz).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return run


def _int4_cpu(module, x: torch.Tensor) -> Kernel | None:
    params = None if x.device.type != "cpu" or x.dtype not in HALF else _int4_params(module, x)
    if params is None:
        return None
    u, group, sz = params
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    return _int4_run(torch.ops.aten._weight_int4pack_mm_for_cpu, w, group, sz, module.bias)


def _int4_cuda(module, x: torch.Tensor) -> Kernel | None:
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or module.in_features % 128 or module.out_features % 8:
        return None
    params = _int4_params(module, x)
    if params is None:
        return None
    u, group, sz = params
    u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
    w = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
    return _int4_run(torch.ops.aten._weight_int4pack_mm, w, group, sz, module.bias)


def _gemm(module, x: torch.Tensor) -> Kernel | None:
    """16-bit rows on CPU from `gemm_rows` on (a prompt's prefill): the weight dequantized at each call,
    then one half-precision GEMM. torch's fused CPU kernels below scale with the rows like
    matrix-vector products; past the threshold the dequantization's fixed cost is the smaller."""
    start = gemm_rows(module, x)
    if start is None or rows(x) < start:
        return None
    return lambda x: F.linear(x, module.dequantize(x.dtype), _bias(module, x.dtype))


def _dense(module, x: torch.Tensor) -> Kernel | None:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    weight = module.dequantize(x.dtype)
    return lambda x: F.linear(x, weight, module.bias)


class NativeQuant:
    """A PackedLinear's weights as `llmctl::mv_quant` reads them (`core/native`): unsigned
    integers, four rows' 64-byte pieces interleaved; float32 scale, offset and bias. Callable on
    one input row; `core/native/decode.py` hands the same tensors to its whole-step plan."""

    def __init__(self, module):
        from llmctl.core import native

        s, K = module.scheme, module.in_features
        scale, zero, q = module.integers()
        low = -(1 << (s.bits - 1))
        u = (q.to(torch.int16) - low).to(torch.uint8)
        if s.bits == 4:  # each 128 inputs as 64 bytes: input j in the low nibble, 64 + j in the high
            u = u.reshape(-1, K // 128, 2, 64)
            u = (u[:, :, 0] | u[:, :, 1] << 4).reshape(-1, K // 2)
        n, width = u.shape  # four rows' 64-byte pieces interleaved: [N / 4, width / 64, 4, 64]
        self.weight = u.reshape(n // 4, 4, width // 64, 64).transpose(1, 2).contiguous().reshape(n, width)
        self.scale, self.zero = scale.contiguous(), (zero - low).contiguous()
        self.bias = None if module.bias is None else module.bias.detach().float()
        self.bits = s.bits
        self.op = native.ops().mv_quant  # looked up here, not in a compiled graph

    @staticmethod
    def takes(module, device: torch.device) -> bool:
        from llmctl.core import native

        s, K = module.scheme, module.in_features
        return device.type == "cpu" and s.bits in (4, 8) and not module.out_features % 4 \
            and not (s.group_size or K) % native.block_of(s.bits) and native.has(native.QUANT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.scale, self.zero, self.bias, self.bits)


def _native(module, x: torch.Tensor) -> Kernel | None:
    """One input row on CPU: llmctl's integer kernel (`core/native`), the input quantized per block."""
    if x.numel() != module.in_features or not NativeQuant.takes(module, x.device):
        return None
    return NativeQuant(module)


def _dequantize(module, x: torch.Tensor) -> Kernel:
    return lambda x: F.linear(x, module.dequantize(x.dtype), _bias(module, x.dtype))


def _bias(module, dtype: torch.dtype) -> torch.Tensor | None:
    """The bias in the input's dtype (F.linear takes one dtype; a float32 module may get 16-bit inputs)."""
    return None if module.bias is None else module.bias.to(dtype)


KERNELS: dict[str, Callable] = {"native": _native, "gemm": _gemm, "int8pack": _int8, "int4pack_cpu": _int4_cpu,
                                "int4pack_cuda": _int4_cuda, "dense": _dense, "dequantize": _dequantize}


def choose(module, x: torch.Tensor, allowed=None) -> tuple[str, Kernel, torch.Tensor]:
    """The first kernel of KERNELS (or of `allowed`) that takes this module and input and runs
    (an op a build lacks raises, and the next is tried), with its output for `x`."""
    for name, make in KERNELS.items():
        if allowed is not None and name not in allowed:
            continue
        try:  # making a kernel's layout can raise too (a shape the op refuses)
            kernel = make(module, x)
            if kernel is not None:
                return name, kernel, kernel(x)
        except (RuntimeError, NotImplementedError):
            if name == "dequantize":
                raise
    raise ValueError(f"no kernel among {allowed} takes this module")


def native_layout(module, dtype: torch.dtype) -> NativeQuant | None:
    """The `native` one-row kernel of a PackedLinear on CPU for inputs of `dtype` (made once and
    kept with the module's other kernels), or None where it does not take the module."""
    key = (torch.device("cpu"), dtype, "one")
    if key not in module.kernels:
        if not NativeQuant.takes(module, torch.device("cpu")):
            return None
        module.kernels[key] = ("native", NativeQuant(module))
    name, kernel = module.kernels[key]
    return kernel if name == "native" else None


def linear(module, x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():  # the fused ops have no backward
        return _dequantize(module, x)(x)
    n, start = rows(x), gemm_rows(module, x)  # one row (decoding) and many (prefill) may take other kernels
    key = (x.device, x.dtype, "one" if n == 1 else "many" if start is not None and n >= start else "few")
    if key not in module.kernels:
        name, kernel, y = choose(module, x)
        module.kernels[key] = (name, kernel)
        return y
    return module.kernels[key][1](x)
