"""Multi-head attention (MHA / GQA / MQA via num_kv_heads), its masks and its kernels.

The kernel is a registered strategy, ATTENTION_KERNELS.get(cfg.attention_kernel):
fn(q [B, H, T, D], k, v [B, KV, K, D], mask, is_causal, dropout_p) -> [B, H, T, D], where
is_causal (mask None) means query i sees keys up to i + K - T (bottom-right aligned, as in
flash-attn: the usual causal mask when T = K).
'sdpa' (torch scaled_dot_product_attention, the default) and 'eager' (explicit softmax, a
readable reference) are built in; plugins add more through the `llmctl.attention` entry points.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.core.model.cache import KVCache
from llmctl.core.registry import Registry
from llmctl.core.model.norm import make_norm
from llmctl.core.model.position import apply_rotary


ATTENTION_KERNELS: Registry = Registry("attention kernel", entry_point_group="llmctl.attention")


# Float32 causal attention on CPU over fewer keys than this runs as one SDPA call per block
# of CAUSAL_QUERY_BLOCK queries, each over the keys it can see. Measured against torch's CPU
# flash kernel (torch 2.13, head size 64, 4-12 heads): 15-25% faster for 384-640 keys, even
# at 128-256, slower from 768 keys on, where the kernel's own blocking pays; with gradients
# 7-12% faster at 256-512 keys in float32, but 12-23% slower in bfloat16.
CAUSAL_BLOCKED_BELOW = 768
CAUSAL_QUERY_BLOCK = 64

# bfloat16/float16 attention on CPU over at most this many keys runs as explicit products
# (`_explicit_blocks`): torch's CPU flash kernel computes 16-bit inputs in float32 and is 2-2.5x
# slower with gradients than two 16-bit matmuls and a softmax (which accumulates in float32, as
# transformers' eager attention does). Measured (torch 2.13, 2 threads, head size 64, GQA 6/2,
# 2048 tokens per batch), forward + backward, ms: 128 keys 17.5 -> 5.7, 256 keys 16.8 -> 6.8,
# 512 keys 27.9 -> 11.9, 1024 keys 35.6 -> 23.1 (forward only 13.5 -> 7.9). The probabilities
# are kept for backward (T x K per head, as eager attention), hence the bound on keys.
# Decoding (one query) keeps SDPA, so that eager and compiled steps round alike: explicit is
# faster there in eager mode (us per layer for 48 / 256 / 1024 keys, 12 heads: flash 35 / 150 /
# 579, explicit 48 / 66 / 97), but through inductor it decoded at 78 tok/s against 121 (bf16,
# 97.5M Llama, 64 tokens over a 256-slot static cache).
EXPLICIT_16BIT_UP_TO = 1024
EXPLICIT_QUERY_BLOCK = 128


@ATTENTION_KERNELS.register("sdpa")
def sdpa_attention(q, k, v, mask, is_causal: bool, dropout_p: float) -> torch.Tensor:
    Tq, K = q.shape[2], k.shape[2]
    if q.device.type == "cpu" and 1 < Tq <= K <= EXPLICIT_16BIT_UP_TO:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        if dtype in (torch.bfloat16, torch.float16):  # (under autocast q and k come float32 from the rotation)
            return _explicit_blocks(q.to(dtype), k.to(dtype), v.to(dtype), mask, is_causal, dropout_p)
    if (is_causal and q.device.type == "cpu" and q.dtype == torch.float32
            and Tq >= 2 * CAUSAL_QUERY_BLOCK and K < CAUSAL_BLOCKED_BELOW):
        return _causal_blocks(q, k, v, dropout_p)
    if is_causal and Tq != K:  # SDPA aligns is_causal top-left: spell out the bottom-right mask
        mask, is_causal = torch.ones(Tq, K, dtype=torch.bool, device=q.device).tril(K - Tq), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
    )


def _causal_blocks(q, k, v, dropout_p: float, block: int = CAUSAL_QUERY_BLOCK) -> torch.Tensor:
    """Bottom-right causal attention (query i sees keys up to i + K - Tq), a block of queries
    per SDPA call over only the keys that block can see."""
    Tq, K = q.shape[2], k.shape[2]
    offset = K - Tq
    hidden = torch.full((Tq, K), float("-inf"), dtype=q.dtype, device=q.device).triu(offset + 1)
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start in range(0, Tq, block):
        end = min(start + block, Tq)
        seen = offset + end
        out = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :seen], v[:, :, :seen],
                                             attn_mask=hidden[start:end, :seen], dropout_p=dropout_p, enable_gqa=gqa)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1).transpose(1, 2)  # [B, T, H, D] memory: the output projection reads it as is


def _explicit_blocks(q, k, v, mask, is_causal: bool, dropout_p: float,
                     block: int = EXPLICIT_QUERY_BLOCK) -> torch.Tensor:
    """Attention as explicit products in q's dtype, a block of queries at a time over the keys
    it can see (causal: bottom-right aligned), each key/value head shared by its group of query
    heads without copies; the softmax accumulates in float32 (torch's CPU kernel)."""
    B, H, Tq, D = q.shape
    KV, K = k.shape[1], k.shape[2]
    group, offset, scale = H // KV, K - Tq, 1 / math.sqrt(D)
    outs = []
    for start in range(0, Tq, block):
        end = min(start + block, Tq)
        n, seen = end - start, offset + end if is_causal else K
        scores = (q[:, :, start:end].reshape(B, KV, group * n, D) @ k[:, :, :seen].transpose(-1, -2))
        scores = scores.view(B, H, n, seen).mul_(scale)
        if is_causal:
            hidden = torch.ones(n, seen, dtype=torch.bool, device=q.device).triu(offset + start + 1)
            scores = scores.masked_fill_(hidden, float("-inf"))
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill_(~mask[..., start:end, :seen], float("-inf"))
        elif mask is not None:  # an additive bias (ALiBi): added, and normalised, in float32
            scores = scores.float() + mask[..., start:end, :seen]
        probs = scores.softmax(dim=-1)
        if dropout_p:
            probs = F.dropout(probs, p=dropout_p)
        out = probs.to(v.dtype).view(B, KV, group * n, seen) @ v[:, :, :seen]
        outs.append(out.view(B, H, n, D).transpose(1, 2))
    if len(outs) == 1:  # (the caller's reshape makes the copy a concatenation would)
        return outs[0].transpose(1, 2)
    return torch.cat(outs, dim=1).transpose(1, 2)  # [B, T, H, D] memory, as `_causal_blocks`


def inference_backends(device: torch.device):
    """A context for inference on `device`: on CUDA, SDPA without its cuDNN backend, which builds
    an execution plan for every new key length (tens of milliseconds each: bf16 decoding on an
    H200 ran at 18 tokens/s with it, 114 without); training, with fixed shapes, keeps it."""
    from contextlib import nullcontext

    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@ATTENTION_KERNELS.register("eager")
def eager_attention(q, k, v, mask, is_causal: bool, dropout_p: float, softcap: float | None = None) -> torch.Tensor:
    """Explicit float32 scores and softmax; `softcap` caps the scores at ±softcap by tanh before
    the mask (Gemma 2's attn_logit_softcapping: `Attention` takes this kernel for it)."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p).to(v.dtype)
    return probs @ v


@dataclass
class AttentionContext:
    """Everything a layer needs besides its input, computed once per forward."""

    rotary: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [B, T, head_dim]
    mask: torch.Tensor | None  # bool (True = attend) or additive float, [B|1, H|1, T, K]
    is_causal: bool  # the kernel applies the causal pattern itself (mask is None then)
    cache: KVCache | None
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, KV, P, D]: prefix/prompt tuning
    # per-layer sliding windows (`ModelConfig.layer_sliding_windows`): {window: (mask, is_causal)} for
    # the layers with that window, over the keys the cache gives them; the others take `mask`, `is_causal`
    windows: dict[int, tuple[torch.Tensor | None, bool]] | None = None
    local_rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # the sliding layers' with `local_rope_theta`


def build_mask(
    cfg,
    q_idx: range,
    k_idx: range,
    padding: torch.Tensor | None,
    bias: torch.Tensor | None,
    device: torch.device | None = None,
    documents: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """The attention mask for queries at sequence indices q_idx (T of them) over keys k_idx (K).

    `padding` [B, K] marks real keys (1) and padding (0); `bias` is an additive
    [B, H, T, K] position bias (ALiBi); `documents` [B, K] (no cache: queries are the keys)
    confines attention to each packed document. Returns (mask, is_causal): when the plain
    causal pattern suffices the mask is None and SDPA's own causal kernel is used.
    """
    plain = padding is None and bias is None and cfg.sliding_window is None and documents is None
    if plain and not cfg.is_causal:
        return None, False
    if plain and len(q_idx) == 1:  # one new token sees every cached key
        return None, False
    if plain and len(q_idx) == len(k_idx):
        return None, True
    q_pos = torch.arange(q_idx.start, q_idx.stop, device=device)
    k_pos = torch.arange(k_idx.start, k_idx.stop, device=device)
    return mask_at(cfg, q_pos, k_pos, padding, bias, documents), False


def mask_at(cfg, q_pos: torch.Tensor, k_pos: torch.Tensor, padding: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, documents: torch.Tensor | None = None) -> torch.Tensor:
    """`build_mask`'s mask for queries at sequence indices `q_pos` [T] over keys `k_pos` [K]
    (tensors, so a compiled decode step can pass its cache slot): bool [B|1, 1, T, K], or the
    additive `bias` with -inf where attention is not allowed."""
    distance = q_pos[:, None] - k_pos[None, :]  # [T, K]
    allowed = torch.ones_like(distance, dtype=torch.bool)
    if cfg.is_causal:
        allowed &= distance >= 0
    if cfg.sliding_window is not None:
        allowed &= distance < cfg.sliding_window
    allowed = allowed[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, :].bool()
    if documents is not None:
        allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])
    allowed = allowed | (distance == 0)  # a padded query attends to itself: no empty rows
    if bias is None:
        return allowed
    return bias.masked_fill(~allowed, float("-inf"))


class Attention(nn.Module):
    """Self-attention with q/k/v/o projections as plain nn.Linear at HF module paths."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, cfg.head_dim)
            self.k_norm = make_norm(cfg, cfg.head_dim)
        self.dropout = cfg.attention_dropout
        self.window = cfg.sliding_window  # this layer's (`AttentionContext.windows`)
        self.local_rope = cfg.local_rope_theta is not None and cfg.sliding_window is not None  # Gemma 3's local layers
        # scores scaled by attention_scale_dim ** -0.5: the kernels' head_dim ** -0.5 on rescaled queries
        self.q_scale = (cfg.head_dim / cfg.attention_scale_dim) ** 0.5 if cfg.attention_scale_dim else None
        self.kernel = ATTENTION_KERNELS.get(cfg.attention_kernel)
        if cfg.attention_softcap is not None:  # SDPA cannot cap the scores
            self.kernel = functools.partial(eager_attention, softcap=cfg.attention_softcap)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, keep: int = 0) -> tuple[torch.Tensor, None]:
        """Attention output [B, T, hidden]; keep > 0: only the last `keep` positions query
        (every position still gives keys and values, to the cache too)."""
        B, T, _ = x.shape
        Tq = keep or T
        q = self.q_proj(x[:, T - Tq :]).view(B, Tq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D]
        rotary = ctx.local_rotary if self.local_rope else ctx.rotary
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos[:, T - Tq :], sin[:, T - Tq :]), apply_rotary(k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        if ctx.prefix is not None:  # virtual tokens' keys/values, before the real ones (the mask allows them)
            pk, pv = (t.to(k.dtype).expand(B, -1, -1, -1) for t in ctx.prefix[self.layer_idx])
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        if self.q_scale is not None:
            q = q * self.q_scale
        mask, is_causal = (ctx.windows or {}).get(self.window, (ctx.mask, ctx.is_causal))  # this layer's window
        mask = mask[..., -Tq:, :] if Tq < T and mask is not None else mask
        out = self.kernel(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, Tq, -1)), None
