"""The `grpo` objective: Group Relative Policy Optimization with verifiable rewards.

    llmctl finetune BASE --method grpo adapter=lora --data prompts.jsonl \\
        objective_args.verifiers.number={} objective_args.num_generations=8 -o OUT

Each step takes `batch_size` prompts (records with `prompt` and what the verifiers read) and
samples `num_generations` completions of each with generate's core, seeded by (seed, step):
batch i is a pure function of (seed, i) and the weights, so resume is exact. Verifiers score
them (`verifiers.py`); rewards are normalised within each prompt's group into advantages; the
loss is TRL's clipped surrogate (`epsilon`, `epsilon_high`) plus `beta` × the k3 KL estimate to
the reference (the base with the adapter switched off, or a frozen copy for `full`; none at
beta 0), aggregated per `loss_type` exactly as TRL's GRPOTrainer does. Log-probabilities are
taken at the sampling temperature, as TRL does. One policy update per generation
(`num_iterations=1`: the ratio is 1 but carries the gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from llmctl.core.train.objectives import OBJECTIVES, Batch
from llmctl.core.train.sft import SFT, SFTBatches
from llmctl.errors import ConfigError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GRPOConfig:
    """`objective_args` of grpo (TRL's GRPOConfig names and defaults where they exist)."""

    verifiers: dict = field(default_factory=lambda: {"exact_match": {}})  # name: settings (+ weight)
    num_generations: int = 8  # completions per prompt (the group)
    max_completion_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings besides EOS
    beta: float = 0.0  # KL penalty; 0: no reference model
    epsilon: float = 0.2  # clipping: ratio within [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # default: epsilon (DAPO: 0.28)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False  # no loss on completions cut at max_completion_length
    num_iterations: int = 1  # μ: updates per generation (1 only)


def settings(plan) -> GRPOConfig:
    from llmctl.config import build

    return build(GRPOConfig, plan.config.objective_args, prefix="objective_args.")


# -- the maths (TRL's GRPOTrainer) -------------------------------------------------------------

def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (trl.trainer.utils.nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    variance = variance * count / (count - 1)
    return torch.sqrt(variance if dim is None else variance.squeeze(dim)).reshape(() if dim is None else -1)


def advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, whether each reward's std is zero) of rewards [N] in consecutive groups;
    a NaN reward (no verifier had an opinion) is left out of its group's baseline and gets 0."""
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = nanstd(groups, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, adv: torch.Tensor,
              mask: torch.Tensor, *, beta: float, epsilon_low: float, epsilon_high: float, loss_type: str,
              max_completion_length: int, num_items: float | None = None) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) of per-token log-probs [B, T] under the policy, the sampling policy and the
    reference, advantages [B] and the completion mask [B, T]; `num_items` (dapo): the completion
    tokens the loss is normalised by (default: those of this batch)."""
    mask = mask.to(logps.dtype)
    adv = adv[:, None]
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    metrics = {}
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        normalizer = torch.as_tensor(mask.sum() if num_items is None else num_items, dtype=logps.dtype)
        loss = (per_token * mask).sum() / normalizer.clamp(min=1.0)
    else:
        raise ConfigError(f"objective_args.loss_type: {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")
    low = (coef_1 < 1 - epsilon_low) & (adv < 0)
    high = (coef_1 > 1 + epsilon_high) & (adv > 0)
    metrics.update({"clip_ratio/low_mean": _masked_mean(low.float(), mask),
                    "clip_ratio/high_mean": _masked_mean(high.float(), mask),
                    "clip_ratio/region_mean": _masked_mean((low | high).float(), mask)})
    return loss, metrics


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# -- the objective ---------------------------------------------------------------------------

@OBJECTIVES.register("grpo")
class GRPO(SFT):
    """Sample groups, score them with verifiers, push up the better completions of each group."""

    takes_args = True

    @classmethod
    def resolve(cls, plan) -> None:
        from llmctl.core.rl.verifiers import build_verifiers

        s = settings(plan)
        checks = [(s.num_generations >= 2, "num_generations must be >= 2 (advantages compare a group)"),
                  (s.max_completion_length >= 1, "max_completion_length must be >= 1"),
                  (s.temperature > 0, "temperature must be > 0 (GRPO samples)"),
                  (s.epsilon >= 0 and (s.epsilon_high is None or s.epsilon_high >= 0), "epsilon must be >= 0"),
                  (s.beta >= 0, "beta must be >= 0"),
                  (s.num_iterations == 1, "num_iterations: only 1 is supported (one update per generation)")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"objective_args.{message}")
        if plan.config.chat_template:
            raise ConfigError("config key 'chat_template': grpo renders chat prompts with the tokenizer's template")
        if plan.config.distributed.strategy == "fsdp":
            raise ConfigError("config key 'distributed.strategy': grpo samples from the unsharded policy; use ddp")
        if s.beta and plan.config.adapter_method == "full" and plan.init_from is None:
            raise ConfigError("objective_args.beta > 0 with full finetuning needs a base checkpoint as the reference")
        build_verifiers(s.verifiers)  # settings checked before anything is written
        super().resolve(plan)  # SFT's checks (causal model, adapter method), then `encode`

    @classmethod
    def encode(cls, plan) -> dict:
        """The prompt records (no rows: completions are sampled during training)."""
        from llmctl.core.data.rl import read_prompts

        records = read_prompts(plan.text_files)
        plan.report.info(f"GRPO data: {len(records)} prompts, {settings(plan).num_generations} completions each, "
                         f"{plan.config.batch_size} prompts per micro-batch")
        return {"records": records}

    def __init__(self, plan, device):
        from llmctl.core.rl.verifiers import build_verifiers

        super().__init__(plan, device)
        self.settings = settings(plan)
        self.records = plan.prepared["records"]
        self.verifiers = build_verifiers(self.settings.verifiers)
        self.reference = None
        if self.settings.beta and self.cfg.adapter_method == "full":
            from llmctl.core.model.io import load_model

            self.reference = load_model(plan.init_from, device=device, dtype=torch.float32)[0]

    def data(self, d):
        return SFTBatches(torch.arange(len(self.records)), None, batch_size=self.cfg.batch_size, rank=d.rank,
                          world=d.world, seed=self.cfg.seed, eval_batches=0)

    def batch(self, rows, index, generator=None) -> Batch:
        return rows, rows, {"index": index}  # record indices; the loss samples from them

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.policy = model  # samples the completions; its head makes log-probs

    def companions(self) -> dict[str, nn.Module]:
        return {"reference": self.reference} if self.reference is not None else {}

    def loss(self, forward, inputs, labels, extra):
        s = self.settings
        G = s.num_generations
        records = [self.records[i] for i in inputs.tolist() for _ in range(G)]  # each prompt's group together
        rollout = self.rollout([r["prompt"] for r in records], extra["index"])
        rewards, per_verifier = self.rewards(rollout, records)
        adv, std_zero = advantages(rewards, G, s.scale_rewards)
        mask = rollout.mask
        if s.mask_truncated_completions:
            mask = mask * ~rollout.truncated[:, None]
        logps = self.logprobs(forward, self.policy.head, rollout)
        ref = None
        if s.beta:
            with torch.no_grad():
                if self.reference is not None:
                    ref = self.logprobs(self.reference, self.reference.head, rollout)
                else:
                    from llmctl.core.adapters import adapters_disabled

                    with adapters_disabled(self.policy):
                        ref = self.logprobs(forward, self.policy.head, rollout)
        eps_high = s.epsilon if s.epsilon_high is None else s.epsilon_high
        loss, metrics = grpo_loss(logps, logps.detach(), ref, adv.to(logps.device), mask, beta=s.beta,
                                  epsilon_low=s.epsilon, epsilon_high=eps_high, loss_type=s.loss_type,
                                  max_completion_length=s.max_completion_length)
        lengths = rollout.mask.sum(-1).float()
        self.record(reward=torch.nanmean(rewards), reward_std=nanstd(rewards),
                    frac_reward_zero_std=std_zero.float().mean(),
                    **{f"rewards/{name}/mean": torch.nanmean(v) for name, v in per_verifier.items()},
                    **{"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                       "completions/max_length": lengths.max(),
                       "completions/clipped_ratio": rollout.truncated.float().mean()}, **metrics)
        return loss, loss.detach()

    # -- steps of `loss` ------------------------------------------------------------------------

    def rollout(self, prompts: list, index: int) -> "Rollout":
        """Sample a completion for each prompt (seeded by the run's seed and the batch index)."""
        from llmctl.core.generate import GenerationConfig, encode_prompt, generate

        s, tok = self.settings, self.plan.tokenizer
        gen = GenerationConfig(max_new_tokens=s.max_completion_length, temperature=s.temperature, top_p=s.top_p,
                               top_k=s.top_k, stop=list(s.stop), seed=self.cfg.seed * 1_000_003 + index,
                               batch_size=len(prompts))
        was_training = self.policy.training
        self.policy.eval()
        try:
            results = generate(self.policy, tok, prompts, gen)
        finally:
            self.policy.train(was_training)
        prompt_ids = [encode_prompt(tok, p) for p in prompts]
        return Rollout.build(prompt_ids, [r.tokens for r in results], [r.text for r in results],
                             [r.finish_reason == "length" for r in results], self.device,
                             pad_id=tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0))

    def rewards(self, rollout: "Rollout", records: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the verifiers' rewards [N] (NaN where none scored) and each verifier's."""
        from llmctl.core.rl.verifiers import score

        prompts = [r["prompt"] for r in records]
        values, _ = score(self.verifiers, prompts, rollout.texts, records)
        table = torch.tensor(values, dtype=torch.float32).reshape(len(records), len(self.verifiers))
        weights = torch.tensor([b.weight for b in self.verifiers], dtype=torch.float32)
        total = (table * weights).nansum(dim=1)
        total[torch.isnan(table).all(dim=1)] = torch.nan
        return total, {b.name: table[:, i] for i, b in enumerate(self.verifiers)}

    def logprobs(self, forward, head, rollout: "Rollout") -> torch.Tensor:
        """Log-probabilities [N, C] of the completion tokens at the sampling temperature, from a
        model's `forward` (final hidden states) and its `head`."""
        from llmctl.core.model.logprobs import token_logprobs

        features = forward(rollout.ids, skip_head=True).features
        rows = torch.arange(len(features), device=features.device)[:, None]
        wanted = features[rows, rollout.positions]  # the positions that predict each completion token
        temperature = self.settings.temperature
        logps, _ = token_logprobs(wanted, rollout.targets, lambda h: head(h) / temperature,
                                  vocab=self.plan.model_config.vocab_size)
        return logps.view_as(rollout.targets) * rollout.mask


@dataclass
class Rollout:
    """Sampled completions as tensors: rows of prompt + completion (right-padded)."""

    ids: torch.Tensor  # [N, T]
    positions: torch.Tensor  # [N, C]: where each completion token is predicted
    targets: torch.Tensor  # [N, C]: the completion tokens (padded)
    mask: torch.Tensor  # [N, C] float: 1 on completion tokens
    truncated: torch.Tensor  # [N] bool: cut at max_completion_length
    texts: list[str]

    @classmethod
    def build(cls, prompts: list[list[int]], completions: list[list[int]], texts: list[str], truncated: list[bool],
              device, pad_id: int) -> "Rollout":
        C = max(1, max(len(c) for c in completions))
        T = max(len(p) + len(c) for p, c in zip(prompts, completions))
        ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
        targets = torch.full((len(prompts), C), pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), C)
        starts = torch.tensor([len(p) - 1 for p in prompts])
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = 1
        positions = (starts[:, None] + torch.arange(C)).clamp(max=T - 1)
        return cls(ids.to(device), positions.to(device), targets.to(device), mask.to(device),
                   torch.tensor(truncated, device=device), texts)
