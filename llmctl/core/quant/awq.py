"""AWQ (Lin et al., 2023): scale salient input channels up before rounding, fold the inverse
scale into the operation that produces those inputs, then search each group's clipping range.

For a set of linears sharing an input X (q/k/v after the attention norm, gate/up after the
feed-forward norm, o after v, down after up) the per-channel scale is
s = mean|x|^α / mean|ŵ|^(1−α) (ŵ: weights normalised per group), with α on a grid chosen to
minimise Σ‖X Wᵀ − (X/s) Q(W·s)ᵀ‖² over the set's outputs (AutoAWQ evaluates the whole
attention or MLP; the linears' outputs are what this measures). The producer is divided by s
(a norm's weight, or the output rows of v_proj / up_proj), so the float model is unchanged.
Clipping then shrinks each group's range by up to `max_shrink`, keeping the shrink with the
least output error per group (q and k are left unclipped, as AutoAWQ does).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llmctl.core.model.layerwise import capture_inputs
from llmctl.core.model.norm import LayerNorm, RMSNorm, pre_norm
from llmctl.core.quant.config import AWQConfig
from llmctl.core.quant.scheme import Scheme

SEARCH_ROWS = 4096  # input rows the scale search evaluates


def _groups(block: nn.Module, linears: list[str]) -> list[tuple[nn.Module | None, list[str]]]:
    """(producer to fold the inverse scale into, linears sharing its output); producer None: no scaling."""
    have = set(linears)
    pre = getattr(block, "place", None) is pre_norm
    scalable = lambda m: isinstance(m, (RMSNorm, LayerNorm)) and getattr(m, "weight", None) is not None  # noqa: E731
    get = lambda p: block.get_submodule(p) if p in have else None  # noqa: E731
    out = []
    attn = [p for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if p in have]
    if attn:
        out.append((block.input_layernorm if pre and scalable(block.input_layernorm) else None, attn))
    v, o = get("self_attn.v_proj"), get("self_attn.o_proj")
    if o is not None:
        out.append((v if isinstance(v, nn.Linear) and v.out_features == o.in_features else None, ["self_attn.o_proj"]))
    mlp = [p for p in ("mlp.gate_proj", "mlp.up_proj") if p in have]
    if mlp:
        norm = block.post_attention_layernorm
        out.append((norm if pre and scalable(norm) else None, mlp))
    up, down = get("mlp.up_proj"), get("mlp.down_proj")
    if down is not None:
        out.append((up if isinstance(up, nn.Linear) else None, ["mlp.down_proj"]))
    grouped = {p for _, ps in out for p in ps}
    return out + [(None, [p]) for p in linears if p not in grouped]  # MoE experts, other layouts


def _fold(producer: nn.Module, s: torch.Tensor) -> None:
    """Divide the producer's output channels by s."""
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
        if producer.bias is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
        return
    w = producer.weight
    offset = getattr(producer, "offset", 0.0)  # Gemma stores scale − 1
    w.copy_(((offset + w.float()) / s - offset).to(w.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], scheme: Scheme, cfg: AWQConfig,
                 x_mean: torch.Tensor) -> torch.Tensor | None:
    """The per-input-channel scale with the least output error, or None when α = 0 (no scaling) wins."""
    w = torch.cat(weights).float()
    width = scheme.width(w.shape[1])
    g = w.reshape(-1, width).abs()
    w_mean = (g / g.amax(1, keepdim=True).clamp(min=1e-8)).reshape(w.shape).mean(0)
    refs = [x @ wi.float().T for wi in weights]
    best, best_loss = None, float("inf")
    for r in range(cfg.grid):
        alpha = r / cfg.grid
        s = x_mean.pow(alpha) / w_mean.pow(1 - alpha) if cfg.duo_scaling else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = sum(((x / s) @ scheme.fake(wi.float() * s).T - ref).pow(2).sum().item()
                   for wi, ref in zip(weights, refs))
        if loss < best_loss:
            best, best_loss = (None if r == 0 else s), loss
    return best


def search_clip(x: torch.Tensor, w: torch.Tensor, scheme: Scheme, cfg: AWQConfig) -> torch.Tensor:
    """`w` [out, in] clamped per group to the range (shrunk by up to max_shrink) whose rounding
    gives the least error on the group's share of the output x Wᵀ."""
    out, cols = w.shape
    groups = scheme.groups(cols)
    xg = x.float().reshape(-1, groups, cols // groups)            # [n, G, k]
    wg = w.float().reshape(out, groups, -1)                        # [O, G, k]
    ref = torch.einsum("ngk,ogk->nog", xg, wg)
    top = wg.abs().amax(-1, keepdim=True)                          # [O, G, 1]
    best_err = torch.full((out, groups), float("inf"))
    best = top.clone()
    for i in range(int(cfg.max_shrink * cfg.clip_grid)):
        limit = top * (1 - i / cfg.clip_grid)
        clipped = torch.maximum(torch.minimum(wg, limit), -limit)
        q = scheme.fake(clipped.reshape(out, cols)).reshape(out, groups, -1)
        err = (torch.einsum("ngk,ogk->nog", xg, q) - ref).pow(2).mean(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), limit, best)
    return torch.maximum(torch.minimum(wg, best), -best).reshape(out, cols).to(w.dtype)


def awq_block(block: nn.Module, linears: list[str], forward: Callable[[], None], put, scheme: Scheme,
              cfg: AWQConfig) -> None:
    inputs: dict[str, list[torch.Tensor]] = {}
    with capture_inputs(block, lambda p, x: p in linears and inputs.setdefault(p, []).append(
            x.detach().reshape(-1, x.shape[-1]))):
        forward()
    xs = {p: torch.cat(v).float() for p, v in inputs.items()}
    g = torch.Generator().manual_seed(0)
    scaled: dict[str, torch.Tensor] = {}  # the inputs as the scaled weights see them
    for producer, group in _groups(block, [p for p in linears if p in xs]):
        x = xs[group[0]]
        rows = x[torch.randperm(len(x), generator=g)[:SEARCH_ROWS]]
        s = None
        if producer is not None:
            weights = [block.get_submodule(p).weight for p in group]
            s = search_scale(rows, weights, scheme, cfg, x.abs().mean(0))
        if s is not None:
            _fold(producer, s)
            for p in group:
                block.get_submodule(p).weight.mul_(s.to(block.get_submodule(p).weight.dtype))
        for p in group:
            scaled[p] = rows if s is None else rows / s
    for p, x in scaled.items():
        linear = block.get_submodule(p)
        w = linear.weight
        if cfg.clip and not p.endswith(("q_proj", "k_proj")):
            w = search_clip(x[:cfg.clip_tokens], w, scheme, cfg)
        put(p, scheme.nearest(w, linear.weight.dtype), 2 * x.T @ x / len(x))
