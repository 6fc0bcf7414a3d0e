"""Edges of the model core the parity tests did not reach (found by mutation testing,
docs/testing.md). `transformer.py`: given position ids and hidden states against transformers,
the last layer trimmed to the kept positions, blocks run one by one, the KV cache `make_cache`
builds, `decode_step` in bfloat16 and without padding, GPT-2's initialisation, skip_head,
input embeddings, dropout sites, gradient checkpointing. `reward.py`: scores against
transformers' sequence classifier, the fresh score head. `transforms.py`: replaced linears in
"all-linear", the device of replacements, untying, records and every refusal's message."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import transformers
transformers.logging.set_verbosity_error()

from llmctl.core.adapters.prompt import Prefix  # noqa: E402
from llmctl.core.model import ModelConfig, Transformer  # noqa: E402
from llmctl.core.model import transforms as tf  # noqa: E402
from llmctl.core.model.io import load_model  # noqa: E402
from llmctl.core.model.reward import add_score_head, last_tokens, sequence_scores  # noqa: E402
from llmctl.errors import CheckpointError  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
            max_seq_len=64)


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers' tiny Llama, llmctl's load of it), weights moved off their init."""
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("llama")
    theirs.save_pretrained(path)
    return theirs, load_model(path)[0]


def test_given_position_ids_equal_transformers(llama):
    """Position ids passed to forward are used (not recounted from 0): a shifted and a gapped row."""
    theirs, ours = llama
    ids = torch.randint(0, 96, (2, 6))
    positions = torch.tensor([[7, 8, 9, 10, 11, 12], [0, 1, 2, 20, 21, 22]])
    with torch.no_grad():
        expected = theirs(ids, position_ids=positions).logits
        got = ours(ids, position_ids=positions).logits
        assert (got - expected).abs().max() < 1e-4
        assert (ours(ids).logits - expected).abs().max() > 1e-2  # the positions matter here


def test_hidden_states_equal_transformers(llama):
    """The embeddings, then each layer's output; transformers' last one is after the final norm."""
    theirs, ours = llama
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        expected = theirs(ids, output_hidden_states=True).hidden_states
        out = ours(ids, output_hidden_states=True)
        assert ours(ids).hidden_states == []  # only when asked
    assert len(out.hidden_states) == len(expected) == 4
    for got, want in zip(out.hidden_states[:-1], expected[:-1]):
        assert (got - want).abs().max() < 1e-5
    assert (ours.model.norm(out.hidden_states[-1]) - expected[-1]).abs().max() < 1e-5


def test_only_the_last_layer_is_trimmed_and_only_when_no_position_is_needed():
    """logits_to_keep: the last block's MLP sees the kept positions only, earlier blocks all;
    with hidden states or labels asked for, every position runs every layer."""
    model = make(num_layers=3)
    seen = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        assert seen == [10, 10, 10]
        seen.clear()
        kept = model(ids, logits_to_keep=2).logits
        assert seen == [10, 10, 2] and (kept - full[:, -2:]).abs().max() < 1e-5
        seen.clear()
        out = model(ids, logits_to_keep=2, output_hidden_states=True)
        assert seen == [10, 10, 10]
        assert [h.shape[1] for h in out.hidden_states] == [10] * 4
        assert (out.logits - full[:, -2:]).abs().max() < 1e-5
        seen.clear()
        labels = torch.randint(0, 97, (2, 10))
        loss = model(ids, labels=labels, logits_to_keep=0).loss
        assert seen == [10, 10, 10]
        assert abs(loss.item() - torch.nn.functional.cross_entropy(full.flatten(0, 1), labels.flatten()).item()) < 1e-5


def test_blocks_run_one_by_one_equal_forward():
    """embed → each block as `block(x, ctx)` → head (layerwise.py's protocol) gives forward's logits."""
    model = make()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        x, ctx = model.embed(ids)
        for block in model.model.layers:
            x, _ = block(x, ctx)
        assert x.shape == (2, 9, 32)
        assert (model.head(x) - model(ids).logits).abs().max() < 1e-5


