"""The transformer: variants, causality, KV cache, save/load, MoE, MTP, presets, module paths."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llmctl.core.model import KVCache, ModelConfig, Transformer
from llmctl.core.model.io import load_model, save_model
from llmctl.core.model.presets import load_preset
from llmctl.errors import ConfigError, UsageError

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_seq_len=64)
VARIANTS = {
    "llama-gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "alibi": dict(position="alibi", norm="layernorm"),
    "nope": dict(position="nope"),
    "sinusoidal": dict(position="sinusoidal", mlp="gelu"),
    "learned": dict(position="learned", mlp="relu", qkv_bias=True, o_bias=True, mlp_bias=True),
    "post-norm": dict(norm_placement="post", norm="layernorm", norm_bias=False),
    "geglu-qknorm": dict(mlp="geglu", qk_norm=True, num_kv_heads=2),
    "gemma-norm": dict(norm="gemma_rmsnorm", scale_embeddings=True, activation="gelu_tanh", mlp="geglu"),
    "sliding-window": dict(sliding_window=3, num_kv_heads=2),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "moe": dict(num_experts=4, experts_per_token=2, moe_intermediate_size=24, tie_embeddings=False),
    "moe-shared": dict(num_experts=3, experts_per_token=1, shared_expert_intermediate_size=16),
    "mtp": dict(num_mtp_heads=2),
}


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # perturb norm weights too, so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_roundtrip(variant, tmp_path):
    model = make(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 10))
    save_model(model, tmp_path / "ck", lineage={"command": "test"})
    loaded, cfg = load_model(tmp_path / "ck")
    assert cfg.to_dict() == model.cfg.to_dict()
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    saved_type = json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"]
    hf_expressible = {"llama-gqa": "llama", "mqa": "llama", "sliding-window": "mistral", "yarn": "llama",
                      "geglu-qknorm": "qwen3", "gemma-norm": "gemma"}
    assert saved_type == hf_expressible.get(variant, "llmctl")
    if model.cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    model = make(**VARIANTS[variant])
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 97
    a, b = logits(model, ids), logits(model, changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_forward(variant):
    model = make(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 11))
    full = logits(model, ids)
    cache = model.make_cache(2, 16)
    steps = [logits(model, ids[:, :5], cache=cache)]  # prefill, then 2 tokens, then one by one
    steps.append(logits(model, ids[:, 5:7], cache=cache))
    steps += [logits(model, ids[:, t : t + 1], cache=cache) for t in range(7, 11)]
    assert cache.length == 11
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["llama-gqa", "alibi", "learned", "sliding-window", "moe"])
def test_kv_cache_left_padded_batch(variant):
    """A left-padded batch decoded with the cache equals each sequence run alone."""
    model = make(**VARIANTS[variant])
    rows = [torch.randint(0, 97, (n,)) for n in (9, 6, 4)]
    width, new = 9, 3
    prompt = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, row in enumerate(rows):
        prompt[r, width - len(row) :] = row
        mask[r, width - len(row) :] = 1
    continuation = torch.randint(0, 97, (3, new))
    cache = model.make_cache(3, width + new)
    out = [logits(model, prompt, attention_mask=mask, cache=cache)[:, -1:]]
    for t in range(new):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        out.append(logits(model, continuation[:, t : t + 1], attention_mask=mask, cache=cache))
    batched = torch.cat(out, dim=1)
    for r, row in enumerate(rows):
        alone = logits(model, torch.cat([row, continuation[r]])[None])[:, len(row) - 1 :]
        assert (batched[r] - alone[0]).abs().max() < 1e-5


def test_sliding_window_limits_context():
    model = make(sliding_window=3)
    ids = torch.randint(0, 97, (1, 10))
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 97
    a, b = logits(model, ids), logits(model, changed)
    # with 2 layers the receptive field of position t reaches back 2 * (3 - 1) = 4 tokens
    assert torch.allclose(a[:, 7:], b[:, 7:], atol=1e-6)
    assert not torch.allclose(a[:, 2:5], b[:, 2:5])
    unwindowed = make(sliding_window=None)
    assert not torch.allclose(logits(unwindowed, ids)[:, 7:], logits(unwindowed, changed)[:, 7:])


def test_cache_truncate_and_reorder():
    model = make(num_kv_heads=2)
    ids = torch.randint(0, 97, (2, 8))
    cache = model.make_cache(2, 8)
    logits(model, ids[:, :6], cache=cache)
    cache.truncate(4)  # roll back two speculative tokens
    again = logits(model, ids[:, 4:8], cache=cache)
    assert torch.allclose(again, logits(model, ids)[:, 4:], atol=1e-5)
    cache.truncate(5)
    cache.reorder(torch.tensor([1, 1, 0]))
    assert cache.batch_size == 3 and cache.length == 5
    rows = ids[[1, 1, 0]]
    step = logits(model, rows[:, 5:6], cache=cache)
    assert torch.allclose(step, logits(model, rows)[:, 5:6], atol=1e-5)
    with pytest.raises(Exception, match="overflow"):
        logits(model, rows[:, :4], cache=cache)


def test_rope_tables_match_direct_computation_and_follow_changes():
    model = make(num_kv_heads=2)
    rope = model.model.embed_positions
    far = torch.tensor([[0, 5, 3000]])  # beyond the first table: it grows
    cos, sin = rope.rotary(far, torch.float32)
    expect = rope._cos_sin("default", {}, far, far, torch.float32)
    assert torch.equal(cos, expect[0]) and torch.equal(sin, expect[1])
    assert all(torch.equal(a, b) for a, b in zip(rope.rotary(far, torch.float32, cached=False), (cos, sin)))
    model.cfg.rope_scaling = {"rope_type": "linear", "factor": 2.0}  # as `generate --rope-scaling` does
    cos, _ = rope.rotary(far, torch.float32, 3001)
    assert torch.equal(cos, rope._cos_sin("linear", {"factor": 2.0}, far, far, torch.float32)[0])


def test_training_after_inference_mode_decoding():
    model = make(num_kv_heads=2)
    ids = torch.randint(0, 97, (2, 8))
    with torch.inference_mode():  # builds the rotary tables inside inference mode
        logits(model, ids, cache=model.make_cache(2, 8))
    model.train()(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_encoder_is_bidirectional_and_respects_padding():
    model = make(is_causal=False, position="learned", norm="layernorm", norm_placement="post",
                 embedding_norm=True, type_vocab_size=2, mlp="gelu", lm_head_bias=True)
    ids = torch.randint(0, 97, (1, 8))
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 97
    assert not torch.allclose(logits(model, ids)[:, :6], logits(model, changed)[:, :6])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    a = logits(model, ids, attention_mask=mask)[:, :5]
    b = logits(model, changed, attention_mask=mask)[:, :5]
    assert torch.allclose(a, b, atol=1e-6)
    assert hasattr(model, "mlm_transform")


def test_moe_aux_loss_trains_the_router():
    model = make(num_experts=4, experts_per_token=2, router_aux_loss_coef=0.1).train()
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids)
    assert out.aux_loss.item() > 0
    (out.loss + out.aux_loss).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert all(e.down_proj.weight.grad is not None for e in model.model.layers[0].mlp.experts)


def test_mtp_heads_add_an_auxiliary_loss():
    model = make(num_mtp_heads=2).train()
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids)
    assert out.aux_loss.item() > 0
    (out.loss + out.aux_loss).backward()
    assert model.mtp_heads[1].mlp.up_proj.weight.grad is not None
    assert make()(ids, labels=ids).aux_loss.item() == 0


def test_loss_ignores_minus_100():
    model = make()
    ids = torch.randint(0, 97, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    expected = nn.functional.cross_entropy(out.logits[:, 3:].reshape(-1, 97), ids[:, 3:].reshape(-1))
    assert torch.allclose(out.loss, expected)


def test_gradient_checkpointing_same_gradients():
    ids = torch.randint(0, 97, (2, 8))
    grads = []
    for flag in (False, True):
        model = make(gradient_checkpointing=flag, residual_dropout=0.0).train()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert torch.allclose(*grads, atol=1e-6)


def test_dropout_only_in_training():
    model = make(embedding_dropout=0.5, attention_dropout=0.5, residual_dropout=0.5)
    ids = torch.randint(0, 97, (1, 8))
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_logits_to_keep_and_hidden_states():
    model = make()
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    assert torch.allclose(model(ids, logits_to_keep=1).logits, out.logits[:, -1:], atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_to_keep_trims_the_last_layer_exactly(variant):
    """Only the kept positions run the last layer's queries and MLP: same logits as a full
    forward, without and with a prefilled cache and left padding."""
    model = make(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 10))
    full = logits(model, ids)
    for keep in (1, 4):
        assert (logits(model, ids, logits_to_keep=keep) - full[:, -keep:]).abs().max() < 1e-5
    cache = model.make_cache(2, 10)
    logits(model, ids[:, :6], cache=cache, logits_to_keep=1)
    assert (logits(model, ids[:, 6:], cache=cache, logits_to_keep=3) - full[:, -3:]).abs().max() < 1e-5
    if model.cfg.is_causal:
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :3] = 0
        padded = logits(model, ids, attention_mask=mask)
        assert (logits(model, ids, attention_mask=mask, logits_to_keep=2) - padded[:, -2:]).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["llama-gqa", "alibi", "learned", "sliding-window", "moe", "geglu-qknorm"])
def test_static_decode_step_matches_cached_forward(variant):
    """`decode_step` (fixed shapes, for torch.compile) equals forward with a KV cache, padded rows too."""
    model = make(**VARIANTS[variant])
    rows = [torch.randint(0, 97, (n,)) for n in (7, 4)]
    width, new, size = 7, 4, 16
    prompt, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, size, dtype=torch.long)
    for r, row in enumerate(rows):
        prompt[r, width - len(row) :], mask[r, width - len(row) :] = row, 1
    mask[:, width:] = 1
    continuation = torch.randint(0, 97, (2, new))
    eager, static = model.make_cache(2, size), model.make_cache(2, size)
    for cache in (eager, static):
        logits(model, prompt, attention_mask=mask[:, :width], cache=cache)
    next_pos = mask[:, :width].sum(-1, keepdim=True)
    with torch.no_grad():
        for t in range(new):
            step = continuation[:, t : t + 1]
            expected = logits(model, step, attention_mask=mask[:, : width + t + 1], position_ids=next_pos + t,
                              cache=eager)[:, -1]
            slot = torch.tensor([static.length])
            got = model.decode_step(step, next_pos + t, mask.bool(), static.keys, static.values, slot)
            static.advance(1)
            assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["llama-gqa", "alibi", "learned", "sinusoidal", "sliding-window", "moe"])
def test_packed_documents_equal_separate_forwards(variant):
    """document_ids: each packed document sees only itself, with positions from 0."""
    model = make(**VARIANTS[variant])
    lengths = [[5, 1, 6], [12]]
    ids = torch.randint(0, 97, (2, 12))
    docs = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])
    packed = logits(model, ids, document_ids=docs)
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = logits(model, ids[b : b + 1, start : start + n])
            assert (packed[b, start : start + n] - alone[0]).abs().max() < 1e-5
            start += n


def test_every_projection_is_a_plain_linear_at_hf_paths():
    model = make(num_experts=2, experts_per_token=1)
    names = dict(model.named_modules())
    for path in ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                 "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
                 "model.layers.0.mlp.experts.1.gate_proj", "model.layers.0.mlp.experts.1.down_proj",
                 "model.layers.0.mlp.gate", "lm_head"]:
        assert type(names[path]) is nn.Linear, path
    dense = dict(make().named_modules())
    assert type(dense["model.layers.0.mlp.up_proj"]) is nn.Linear
    assert isinstance(dense["model.embed_tokens"], nn.Embedding) and "model.norm" in dense


def test_module_surgery_keeps_working():
    """A wrapper swapped in for a projection is used by forward (how LoRA attaches)."""
    model = make()
    layer = model.model.layers[0].self_attn

    class Zero(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0

    before = logits(model, torch.arange(6)[None])
    layer.o_proj = Zero(layer.o_proj)
    assert not torch.allclose(before, logits(model, torch.arange(6)[None]))


def test_config_validation_and_registry_errors():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(UsageError, match="did you mean 'rope'"):
        Transformer(ModelConfig(**{**TINY, "position": "ropee"}))
    with pytest.raises(UsageError, match="did you mean 'swiglu'"):
        Transformer(ModelConfig(**{**TINY, "mlp": "swigl"}))
    assert ModelConfig.from_dict(ModelConfig(**TINY).to_dict()) == ModelConfig(**TINY)
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        ModelConfig.from_dict({"hiden_size": 3})


EXPECTED_PRESETS = {"nano": "llama", "micro": "llama", "small": "gpt2", "llama": "llama", "qwen3": "qwen3",
                    "mistral": "mistral", "mixtral": "mixtral", "bert": "bert"}


@pytest.mark.parametrize("name", EXPECTED_PRESETS)
def test_presets(name):
    from llmctl.core.hf import arch_for

    cfg = load_preset(name)
    with torch.device("meta"):
        params = Transformer(cfg).num_parameters()
    assert arch_for(cfg).model_type == EXPECTED_PRESETS[name]
    # GPT-2 small and BertForMaskedLM (bert-base-uncased) have published counts; the rest ±1%
    published = {"small": 124_439_808, "bert": 109_514_298}
    approx = {"nano": 0.131e6, "micro": 10e6, "llama": 125e6, "qwen3": 596e6, "mistral": 285e6, "mixtral": 189e6}
    if name in published:
        assert params == published[name]
    else:
        assert params == pytest.approx(approx[name], rel=0.01)  # one layer more or less is 2.5%+


def test_unknown_preset_suggests():
    with pytest.raises(UsageError, match="did you mean 'micro'"):
        load_preset("mirco")


def test_nano_preset_runs_and_caches():
    model = Transformer(load_preset("nano")).eval()
    ids = torch.randint(0, 512, (1, 5))
    cache = model.make_cache(1, 8)
    assert isinstance(cache, KVCache)
    assert logits(model, ids, cache=cache).shape == (1, 5, 512)


@pytest.mark.parametrize("variant", ["llama-gqa", "alibi", "sliding-window", "post-norm"])
def test_eager_kernel_matches_sdpa(variant):
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    fast, eager = make(**VARIANTS[variant]), make(**VARIANTS[variant], attention_kernel="eager")
    for kw in ({}, {"attention_mask": mask}):
        assert (logits(fast, ids, **kw) - logits(eager, ids, **kw)).abs().max() < 1e-5


@pytest.mark.parametrize("heads,kv_heads,tq,k", [(4, 4, 200, 200), (4, 2, 130, 300), (2, 1, 511, 511)])
def test_blocked_causal_attention_matches_sdpa(heads, kv_heads, tq, k):
    """The CPU path for causal attention under 768 keys (64-query SDPA calls over the keys each
    block sees) equals one masked SDPA call, bottom-right aligned, values and gradients."""
    from llmctl.core.model import attention

    torch.manual_seed(0)
    q = torch.randn(2, heads, tq, 16, requires_grad=True)
    kv = [torch.randn(2, kv_heads, k, 16, requires_grad=True) for _ in range(2)]
    calls = []
    real = attention._causal_blocks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "_causal_blocks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        out = attention.sdpa_attention(q, *kv, None, True, 0.0)
    assert calls, "the blocked path was not taken"
    visible = torch.ones(tq, k, dtype=torch.bool).tril(k - tq)
    ref = torch.nn.functional.scaled_dot_product_attention(q, *kv, attn_mask=visible, enable_gqa=heads != kv_heads)
    assert (out - ref).abs().max() < 1e-5
    eager = attention.eager_attention(q, *kv, None, True, 0.0)  # the readable kernel: same alignment
    assert (eager - ref).abs().max() < 1e-5
    grad = torch.randn_like(ref)
    mine = torch.autograd.grad(out, [q, *kv], grad)
    theirs = torch.autograd.grad(ref, [q, *kv], grad)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(mine, theirs))


def test_long_causal_forward_matches_eager_kernel():
    """A 300-token forward (blocked causal attention, trimmed last layer) against the eager kernel."""
    cfg = dict(max_seq_len=512, num_kv_heads=2)
    fast, eager = make(**cfg), make(**cfg, attention_kernel="eager")
    ids = torch.randint(0, 97, (2, 300))
    full = logits(fast, ids)
    assert (full - logits(eager, ids)).abs().max() < 1e-4
    assert (logits(fast, ids, logits_to_keep=170) - full[:, -170:]).abs().max() < 1e-4
