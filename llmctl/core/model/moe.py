"""Mixture of experts: a top-k softmax router over feed-forward experts (Mixtral, Qwen-MoE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.core.model.mlp import make_mlp


class MoE(nn.Module):
    """Routes each token to `experts_per_token` of `num_experts` FFNs, mixing by router weight.

    Module paths follow HF: `gate` is the router, `experts.E.{gate,up,down}_proj` the experts,
    and with shared_expert_intermediate_size > 0 `shared_expert` (every token, scaled by
    sigmoid(`shared_expert_gate`(x)), as in Qwen2-MoE).
    forward returns (output, load-balancing loss) where the loss is the Switch/Mixtral
    num_experts * Σ_e (fraction of routed slots to e) * (mean router probability of e).
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_experts, self.top_k, self.normalize = cfg.num_experts, cfg.experts_per_token, cfg.moe_normalize_topk
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(make_mlp(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = make_mlp(cfg, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(h).float(), dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(h.dtype)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):  # every expert runs (maybe on 0 tokens): DDP-safe
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(h[token]) * weights[token, slot, None])
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        routed = F.one_hot(chosen, self.num_experts).float().sum(1).mean(0)  # [E]
        aux = self.num_experts * (routed * probs.mean(0)).sum()
        return out.view(shape), aux