def test_make_cache_follows_the_model_and_its_layers():
    """dtype and device from the embeddings unless given, one [B, kv_heads_i, S, D] pair per layer
    with each layer's own kv heads, and the sliding window; a cached run equals the full one."""
    model = make(num_layers=3, layer_num_heads=[4, 2, 4], layer_num_kv_heads=[2, 1, 4], sliding_window=4)
    cache = model.make_cache(2, 12)
    assert [k.shape for k in cache.keys] == [(2, h, 12, 8) for h in (2, 1, 4)]
    assert [v.shape for v in cache.values] == [(2, h, 12, 8) for h in (2, 1, 4)]
    assert cache.sliding_window == 4 and cache.keys[0].dtype == torch.float32
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        model(ids[:, :7], cache=cache)
        assert (model(ids[:, 7:], cache=cache).logits - full[:, 7:]).abs().max() < 1e-5
    assert model.make_cache(1, 4, dtype=torch.float16).keys[0].dtype == torch.float16
    assert model.make_cache(1, 4, device="meta").keys[0].is_meta
    half = make().to(torch.bfloat16)
    assert {t.dtype for t in half.make_cache(1, 4).keys + half.make_cache(1, 4).values} == {torch.bfloat16}
    with torch.device("meta"):
        on_meta = make()
    assert on_meta.make_cache(1, 4).values[1].is_meta


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_decode_step_in_bfloat16_without_padding_equals_cached_forward(position):
    """decode_step with `padding=None` (the batch's rows all full) in a bfloat16 model: the
    rotary tables and ALiBi's bias in the model's dtype, positions for every row: bit for bit.
    (Past 256 positions ALiBi's distance × slope is no longer exact in bfloat16.)"""
    model = make(position=position, max_seq_len=512).to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 303))
    eager, static = model.make_cache(2, 304), model.make_cache(2, 304)
    with torch.no_grad():
        for cache in (eager, static):
            model(ids[:, :300], cache=cache)
        for t in range(300, 303):
            step = ids[:, t : t + 1]
            expected = model(step, cache=eager).logits[:, -1]
            got = model.decode_step(step, torch.full((2, 1), t), None, static.keys, static.values,
                                    torch.tensor([static.length]))
            static.advance(1)
            assert got.shape == (2, 97) and got.dtype == torch.float32 and torch.equal(got, expected)


def test_aux_loss_is_float32_in_a_bfloat16_model():
    """The auxiliary loss accumulates in float32 (bfloat16 activations or not)."""
    for overrides in ({}, dict(num_experts=4, experts_per_token=2, moe_intermediate_size=16)):
        model = make(**overrides).to(torch.bfloat16)
        with torch.no_grad():
            out = model(torch.randint(0, 97, (2, 5)))
        assert out.aux_loss.dtype == torch.float32


def test_initialisation_is_gpt2s():
    """transformers' GPT2PreTrainedModel._init_weights: linears and embeddings (learned positions
    too) N(0, initializer_range²), biases 0, norms 1, and the residual projections (o_proj,
    down_proj) N(0, (initializer_range / sqrt(2 · num_layers))²)."""
    std, layers = 0.05, 3
    model = make(num_layers=layers, hidden_size=128, num_heads=4, num_kv_heads=4, intermediate_size=256,
                 initializer_range=std, position="learned", norm="layernorm", qkv_bias=True, o_bias=True,
                 mlp_bias=True, tie_embeddings=False, lm_head_bias=True)
    shrunk = std / math.sqrt(2 * layers)
    assert model.lm_head.bias is not None
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            want = shrunk if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            assert abs(p.std().item() / want - 1) < 0.1 and abs(p.mean().item()) < want / 10, name


