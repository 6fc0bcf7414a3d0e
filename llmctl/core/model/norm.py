"""Normalization layers, registered by name: NORMS.get(cfg.norm)(dim, cfg) -> nn.Module."""

from __future__ import annotations

import torch
from torch import nn

from llmctl.core.registry import Registry

NORMS: Registry = Registry("norm")


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (Llama, Mistral, Qwen)."""

    offset = 0.0  # the effective scale is offset + weight

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - self.offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


@NORMS.register("gemma_rmsnorm")
class GemmaRMSNorm(RMSNorm):
    """RMSNorm whose stored weight is the scale minus one (Gemma)."""

    offset = 1.0


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm; `bias` switches the additive term."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)


def make_norm(cfg, dim: int | None = None) -> nn.Module:
    """The norm named by `cfg.norm` over `dim` features (default hidden_size)."""
    return NORMS.get(cfg.norm)(dim or cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)


# Where a block's norms sit around a sublayer (attention or feed-forward).
# A placement is fn(x, sublayer, norm, dropout, keep) -> (output, aux_loss), where `sublayer`
# returns (output, aux_loss) and keep > 0 means it returns the last `keep` positions only.
PLACEMENTS: Registry = Registry("norm placement")


def tail(x: torch.Tensor, keep: int) -> torch.Tensor:
    """The last `keep` positions of x [B, T, ...] (all of them when keep is 0)."""
    return x[:, -keep:] if keep else x


@PLACEMENTS.register("pre")
def pre_norm(x: torch.Tensor, sublayer, norm: nn.Module, dropout: nn.Module, keep: int = 0):
    """x + sublayer(norm(x)) (GPT-2, Llama)."""
    out, aux = sublayer(norm(x))
    return tail(x, keep) + dropout(out), aux


@PLACEMENTS.register("post")
def post_norm(x: torch.Tensor, sublayer, norm: nn.Module, dropout: nn.Module, keep: int = 0):
    """norm(x + sublayer(x)) (original Transformer, BERT)."""
    out, aux = sublayer(x)
    return norm(tail(x, keep) + dropout(out)), aux


@PLACEMENTS.register("sandwich")
def sandwich_norm(x: torch.Tensor, sublayer, norm: nn.Module, dropout: nn.Module, keep: int = 0):
    """x + out_norm(sublayer(norm(x))) (Gemma 2, Gemma 3): pre-norm whose sublayers end in their
    own norm (`out_norms`: the block's `attn_out_norm` and `mlp_out_norm`)."""
    return pre_norm(x, sublayer, norm, dropout, keep)


sandwich_norm.out_norms = True


# How a block joins attention and feed-forward: fn(block, x, attend, feed, keep) -> (output, aux_loss),
# `attend` and `feed` being sublayers as above. `shared_norm`: one norm (`input_layernorm`) feeds both,
# and the block has no `post_attention_layernorm`.
RESIDUALS: Registry = Registry("residual")


@RESIDUALS.register("sequential")
def sequential(block: nn.Module, x: torch.Tensor, attend, feed, keep: int = 0):
    """Attention then feed-forward, each wrapped by the block's norm placement (Llama, GPT-2, BERT)."""
    x, _ = block.place(x, attend, block.input_layernorm, block.dropout, keep)
    return block.place(x, feed, block.post_attention_layernorm, block.dropout)


@RESIDUALS.register("parallel")
def parallel(block: nn.Module, x: torch.Tensor, attend, feed, keep: int = 0):
    """x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX's use_parallel_residual, GPT-J)."""
    attn, _ = attend(block.input_layernorm(x))
    mlp, aux = feed(block.post_attention_layernorm(tail(x, keep)))
    return block.dropout(mlp) + block.dropout(attn) + tail(x, keep), aux  # transformers' order of sums


@RESIDUALS.register("parallel_shared")
def parallel_shared(block: nn.Module, x: torch.Tensor, attend, feed, keep: int = 0):
    """x + attn(ln(x)) + mlp(ln(x)), one norm for both (Phi-2)."""
    h = block.input_layernorm(x)
    attn, _ = attend(h)
    mlp, aux = feed(tail(h, keep))
    return block.dropout(attn) + block.dropout(mlp) + tail(x, keep), aux


parallel_shared.shared_norm = True
