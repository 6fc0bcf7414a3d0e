"""LoRA, rsLoRA and DoRA as one module transform (`lora`), with merging.

    model = load_model(base, transforms=[LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])])[0]
    merge_adapter(model)            # the deltas folded into the base weights; LoRA gone

The targeted module keeps its own class, tensors and names (`weight`, `bias`, or a quantized
module's `weight`, `absmax`…): LoRA turns it into a subclass of its own type (as FSDP2's
`fully_shard` does) that adds PEFT's adapter tensors `lora_A.weight` (r × in),
`lora_B.weight` (out × r) and, for DoRA, `lora_magnitude_vector` (out), and adds
`scaling · B(A(dropout(x)))` to the base output. `scaling` is alpha / r, or alpha / √r with
rsLoRA. DoRA (PEFT's formulation) rescales each output row of W + scaling·BA to a learned
magnitude m: y = m/‖W + scaling·BA‖ · (xWᵀ + scaling·B(A(x))) + bias, the norm detached.
LoRA on a frozen `nn.Linear` is one autograd node (`_LoraLinear`: the input cast once under
autocast, no weight-gradient work, the adapter added into the base output and its share of the
input gradient into the base's in place); DoRA and quantized bases compose their base's forward.

A base layer takes part through one protocol: `dense_weight(module)` (its weight as a float
matrix: `dequantize()` when it has one) and, to merge into a quantized layer, a class
constructor that takes an `nn.Linear` (`type(base)(linear)`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from llmctl.core.model.transforms import TRANSFORMS, Transform, replace_module
from llmctl.errors import UsageError

ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude_vector")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A base layer's weight as a dense (out × in) matrix."""
    return module.dequantize() if hasattr(module, "dequantize") else module.weight


class LoraLayer(nn.Module):
    """The mixin a targeted module's class is extended with (`lora_class`)."""

    adapter_active = True  # False inside `adapters_disabled`: the base layer's output

    def init_lora(self, r: int, alpha: float, dropout: float, rslora: bool, dora: bool) -> None:
        out_features, in_features = self.out_features, self.in_features
        device = dense_device(self)
        self.r, self.scaling = r, alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        if device.type != "meta":  # PEFT's init: A Kaiming-uniform, B zero (the delta starts at 0)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = None
        if dora:
            magnitude = torch.empty(out_features, device=device)
            if device.type != "meta":
                magnitude = torch.linalg.norm(dense_weight(self).detach().float(), dim=1)
            self.lora_magnitude_vector = nn.Parameter(magnitude)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A (out × in), in float32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_active and fusable(self, x):
            return lora_linear(self, x)
        result = super().forward(x)
        if not self.adapter_active:
            return result
        x = self.lora_dropout(x)
        if self.lora_magnitude_vector is not None or not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # (LoRA under autocast: cast once, by autocast; DoRA's norm in fp32)
        h = self.lora_A(x)
        if self.lora_magnitude_vector is None:  # result + scaling · h Bᵀ in one GEMM (no scaled copy, no add)
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]).to(result.dtype),
                              self.lora_B.weight.t().to(result.dtype), alpha=self.scaling)
            return out.view(result.shape)
        lora = self.lora_B(h).to(result.dtype) * self.scaling
        weight = dense_weight(self).to(x.dtype)
        norm = torch.linalg.norm(weight + self.delta_weight().detach().to(x.dtype), dim=1).detach()
        scale = (self.lora_magnitude_vector / norm).to(result.dtype)
        base = F.linear(x, weight) if self.training and not isinstance(self.lora_dropout, nn.Identity) \
            else result - (self.bias if getattr(self, "bias", None) is not None else 0)
        return result + (scale - 1) * base + scale * lora

    def merged_weight(self) -> torch.Tensor:
        """The dense weight that gives this layer's output without the adapter (float32)."""
        weight = dense_weight(self).detach().float() + self.delta_weight().detach()
        if self.lora_magnitude_vector is not None:
            weight = weight * (self.lora_magnitude_vector.detach().float() / torch.linalg.norm(weight, dim=1))[:, None]
        return weight


def fusable(module: LoraLayer, x: torch.Tensor) -> bool:
    """Whether `lora_linear` computes this call: LoRA (not DoRA) on a frozen plain `nn.Linear`, in
    the adapter's dtype or under autocast."""
    weight, bias = module.weight, module.bias
    return (module.lora_magnitude_vector is None and module.base_class is nn.Linear and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
            and (weight.dtype == module.lora_A.weight.dtype or torch.is_autocast_enabled(x.device.type)))


