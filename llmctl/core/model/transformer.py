"""The transformer every llmctl command shares, readable top to bottom.

    model = Transformer(cfg)
    out = model(input_ids, attention_mask=None, position_ids=None, cache=None, labels=None)
    out.logits [B, T, vocab] float32; out.loss; out.aux_loss

Module paths match Hugging Face's Llama layout (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, `model.layers.N.mlp.down_proj`, `model.norm`, `lm_head`),
so LoRA, quantized linears and pruning masks attach by module surgery and PEFT adapter keys
map one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmctl.core.model.attention import Attention, AttentionContext, build_mask, mask_at
from llmctl.core.model.cache import KVCache, StaticSlot
from llmctl.core.model.config import ModelConfig
from llmctl.core.model.mlp import ACTIVATIONS, make_mlp
from llmctl.core.model.moe import MoE
from llmctl.core.model.norm import PLACEMENTS, RESIDUALS, make_norm
from llmctl.core.model.position import make_position

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, vocab] float32 (None with skip_head)
    loss: torch.Tensor | None = None  # mean cross-entropy over labels != -100
    aux_loss: torch.Tensor | float = 0.0  # weighted MoE balance + MTP losses: train on loss + aux_loss
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # with output_hidden_states
    features: torch.Tensor | None = None  # with skip_head: what `head` turns into the logits


class Block(nn.Module):
    """One transformer layer: attention and feed-forward joined by `cfg.residual` (in turn, each
    wrapped by the norm placement, or in parallel)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.num_experts else make_mlp(cfg)
        self.input_layernorm = make_norm(cfg)  # the norm around attention
        self.residual = RESIDUALS.get(cfg.residual)
        if not getattr(self.residual, "shared_norm", False):
            self.post_attention_layernorm = make_norm(cfg)  # the norm around the feed-forward
        self.dropout = nn.Dropout(cfg.residual_dropout)
        self.place = PLACEMENTS.get(cfg.norm_placement)
        if getattr(self.place, "out_norms", False):  # norms on the sublayers' outputs (Gemma 2's sandwich)
            self.attn_out_norm, self.mlp_out_norm = make_norm(cfg), make_norm(cfg)

    def _attend(self, h: torch.Tensor, ctx: AttentionContext, keep: int) -> tuple[torch.Tensor, None]:
        out, aux = self.self_attn(h, ctx, keep)
        return (self.attn_out_norm(out) if hasattr(self, "attn_out_norm") else out), aux

    def _feed_forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.mlp(h)
        out, aux = out if isinstance(out, tuple) else (out, None)
        return (self.mlp_out_norm(out) if hasattr(self, "mlp_out_norm") else out), aux

    def forward(self, x: torch.Tensor, ctx: AttentionContext, keep: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, MoE balance loss or None); keep > 0: output the last `keep` positions only."""
        return self.residual(self, x, lambda h: self._attend(h, ctx, keep), self._feed_forward, keep)


class Backbone(nn.Module):
    """Embeddings, layers and the final norm: the `model.` prefix of every weight name."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = make_position(cfg)
        if cfg.local_rope_theta is not None:  # no weights: the sliding layers' rotary tables (Gemma 3)
            self.local_positions = make_position(cfg.local_rope())
        if cfg.type_vocab_size:
            self.embed_types = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        if cfg.embedding_norm:
            self.embed_norm = make_norm(cfg)
        self.dropout = nn.Dropout(cfg.embedding_dropout)
        self.layers = nn.ModuleList(Block(cfg.layer(i), i) for i in range(cfg.num_layers))
        if cfg.norm_placement != "post":  # post-norm blocks already end normalized
            self.norm = make_norm(cfg)