def test_tying_refuses_a_replaced_head_or_embedding():
    """tie_weights shares one tensor when the config ties, and refuses a replaced module."""
    tied, untied = make(tie_embeddings=True), make(tie_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    for path in ("lm_head", "model.embed_tokens"):
        model = make(tie_embeddings=True)
        old = model.get_submodule(path)
        model.set_submodule(path, type("Replaced", (type(old),), {})(*old.weight.shape[::-1 if path == "lm_head" else 1]))
        with pytest.raises(ValueError, match="^cannot tie a replaced output head or embedding; replace_module unties them$"):
            model.tie_weights()


def test_skip_head_returns_what_head_turns_into_the_logits():
    """skip_head: no logits but the kept positions' final hidden states; the aux loss and the
    hidden states as forward's."""
    model = make(num_experts=4, experts_per_token=2, moe_intermediate_size=16)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        for keep, hidden in ((0, False), (3, False), (3, True)):
            out = model(ids, skip_head=True, logits_to_keep=keep, output_hidden_states=hidden)
            assert out.logits is None and out.features.shape == (2, keep or 8, 32)
            assert (model.head(out.features) - full.logits[:, -keep if keep else 0 :]).abs().max() < 1e-5
            assert out.aux_loss > 0  # (trimmed, the last layer's balance loss counts the kept positions only)
            assert (out.aux_loss - full.aux_loss).abs() < 1e-6 or keep and not hidden
            assert len(out.hidden_states) == (3 if hidden else 0)


def test_embed_takes_input_embeddings_in_place_of_the_tokens():
    """inputs_embeds stands in for embed_tokens(input_ids), with or without the ids."""
    model = make()
    ids = torch.randint(0, 97, (2, 7))
    embeds = torch.randn(2, 7, 32)
    with torch.no_grad():
        for given in (None, ids):
            x, _ = model.embed(given, inputs_embeds=embeds)
            assert torch.equal(x, embeds)
        x, ctx = model.embed(None, inputs_embeds=model.model.embed_tokens(ids))
        for block in model.model.layers:
            x, _ = block(x, ctx)
        assert (model.head(x) - model(ids).logits).abs().max() < 1e-5


def test_embed_refuses_a_mask_of_the_wrong_length_and_documents_with_a_mask_or_cache():
    model = make()
    cache = model.make_cache(2, 12)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 3)), cache=cache)
        with pytest.raises(ValueError, match=r"^attention_mask must be \[B, 7\] \(cached \+ new\), got \[2, 4\]$"):
            model(torch.randint(0, 97, (2, 4)), attention_mask=torch.ones(2, 4), cache=cache)
        docs = torch.zeros(2, 4, dtype=torch.long)
        for kwargs in (dict(attention_mask=torch.ones(2, 4)), dict(cache=model.make_cache(2, 8))):
            with pytest.raises(ValueError, match="^document_ids cannot be combined with a KV cache or an attention mask$"):
                model(torch.randint(0, 97, (2, 4)), document_ids=docs, **kwargs)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(transformers' tiny LlamaForSequenceClassification with 3 labels and pad 2, llmctl's load of it)."""
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                      num_labels=3, pad_token_id=2)
    torch.manual_seed(0)
    theirs = transformers.LlamaForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("classifier")
    theirs.save_pretrained(path)
    return theirs, load_model(path)[0]


def test_sequence_scores_equal_transformers_classifier(classifier):
    """The score at each row's last non-pad token: right and left padding, a pad inside the row,
    no padding, only padding; without a pad token, the last position (transformers: batch 1)."""
    theirs, ours = classifier
    ids = torch.tensor([[5, 6, 7, 2, 2, 2], [2, 2, 9, 10, 11, 12], [5, 2, 7, 8, 2, 2], [4, 5, 6, 7, 8, 9],
                        [2, 2, 2, 2, 2, 2]])
    assert last_tokens(ids, 2).tolist() == [2, 5, 3, 5, 0]
    with torch.no_grad():
        expected = theirs(ids).logits
        got = sequence_scores(ours, ids, 2)
        assert got.shape == (5, 3) and (got - expected).abs().max() < 1e-5
        theirs.config.pad_token_id = None
        try:
            alone = torch.cat([theirs(row[None]).logits for row in ids])
        finally:
            theirs.config.pad_token_id = 2
        assert (sequence_scores(ours, ids, None) - alone).abs().max() < 1e-5
    assert last_tokens(ids, None).tolist() == [5] * 5


def test_score_head_is_a_fresh_normal_head_in_the_models_dtype_and_device():
    """transformers' `score`: Linear(hidden, num_labels, bias=False) drawn N(0, initializer_range²)."""
    model = make(hidden_size=128, num_heads=4, num_kv_heads=4, tie_embeddings=False).to(torch.bfloat16)
    cfg = dataclasses.replace(model.cfg, num_labels=64, initializer_range=0.05)
    add_score_head(model, cfg)
    head = model.lm_head
    assert model.cfg is cfg and head.bias is None and head.weight.shape == (64, 128)
    assert head.weight.dtype == torch.bfloat16 and head.weight is not model.model.embed_tokens.weight
    assert abs(head.weight.float().std().item() / 0.05 - 1) < 0.05
    with torch.device("meta"):
        on_meta = make(tie_embeddings=False)
    add_score_head(on_meta, dataclasses.replace(on_meta.cfg, num_labels=2))
    assert on_meta.lm_head.weight.is_meta


def test_a_prefix_adapters_keys_are_made_once_per_cache():
    """With a KV cache, the prefix encoder runs on the first step only; later steps reuse cache.prefix."""
    model = Prefix(num_virtual_tokens=3).apply(make())
    calls = []
    model.prompt_encoder.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 97, (2, 8))
    cache = model.make_cache(2, 8)
    with torch.no_grad():
        full = model(ids).logits
        assert len(calls) == 1
        model(ids[:, :5], cache=cache)
        prefix = cache.prefix
        steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 8)]
    assert len(calls) == 2 and cache.prefix is prefix and len(prefix) == 2
    assert (torch.cat(steps, 1) - full[:, 5:]).abs().max() < 1e-5


