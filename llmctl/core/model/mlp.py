"""Feed-forward blocks and activations, registered by name.

    MLPS.get(cfg.mlp)(cfg, intermediate_size) -> nn.Module with up_proj/down_proj (+ gate_proj)
    ACTIVATIONS.get(name) -> elementwise function

Gated blocks compute down(act(gate(x)) * up(x)); plain blocks compute down(act(up(x))).
`cfg.activation`, when set, overrides the block's default nonlinearity (GPT-2 and Gemma use
the tanh approximation of GELU).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.core.registry import Registry

ACTIVATIONS: Registry = Registry("activation")
ACTIVATIONS.register("silu")(F.silu)
ACTIVATIONS.register("gelu")(F.gelu)
ACTIVATIONS.register("gelu_tanh")(functools.partial(F.gelu, approximate="tanh"))
ACTIVATIONS.register("relu")(F.relu)
ACTIVATIONS.register("relu2")(lambda x: F.relu(x).square())

MLPS: Registry = Registry("mlp")


class FeedForward(nn.Module):
    """A feed-forward block; subclasses fix `gated` and the default activation."""

    gated = False
    default_activation = "gelu"

    def __init__(self, cfg, intermediate_size: int | None = None):
        super().__init__()
        inner = intermediate_size or cfg.intermediate_size
        if self.gated:
            self.gate_proj = nn.Linear(cfg.hidden_size, inner, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, inner, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(inner, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS.get(cfg.activation or self.default_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


def _variant(name: str, gated: bool, activation: str) -> type[FeedForward]:
    cls = type(name, (FeedForward,), {"gated": gated, "default_activation": activation})
    return MLPS.register(name)(cls)


for _name, _gated, _act in [
    ("swiglu", True, "silu"),
    ("geglu", True, "gelu"),
    ("reglu", True, "relu"),
    ("gelu", False, "gelu"),
    ("relu", False, "relu"),
    ("silu", False, "silu"),
]:
    _variant(_name, _gated, _act)


def make_mlp(cfg, intermediate_size: int | None = None) -> FeedForward:
    """The feed-forward block named by `cfg.mlp`."""
    return MLPS.get(cfg.mlp)(cfg, intermediate_size)
