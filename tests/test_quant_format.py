"""The compressed-tensors pack-quantized format: packing, grids, transformers parity, kernels."""

import json

import pytest
import torch

from conftest import tiny_llama
from llmctl.core.model.io import load_model, save_model
from llmctl.core.quant import kernels
from llmctl.core.quant.linear import PackedLinear, PackQuantized
from llmctl.core.quant.pack import pack, unpack
from llmctl.core.quant.scheme import Scheme
from llmctl.errors import CheckpointError

import compressed_tensors as ct  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    return tiny_llama(out, ["the cat sat on the mat, hello world"] * 20, vocab=300, context=64)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [32, 37, 8])
def test_packing_round_trips_and_equals_compressed_tensors(bits, n):
    lo = -(2 ** (bits - 1))
    q = torch.randint(lo, -lo, (5, n), dtype=torch.int8)
    packed = pack(q, bits)
    assert torch.equal(packed, pack_to_int32(q, bits))
    assert torch.equal(unpack(packed, bits, n), q)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size((5, n))), q)
    zp = q[:, :1]  # a column of zero points, packed along the output dimension
    assert torch.equal(pack(zp, bits, dim=0), pack_to_int32(zp, bits, packed_dim=0))
    assert torch.equal(unpack(pack(zp, bits, dim=0), bits, 5, dim=0), zp)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 16), (8, None), (4, None)])
def test_grid_is_compressed_tensors_arithmetic(bits, group, symmetric):
    w = torch.randn(12, 64) * torch.linspace(0.1, 3, 64)
    s = Scheme(bits, group, symmetric)
    scale, zero = s.params(w)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group" if group else "channel",
                            group_size=group)
    g = w.reshape(12, s.groups(64), -1)
    ct_scale, ct_zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
    torch.testing.assert_close(scale, ct_scale)
    assert torch.equal(zero, ct_zero.float())
    q = s.quantize(w, scale, zero)
    ct_zero_arg = None if symmetric else ct_zero
    assert torch.equal(q, ct_quantize(w, ct_scale, ct_zero_arg, args, dtype=torch.int8))
    assert (s.dequantize(q, scale, zero) - w).abs().max() <= scale.max() * (0.5 + 1e-4) + 1e-6


SCHEMES = [dict(bits=8), dict(bits=4), dict(bits=4, group_size=32), dict(bits=4, group_size=16)]


@pytest.mark.parametrize("params", SCHEMES, ids=lambda p: f"int{p['bits']}-g{p.get('group_size')}")
def test_transformers_loads_ours_and_we_load_theirs_with_equal_logits(base, tmp_path, params):
    import transformers
    model, _ = load_model(base, transforms=[PackQuantized(**params)])
    save_model(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        ours = load_model(tmp_path / "ours")[0]
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")  # compressed again by compressed-tensors (before a forward)
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
        again = load_model(tmp_path / "theirs")[0]
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-4, atol=1e-4)
    packed = [m for m in again.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 14 and isinstance(again.lm_head, torch.nn.Linear)
    dense = load_model(base)[0].model.layers[0].self_attn.q_proj.weight
    scale = packed[0].weight_scale.float()
    step = scale.repeat_interleave(32 // scale.shape[1], 1)  # within half a step of the float weight
    assert ((packed[0].dequantize() - dense).abs() <= step * 0.5001 + 1e-6).all()


def test_asymmetric_zero_points_decompress_as_compressed_tensors_does():
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    linear = torch.nn.Linear(64, 24)
    module = PackedLinear.from_linear(linear, Scheme(4, 32, symmetric=False))
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, symmetric=False, strategy="group", group_size=32))
    state = {k: v for k, v in module.state_dict().items() if k != "bias"}
    weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(module.dequantize(), weight)
    assert (module.dequantize() - linear.weight).abs().max() < 0.6 * module.weight_scale.max()


@pytest.mark.parametrize("params,kernel", [(dict(bits=8), "int8pack"), (dict(bits=4), "int4pack_cpu"),
                                           (dict(bits=4, group_size=64), "int4pack_cpu"),
                                           (dict(bits=4, group_size=64, symmetric=False), "int4pack_cpu"),
                                           (dict(bits=8, group_size=64), "dequantize"),
                                           (dict(bits=4, group_size=16), "dequantize")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_equal_the_dequantized_product(params, kernel, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48).to(dtype)
    module = PackedLinear.from_linear(linear, PackQuantized(**params).scheme)
    x = torch.randn(3, 5, 256, dtype=dtype)
    with torch.no_grad():
        y = module(x)
        assert [name for name, _ in module.kernels.values()] == [kernel if dtype == torch.bfloat16 else "dense"]
        expected = torch.nn.functional.linear(x.float(), module.dequantize(torch.float32), linear.bias.float())
    tol = 2e-2 * expected.abs().max().item() if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=tol)
    x.requires_grad_(True)
    module(x).sum().backward()  # a gradient to the input: the dequantizing path
    torch.testing.assert_close(x.grad.float(), (module.dequantize(torch.float32).sum(0)).expand(3, 5, -1).float(),
                               rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_kernel_is_made_again_after_a_move():
    module = PackedLinear.from_linear(torch.nn.Linear(64, 16), Scheme(8))
    with torch.no_grad():
        module(torch.randn(2, 64))
        assert module.kernels
        module.to(torch.bfloat16)
        assert not module.kernels and module.weight_scale.dtype == torch.bfloat16
        assert module(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert kernels.choose(module, torch.randn(1, 64, dtype=torch.bfloat16), allowed=["dequantize"])[0] == "dequantize"


@pytest.mark.parametrize("change,message", [
    (lambda q: q.update(format="int-quantized"), "only the 'pack-quantized' format"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"), "weight-only int"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3), "bits"),
    (lambda q: q["config_groups"]["group_0"]["weights"].pop("num_bits"), "malformed"),
])
def test_unsupported_quantization_configs_fail_clearly(base, tmp_path, change, message):
    model, _ = load_model(base, transforms=[PackQuantized(bits=8)])
    out = save_model(model, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    change(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(out)