def test_rotary_tables_cover_long_inputs_and_long_cached_steps():
    """Past the 1024 positions the rotary tables start with: one 1300-token forward, and a
    700-token step after 600 cached ones (the tables then hold 1200), equal the full forward."""
    model = make(max_seq_len=2048)
    ids = torch.randint(0, 97, (1, 1300))
    with torch.no_grad():
        full = model(ids).logits
        fresh = make(max_seq_len=2048)
        cache = fresh.make_cache(1, 1300)
        fresh(ids[:, :600], cache=cache)
        assert (fresh(ids[:, 600:], cache=cache).logits - full[:, 600:]).abs().max() < 1e-4


def test_each_dropout_acts_where_its_config_says():
    """embedding_dropout on the embeddings (zeros, the rest scaled by 1/(1-p)); residual_dropout
    on each sublayer's output before the residual add; none of it in eval."""
    ids = torch.randint(0, 97, (2, 8))
    model = make(embedding_dropout=0.5).train()
    x, _ = model.embed(ids)
    clean = model.model.embed_tokens(ids)
    dropped = x == 0
    assert 0.3 < dropped.float().mean() < 0.7
    assert torch.allclose(x[~dropped], 2 * clean[~dropped])
    model = make(residual_dropout=0.5).train()
    block = model.model.layers[0]
    h = torch.randn(2, 8, 32)
    _, ctx = model.embed(ids)
    torch.manual_seed(1)
    out, _ = block(h, ctx)
    block.eval()
    assert not torch.allclose(out, block(h, ctx)[0])
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_gradient_checkpointing_recomputes_each_layer_in_training_only():
    """Checkpointed blocks run their forward again during backward (activations not kept);
    the last one still runs only the kept positions."""
    ids = torch.randint(0, 97, (2, 8))
    for flag, training, runs in ((True, True, 2), (True, False, 1), (False, True, 1)):
        model = make(gradient_checkpointing=flag).train(training)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        model(ids, labels=ids).loss.backward()
        assert len(calls) == runs, (flag, training)
    model, seen = make(gradient_checkpointing=True).train(), []
    model.model.layers[-1].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model(ids, logits_to_keep=2)
    assert seen == [2]


def test_gradient_checkpointing_trains_blocks_behind_frozen_embeddings():
    """Frozen embeddings (an adapter's base): the blocks' inputs need no gradient, and their
    weights still get the gradients computed without checkpointing (a reentrant checkpoint gives none)."""
    ids = torch.randint(0, 97, (2, 8))
    grads = []
    for flag in (False, True):
        model = make(gradient_checkpointing=flag, tie_embeddings=False).train()
        model.model.embed_tokens.weight.requires_grad_(False)
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[1] is not None and torch.allclose(*grads, atol=1e-6)


def test_an_all_ones_attention_mask_keeps_the_causal_fast_path():
    """No padding in the mask: no explicit mask, the kernel's causal pattern (SDPA's fast path)."""
    model = make()
    ids = torch.randint(0, 97, (2, 6))
    _, ctx = model.embed(ids, attention_mask=torch.ones(2, 6, dtype=torch.long))
    assert ctx.mask is None and ctx.is_causal
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 0] = 0
    _, ctx = model.embed(ids, attention_mask=mask)
    assert ctx.mask is not None and not ctx.is_causal


def test_bfloat16_embeddings_and_logits_dtypes():
    """In a bfloat16 model: sinusoidal positions added in bfloat16, Gemma's sqrt(hidden) rounded
    to bfloat16 before the product (as transformers' normalizer), float32 logits."""
    ids = torch.randint(0, 97, (2, 6))
    sinusoidal = make(position="sinusoidal").to(torch.bfloat16)
    assert sinusoidal.embed(ids)[0].dtype == torch.bfloat16
    gemma = make(norm="gemma_rmsnorm", scale_embeddings=True).to(torch.bfloat16)
    with torch.no_grad():
        expected = gemma.model.embed_tokens(ids) * torch.tensor(32**0.5, dtype=torch.bfloat16)
        assert torch.equal(gemma.embed(ids)[0], expected)
        assert not torch.equal(expected, gemma.model.embed_tokens(ids) * torch.tensor(32**0.5))
        assert gemma(ids).logits.dtype == torch.float32


# -- module transforms (core/model/transforms.py) ----------------------------------------------------

