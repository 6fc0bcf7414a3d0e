"""A whole batch-1 decode step on CPU in one native call: `decode.cpp`'s DecodePlan.

At batch 1 a 100M-parameter model reads its weights in about 2 ms per token with the native
products, while Python's eager step spends 3 ms more on a hundred small torch calls per layer and
a compiled step 3 ms on its guards and graph (BENCHMARKS.md, Quantize → Speed). The plan runs
every layer — norms, products, rotary, cache write, attention, activation, residuals — and the
final norm and the head in C++, and, where the embedding is a plain lookup (scaled or not) and the
rotary angles come from RoPE's tables, the embedding and the rotary lookup too: Python passes the
token id. (Each torch op between plan calls runs on caches the weights have just swept: a final
norm that takes 25 µs alone took 210 µs there.)

    step = native_step(model)      # None where the plan does not take the model (`why_not`)
    logits = step(ids, positions, None, cache.keys, cache.values, slot)   # as Transformer.decode_step

It takes plain pre-norm causal decoders — RMSNorm (Gemma's too) or LayerNorm, RoPE or position
embeddings or none, gated or plain feed-forward, GQA, biases, a sliding window, per-layer sizes
— whose linears are float32 / bf16 `nn.Linear`s or int8/int4 `PackedLinear`s the native kernels
take, with a float32 or bf16 cache. Anything else (MoE, ALiBi, qk-norm, post-norm, sandwich norms, per-layer
windows, softcapping, a custom attention scale (Gemma 2), local RoPE (Gemma 3), parallel residuals,
partial rotary, adapters, hooks, padding, batches) keeps `Transformer.decode_step`. Results equal the eager step's to
float rounding: the residual stream stays float32 where eager rounds it to the model's dtype,
and int8/int4 products quantize their input per block, as `mv_quant` does in eager decoding.
The plan holds the weights as they are when it is built; `Runner` builds one per generation.
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.core import native
from llmctl.core.native import arena

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4}  # decode.cpp's Activation
FLOAT_KINDS = {torch.float32: (1, native.F32), torch.bfloat16: (2, native.BF16)}  # (Weights kind, capability)
NONE = torch.empty(0)  # an absent tensor in the plan's list


def why_not(model) -> str | None:
    """Why the native plan cannot run `model`'s decode step (None: it can)."""
    from llmctl.core.model.attention import Attention
    from llmctl.core.model.mlp import FeedForward
    from llmctl.core.model.transformer import Block

    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "decode_step"):
        return "not an llmctl Transformer"
    if native.ops() is None or not native.has(native.F32):
        return "native kernels unavailable"
    checks = {
        "training mode (dropout)": model.training,
        "an encoder": not cfg.is_causal,
        "post-norm" if cfg.norm_placement == "post" else f"{cfg.norm_placement} norms": cfg.norm_placement != "pre",
        "per-layer sliding windows": cfg.layer_sliding_windows is not None,
        "attention softcapping": cfg.attention_softcap is not None,
        "logit softcapping": cfg.logit_softcap is not None,
        "an attention scale other than head_dim ** -0.5": cfg.attention_scale_dim is not None,
        "a local RoPE theta": cfg.local_rope_theta is not None,
        f"{cfg.residual} residual": cfg.residual != "sequential",
        "partial rotary": cfg.position == "rope" and cfg.rotary_dim != cfg.head_dim,
        "mixture of experts": bool(cfg.num_experts),
        "qk-norm": cfg.qk_norm,
        "ALiBi": cfg.position == "alibi",
        f"attention kernel {cfg.attention_kernel!r}": cfg.attention_kernel not in ("sdpa", "eager"),
        "a prefix or prompt adapter": model.kv_prefix() is not None,
        f"{model.model.embed_tokens.weight.dtype} weights": model.model.embed_tokens.weight.dtype not in FLOAT_KINDS,
        "not on CPU": model.model.embed_tokens.weight.device.type != "cpu",
        "forward hooks": any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()),
    }
    for reason, failed in checks.items():
        if failed:
            return reason
    for i, block in enumerate(model.model.layers):
        where = f"layer {i}"
        if type(block) is not Block or type(block.self_attn) is not Attention:
            return f"{where}: a replaced block"
        if not isinstance(block.mlp, FeedForward) or _activation(block.mlp) is None:
            return f"{where}: feed-forward {type(block.mlp).__name__}"
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            if not _plain_norm(norm):
                return f"{where}: norm {type(norm).__name__}"
        for name, linear in _linears(block):
            if _product(linear) is None:
                return f"{where}.{name}: {type(linear).__name__} the native kernels do not take"
    return None


