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


def test_per_layer_sliding_windows_cache_and_decode_step_equal_the_full_forward():
    """Gemma 2's alternation: each layer masks (and the cache trims) by its own window, in the
    cached forward and the fixed-shape `decode_step` alike; a window per layer changes the result."""
    from llmctl.core.model.transformer import window_layers

    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "num_layers": 3, "layer_sliding_windows": [2, None, 3]})
    model = Transformer(cfg).eval()
    assert model.make_cache(1, 8).windows == [2, None, 3] and window_layers(cfg) == {2: 0, 3: 2}
    with torch.no_grad():
        full = model(IDS).logits
        cache = model.make_cache(2, 8)
        model(IDS[:, :3], cache=cache)
        steps = [model(IDS[:, t : t + 1], cache=cache).logits for t in (3, 4, 5)]
        static = model.make_cache(2, 8)
        model(IDS[:, :3], cache=static)
        for t in (3, 4, 5):
            slot = torch.tensor([t])
            steps.append(model.decode_step(IDS[:, t : t + 1], slot.expand(2, 1), None, static.keys, static.values,
                                           slot)[:, None])
            static.advance(1)
        uniform = Transformer(ModelConfig(**{**TINY, "num_layers": 3, "sliding_window": 2}))
        uniform.load_state_dict(model.state_dict())
        other = uniform.eval()(IDS).logits
    for got in (torch.cat(steps[:3], 1), torch.cat(steps[3:], 1)):
        assert torch.allclose(got, full[:, 3:], atol=1e-5)
    assert (other - full).abs().max() > 1e-3


@pytest.mark.parametrize("fields,match", [
    (dict(layer_sliding_windows=[2, None], sliding_window=4), "leave sliding_window unset"),
    (dict(layer_sliding_windows=[2]), "must hold 2 sizes"),
    (dict(layer_sliding_windows=[0, None]), "must hold 2 sizes"),
    (dict(attention_softcap=0.0), "attention_softcap must be > 0"),
])
def test_per_layer_window_and_softcap_settings_are_checked(fields, match):
    from llmctl.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{**TINY, "num_layers": 2, **fields})
    assert ModelConfig(**{**TINY, "num_layers": 2, "layer_sliding_windows": [4, 4]}).sliding_window == 4  # one for all


def test_per_layer_windows_follow_their_layers_when_layers_are_dropped():
    """Layer pruning and a `keep_every` student keep each kept layer's own window (one left: the config's)."""
    from llmctl.core.distill.student import student_config
    from llmctl.core.prune.structured import resized

    cfg = ModelConfig(**{**TINY, "num_layers": 4, "layer_sliding_windows": [3, None, 3, None]})
    model = Transformer(cfg).eval()
    assert resized(model, layers=[0, 1, 3]).cfg.layer_sliding_windows == [3, None, None]
    kept = resized(model, layers=[0, 2]).cfg
    assert (kept.layer_sliding_windows, kept.sliding_window) == (None, 3)
    assert student_config(cfg, 2) == kept