class _Quantized(nn.Module):
    """A replaced linear: no nn.Linear, but in_features and out_features (and buffers only)."""

    def __init__(self, n: int, m: int):
        super().__init__()
        self.in_features, self.out_features = n, m
        self.register_buffer("qweight", torch.zeros(m, n, dtype=torch.int8))


class _InOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_features = 4


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.quantized, self.in_only, self.empty = nn.Linear(4, 4), _Quantized(4, 4), _InOnly(), nn.Identity()
        self.lm_head = nn.Linear(4, 8)


@tf.TRANSFORMS.register("edges_to_linear")
@dataclass(kw_only=True)
class _ToLinear(tf.Transform):
    """Each selected module becomes nn.Linear(4, 4), made without a device; records the paths it is handed."""

    bits: int = 8
    seen: list | None = None

    def replace(self, path, module):
        self.seen.append(path)
        return nn.Linear(4, 4)


@tf.TRANSFORMS.register("edges_quantized")
class _QuantFormat(_ToLinear):
    quant_method = "edges-format"


def test_all_linear_picks_replaced_linears_by_their_features_not_the_head():
    assert tf.select_modules(_Toy(), "all-linear") == ["dense", "quantized"]


def test_transform_selection_and_replacement_on_the_replaced_modules_device():
    """select() passes exclude_modules and layers_to_transform; replace() gets each path; new
    tensors land on the device of the module they replace (parameters or buffers), the default
    device for a module without tensors; a model without `transforms` gets the list."""
    model = make(num_layers=3)
    t = _ToLinear(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.2.self_attn.v_proj"],
                  layers_to_transform=[0, 2], seen=[])
    assert t.select(model) == tf.select_modules(model, ["q_proj", "v_proj"], ["model.layers.2.self_attn.v_proj"],
                                                [0, 2])
    assert t.select(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                               "model.layers.2.self_attn.q_proj"]
    with torch.device("meta"):
        toy = _Toy()
    t = _ToLinear(target_modules=["dense", "quantized", "empty"], seen=[])
    assert t.apply(toy) is toy and toy.transforms == [t] and t.seen == ["dense", "quantized", "empty"]
    assert toy.dense.weight.is_meta and toy.quantized.weight.is_meta and not toy.empty.weight.is_meta


def test_replacing_only_the_head_or_embeddings_unties_them():
    for path, untied in (("lm_head", True), ("model.embed_tokens", True), ("model.layers.0.mlp.up_proj", False)):
        model = make(tie_embeddings=True)
        tf.replace_module(model, path, nn.Linear(1, 1))
        assert model.cfg.tie_embeddings is not untied, path
    toy = _Toy()  # no cfg at all
    tf.replace_module(toy, "lm_head", nn.Linear(4, 2))
    assert toy.lm_head.out_features == 2


def test_transform_records_and_their_refusals():
    """record(): a leading Hugging Face format to config.json, every other spec to llmctl.json;
    each refusal's whole message."""
    first, second, third = _QuantFormat(seen=[]), _ToLinear(bits=4, seen=[]), _ToLinear(bits=2, seen=[])
    config, specs = tf.record([first, second, third])
    assert config["quant_method"] == "edges-format" and [s["bits"] for s in specs] == [4, 2]
    assert tf.record([second, first])[0] is None
    with pytest.raises(CheckpointError, match=r"^llmctl\.json: transform record \{'bits': 4\} has no 'type'$"):
        tf.from_spec({"bits": 4})
    with pytest.raises(CheckpointError, match=r"has no 'type'$"):
        tf.from_spec(["type"])
    known = ", ".join(tf.TRANSFORMS.names())
    with pytest.raises(CheckpointError) as error:
        tf.from_spec({"type": "edges_missing"})
    assert str(error.value) == f"llmctl.json: transform 'edges_missing' is not installed; known: {known}"
    with pytest.raises(CheckpointError, match=r"^llmctl\.json: transform edges_to_linear has no parameter 'alpha'$"):
        tf.from_spec({"type": "edges_to_linear", "zeta": 1, "alpha": 2})
    with pytest.raises(CheckpointError,
                       match=r"^quantization_config: transform edges_quantized has no parameter 'alpha'$"):
        tf.from_quantization_config({"quant_method": "edges-format", "alpha": 1})
    formats = sorted(cls.quant_method for _, cls in tf.TRANSFORMS.items() if cls.quant_method)
    with pytest.raises(CheckpointError) as error:
        tf.from_quantization_config({"quant_method": "gptq"})
    assert str(error.value) == (f"config.json: quantization_config quant_method 'gptq' is not supported; "
                                f"supported: {', '.join(formats)}")
