"""The native whole-step decoder (`llmctl/core/native/decode.py`): the eager step's logits and
cache for every variant it takes, transformers' greedy tokens end to end, and the eager step
for every model it does not take."""

import pytest
import torch
from conftest import tiny_llama

from llmctl.core import native
from llmctl.core.generate import GenerationConfig, generate
from llmctl.core.generate.search import Runner
from llmctl.core.model.config import ModelConfig
from llmctl.core.model.io import load_model
from llmctl.core.model.transformer import Transformer
from llmctl.core.native.decode import NONE, NativeStep, native_step, why_not
from llmctl.core.quant.linear import PackQuantized
from llmctl.core.tokenizer import load_tokenizer

needs = pytest.mark.skipif(native.ops() is None or not native.has(native.QUANT | native.BF16 | native.F32),
                           reason="no C++ compiler or no AVX2 + FMA here")

BASE = dict(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
            max_seq_len=128, tie_embeddings=False)
VARIANTS = {
    "llama": {},
    "sliding window": dict(sliding_window=5),
    "gpt2": dict(num_kv_heads=4, norm="layernorm", mlp="gelu", activation="gelu_tanh", position="learned",
                 qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True),
    "gemma": dict(norm="gemma_rmsnorm", mlp="geglu", activation="gelu_tanh", scale_embeddings=True, num_kv_heads=1),
    "nope relu2 plain": dict(position="nope", mlp="relu", activation="relu2", norm="layernorm", norm_bias=False),
    "pruned": dict(layer_num_heads=[4, 2], layer_num_kv_heads=[2, 1], layer_intermediate_sizes=[256, 128]),
    "rope scaling, exact gelu": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, mlp="geglu"),
    "dynamic ntk": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_seq_len=8),
}


def build(variant: dict, dtype=torch.float32, bits=None, group=None, symmetric=True) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, **variant})).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases away from their initial 1 / 0
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(dtype)
    if bits:
        PackQuantized(bits=bits, group_size=group, symmetric=symmetric).apply(model)
    return model


def decode_both(model, steps: int = 10):
    """(eager logits, native logits, eager cache, native cache) over a prompt of 6 and `steps` tokens."""
    step = native_step(model)
    assert isinstance(step, NativeStep), why_not(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (1, 6), generator=g)
    eager_cache, native_cache = model.make_cache(1, 32), model.make_cache(1, 32)
    eager, ours = [], []
    with torch.inference_mode():
        model(ids, cache=eager_cache), model(ids, cache=native_cache)
        for _ in range(steps):
            token = torch.randint(0, BASE["vocab_size"], (1, 1), generator=g)
            slot = torch.full((1,), eager_cache.length)
            eager.append(model.decode_step(token, slot[None], None, eager_cache.keys, eager_cache.values, slot))
            ours.append(step(token, slot[None], None, native_cache.keys, native_cache.values, slot))
            eager_cache.advance(1), native_cache.advance(1)
    return torch.stack(eager).float(), torch.stack(ours).float(), eager_cache, native_cache


def assert_steps_equal(ours, eager, quantized: bool = False):
    """Native and eager logits [steps, 1, V] equal up to float32 summation order. With quantized
    products each input is rounded to int8 per block, and the two steps' attentions add in different
    orders: a one-ulp difference can carry one input across a rounding boundary (seen at one step of
    ten on an AVX2 build). One step may then differ by less than 2 % of the largest logit."""
    scale = eager.abs().max().item()
    if not quantized:
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5 * scale)
        return
    apart = [i for i, (o, e) in enumerate(zip(ours, eager)) if not torch.allclose(o, e, rtol=1e-5, atol=1e-5 * scale)]
    assert len(apart) <= 1, f"steps {apart} differ"
    assert (ours - eager).abs().max().item() < 0.02 * scale


@needs
@pytest.mark.parametrize("variant", VARIANTS)
def test_native_step_equals_the_eager_step(variant):
    eager, ours, eager_cache, native_cache = decode_both(build(VARIANTS[variant]))
    assert ours.shape == eager.shape == (10, 1, BASE["vocab_size"])
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())
    for a, b in zip(eager_cache.keys + eager_cache.values, native_cache.keys + native_cache.values):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@needs