def native_step(model) -> NativeStep | None:
    """The native decode step of `model` (with the weights as they are now), or None."""
    if why_not(model) is not None:
        return None
    return NativeStep(model)


class NativeStep:
    """`step(ids [1, 1], positions [1, 1], None, keys, values, slot [1]) -> logits [1, V]`,
    `Transformer.decode_step`'s signature, through one DecodePlan call (with the final norm and the
    head where the kernels take them: `head_in_plan`; from the token id where the plan can embed
    it: `embeds`)."""

    def __init__(self, model):
        cfg, layers = model.cfg, model.model.layers
        self.dtype = model.model.embed_tokens.weight.dtype
        self.head_in_plan = _plain_norm(model.model.norm) and _product(model.lm_head) is not None
        streamed = [linear for block in layers for _, linear in _linears(block)]
        arena.pack(model, [_weight_slot(m) for m in streamed + [model.lm_head] * self.head_in_plan])
        meta, tensors = [cfg.hidden_size, ACTIVATION_CODES[_activation(layers[0].mlp)], -1, 0], [NONE] * 6
        if self.head_in_plan:  # after the plan, Python runs nothing but the embedding
            head_kind, head = _product(model.lm_head)
            meta[2:] = [_norm_kind(model.model.norm), head_kind]
            tensors = [*_norm(model.model.norm), *head]
        for block in layers:
            attn = block.self_attn
            meta += [attn.num_heads, attn.num_kv_heads, attn.head_dim, cfg.sliding_window or 0,
                     _norm_kind(block.input_layernorm)]
            tensors += [*_norm(block.input_layernorm), *_norm(block.post_attention_layernorm)]
            for _, linear in _linears(block, with_absent=True):
                kind, weights = _product(linear) if linear is not None else (0, [NONE] * 4)
                meta.append(kind)
                tensors += weights
        self.model = model
        self.plan = torch.classes.llmctl.DecodePlan(tensors, meta, float(cfg.norm_eps))
        self.embeds, self.rope = _token_input(model)
        if self.embeds:  # after packing: a tied table is the head's arena copy
            scale = torch.tensor(cfg.hidden_size**0.5, dtype=self.dtype).item() if cfg.scale_embeddings else 1.0
            self.plan.set_embedding(model.model.embed_tokens.weight.detach(), scale)

    def __call__(self, ids, positions, padding, keys, values, slot) -> torch.Tensor:
        if ids.shape != (1, 1) or padding is not None:
            raise ValueError("the native decode step takes one unpadded row")
        pos = int(slot)
        if self.embeds:
            position = int(positions)
            tables = (NONE, NONE) if self.rope is None else self.rope.tables(position + 1, ids.device, self.dtype)
            if tables is not None:  # None: dynamic NTK's angles, computed per call below
                return self._logits(self.plan.step_token(int(ids), pos, position, *tables, keys, values))
        model = self.model
        x = model._embed(ids, positions, None)
        rotary = model.model.embed_positions.rotary(positions, x.dtype, pos + 1)
        cos, sin = (t.reshape(-1) for t in rotary) if rotary is not None else (NONE, NONE)
        return self._logits(self.plan.step(x.reshape(-1), pos, cos, sin, keys, values))

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        if self.head_in_plan:
            return out.view(1, -1)
        return self.model.head(out.to(self.dtype).view(1, 1, -1))[:, -1]


