"""NF4 edges the round-trip tests left open: the defaults (double quantization on), the
single-quantized path through `NF4Linear` and the transform, low-precision compute without
autocast, and the shapes-only (meta) construction `load_model` uses."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmctl.core.quant.nf4 import NF4, NF4_CODE, NF4Linear, dequantize_nf4, quantize_nf4  # noqa: E402


def _nearest_levels(weight: torch.Tensor) -> torch.Tensor:
    """QLoRA's definition by brute force: each 64-block / its absmax, then the nearest NF4 level."""
    blocks = weight.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    code = torch.tensor(NF4_CODE)
    index = ((blocks / absmax)[..., None] - code).abs().argmin(-1)
    return (code[index] * absmax).reshape(weight.shape)


def test_defaults_double_quantize_and_single_quantization_is_plain_absmax():
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    assert quantize_nf4(weight).absmax.dtype == torch.int8
    single = quantize_nf4(weight, double_quant=False)
    assert single.absmax.dtype == torch.float32 and single.absmax_scale is None
    torch.testing.assert_close(dequantize_nf4(single), _nearest_levels(weight), rtol=0, atol=1e-6)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_linear_and_the_transform_keep_the_quantization_asked_for(double_quant):
    linear = torch.nn.Linear(64, 40)
    layer = NF4Linear(linear, double_quant)
    via_transform = NF4(double_quant=double_quant).replace("mlp.up_proj", linear)
    want = dequantize_nf4(quantize_nf4(linear.weight, double_quant=double_quant))
    for q in (layer, via_transform):
        assert q.weight_absmax.dtype == (torch.int8 if double_quant else torch.float32)
        assert ("weight_absmax_scale" in q.state_dict()) is double_quant
        assert torch.equal(q.dequantize(), want)
    assert NF4Linear(linear).weight_absmax.dtype == torch.int8  # the default
    assert NF4().replace("mlp.up_proj", linear).weight_absmax.dtype == torch.int8


def test_low_precision_input_computes_in_its_dtype_without_autocast():
    linear = torch.nn.Linear(64, 48)
    layer = NF4Linear(linear)
    assert layer.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert dequantize_nf4(layer.packed(), torch.float16).dtype == torch.float16
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    y = layer(x)
    w = layer.dequantize().bfloat16()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, x.detach() @ w.t() + linear.bias.detach().bfloat16())
    grad = torch.randn(3, 48, generator=torch.Generator().manual_seed(2)).bfloat16()
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, grad @ w)


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_meta_linear_gives_the_buffers_of_a_real_one(double_quant):
    shape = (33, 70)  # 2310 values: a padded last block
    real = NF4Linear(torch.nn.Linear(shape[1], shape[0]), double_quant).state_dict()
    meta = NF4Linear(torch.nn.Linear(shape[1], shape[0], device="meta"), double_quant).state_dict()
    assert real.keys() == meta.keys()
    for name, tensor in meta.items():
        assert tensor.is_meta, name
        assert (tensor.shape, tensor.dtype) == (real[name].shape, real[name].dtype), name
