"""The `grpo` objective: Group Relative Policy Optimization with verifiable rewards.

    llmctl finetune BASE --method grpo adapter=lora --data prompts.jsonl \\
        objective_args.verifiers.number={} objective_args.num_generations=8 -o OUT

Each micro-batch takes `batch_size` prompts (records with `prompt` and what the verifiers read);
a generation round samples `num_generations` completions of each prompt of an optimizer step's
`grad_accum` micro-batches in one call of generate's core, seeded by (seed, round): a round is a
pure function of (seed, round) and the weights. Verifiers score them (`verifiers.py`); rewards
are normalised within each prompt's group into advantages; the loss is TRL's clipped surrogate
(`epsilon`, `epsilon_high`) plus `beta` × the k3 KL estimate to the reference (the base with
the adapter switched off, or a frozen copy for `full`; none at beta 0), aggregated per
`loss_type` exactly as TRL's GRPOTrainer does — `dapo` over the completion tokens of the whole
step, every micro-batch and process (TRL's `num_items_in_batch`). Log-probabilities are taken
at the sampling temperature, as TRL does.

A round serves `num_iterations` (μ) optimizer steps, as TRL's buffered generation batch: the
old log-probs are the policy's at sampling time, so the ratio departs from 1 from the second
update on and clipping bites (μ = 1: the detached current log-probs, ratio 1). The round —
completions, advantages, old and reference log-probs — is kept in the training state
(`state`), so a run resumed between its updates continues it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from llmctl.core.train.objectives import OBJECTIVES, Batch, Objective
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
    num_iterations: int = 1  # μ: optimizer steps per generation round (TRL's)


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
    return torch.sqrt(variance).reshape(() if dim is None else -1)


def batch_nanstd(rewards: torch.Tensor, d, device) -> torch.Tensor:
    """`nanstd` of the rewards of every rank together (TRL gathers the whole batch's rewards
    before scaling by the batch's std): from the ranks' summed counts, sums and squares."""
    from llmctl.core.train.distributed import all_reduce_sum

    known = rewards[~torch.isnan(rewards)].double()
    n, total, squares = all_reduce_sum([float(known.numel()), float(known.sum()), float((known * known).sum())],
                                       d, device)
    variance = (squares - total * total / n) / (n - 1) if n > 1 else 0.0
    return torch.tensor(max(variance, 0.0) ** 0.5, dtype=rewards.dtype)


def advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
               batch_std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, whether each reward's std is zero) of rewards [N] in consecutive groups;
    a NaN reward (no verifier had an opinion) is left out of its group's baseline and gets 0.
    `batch_std`: the std `scale_rewards="batch"` divides by (default: these rewards')."""
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch" and batch_std is not None:
        std = batch_std.expand_as(rewards)
    elif scale_rewards == "batch":
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
    targets = Objective.targets  # `step_batches` normalises the loss over the step itself

    @classmethod
    def resolve(cls, plan) -> None:
        from llmctl.core.rl.verifiers import build_verifiers

        s = settings(plan)
        checks = [(s.num_generations >= 2, "num_generations must be >= 2 (advantages compare a group)"),
                  (s.max_completion_length >= 1, "max_completion_length must be >= 1"),
                  (s.temperature > 0, "temperature must be > 0 (GRPO samples)"),
                  (s.epsilon >= 0 and (s.epsilon_high is None or s.epsilon_high >= 0), "epsilon must be >= 0"),
                  (s.beta >= 0, "beta must be >= 0"),
                  (s.num_iterations >= 1, "num_iterations must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"objective_args.{message}")
        if plan.config.chat_template:
            raise ConfigError("config key 'chat_template': grpo renders chat prompts with the tokenizer's template")
        if s.beta and plan.config.adapter_method == "full" and plan.init_from is None:
            raise ConfigError("objective_args.beta > 0 with full finetuning needs a base checkpoint as the reference")
        for bound in build_verifiers(s.verifiers):  # settings checked before anything is written
            for message in getattr(bound.verifier, "warnings", list)():
                plan.report.warn(f"verifier {bound.name}: {message}")
            if getattr(bound.verifier, "path", ""):  # a reward model: a parent (lineage; --force never replaces it)
                plan.parents.append(bound.verifier.path)
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
        self.round: Round | None = None  # the generation the current steps train on

    def data(self, d):
        self.dist = d  # dapo counts the step's tokens over every process
        return Rounds(torch.arange(len(self.records)), None, batch_size=self.cfg.batch_size, rank=d.rank,
                      world=d.world, seed=self.cfg.seed, eval_batches=0,
                      accum=self.cfg.grad_accum, iterations=self.settings.num_iterations)

    def batch(self, rows, index, generator=None) -> Batch:
        return rows, rows, {"index": index}  # record indices; `step_batches` samples from them

    def step_batches(self, batches: list[Batch]) -> list[Batch]:
        """A new generation round every `num_iterations` steps: the step's micro-batches sampled and scored."""
        number = batches[0][2]["index"] // (self.cfg.grad_accum * self.settings.num_iterations)
        if self.round is None or self.round.number != number:
            self.round = self.generate([b[0] for b in batches], number)
        return batches

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.policy = model  # samples the completions; its head makes log-probs

    def companions(self) -> dict[str, nn.Module]:
        return {"reference": self.reference} if self.reference is not None else {}

    def loss(self, forward, inputs, labels, extra):
        s = self.settings
        part = self.round.parts[extra["index"] % self.cfg.grad_accum]
        logps = self.logprobs(forward, self.policy.head, part.rollout)
        old = part.old if part.old is not None else logps.detach()
        eps_high = s.epsilon if s.epsilon_high is None else s.epsilon_high
        loss, metrics = grpo_loss(logps, old, part.ref, part.advantages, part.mask, beta=s.beta,
                                  epsilon_low=s.epsilon, epsilon_high=eps_high, loss_type=s.loss_type,
                                  max_completion_length=s.max_completion_length, num_items=self.round.num_items)
        self.record(**metrics)
        return loss, loss.detach()

    # -- a generation round ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_rows: list[torch.Tensor], number: int) -> "Round":
        """Round `number`: every micro-batch's groups sampled in one call, scored, their advantages,
        reference log-probs (beta > 0) and old log-probs (μ > 1); metrics recorded."""
        s, G = self.settings, self.settings.num_generations
        records = [[self.records[i] for i in rows.tolist() for _ in range(G)] for rows in prompt_rows]
        everything = [r for part in records for r in part]  # each prompt's group together
        rollout = self.rollout([r["prompt"] for r in everything], number)
        rewards, per_verifier = self.rewards(rollout, everything)
        batch_std = batch_nanstd(rewards, self.dist, self.device) \
            if s.scale_rewards == "batch" and self.dist.enabled else None  # the global batch's, under DDP/FSDP
        adv, std_zero = advantages(rewards, G, s.scale_rewards, batch_std)
        parts = []
        for i, rows in enumerate(rollout.split(len(records))):
            mask = rows.mask * ~rows.truncated[:, None] if s.mask_truncated_completions else rows.mask
            parts.append(Part(rows, adv.chunk(len(records))[i].to(self.device), mask, self._reference(rows),
                              self.logprobs(self.policy, self.policy.head, rows) if s.num_iterations > 1 else None))
        num_items = None
        if s.loss_type == "dapo":  # completion tokens per micro-batch and process, of the whole step
            from llmctl.core.train.distributed import all_reduce_sum

            [total] = all_reduce_sum([float(sum(p.mask.sum() for p in parts))], self.dist, self.device)
            num_items = total / (len(parts) * self.dist.world)
        lengths = rollout.mask.sum(-1).float()
        self.record(reward=torch.nanmean(rewards), reward_std=nanstd(rewards),
                    frac_reward_zero_std=std_zero.float().mean(),
                    **{f"rewards/{name}/mean": torch.nanmean(v) for name, v in per_verifier.items()},
                    **{"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                       "completions/max_length": lengths.max(),
                       "completions/clipped_ratio": rollout.truncated.float().mean()})
        return Round(number, parts, num_items)

    def _reference(self, rollout: "Rollout") -> torch.Tensor | None:
        """The reference's log-probs (None at beta 0): a frozen copy, or the policy with its adapter off."""
        if not self.settings.beta:
            return None
        if self.reference is not None:
            return self.logprobs(self.reference, self.reference.head, rollout)
        from llmctl.core.adapters import adapters_disabled

        with adapters_disabled(self.policy):
            return self.logprobs(self.policy, self.policy.head, rollout)

    def state(self) -> dict[str, torch.Tensor]:
        """The round, when later steps reuse it (μ > 1)."""
        return self.round.state() if self.round is not None and self.settings.num_iterations > 1 else {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.round = Round.from_state(tensors, self.device) if tensors else None

    def rollout(self, prompts: list, index: int) -> "Rollout":
        """Sample a completion for each prompt (seeded by the run's seed and the round)."""
        from llmctl.core.generate import GenerationConfig, encode_prompt, generate
        from llmctl.core.train.distributed import gathered

        s, tok = self.settings, self.plan.tokenizer
        gen = GenerationConfig(max_new_tokens=s.max_completion_length, temperature=s.temperature, top_p=s.top_p,
                               top_k=s.top_k, stop=list(s.stop), seed=self.cfg.seed * 1_000_003 + index,
                               batch_size=len(prompts))
        was_training = self.policy.training
        self.policy.eval()
        try:
            with gathered(self.policy):  # FSDP: the whole policy on every rank while it samples
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


class Rounds(SFTBatches):
    """Prompt batches by generation round: step s's `accum` micro-batches are round s // μ's."""

    def __init__(self, *args, accum: int, iterations: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.accum, self.iterations = accum, iterations

    def batch(self, index: int) -> torch.Tensor:
        return super().batch(index // (self.accum * self.iterations) * self.accum + index % self.accum)


@dataclass
class Part:
    """One micro-batch of a round: what its loss needs besides the policy's log-probs."""

    rollout: "Rollout"
    advantages: torch.Tensor  # [N]
    mask: torch.Tensor  # [N, C]: the tokens the loss counts
    ref: torch.Tensor | None  # [N, C] reference log-probs (beta > 0)
    old: torch.Tensor | None  # [N, C] the policy's at sampling time (μ > 1)


@dataclass
class Round:
    """A generation round: its number, micro-batches and dapo's normaliser."""

    number: int
    parts: list[Part]
    num_items: float | None

    TENSORS = ("ids", "positions", "targets", "mask", "truncated", "advantages", "loss_mask", "ref", "old")

    def state(self) -> dict[str, torch.Tensor]:
        out = {"number": torch.tensor([self.number]),
               **({"num_items": torch.tensor([self.num_items], dtype=torch.float64)} if self.num_items else {})}
        for i, p in enumerate(self.parts):
            r = p.rollout
            values = (r.ids, r.positions, r.targets, r.mask, r.truncated.long(), p.advantages, p.mask, p.ref, p.old)
            out.update({f"{i}.{k}": v for k, v in zip(self.TENSORS, values) if v is not None})
        return out

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor], device) -> "Round":
        parts = []
        for i in range(len({k.split(".")[0] for k in t if "." in k})):
            v = {k: t[f"{i}.{k}"].to(device) if f"{i}.{k}" in t else None for k in cls.TENSORS}
            rollout = Rollout(v["ids"], v["positions"], v["targets"], v["mask"], v["truncated"].bool(), [])
            parts.append(Part(rollout, v["advantages"], v["loss_mask"], v["ref"], v["old"]))
        return cls(int(t["number"]), parts, float(t["num_items"]) if "num_items" in t else None)


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

    def split(self, n: int) -> list["Rollout"]:
        """`n` equal parts of the rows, each cut to its own longest row and completion."""
        size = len(self.ids) // n
        parts = []
        for i in range(0, len(self.ids), size):
            rows = slice(i, i + size)
            C = max(1, int(self.mask[rows].sum(-1).max()))
            T = int(self.positions[rows, :C].amax()) + 1  # the inputs that predict the completions
            parts.append(Rollout(self.ids[rows, :T], self.positions[rows, :C], self.targets[rows, :C],
                                 self.mask[rows, :C], self.truncated[rows], self.texts[rows]))
        return parts