def _token_input(model) -> tuple[bool, object]:
    """(whether the plan can embed a token id itself, the RoPE whose tables rotate it or None for
    no rotation): a plain embedding lookup, scaled or not, with nothing added to it."""
    from llmctl.core.model.position import PositionEncoding, RoPE
    from llmctl.core.model.transformer import Transformer

    cfg, embedding, positions = model.cfg, model.model.embed_tokens, model.model.embed_positions
    plain = (type(model)._embed is Transformer._embed and type(embedding) is nn.Embedding
             and embedding.max_norm is None and embedding.weight.is_contiguous()
             and not cfg.type_vocab_size and not cfg.embedding_norm and type(positions).embed is PositionEncoding.embed)
    rotary = type(positions).rotary
    if not plain or rotary not in (PositionEncoding.rotary, RoPE.rotary):
        return False, None
    return True, positions if rotary is RoPE.rotary else None


def _activation(mlp) -> str | None:
    from llmctl.core.model.mlp import ACTIVATIONS

    return next((name for name in ACTIVATION_CODES if ACTIVATIONS.get(name) is mlp.act), None)


def _linears(block, with_absent: bool = False):
    """(name, module) of the block's seven products in the plan's order (q, k, v, o, gate, up, down)."""
    attn, mlp = block.self_attn, block.mlp
    for name, module in [("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj),
                         ("o_proj", attn.o_proj), ("gate_proj", getattr(mlp, "gate_proj", None)),
                         ("up_proj", mlp.up_proj), ("down_proj", mlp.down_proj)]:
        if module is not None or with_absent:
            yield name, module


def _product(linear) -> tuple[int, list[torch.Tensor]] | None:
    """(decode.cpp's Weights kind, [weights, scale, zero, bias]) of a linear, or None."""
    from llmctl.core.quant.kernels import native_layout
    from llmctl.core.quant.linear import PackedLinear

    if type(linear) is nn.Linear:
        w = linear.weight.detach()
        kind = FLOAT_KINDS.get(w.dtype)
        if kind is None or linear.in_features % 32 or not native.has(kind[1]) or not w.is_contiguous():
            return None
        return kind[0], [w, NONE, NONE, NONE if linear.bias is None else linear.bias.detach().float().contiguous()]
    if type(linear) is PackedLinear:
        layout = native_layout(linear, linear.weight_scale.dtype)
        if layout is None:
            return None
        return layout.bits, [layout.weight, layout.scale, layout.zero, NONE if layout.bias is None else layout.bias]
    return None


def _plain_norm(norm) -> bool:
    """An RMSNorm (Gemma's too) or LayerNorm with its own forward: what decode.cpp's norms compute."""
    from llmctl.core.model.norm import LayerNorm, RMSNorm

    return isinstance(norm, (RMSNorm, LayerNorm)) and type(norm).forward in (RMSNorm.forward, LayerNorm.forward)


def _norm_kind(norm) -> int:
    """decode.cpp's Norm: 0 RMS, 1 LayerNorm."""
    from llmctl.core.model.norm import LayerNorm

    return int(isinstance(norm, LayerNorm))


def _weight_slot(linear) -> tuple[object, str]:
    """Where the weights the plan streams for `linear` are held: (holder, attribute)."""
    if type(linear) is nn.Linear:
        return linear.weight, "data"
    from llmctl.core.quant.kernels import native_layout

    return native_layout(linear, linear.weight_scale.dtype), "weight"


def _norm(norm) -> list[torch.Tensor]:
    """[effective scale, bias] float32 of an RMSNorm (Gemma's offset added) or LayerNorm."""
    weight = norm.weight.detach().float() + getattr(norm, "offset", 0.0)
    bias = getattr(norm, "bias", None)
    return [weight.contiguous(), NONE if bias is None else bias.detach().float().contiguous()]
