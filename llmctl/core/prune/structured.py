"""Structured pruning: attention heads, MLP channels and whole layers, removed physically.

Importance comes from one calibrated run of the unpruned model (`for_each_block`):
- a query head's is the energy of its contribution to the attention output, Σ_t ‖W_o,h x_t,h‖²
  (from the Gram matrix of its o_proj input); a KV group's is the sum over its query heads;
- an MLP channel's is Σ_t x_t,c² · ‖W_down[:, c]‖² (its exact contribution energy);
- a layer's is ShortGPT's block influence, 1 − mean cos(input, output) (Men et al., 2024).
`uniform=true` removes the same count from every layer, so the model keeps Hugging Face's
shape; `uniform=false` ranks units across layers by their share of their layer's importance
and the checkpoint records per-layer sizes (`model_type: llmctl`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llmctl.core.model.config import PER_LAYER
from llmctl.core.model.layerwise import capture_inputs
from llmctl.core.prune.base import PRUNERS, Pruner
from llmctl.core.prune.calibration import for_each_block
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import UsageError


class Structured(Pruner):
    calibrated = True
    structured = True

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if model.cfg.num_mtp_heads:
            raise UsageError("structured pruning of a model with multi-token-prediction heads is not supported")

    def removed(self, n: int) -> int:
        """Units removed of `n` (at least one always stays)."""
        return min(round(n * self.settings.sparsity), n - 1)

    def keep(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sorted indices kept per layer, from per-layer unit scores (see the module docstring)."""
        if self.settings.uniform:
            return [s.topk(len(s) - self.removed(len(s))).indices.sort().values for s in scores]
        shares = torch.cat([s / s.sum().clamp_min(1e-30) for s in scores])
        layer = [i for i, s in enumerate(scores) for _ in range(len(s))]
        left = [len(s) for s in scores]
        drop = torch.zeros(len(shares), dtype=torch.bool)
        wanted, dropped = round(len(shares) * self.settings.sparsity), 0
        for j in shares.argsort().tolist():  # weakest first; a layer's last unit always stays
            if dropped == wanted:
                break
            if left[layer[j]] > 1:
                drop[j], left[layer[j]], dropped = True, left[layer[j]] - 1, dropped + 1
        return [(~d).nonzero().flatten() for d in drop.split([len(s) for s in scores])]


def _rows(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep output features `index` of `linear` (weight rows and bias); its sizes are left
    as they were, for `resized` rebuilds the model around the tensors."""
    linear.weight = nn.Parameter(linear.weight.detach()[index].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[index].clone())


def _columns(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep input features `index` of `linear`."""
    linear.weight = nn.Parameter(linear.weight.detach()[:, index].clone())


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of units of `size` rows each (heads → rows of a projection)."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def resized(model: nn.Module, layers: list[int] | None = None, **sizes: list[int]) -> nn.Module:
    """The model rebuilt at its new sizes: `sizes` per-layer lists of num_heads, num_kv_heads,
    intermediate_size (of the kept layers), `layers` the kept layers; weights reassigned, not copied.
    A size equal in every layer becomes the config's own field (Hugging Face's shape)."""
    from llmctl.core.model.build import build_model

    cfg = model.cfg
    layers = list(range(cfg.num_layers)) if layers is None else layers
    fields = {}
    for key, field in PER_LAYER.items():
        values = sizes.get(field) or [getattr(cfg.layer(i), field) for i in layers]
        uniform = len(set(values)) == 1
        fields[field], fields[key] = (values[0], None) if uniform else (getattr(cfg, field), values)
    new_cfg = dataclasses.replace(cfg, num_layers=len(layers), **fields)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(index) not in layers:
                continue
            name = f"model.layers.{layers.index(int(index))}.{rest}"
        state[name] = tensor
    new = build_model(new_cfg, device="meta")
    new.load_state_dict(state, strict=True, assign=True)
    new.tie_weights()
    return new.eval()


@PRUNERS.register("heads")
class Heads(Structured):
    """Attention heads: whole KV groups (`unit=groups`) or query heads within each group."""

    def check(self) -> None:
        super().check()
        if self.settings.unit == "queries" and not self.settings.uniform:
            raise UsageError("unit=queries removes the same share of every group: it needs uniform=true")

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if model.cfg.position == "alibi":
            raise UsageError("heads pruning of an ALiBi model is not supported (its slopes follow the head index)")

    @torch.no_grad()
    def prune(self, model: nn.Module, tokens: torch.Tensor | None, report: Reporter = SILENT) -> nn.Module:
        energy: list[torch.Tensor] = []  # per layer: [heads]

        def visit(i: int, block: nn.Module, inputs: torch.Tensor, ctx) -> None:
            attn = block.self_attn
            grams = torch.zeros(attn.num_heads, attn.head_dim, attn.head_dim, device=inputs.device)

            def add(path: str, x: torch.Tensor) -> None:
                if path == "o_proj":
                    heads = x.reshape(-1, attn.num_heads, attn.head_dim).float()
                    grams.add_(torch.einsum("nhd,nhe->hde", heads, heads))

            with capture_inputs(attn, add):
                block(inputs, ctx)
            w = attn.o_proj.weight.float().view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)  # [H, out, D]
            energy.append(((w @ grams) * w).sum((1, 2)).cpu())

        for_each_block(model, tokens, visit, report, description="score heads")
        heads, kv_heads = [], []
        if self.settings.unit == "queries":
            kept = []
            for i, e in enumerate(energy):
                kv = model.cfg.layer(i).num_kv_heads
                per_group = e.view(kv, -1)
                n = per_group.shape[1] - self.removed(per_group.shape[1])
                inside = per_group.topk(n, dim=1).indices.sort(dim=1).values
                kept.append((inside + torch.arange(kv)[:, None] * per_group.shape[1]).flatten())
                heads.append(kv * n)
                kv_heads.append(kv)
            groups = [torch.arange(kv) for kv in kv_heads]
        else:
            group_energy = [e.view(model.cfg.layer(i).num_kv_heads, -1).sum(1) for i, e in enumerate(energy)]
            groups = self.keep(group_energy)
            kept = []
            for i, g in enumerate(groups):
                per_group = model.cfg.layer(i).num_heads // model.cfg.layer(i).num_kv_heads
                kept.append(_expand(g, per_group))
                heads.append(len(g) * per_group)
                kv_heads.append(len(g))
        for block, q, g in zip(model.model.layers, kept, groups):
            attn = block.self_attn
            d = attn.head_dim
            _rows(attn.q_proj, _expand(q, d))
            _rows(attn.k_proj, _expand(g, d))
            _rows(attn.v_proj, _expand(g, d))
            _columns(attn.o_proj, _expand(q, d))
        self.summary = {"heads": heads, "kv_heads": kv_heads}
        return resized(model, num_heads=heads, num_kv_heads=kv_heads)


