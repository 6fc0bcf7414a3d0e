"""AWQ (Lin et al., 2023): scale salient input channels up before rounding, fold the inverse
scale into the operation that produces those inputs, then search each group's clipping range.

For a set of linears sharing an input X (q/k/v after the attention norm, gate/up after the
feed-forward norm, o after v, down after a gated MLP's up) the per-channel scale is
s = mean|x|^α / (mean|ŵ|^(1−α) + 1e-4) (ŵ: weights normalised per group), normalised so that
max(s)·min(s) = 1, with α ∈ {0, 1/grid, …} (`identity`: s = 1 too, as llm-compressor tries) chosen, as
AutoAWQ and llm-compressor do, by the mean
squared error at the output of the module the set feeds — the attention for q/k/v, the MLP for
gate/up, the whole block for a norm that feeds both (Phi-2), the linear itself for o and down — run
on the block's calibration inputs with every
linear of the set replaced by Q(W·s)/s (the rest of the block in float). The producer is divided
by s (a norm's weight, or the output rows of v_proj / up_proj), so the float model is unchanged.
Clipping then shrinks each group's range by up to `max_shrink`, keeping the shrink with the
least error on the group's share of the linear's output (q and k are left unclipped, as AutoAWQ does).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from llmctl.core.model.layerwise import capture_inputs
from llmctl.core.model.norm import LayerNorm, RMSNorm, pre_norm, sandwich_norm
from llmctl.core.quant.config import AWQConfig
from llmctl.core.quant.scheme import Scheme

SAMPLE_ROWS = 4096  # input rows (sampled) the clipping search and the error report use


def _groups(block: nn.Module, linears: list[str]) -> list[tuple[nn.Module | None, list[str]]]:
    """(producer to fold the inverse scale into, linears sharing its output); producer None: no scaling.
    One norm feeding both sublayers (Phi-2's parallel block) makes q, k, v and the MLP's input
    linears one group, judged at the block's output, as AutoAWQ's Phi does."""
    have = set(linears)
    pre = getattr(block, "place", None) in (pre_norm, sandwich_norm)  # a norm right before the group's linears
    scalable = lambda m: isinstance(m, (RMSNorm, LayerNorm)) and getattr(m, "weight", None) is not None  # noqa: E731
    get = lambda p: block.get_submodule(p) if p in have else None  # noqa: E731
    producer = lambda norm: norm if pre and scalable(norm) else None  # noqa: E731
    attn = [p for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if p in have]
    mlp = [p for p in ("mlp.gate_proj", "mlp.up_proj") if p in have]
    norm = getattr(block, "post_attention_layernorm", None)  # None: the input norm feeds the MLP too
    if norm is None:
        attn, mlp = attn + mlp, []
    out = [(producer(block.input_layernorm), attn)] if attn else []  # AutoAWQ's order: qkv, o, gate/up, down
    v, o = get("self_attn.v_proj"), get("self_attn.o_proj")
    if o is not None:
        out.append((v if isinstance(v, nn.Linear) and v.out_features == o.in_features else None, ["self_attn.o_proj"]))
    if mlp:
        out.append((producer(norm), mlp))
    up, down = get("mlp.up_proj"), get("mlp.down_proj")
    if down is not None:  # up's output reaches down linearly only through a gate's product
        gated = isinstance(up, nn.Linear) and getattr(block.mlp, "gated", False)
        out.append((up if gated else None, ["mlp.down_proj"]))
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


def scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, duo: bool = True) -> torch.Tensor:
    """s = mean|x|^α / (mean|ŵ|^(1−α) + 1e-4) (duo) or mean|x|^α, normalised to max·min = 1."""
    s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if duo else x_mean.pow(alpha)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(s.isfinite(), s, torch.ones_like(s))


@contextmanager
def _swapped(linears: list[nn.Module], weights: list[torch.Tensor]) -> Iterator[None]:
    """The linears hold `weights` inside the block, their own weights again after."""
    saved = [m.weight.data for m in linears]
    try:
        for m, w in zip(linears, weights):
            m.weight.data = w.to(m.weight.dtype)
        yield
    finally:
        for m, w in zip(linears, saved):
            m.weight.data = w


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def module_error(module: nn.Module, calls: list[tuple], linears: list[nn.Module], weights: list[torch.Tensor]) -> float:
    """Mean squared difference of `module`'s output over its recorded (args, kwargs, output)
    calls when `linears` hold `weights` instead of their own."""
    total, count = 0.0, 0
    with _swapped(linears, weights):
        for args, kwargs, ref in calls:
            total += (_output(module(*args, **kwargs)).float() - ref).pow(2).sum().item()
            count += ref.numel()
    return total / max(count, 1)


def search_scale(module: nn.Module, calls: list[tuple], linears: list[nn.Module], x_mean: torch.Tensor,
                 scheme: Scheme, cfg: AWQConfig) -> torch.Tensor | None:
    """The per-input-channel scale whose rounded weights Q(W·s)/s, all of `linears` at once, give
    the least error at the output of `module` (the attention, the MLP, or the linear itself),
    or None when s = 1 wins (α = 0 without duo scaling; with `identity`, s = 1 is tried beside the
    grid, as llm-compressor does). With duo scaling, α = 0 gives s ∝ 1/mean|ŵ|, which is applied when
    it wins, as AutoAWQ and llm-compressor do."""
    weights = [m.weight.float() for m in linears]
    w = torch.cat(weights)
    g = w.reshape(-1, scheme.width(w.shape[1])).abs()
    w_mean = (g / (g.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    candidates = [scales(x_mean, w_mean, r / cfg.grid, cfg.duo_scaling) for r in range(cfg.grid)]
    if cfg.identity and cfg.duo_scaling:  # (without duo, α = 0 is s = 1 already)
        candidates.insert(0, torch.ones_like(x_mean))
    best, best_loss = None, float("inf")
    for s in candidates:
        loss = module_error(module, calls, linears, [scheme.fake(wi * s) / s for wi in weights])
        if loss < best_loss:
            best, best_loss = (None if bool((s == 1).all()) else s), loss
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


def _parent(block: nn.Module, group: list[str]) -> nn.Module:
    """The module whose output a group's error is measured at: the linears' lowest common parent
    (self_attn for q/k/v, mlp for gate/up), the linear itself when it is alone."""
    if len(group) == 1:
        return block.get_submodule(group[0])
    return block.get_submodule(os.path.commonprefix([p.rsplit(".", 1)[0] + "." for p in group]).rstrip("."))


def awq_block(block: nn.Module, linears: list[str], forward: Callable[[], None], put, scheme: Scheme,
              cfg: AWQConfig) -> None:
    groups = _groups(block, linears)
    parents = {i: _parent(block, group) for i, (producer, group) in enumerate(groups) if producer is not None}
    calls: dict[nn.Module, list[tuple]] = {m: [] for m in parents.values()}  # (args, kwargs, float output)
    inputs: dict[str, list[torch.Tensor]] = {}

    def record(module, args, kwargs, out):
        calls[module].append((args, kwargs, _output(out).detach().float()))

    with capture_inputs(block, lambda p, x: p in linears and x.numel() and inputs.setdefault(p, []).append(
            x.detach().reshape(-1, x.shape[-1]))):  # (an unrouted expert's empty calls: none)
        hooks = [m.register_forward_hook(record, with_kwargs=True) for m in calls]
        try:
            forward()
        finally:
            for h in hooks:
                h.remove()
    g = torch.Generator().manual_seed(0)
    scaled: dict[str, torch.Tensor] = {}  # sampled inputs as the scaled weights see them
    for i, (producer, group) in enumerate(groups):
        group = [p for p in group if p in inputs]  # MoE experts no token reached
        if not group:
            continue
        x = torch.cat(inputs[group[0]]).float()
        rows = x[torch.randperm(len(x), generator=g)[:SAMPLE_ROWS]]
        s = None
        if producer is not None:
            modules = [block.get_submodule(p) for p in group]
            s = search_scale(parents[i], calls[parents[i]], modules, x.abs().mean(0), scheme, cfg)
        if s is not None:
            _fold(producer, s)
            for m in modules:
                m.weight.mul_(s.to(m.weight.dtype))
        for p in group:
            scaled[p] = rows if s is None else rows / s
    for p, x in scaled.items():
        linear = block.get_submodule(p)
        w = linear.weight
        if cfg.clip and not p.endswith(("q_proj", "k_proj")):
            w = search_clip(x[:cfg.clip_tokens], w, scheme, cfg)
        put(p, scheme.nearest(w, linear.weight.dtype), 2 * x.T @ x / len(x))
