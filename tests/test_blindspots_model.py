"""Model pieces that only llmctl implements, or whose losses were only checked to be positive,
against a published implementation, the paper's formula or an equivalent configuration:
ALiBi (Bloom), sinusoidal positions, NoPE, causal post-norm, MoE balance and MTP losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from llmctl.core.model import ModelConfig, Transformer

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_seq_len=64)


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # norms and biases away from their initial values, so each one matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- ALiBi: Bloom's implementation -----------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20])
def test_alibi_slopes_equal_blooms(heads):
    """Press et al.'s geometric slopes, with the interleaved extra slopes for a head count that
    is not a power of two, as Bloom builds them (its bias at key position 1 is the slope)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from llmctl.core.model.position import ALiBi

    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]
    ours = ALiBi(ModelConfig(**{**TINY, "num_heads": heads, "hidden_size": 4 * heads})).slopes("cpu")
    torch.testing.assert_close(ours, bloom)


def _bloom_from_ours(model: Transformer):
    """transformers' Bloom with our model's weights (Bloom fuses q/k/v per head: [H, 3, D])."""
    cfg = model.cfg
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        layer_norm_epsilon=cfg.norm_eps, hidden_dropout=0.0, attention_dropout=0.0)).eval()
    ours = model.state_dict()
    state = {"transformer.word_embeddings.weight": ours["model.embed_tokens.weight"],
             "transformer.word_embeddings_layernorm.weight": ours["model.embed_norm.weight"],
             "transformer.word_embeddings_layernorm.bias": ours["model.embed_norm.bias"],
             "transformer.ln_f.weight": ours["model.norm.weight"], "transformer.ln_f.bias": ours["model.norm.bias"],
             "lm_head.weight": ours["lm_head.weight"]}
    H, D = cfg.num_heads, cfg.head_dim
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            qkv = [ours[f"{src}self_attn.{p}_proj.{kind}"].reshape(H, 1, D, -1) for p in "qkv"]
            state[f"{dst}self_attention.query_key_value.{kind}"] = torch.cat(qkv, 1).reshape(3 * H * D, -1).squeeze(-1)
            for a, b in (("self_attn.o_proj", "self_attention.dense"), ("mlp.up_proj", "mlp.dense_h_to_4h"),
                         ("mlp.down_proj", "mlp.dense_4h_to_h"), ("input_layernorm", "input_layernorm"),
                         ("post_attention_layernorm", "post_attention_layernorm")):
                state[f"{dst}{b}.{kind}"] = ours[f"{src}{a}.{kind}"]
    missing, unexpected = bloom.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    bloom.tie_weights()
    return bloom


def test_alibi_model_equals_bloom():
    """A Bloom-shaped llmctl model (ALiBi, embedding LayerNorm, tanh-GELU, biases) gives
    transformers' Bloom logits, on a plain and on a left-padded batch."""
    model = make(position="alibi", norm="layernorm", embedding_norm=True, mlp="gelu", activation="gelu_tanh",
                 qkv_bias=True, o_bias=True, mlp_bias=True, intermediate_size=128)
    bloom = _bloom_from_ours(model)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    with torch.no_grad():
        for m in (None, mask):
            theirs = bloom(x, attention_mask=m).logits
            ours = model(x, attention_mask=m).logits
            real = slice(None) if m is None else mask.bool()
            torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)


# -- sinusoidal, NoPE, post-norm -------------------------------------------------------------

@pytest.mark.parametrize("dim", [32, 6, 7])
def test_sinusoidal_table_is_the_papers_formula(dim):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    from llmctl.core.model.position import SinusoidalPositions

    positions = torch.tensor([[0, 1, 2, 7, 50, 255]])
    table = SinusoidalPositions(ModelConfig(**{**TINY, "hidden_size": dim, "num_heads": 1, "position": "sinusoidal"})).embed(positions)[0]
    for row, pos in zip(table.tolist(), positions[0].tolist()):
        expected = [(math.sin if j % 2 == 0 else math.cos)(pos / 10000 ** ((j - j % 2) / dim)) for j in range(dim)]
        assert row == pytest.approx(expected, abs=2e-5)


