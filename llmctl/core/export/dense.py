"""A loaded model's tensors as plain dense weights, computed one at a time on demand.

    tensors = dense_tensors(model)            # {name: DenseTensor(shape, get)}
    w = tensors["model.layers.0.self_attn.q_proj.weight"].get()

Every exporter writes what the model computes: an adapted layer (LoRA / DoRA) gives its merged
weight, a quantized layer (any module with `dequantize()`) its dequantized weight; each is made
only when asked for, so an export still holds about one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class DenseTensor:
    shape: tuple[int, ...]
    get: Callable[[], torch.Tensor]


def _special(model: nn.Module) -> dict[str, tuple[str, Callable[[], torch.Tensor]]]:
    """{module path: (kind, weight thunk)} for adapted and quantized linear layers."""
    from llmctl.core.adapters.lora import LoraLayer

    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out[path] = ("adapted", module.merged_weight)
        elif hasattr(module, "dequantize") and not isinstance(module, nn.Linear):
            out[path] = ("quantized", lambda m=module: m.dequantize(torch.float32))
    return out


def dense_tensors(model: nn.Module) -> tuple[dict[str, DenseTensor], set[str]]:
    """(`model`'s dense tensors by our parameter name, the kinds of layer folded: "adapted",
    "quantized"). An adapted or quantized layer contributes its `weight` and `bias` only (its
    weight where its first stored tensor is: a packed layer stores no `weight`)."""
    special = _special(model)
    tensors: dict[str, DenseTensor] = {}
    for name, t in model.state_dict().items():
        path, leaf = name.rpartition(".")[0], name.rpartition(".")[2]
        owner = next((p for p in special if path == p or path.startswith(p + ".")), None)
        if owner is None or (path == owner and leaf == "bias"):
            tensors[name] = DenseTensor(tuple(t.shape), lambda t=t: t.detach())
        elif f"{owner}.weight" not in tensors:
            module = model.get_submodule(owner)
            tensors[f"{owner}.weight"] = DenseTensor((module.out_features, module.in_features), special[owner][1])
    return tensors, {kind for kind, _ in special.values()}
