"""Quantized linears on CUDA (marker `cuda`, skipped without a GPU): the fused kernels equal the
dequantized product, and a quantized checkpoint decodes there."""

import pytest
import torch

from llmctl.core.quant.linear import PackedLinear
from llmctl.core.quant.scheme import Scheme

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("scheme,dtype,kernels", [
    (Scheme(8), torch.bfloat16, {"int8pack", "dequantize"}),
    (Scheme(4, 128), torch.bfloat16, {"int4pack_cuda"}),
    (Scheme(4, 128, symmetric=False), torch.bfloat16, {"int4pack_cuda"}),
    (Scheme(4, 64), torch.float16, {"dequantize"}),
])
def test_cuda_kernels_equal_the_dequantized_product(scheme, dtype, kernels):
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 256).to(dtype)
    module = PackedLinear.from_linear(linear, scheme).cuda()
    x = torch.randn(4, 7, 1024, dtype=dtype, device="cuda")
    with torch.no_grad():
        y = module(x)
        expected = torch.nn.functional.linear(x.float(), module.dequantize(torch.float32), module.bias.float())
    assert {name for name, _ in module.kernels.values()} <= kernels
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=3e-2 * expected.abs().max().item())
