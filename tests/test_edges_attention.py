"""Edges of attention and the KV cache that the parity tests miss (found by mutation testing):
a bfloat16 model's cache and float32 prefix, and the cache's error message."""

from __future__ import annotations

import pytest
import torch
from test_edges_model import TINY
from test_prefix_prompt import _adapted, base  # noqa: F401  (fixture)

from llmctl.core.model import ModelConfig, Transformer
from llmctl.errors import LlmctlError

IDS = torch.tensor([[5, 17, 42, 7, 90, 3], [9, 8, 7, 6, 5, 4]])


def test_bfloat16_cached_decoding_keeps_the_models_dtype():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).eval().to(torch.bfloat16)
    cache = model.make_cache(2, 16)
    assert cache.keys[0].dtype == cache.values[-1].dtype == torch.bfloat16
    with torch.no_grad():
        full = model(IDS).logits.float()
        model(IDS[:, :4], cache=cache)
        steps = torch.cat([model(IDS[:, t : t + 1], cache=cache).logits for t in (4, 5)], 1).float()
    assert torch.allclose(steps, full[:, 4:], atol=3e-2)


def test_prefix_on_a_bfloat16_model_uses_its_float32_virtual_tokens(base):  # noqa: F811
    """The adapter's weights stay float32 on a bfloat16 base; its keys/values are cast to the model's."""
    model = _adapted(base, "prefix")
    with torch.no_grad():
        ref = model(IDS).logits.float()
        half = model.to(torch.bfloat16)
        half.prompt_encoder.float()
        got = half(IDS).logits.float()
    assert next(half.prompt_encoder.parameters()).dtype == torch.float32
    assert torch.allclose(got, ref, atol=5e-2) and got.abs().max() > 0.1


def test_truncating_past_the_cache_says_what_it_holds():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).eval()
    cache = model.make_cache(1, 8)
    with torch.no_grad():
        model(IDS[:1, :3], cache=cache)
    with pytest.raises(LlmctlError, match="cannot truncate a KV cache of length 3 to 5"):
        cache.truncate(5)
