"""Edges of the model code that the parity tests do not reach (found by mutation testing,
docs/testing.md): the rotary tables' dtype, cache and growth, every scaling's uncached path,
and the legacy spelling of `rope_scaling`."""

from __future__ import annotations

import pytest
import torch

from llmctl.core.model import ModelConfig, Transformer

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
            max_seq_len=64)
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


def rope(**overrides):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval().model.embed_positions


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("cached", [True, False])
def test_rotary_tables_come_in_the_requested_dtype(scaling, cached):
    r = rope(rope_scaling=SCALINGS[scaling])
    ids = torch.tensor([[0, 3, 40, 90]])  # past the original context: dynamic and yarn scale
    ref = r.rotary(ids, torch.float32, cached=cached)
    got = r.rotary(ids, torch.bfloat16, cached=cached)
    for g, f in zip(got, ref):
        assert g.dtype == torch.bfloat16
        assert torch.allclose(g.float(), f, atol=1e-2)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_uncached_rotary_equals_the_tables_for_every_scaling(scaling):
    r = rope(rope_scaling=SCALINGS[scaling])
    ids = torch.tensor([[0, 1, 17, 90], [5, 6, 7, 8]])  # 90: past the context
    for a, b in zip(r.rotary(ids, torch.float32), r.rotary(ids, torch.float32, cached=False)):
        assert torch.allclose(a, b, atol=1e-6)
    if scaling != "default":  # the scaling's parameters reach the uncached path too
        plain = rope().rotary(ids, torch.float32, cached=False)
        assert not torch.allclose(plain[0], r.rotary(ids, torch.float32, cached=False)[0])


def test_rotary_tables_are_built_once_and_grow_by_doubling():
    r = rope()
    assert r._tables is None
    r.rotary(torch.tensor([[0, 1, 2]]), torch.float32)  # cached by default
    tables = r._tables
    assert tables is not None and len(tables[0]) == 1024  # room to grow
    r.rotary(torch.tensor([[1023]]), torch.float32, 1024)  # exactly the table's size: reused
    assert r._tables is tables
    r.rotary(torch.tensor([[1500]]), torch.float32)  # beyond it: rebuilt with room to double
    assert r._tables is not tables and len(r._tables[0]) >= 2 * 1501
    grown = r._tables
    r.rotary(torch.tensor([[7]]), torch.bfloat16)  # another dtype: another table
    assert r._tables is not grown and r._tables[0].dtype == torch.bfloat16


def test_legacy_rope_scaling_type_key_is_understood():
    """Older configs spell the scaling `{"type": …}`; it must act as `rope_type`."""
    ids = torch.tensor([[0, 5, 40]])
    legacy = rope(rope_scaling={"type": "linear", "factor": 2.0}).rotary(ids, torch.float32)
    current = rope(rope_scaling={"rope_type": "linear", "factor": 2.0}).rotary(ids, torch.float32)
    plain = rope().rotary(ids, torch.float32)
    assert torch.equal(legacy[0], current[0]) and not torch.equal(legacy[0], plain[0])


@pytest.mark.parametrize("T", [8, 160])  # 160: long enough for the blocked causal kernel on CPU
def test_attention_dropout_acts_in_training_only(T):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "max_seq_len": 256, "attention_dropout": 0.5}))
    ids = torch.randint(0, 97, (1, T))

    def run(train: bool, seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.train(train)(ids).logits

    assert torch.equal(run(False, 0), run(False, 1))  # eval: no dropout
    assert torch.equal(run(True, 0), run(True, 0))  # seeded
    assert not torch.allclose(run(True, 0), run(True, 1))  # training: attention probabilities dropped
    assert not torch.allclose(run(True, 0), run(False, 0))


# -- norms (mutation round: core/model/norm.py) -------------------------------------------------

@pytest.mark.parametrize("name, reference", [("rmsnorm", "llama.modeling_llama.LlamaRMSNorm"),
                                             ("gemma_rmsnorm", "gemma.modeling_gemma.GemmaRMSNorm")])
def test_fresh_norms_equal_transformers_fresh_ones_in_float32_and_bfloat16(name, reference):
    """A freshly built norm scales by one (Llama stores 1, Gemma stores scale − 1 = 0), and in
    bfloat16 returns bfloat16 equal to transformers' module."""
    import importlib

    from llmctl.core.model.norm import NORMS

    module, cls = reference.rsplit(".", 1)
    theirs = getattr(importlib.import_module(f"transformers.models.{module}"), cls)(48, eps=1e-6)
    ours = NORMS.get(name)(48, eps=1e-6)
    x = torch.randn(2, 5, 48) * 3
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(-0.5, 0.5, 48))
    xb = x.bfloat16()
    out = ours.bfloat16()(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, theirs.bfloat16()(xb), rtol=0, atol=0)


@pytest.mark.parametrize("norm, bias", [("layernorm", True), ("layernorm", False), ("rmsnorm", False)])
def test_norm_bias_follows_the_config(norm, bias):
    from types import SimpleNamespace

    from llmctl.core.model.norm import make_norm

    module = make_norm(SimpleNamespace(norm=norm, norm_eps=1e-5, norm_bias=bias, hidden_size=16))
    assert (getattr(module, "bias", None) is not None) == bias
    assert module.weight.shape == (16,)