@PRUNERS.register("channels")
class Channels(Structured):
    """MLP intermediate channels."""

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if model.cfg.num_experts:
            raise UsageError("channels pruning of a mixture-of-experts model is not supported")

    @torch.no_grad()
    def prune(self, model: nn.Module, tokens: torch.Tensor | None, report: Reporter = SILENT) -> nn.Module:
        energy: list[torch.Tensor] = []

        def visit(i: int, block: nn.Module, inputs: torch.Tensor, ctx) -> None:
            down = block.mlp.down_proj
            sq = torch.zeros(down.in_features, device=inputs.device)

            def add(path: str, x: torch.Tensor) -> None:
                if path == "down_proj":
                    sq.add_(x.reshape(-1, x.shape[-1]).float().square().sum(0))

            with capture_inputs(block.mlp, add):
                block(inputs, ctx)
            energy.append((sq * down.weight.float().square().sum(0)).cpu())

        for_each_block(model, tokens, visit, report, description="score channels")
        kept = self.keep(energy)
        for block, index in zip(model.model.layers, kept):
            mlp = block.mlp
            for name in ("gate_proj", "up_proj"):
                if hasattr(mlp, name):
                    _rows(getattr(mlp, name), index)
            _columns(mlp.down_proj, index)
        sizes = [len(k) for k in kept]
        self.summary = {"intermediate_sizes": sizes}
        return resized(model, intermediate_size=sizes)


@PRUNERS.register("layers")
class Layers(Structured):
    """Whole blocks with the lowest block influence (ShortGPT's angular distance)."""

    @torch.no_grad()
    def prune(self, model: nn.Module, tokens: torch.Tensor | None, report: Reporter = SILENT) -> nn.Module:
        influence: list[float] = []
        previous: list[torch.Tensor] = []

        def distance(a: torch.Tensor, b: torch.Tensor) -> float:
            return float(1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())

        def visit(i: int, block: nn.Module, inputs: torch.Tensor, ctx) -> None:
            if previous:
                influence.append(distance(previous.pop(), inputs))
            previous.append(inputs)

        last = for_each_block(model, tokens, visit, report, description="score layers")
        influence.append(distance(previous.pop(), last))
        n = model.cfg.num_layers
        scores = torch.tensor(influence)
        keep = scores.topk(n - self.removed(n)).indices.sort().values.tolist()
        self.summary = {"block_influence": [round(b, 6) for b in influence],
                        "removed_layers": [i for i in range(n) if i not in keep]}
        return resized(model, layers=keep)