def lora_linear(module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """A frozen dense layer plus its LoRA in one autograd node (`_LoraLinear`), in autocast's dtype
    when it is on (x cast once for both paths), else in the adapter's."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else module.lora_A.weight.dtype
    dropout = module.lora_dropout  # drawn over the input as it comes, as PEFT's (and only when it drops)
    dropped = dropout(x).to(dtype) if isinstance(dropout, nn.Dropout) and dropout.training else None
    x = x.to(dtype)
    bias = None if module.bias is None else module.bias.to(dtype)
    return _LoraLinear.apply(x, module.weight.to(dtype), bias, module.lora_A.weight.to(dtype),
                             module.lora_B.weight.to(dtype), module.scaling, dropped)


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + bias + s · (x' Aᵀ) Bᵀ, with x' = dropout(x) (`dropped`) or x itself, for a frozen W.

    Saves x' and h = x' Aᵀ only (W is a parameter) and does no work for W in backward: five
    GEMMs (g B, its products with x' and A, gᵀ h, g W), the adapter's share of grad x added in
    place — with dropout it is x' 's gradient, which autograd takes back through the dropout."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropped):
        x_lora = x if dropped is None else dropped
        h = F.linear(x_lora, lora_a)
        out = F.linear(x, weight, bias)
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), lora_b.t(), alpha=scaling)
        ctx.scaling, ctx.dropout = scaling, dropped is not None
        ctx.save_for_backward(x_lora, weight, lora_a, lora_b, h)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_lora, weight, lora_a, lora_b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = torch.mm(g, lora_b).mul_(ctx.scaling)  # [N, r]: the rank-r gradient, scaled once
        grad_a = torch.mm(grad_h.t(), x_lora.reshape(-1, x_lora.shape[-1])) if ctx.needs_input_grad[3] else None
        grad_b = torch.mm(g.t(), h.reshape(-1, h.shape[-1])).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        grad_x = grad_dropped = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight)
            if not ctx.dropout:
                grad_x.addmm_(grad_h, lora_a)
            grad_x = grad_x.view(x_lora.shape)
        if ctx.dropout and ctx.needs_input_grad[6]:
            grad_dropped = torch.mm(grad_h, lora_a).view(x_lora.shape)
        return grad_x, None, None, grad_a, grad_b, None, grad_dropped


def dense_device(module: nn.Module) -> torch.device:
    return next(t for t in (*module.parameters(), *module.buffers())).device


_CLASSES: dict[type, type] = {}


def lora_class(base: type) -> type:
    """`base` extended with LoRA (one class per base class)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Lora{base.__name__}", (LoraLayer, base), {"base_class": base})
    return _CLASSES[base]


@TRANSFORMS.register("lora")
@dataclass(kw_only=True)
class LoRA(Transform):
    """Low-rank adapters on the selected linear layers (dense or quantized): LoRA, rsLoRA, DoRA."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    modules_to_save: list[str] | None = None  # trained in full and saved with the adapter (PEFT's)
    rank_pattern: dict[str, int] | None = None  # {module pattern: r} for the modules it matches (PEFT's)
    alpha_pattern: dict[str, float] | None = None  # {module pattern: alpha} likewise

    peft_type: ClassVar[str] = "LORA"  # PEFT's files: `peft_format.py`

    def __post_init__(self):
        for key, r in {"": self.r, **(self.rank_pattern or {})}.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise UsageError(f"lora: r must be an integer >= 1, got {r!r}" + (f" for {key!r}" if key else ""))

    def replace(self, path: str, module: nn.Module) -> nn.Module:
        if isinstance(module, LoraLayer):
            raise UsageError(f"lora: {path} already has an adapter (merge it first)")
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            raise UsageError(f"lora: {path} is a {type(module).__name__}, not a linear layer")
        module.__class__ = lora_class(type(module))
        module.init_lora(pattern_value(self.rank_pattern, path, self.r), pattern_value(self.alpha_pattern, path, self.alpha),
                         self.dropout, self.rslora, self.dora)
        return module

    def peft_config(self, model: nn.Module) -> dict:
        from llmctl.core.adapters.peft_format import adapter_config

        return adapter_config(self, model)

    @classmethod
    def from_peft_config(cls, config: dict, model: nn.Module, where: str) -> LoRA:
        from llmctl.core.adapters.peft_format import transform_from_config

        return transform_from_config(config, model, where)

    def peft_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from llmctl.core.adapters.peft_format import adapter_tensors

        return adapter_tensors(model, self)


def pattern_value(patterns: dict | None, path: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` rule: the value of the first key that matches the end
    of `path` at a name boundary (a regex, `(.*\\.)?KEY$`), else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def lora_modules(model: nn.Module) -> dict[str, LoraLayer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every LoRA/DoRA delta into its base layer, in place, and drop the `lora` transforms:
    a dense layer becomes the plain `nn.Linear` (its dtype kept) whose output the adapted layer
    gave; a quantized base is re-quantized from the merged weight (its class made from a Linear,
    so its output equals the adapter's within the quantization error)."""
    if getattr(model, "prompt_encoder", None) is not None:
        raise UsageError("prefix and prompt adapters have no weights to merge into the base; use the adapter "
                         "directory itself")
    for path, module in lora_modules(model).items():
        weight = module.merged_weight()
        dtype = module.weight.dtype if module.weight.is_floating_point() else weight.dtype
        merged = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        merged.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if module.bias is not None:
            merged.bias = module.bias
        if module.base_class is not nn.Linear:
            merged = module.base_class(merged)
        replace_module(model, path, merged)
    model.transforms = [t for t in getattr(model, "transforms", []) if not isinstance(t, LoRA)]
    return model


def mark_trainable(model: nn.Module, modules_to_save: list[str] | None = None) -> None:
    """Only adapter tensors (and the `modules_to_save`, trained in full) require gradients."""
    model.requires_grad_(False)
    for module in lora_modules(model).values():
        for name in ADAPTER_TENSORS:
            part = getattr(module, name)
            if part is not None:
                part.requires_grad_(True)
    encoder = getattr(model, "prompt_encoder", None)  # prefix / prompt tuning (`prompt.py`)
    if encoder is not None:
        encoder.requires_grad_(True)
    for path in saved_modules(model, modules_to_save):
        model.get_submodule(path).requires_grad_(True)


def saved_modules(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """Paths of the modules `modules_to_save` names (PEFT: equal names or `.name` suffixes)."""
    if not modules_to_save:
        return []
    from llmctl.core.model.transforms import matches

    paths = [p for p, _ in model.named_modules() if p and matches(p, list(modules_to_save))]
    if not paths:
        raise UsageError(f"modules_to_save={modules_to_save!r} matches no module")
    return paths