class MLMTransform(nn.Module):
    """BERT's prediction-head transform: dense → activation → norm, before the decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS.get(cfg.activation or "gelu")
        self.norm = make_norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))


class Transformer(nn.Module):
    """Decoder-only (causal) or encoder-only (bidirectional + MLM head) language model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transforms: list = []  # module transforms applied, in order (see transforms.py)
        self.model = Backbone(cfg)
        if not cfg.is_causal:
            self.mlm_transform = MLMTransform(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.num_labels or cfg.vocab_size, bias=cfg.lm_head_bias)  # or HF's score
        self.mtp_heads = nn.ModuleList(Block(cfg, cfg.num_layers + i) for i in range(cfg.num_mtp_heads))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.initializer_range / math.sqrt(2 * cfg.num_layers))
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 2:
            nn.init.normal_(module.weight, std=std)  # learned positions

    def tie_weights(self) -> None:
        """Share the output projection with the token embeddings when the config says so
        (`replace_module` unties them before replacing the head)."""
        if self.cfg.tie_embeddings:
            if type(self.lm_head) is not nn.Linear or type(self.model.embed_tokens) is not nn.Embedding:
                raise ValueError("cannot tie a replaced output head or embedding; replace_module unties them")
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """A pre-allocated KV cache for `batch_size` rows of up to `max_len` positions."""
        ref = self.model.embed_tokens.weight  # never quantized, unlike the projections
        cfg = self.cfg
        return KVCache(
            cfg.num_layers,
            batch_size,
            [cfg.layer(i).num_kv_heads for i in range(cfg.num_layers)],
            max_len,
            cfg.head_dim,
            device=device or ref.device,
            dtype=dtype or ref.dtype,
            sliding_window=cfg.sliding_window if cfg.layer_sliding_windows is None else cfg.layer_sliding_windows,
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        skip_head: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for `input_ids` [B, T].

        attention_mask [B, S]: 1 for real tokens, 0 for padding, S = cache.length + T (left
        padding supported). position_ids [B, T] default to the count of real tokens before
        each one. labels [B, T] are aligned with the logits (labels[:, t] is the target of
        position t — for a causal LM, the *next* token), -100 ignored.
        logits_to_keep > 0 computes logits for the last that many positions only.
        skip_head returns those positions' final hidden states in `out.features` instead of
        logits, for callers that apply `head` in pieces (a large vocabulary's logits are big).
        document_ids [B, T] (non-decreasing along T, no cache) packs several documents in a
        row: a token attends only within its document and positions restart at each one.
        """
        cfg = self.cfg
        T = input_ids.shape[1]
        x, ctx = self.embed(input_ids, attention_mask, position_ids, cache, token_type_ids=token_type_ids,
                            document_ids=document_ids)
        hidden = [x] if output_hidden_states else []
        aux = x.new_zeros((), dtype=torch.float32)
        # positions whose logits are not wanted need no output from the last layer
        trim = logits_to_keep if labels is None and not output_hidden_states and logits_to_keep < T else 0
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x, layer_aux = self._run(layer, x, ctx, trim if i == last else 0)
            if layer_aux is not None:
                aux = aux + layer_aux
            if output_hidden_states:
                hidden.append(x)
        if cache is not None:
            cache.advance(T)
        if cfg.num_experts:
            aux = cfg.router_aux_loss_coef * aux / cfg.num_layers

        if skip_head:
            return ModelOutput(None, features=x[:, -logits_to_keep:] if logits_to_keep else x, aux_loss=aux,
                               hidden_states=hidden)
        out = ModelOutput(self._logits(x, logits_to_keep), hidden_states=hidden)
        if labels is not None:
            out.loss = _cross_entropy(out.logits, labels)
            if cfg.num_mtp_heads and cache is None:
                aux = aux + cfg.mtp_loss_weight * self._mtp_loss(x, ctx, labels)
        out.aux_loss = aux
        return out

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttentionContext]:
        """The first step of `forward` (same arguments): the embeddings [B, T, hidden] and the
        attention context (rotary tables, mask, cache) every block of `model.layers` takes as
        `block(x, ctx) -> (x, aux)`; `head` ends the run. See `layerwise.py`.
        `inputs_embeds` [B, T, hidden] stands in for the token embeddings of `input_ids`.
        With a prefix or prompt adapter (`kv_prefix`) every position also sees its virtual
        tokens' keys and values, and the real tokens' positions start after them."""
        given = input_ids if inputs_embeds is None else inputs_embeds
        B, T = given.shape[:2]
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be [B, {past + T}] (cached + new), got {list(attention_mask.shape)}")
        if document_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("document_ids cannot be combined with a KV cache or an attention mask")
            if position_ids is None:
                position_ids = document_positions(document_ids)
            all_positions = position_ids
        else:
            all_positions = self._positions(attention_mask, B, past + T, given.device)
        given_positions = position_ids is not None
        prefix = self.kv_prefix(cache)
        virtual = prefix_length(prefix)
        if virtual:  # as PEFT: positions (given ones too) count the virtual tokens first
            all_positions = all_positions + virtual
            position_ids = position_ids + virtual if given_positions else None
        if not given_positions:
            position_ids = all_positions[:, past:]

        x = self._embed(input_ids, position_ids, token_type_ids, inputs_embeds)
        # derived positions are all below virtual + past + T; given ones are checked by the encoding
        ctx = self._context(x, position_ids, None if given_positions else virtual + past + T, all_positions,
                            attention_mask, cache, document_ids, prefix)
        return x, ctx

    def kv_prefix(self, cache: KVCache | None = None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each layer's (keys, values) [1, kv_heads, P, head_dim] of an active prefix or prompt
        adapter (`prompt_encoder`, see `core/adapters/prompt.py`), else None; kept on `cache`."""
        encoder = getattr(self, "prompt_encoder", None)
        if encoder is None or not encoder.adapter_active:
            return None
        if cache is not None and cache.prefix is not None:
            return cache.prefix
        prefix = encoder(self)
        if cache is not None:
            cache.prefix = prefix
        return prefix

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, padding: torch.Tensor | None,
                    keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor,
                    hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, V] of one new token per row, written into cache slot `slot` (LongTensor [1]);
        `hidden`: (logits, its `final_hidden` [B, hidden]), for contrastive search.

        Every shape is fixed by the cache (attention runs over all its slots, masked to the
        filled ones, the sliding window and `padding` [B, S] bool), so `torch.compile(...,
        dynamic=False)` compiles it once per batch size and cache size. Same result as
        `forward(input_ids, cache=...)` at cache length `slot`; the caller advances the cache.
        """
        cfg = self.cfg
        prefix = self.kv_prefix()
        position_ids = position_ids + prefix_length(prefix)
        x = self._embed(input_ids, position_ids, None)
        key_idx = torch.arange(keys[0].shape[2], device=x.device)
        positions = self.model.embed_positions
        bias = positions.attention_bias(position_ids, self._positions(padding, x.shape[0], len(key_idx), x.device))

        def masks(layer_cfg: ModelConfig) -> tuple[torch.Tensor, bool]:
            mask = mask_at(layer_cfg, slot, key_idx, padding, bias)  # the cache's filled slots, window, padding
            return with_prefix(mask if bias is None else mask.to(x.dtype), prefix), False

        windows = {window: masks(cfg.layer(i)) for window, i in window_layers(cfg).items()}
        rotary = positions.rotary(position_ids, x.dtype, cached=False)  # a few fused ops once compiled
        local = self._local_rotary(position_ids, x.dtype, cached=False)
        ctx = AttentionContext(rotary, *masks(cfg), StaticSlot(keys, values, slot), prefix, windows or None, local)
        for layer in self.model.layers:
            x, _ = layer(x, ctx)
        logits = self._logits(x, 1)[:, -1]
        return (logits, self.final_hidden(x[:, -1])) if hidden else logits

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        cfg, m = self.cfg, self.model
        x = m.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if cfg.scale_embeddings:
            x = x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)
        pos = m.embed_positions.embed(position_ids)
        if pos is not None:
            x = x + pos.to(x.dtype)
        if cfg.type_vocab_size:
            x = x + m.embed_types(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        if cfg.embedding_norm:
            x = m.embed_norm(x)
        return m.dropout(x)

    def _context(self, x, position_ids, span, all_positions, attention_mask, cache, documents=None, prefix=None
                 ) -> AttentionContext:
        """Rotary tables and the attention masks over the keys this step can see (per window, with
        per-layer sliding windows)."""
        T, past = x.shape[1], all_positions.shape[1] - x.shape[1]
        positions = self.model.embed_positions

        def masks(layer_cfg: ModelConfig, layer: int | None = None) -> tuple[torch.Tensor | None, bool]:
            first = cache.window_start(T, layer) if cache is not None else 0
            padding = attention_mask[:, first:] if attention_mask is not None else None
            if padding is not None and bool(padding.all()):  # no padding: keep SDPA's causal fast path
                padding = None
            bias = positions.attention_bias(position_ids, all_positions[:, first:])
            mask, is_causal = build_mask(layer_cfg, range(past, past + T), range(first, past + T), padding, bias,
                                         x.device, documents)
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.to(x.dtype)
            return with_prefix(mask, prefix), is_causal

        windows = {window: masks(self.cfg.layer(i), i) for window, i in window_layers(self.cfg).items()}
        return AttentionContext(positions.rotary(position_ids, x.dtype, span), *masks(self.cfg), cache, prefix,
                                windows or None, self._local_rotary(position_ids, x.dtype, span))

    def _local_rotary(self, position_ids: torch.Tensor, dtype: torch.dtype, span: int | None = None, cached=True):
        """The sliding layers' rotary cos, sin under `local_rope_theta` (Gemma 3), else None."""
        local = getattr(self.model, "local_positions", None)
        return None if local is None else local.rotary(position_ids, dtype, span, cached=cached)

    @staticmethod
    def _positions(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
        """Position of every token [B, S]: index among the real tokens of its row."""
        if mask is None:
            return torch.arange(length, device=device).expand(batch, length)
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def _run(self, layer: Block, x: torch.Tensor, ctx: AttentionContext, keep: int = 0):
        if self.cfg.gradient_checkpointing and self.training:
            return checkpoint(layer, x, ctx, keep, use_reentrant=False)
        return layer(x, ctx, keep)

    def _logits(self, x: torch.Tensor, keep: int) -> torch.Tensor:
        # the class's method: under FSDP, `model.head` called from outside `forward` gathers (distributed.wrap)
        return Transformer.head(self, x[:, -keep:] if keep else x)

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output x through the final norm (pre-norm models have one): what
        transformers calls the last hidden state."""
        return self.model.norm(x) if self.cfg.norm_placement != "post" else x

    def head(self, x: torch.Tensor, projection=None) -> torch.Tensor:
        """Float32 logits [..., vocab] of the last block's outputs x [..., hidden] (norm, head);
        `projection` stands in for lm_head (the same product by another kernel); an LM's
        `logit_softcap` (Gemma 2) caps them, in float32."""
        cfg = self.cfg
        x = self.final_hidden(x)
        if not cfg.is_causal:
            x = self.mlm_transform(x)
        logits = (projection or self.lm_head)(x).float()
        if cfg.logit_softcap is not None and not cfg.num_labels:  # (transformers' classifiers do not cap)
            logits = torch.tanh(logits / cfg.logit_softcap) * cfg.logit_softcap
        return logits

    def _mtp_loss(self, x: torch.Tensor, ctx: AttentionContext, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of the chained extra heads; head k predicts labels k positions ahead."""
        losses = []
        for k, head in enumerate(self.mtp_heads, start=1):
            x, _ = self._run(head, x, ctx)
            losses.append(_cross_entropy(self._logits(x[:, :-k], 0), labels[:, k:]))
        return torch.stack(losses).mean()


def window_layers(cfg: ModelConfig) -> dict[int, int]:
    """{sliding window: a layer with it} under per-layer windows (`AttentionContext.windows`)."""
    return {window: i for i, window in enumerate(cfg.layer_sliding_windows or ()) if window is not None}


def prefix_length(prefix: list[tuple[torch.Tensor, torch.Tensor]] | None) -> int:
    """Number of virtual tokens of a `kv_prefix` (0 for None)."""
    return prefix[0][0].shape[2] if prefix else 0


def with_prefix(mask: torch.Tensor | None, prefix) -> torch.Tensor | None:
    """Bool `mask` [.., T, K] with the prefix's key columns first, every query allowed to see them.
    (None stays None: the bottom-right causal pattern over P + K keys already sees them. The
    mask is never ALiBi's additive one: prefix and prompt adapters refuse ALiBi.)"""
    if mask is None or not prefix:
        return mask
    return F.pad(mask, (prefix_length(prefix), 0), value=True)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token within its document [B, T] (document_ids non-decreasing)."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(-1).values


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten().to(logits.device), ignore_index=IGNORE_INDEX)