@pytest.mark.parametrize("head_dim", [64, 144, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_many_positions_at_any_head_width(head_dim, dtype):
    """26 cached positions (scores 8 at a time and the rest one by one) at head widths whose
    weighted sums take four vectors, four twice then one, or one and a scalar tail (24 with AVX-512)."""
    model = build(dict(head_dim=head_dim), dtype)
    eager, ours, eager_cache, native_cache = decode_both(model, steps=20)
    if dtype == torch.float32:
        assert_steps_equal(ours, eager)
    else:  # the plan's residual stream stays float32 (as in the bf16 test below)
        assert (ours - eager).abs().max().item() < 0.03 * eager.abs().max().item()
    assert native_cache.length == 26


@needs
@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (8, 64, False), (4, 128, True), (4, 128, False)])
def test_quantized_native_step_equals_the_eager_step(bits, group, symmetric):
    # eager decoding takes the same mv_quant kernel per product: the same input rounding
    eager, ours, *_ = decode_both(build({}, bits=bits, group=group, symmetric=symmetric))
    assert_steps_equal(ours, eager, quantized=True)


@needs
@pytest.mark.parametrize("bits", [None, 4])
def test_bfloat16_native_step_is_the_eager_step_to_bf16_rounding(bits):
    # the plan keeps the residual stream in float32 where eager rounds it to bf16 after every op
    eager, ours, eager_cache, native_cache = decode_both(build({}, torch.bfloat16, bits=bits, group=128))
    scale = eager.abs().max().item()
    assert (ours - eager).abs().max().item() < 0.03 * scale
    assert native_cache.keys[0].dtype == torch.bfloat16
    assert (native_cache.keys[1].float() - eager_cache.keys[1].float()).abs().max() < 0.05


@needs
@pytest.mark.parametrize("variant,embeds,rotates", [
    ("llama", True, True), ("gemma", True, True), ("nope relu2 plain", True, False),
    ("gpt2", False, False), ("dynamic ntk", True, True)])  # dynamic NTK: embedded in Python, as gpt2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plan_embeds_token_ids_as_python_does(variant, embeds, rotates, dtype):
    model = build(VARIANTS[variant], dtype)
    by_id, by_state = native_step(model), native_step(model)
    assert (by_id.embeds, by_id.rope is not None) == (embeds, rotates)
    by_state.embeds = False  # the hidden state from model._embed and the rotary rows from RoPE.rotary
    caches = model.make_cache(1, 16), model.make_cache(1, 16)
    with torch.inference_mode():
        for pos in range(12):  # dynamic NTK's base grows past max_seq_len 8
            slot, token = torch.full((1,), pos), torch.tensor([[(7 * pos + 3) % BASE["vocab_size"]]])
            positions = slot[None] + 3  # rotated at its position, stored at its slot: the two must not swap
            a, b = (step(token, positions, None, c.keys, c.values, slot) for step, c in zip((by_id, by_state), caches))
            assert torch.equal(a, b)  # the same float32 hidden state and rotary rows: the same logits
            caches[0].advance(1), caches[1].advance(1)
        assert all(torch.equal(x, y) for x, y in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values))
        if embeds:
            with pytest.raises(RuntimeError, match="outside the embedding table"):
                by_id.plan.step_token(BASE["vocab_size"], 0, 0, NONE, NONE, caches[0].keys, caches[0].values)


@needs
@pytest.mark.parametrize("variant,change", [
    (dict(embedding_norm=True), None), (dict(type_vocab_size=2), None), ({}, "max_norm"), ({}, "subclass")])
def test_embeddings_with_more_than_a_lookup_are_embedded_in_python(variant, change):
    model = build(variant)
    if change == "max_norm":
        model.model.embed_tokens.max_norm = 1.0
    if change == "subclass":
        model.__class__ = type("Embeds", (Transformer,), {"_embed": lambda self, *a, **k: Transformer._embed(self, *a)})
    step = native_step(model)
    assert step is not None and not step.embeds


@needs
def test_the_last_cache_slot_and_the_window_bound():
    model = build(VARIANTS["sliding window"])
    step = native_step(model)
    cache = model.make_cache(1, 4)
    with torch.inference_mode():
        for pos in range(4):
            slot = torch.full((1,), pos)
            step(torch.tensor([[pos + 3]]), slot[None], None, cache.keys, cache.values, slot)
        slot = torch.full((1,), 4)
        with pytest.raises(RuntimeError, match="cache must be"):
            step(torch.tensor([[3]]), slot[None], None, cache.keys, cache.values, slot)


@pytest.mark.parametrize("variant,reason", [
    (dict(position="alibi"), "ALiBi"),
    (dict(num_experts=4), "mixture of experts"),
    (dict(qk_norm=True), "qk-norm"),
    (dict(norm_placement="post"), "post-norm"),
    (dict(norm_placement="sandwich"), "sandwich norms"),  # Gemma 2's
    (dict(layer_sliding_windows=[4, None]), "per-layer sliding windows"),
    (dict(attention_softcap=50.0), "attention softcapping"),
    (dict(logit_softcap=30.0), "logit softcapping"),
    (dict(attention_scale_dim=24.0), "an attention scale"),
    (dict(local_rope_theta=1e4, sliding_window=4), "a local RoPE theta"),  # Gemma 3's
    (dict(is_causal=False), "an encoder"),
    (dict(residual="parallel"), "parallel residual"),  # GPT-NeoX's
    (dict(residual="parallel_shared"), "parallel_shared residual"),  # Phi-2's
    (dict(partial_rotary_factor=0.5), "partial rotary"),
    (dict(hidden_size=48), "q_proj"),  # K % 32
])
def test_models_the_plan_does_not_take_keep_the_eager_step(variant, reason):
    model = build(variant)
    assert reason in (why_not(model) or "") or why_not(model) == "native kernels unavailable"
    assert native_step(model) is None
    runner = Runner(model, [[3, 4, 5]], 16, torch.device("cpu"))
    assert runner.step_fn is None


@needs
def test_hooks_adapters_and_float16_keep_the_eager_step():
    from llmctl.core.model.transforms import replace_module

    model = build({})
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert why_not(model) == "forward hooks"
    handle.remove()
    assert why_not(model) is None
    replace_module(model, "model.layers.1.self_attn.v_proj", torch.nn.Sequential(torch.nn.Linear(128, 64)))
    assert why_not(model) == "layer 1.v_proj: Sequential the native kernels do not take"
    assert why_not(build({}, torch.float16)) == "torch.float16 weights"
    assert why_not(build({}).train()) == "training mode (dropout)"


@needs
def test_runner_takes_the_plan_for_one_cpu_row_only():
    model = build({})
    assert isinstance(Runner(model, [[3, 4, 5]], 16, torch.device("cpu")).step_fn, NativeStep)
    assert Runner(model, [[3, 4, 5], [6, 7]], 16, torch.device("cpu")).step_fn is None


@needs
def test_greedy_generation_through_the_plan_equals_transformers(tmp_path, monkeypatch):
    import transformers

    import llmctl.core.native.decode as decode

    text = "The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the birds.\n\n"
    path = tiny_llama(tmp_path, [text] * 20, vocab=300, context=128, hidden=64, intermediate=128)
    model, tok = load_model(path)[0], load_tokenizer(path)
    steps = []
    monkeypatch.setattr(decode.NativeStep, "__call__",
                        lambda self, *a, _call=decode.NativeStep.__call__: steps.append(1) or _call(self, *a))
    ours = generate(model, tok, ["the cat sat"], GenerationConfig(max_new_tokens=20, eos_ids=[]))[0].tokens
    assert len(steps) == 19  # every token after the prefill's
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tok.encode("the cat sat")])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                          min_new_tokens=20, eos_token_id=None, pad_token_id=2)
    assert ours == ref[0, ids.shape[1]:].tolist()
