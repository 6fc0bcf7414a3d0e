"""Preference losses on sequence log-probabilities, with TRL's parameters and names.

    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)

`pc`/`pr` are the policy's log-probabilities of the chosen/rejected completions [B]
(summed over their tokens; IPO, SimPO and ORPO take the per-token mean), `rc`/`rr` the
reference model's. Each function returns per-example losses and the implicit rewards TRL
logs; the objectives (`preference.py`) average them. Tested equal to TRL's trainers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def dpo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """DPO: `sigmoid` (conservative with `label_smoothing` > 0: cDPO) or `robust` (rDPO, unbiased
    under labels flipped with probability `label_smoothing`)."""
    logits = beta * ((pc - pr) - (rc - rr))
    clean, flipped = -F.logsigmoid(logits) * (1 - label_smoothing), -F.logsigmoid(-logits) * label_smoothing
    losses = clean + flipped if loss_type == "sigmoid" else (clean - flipped) / (1 - 2 * label_smoothing)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def ipo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """IPO: the squared distance of the log-ratio margin from 1 / (2 beta) (mean log-probs)."""
    logits = (pc - pr) - (rc - rr)
    return (logits - 1 / (2 * beta)) ** 2, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def simpo_loss(pc: Tensor, pr: Tensor, *, beta: float, gamma: float, label_smoothing: float = 0.0
               ) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (TRL's CPOTrainer, loss_type=simpo): mean log-probs, target margin `gamma`
    (TRL's `simpo_gamma`), no reference."""
    logits = (pc - pr) - gamma / beta
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    return losses, beta * pc.detach(), beta * pr.detach()


def orpo_loss(pc: Tensor, pr: Tensor, *, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term on mean log-probs, weighted by `beta` (the paper's lambda);
    minimised as NLL(chosen) + losses. Also returns log σ(log odds ratio), which TRL logs."""
    pc, pr = pc.float(), pr.float()
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    return -beta * ratio, beta * pc.detach(), beta * pr.detach(), ratio.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def kto_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, kl: Tensor, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """KTO: `pc`/`rc` the desirable examples' log-probs, `pr`/`rr` the undesirable ones'
    (either may be empty), `kl` the detached, clamped KL estimate (`kto_kl`)."""
    chosen = 1 - torch.sigmoid(beta * ((pc - rc) - kl))
    rejected = 1 - torch.sigmoid(beta * (kl - (pr - rr)))
    losses = torch.cat([desirable_weight * chosen, undesirable_weight * rejected])
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def kto_kl(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """KTO's reference point: the mean log-ratio on mismatched prompt/completion pairs (over all
    ranks), at least 0, no gradient."""
    kl = (policy_kl_logps - reference_kl_logps).mean().detach()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(kl)
        kl = kl / torch.distributed.get_world_size()
    return kl.clamp(min=0)


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> Tensor:
    """A reward model's pairwise loss (TRL's RewardTrainer): -log σ(r_c - r_r [- margin]),
    plus `center_rewards_coefficient` · mean((r_c + r_r)²)."""
    diff = chosen - rejected - (margin if margin is not None else 0)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss
