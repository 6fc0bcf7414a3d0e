"""NF4 (QLoRA's 4-bit NormalFloat): the code book, blockwise absmax with double quantization, NF4Linear."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402,F401

from conftest import tiny_llama  # noqa: E402

from llmctl.core.model.io import load_model, save_model  # noqa: E402
from llmctl.core.quant.nf4 import (ABSMAX_BLOCK, BLOCK, NF4, NF4_CODE, NF4Linear, dequantize_absmax,  # noqa: E402
                                   dequantize_nf4, quantize_nf4)

PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_code_book_is_the_published_table_and_the_normal_quantiles():
    assert list(NF4_CODE) == PUBLISHED
    # QLoRA's construction: 8 positive and 7 negative N(0,1) quantiles between offset and 1/2, an exact zero, /max
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    assert torch.allclose(levels / levels.max(), torch.tensor(PUBLISHED, dtype=torch.float64), atol=1e-6)


def test_levels_round_trip_exactly_and_nibbles_pack_high_first():
    code = torch.tensor(NF4_CODE)
    index = torch.randint(0, 16, (4, BLOCK), generator=torch.Generator().manual_seed(0))
    index[:, 0] = 15  # each block's absmax is 1 × its scale
    scales = torch.tensor([0.5, 2.0, 3.0, 0.25])
    weight = code[index] * scales[:, None]
    q = quantize_nf4(weight, double_quant=False)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == weight.numel() // 2
    assert int(q.codes[0]) == (int(index[0, 0]) << 4) | int(index[0, 1])
    assert torch.equal(dequantize_nf4(q), weight)


def test_round_trip_error_is_within_half_a_level_gap_of_each_block():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 200, generator=gen) * 0.02  # 19,200 values: 300 blocks, padding none; 2 absmax blocks
    for double in (False, True):
        q = quantize_nf4(weight, double_quant=double)
        back = dequantize_nf4(q)
        assert back.shape == weight.shape
        absmax = weight.reshape(-1, BLOCK).abs().amax(1)
        stored = dequantize_absmax(q)
        gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2
        bound = (gap * absmax + (stored - absmax).abs())[:, None] + 1e-7
        assert ((back - weight).reshape(-1, BLOCK).abs() <= bound).all()
        relative = ((back - weight).norm() / weight.norm()).item()
        assert relative < 0.12  # NF4's typical error on normal weights is ~0.09-0.1
        if double:
            assert q.absmax.dtype == torch.int8 and q.absmax_scale.numel() == -(-300 // ABSMAX_BLOCK)
            assert ((stored - absmax).abs() <= q.absmax_scale.repeat_interleave(ABSMAX_BLOCK)[:300] / 2 + 1e-8).all()
    ragged = torch.randn(3, 7, generator=gen)  # 21 values: one padded block
    assert (dequantize_nf4(quantize_nf4(ragged)) - ragged).abs().max() < 0.2 * ragged.abs().max()


def test_nf4_linear_forward_and_backward_use_the_dequantized_weight():
    gen = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(64, 48)
    q = NF4Linear(linear)
    dense = q.dequantize()
    x = torch.randn(5, 64, generator=gen, requires_grad=True)
    y = q(x)
    assert torch.allclose(y, x @ dense.t() + linear.bias, atol=1e-5)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ dense.t() + linear.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)
    assert not any(p.requires_grad for p in q.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16


def test_nf4_checkpoint_is_recorded_and_reloads(tmp_path):
    (tmp_path / "base").mkdir()
    base = tiny_llama(tmp_path / "base", ["nf4 blocks of sixty-four " * 20], vocab=120, context=32, scale=2.0)
    model, _ = load_model(base, transforms=[NF4()])
    dense, _ = load_model(base)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        ours, ref = model(ids).logits, dense(ids).logits
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)
    assert type(model.lm_head) is torch.nn.Linear
    assert 0 < (ours - ref).abs().max() < 0.25 * ref.abs().max()
    out = save_model(model, tmp_path / "nf4")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "llmctl_nf4"
    reloaded, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours)
    layer = reloaded.model.layers[0].mlp.down_proj.state_dict()
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in layer.values()) / (64 * 32)
    assert 4.0 < stored_bits < 4.6  # 4 bits per weight + 8 bits per 64 + 32 bits per 64 x 256 (+ one offset)