@pytest.mark.parametrize("position", ["sinusoidal", "learned"])
def test_absolute_positions_are_added_at_each_tokens_position(position):
    """A model with absolute positions equals the NoPE model whose token embeddings carry
    PE(position) by hand: the table is added once, at the right index, padded rows too."""
    model = make(position=position)
    nope = make(position="nope")
    nope.load_state_dict({k: v for k, v in model.state_dict().items() if "embed_positions" not in k})
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    pe = model.model.embed_positions.embed(positions)
    hook = nope.model.embed_tokens.register_forward_hook(lambda m, i, o: o + pe)
    try:
        with torch.no_grad():
            torch.testing.assert_close(nope(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits)
    finally:
        hook.remove()


def test_nope_is_permutation_invariant_where_the_paper_says():
    """No positional information: an encoder is permutation-equivariant and a one-layer causal
    model's last output ignores the order of the tokens before it; RoPE breaks both."""
    x = ids(1, 10)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    prefix_perm = torch.cat([torch.randperm(9, generator=torch.Generator().manual_seed(1)), torch.tensor([9])])
    for position, invariant in (("nope", True), ("rope", False)):
        encoder = make(position=position, is_causal=False)
        decoder = make(position=position, num_layers=1)
        with torch.no_grad():
            enc, enc_perm = encoder(x).logits, encoder(x[:, perm]).logits
            dec, dec_perm = decoder(x).logits[:, -1], decoder(x[:, prefix_perm]).logits[:, -1]
        assert torch.allclose(enc[:, perm], enc_perm, atol=1e-5) is invariant
        assert torch.allclose(dec, dec_perm, atol=1e-5) is invariant


def test_causal_post_norm_block_is_the_original_transformers():
    """Post-norm (Vaswani et al.): h = LN(x + Attn(x)); out = LN(h + FFN(h)); no final norm."""
    model = make(norm_placement="post", norm="layernorm", num_layers=1)
    layer = model.model.layers[0]
    assert not hasattr(model.model, "norm")
    x = ids(1, 8)
    with torch.no_grad():
        emb = model.model.embed_tokens(x)
        attn = F.scaled_dot_product_attention(*_qkv_rope(model, layer, emb), is_causal=True)
        attn = layer.self_attn.o_proj(attn.transpose(1, 2).reshape(1, 8, -1))
        h = layer.input_layernorm(emb + attn)
        out = layer.post_attention_layernorm(h + layer.mlp(h))
        torch.testing.assert_close(model(x).logits, model.lm_head(out), rtol=1e-5, atol=1e-5)


def _qkv_rope(model, layer, h):
    from llmctl.core.model.position import apply_rotary

    B, T, _ = h.shape
    att = layer.self_attn
    q, k, v = (p(h).view(B, T, -1, att.head_dim).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
    cos, sin = model.model.embed_positions.rotary(torch.arange(T)[None], h.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


# -- auxiliary losses ---------------------------------------------------------------------------

def _router_logits(model: Transformer, x: torch.Tensor) -> list[torch.Tensor]:
    logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: logits.append(o.detach()))
             for layer in model.model.layers]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits


@pytest.mark.parametrize("experts, k, layers", [(4, 2, 1), (8, 2, 2), (3, 1, 3)])
def test_moe_balance_loss_equals_transformers(experts, k, layers):
    """out.aux_loss = coef × the Switch/Mixtral balance loss: transformers'
    `load_balancing_loss_func` on each layer's router logits, averaged over the layers."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = make(num_experts=experts, experts_per_token=k, num_layers=layers, router_aux_loss_coef=0.02)
    x = ids(3, 10)
    with torch.no_grad():
        aux = model(x).aux_loss
        per_layer = [load_balancing_loss_func((g,), experts, k) for g in _router_logits(model, x)]
    torch.testing.assert_close(aux, 0.02 * torch.stack(per_layer).mean())


@pytest.mark.parametrize("heads", [1, 2])
def test_mtp_loss_equals_deeper_models_predicting_further_ahead(heads):
    """Head k (chained after the last layer) scores labels k positions further on: it is the
    model with k more layers (the heads' weights) whose logits at t predict labels[t + k]."""
    model = make(num_mtp_heads=heads, mtp_loss_weight=0.4)
    x = ids(2, 12)
    inputs, labels = x[:, :-1], x[:, 1:].clone()
    labels[0, 3] = -100
    with torch.no_grad():
        out = model(inputs, labels=labels)
        losses = []
        for k in range(1, heads + 1):
            deeper = make(num_layers=TINY["num_layers"] + k)
            state = model.state_dict()
            for j in range(k):
                for name, value in model.mtp_heads[j].state_dict().items():
                    state[f"model.layers.{TINY['num_layers'] + j}.{name}"] = value
            deeper.load_state_dict({n: v for n, v in state.items() if not n.startswith("mtp_heads")})
            logits = deeper(inputs).logits[:, :-k]
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels[:, k:].flatten(), ignore_index=-100))
    torch.testing.assert_close(out.aux_loss, 0.4 * torch.stack(losses).mean())
    torch.testing.assert_close(out.loss, F.cross_entropy(model(inputs).logits.flatten(0, 1), labels.flatten()))


def test_moe_runs_in_bfloat16_close_to_float32():
    """Routing weights are cast to the activations' dtype: a bfloat16 MoE model runs and stays
    within bfloat16 rounding of the float32 one."""
    model = make(num_experts=4, experts_per_token=2, shared_expert_intermediate_size=16)
    x = ids()
    with torch.no_grad():
        full = model(x).logits
        half = model.to(torch.bfloat16)(x).logits
    assert half.dtype == torch.float32 and (half - full).abs().max() < 0.05 * full.abs().max()
