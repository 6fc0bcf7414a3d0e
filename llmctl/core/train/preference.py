"""Preference objectives: `llmctl finetune BASE --method dpo|ipo|simpo|orpo|kto|reward`.

    llmctl finetune BASE --method dpo --data pairs.jsonl adapter=lora objective_args.beta=0.1 -o OUT

Each is an SFT objective (its adapter methods, `prepare` and `save`) with preference data
(`core/data/preference.py`) and a loss from `preference_losses.py`, settings under
`objective_args` with TRL's names (`PreferenceConfig`). A batch of B records is one forward
pass over 2B sequences (chosen then rejected; KTO: the examples then their KL counterparts),
right-padded and cut to the longest; log-probabilities are taken at completion tokens only.

The reference model (dpo, ipo, kto; simpo and orpo have none) is, in order of preference:
the log-probs precomputed once (`precompute_ref=true`, cached beside the data, keyed by the
data, the base checkpoint and the precision), the base itself with the adapter switched off
(`adapters_disabled`: no second copy), or a frozen copy of the base (full finetuning).
Metrics in `metrics.jsonl` use TRL's names: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected (kto: kl; orpo: nll_loss, log_odds_ratio).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from llmctl.core.train import preference_losses as L
from llmctl.core.train.objectives import OBJECTIVES, Batch, Objective
from llmctl.core.train.sft import SFT, SFTBatches
from llmctl.errors import ConfigError

ALIASES = {"simpo_gamma": "gamma", "lambda": "beta"}  # TRL's SimPO name; ORPO's lambda is TRL's beta


@dataclass
class PreferenceConfig:
    """`objective_args` of the preference methods (TRL's names and defaults)."""

    beta: float = 0.1  # dpo/ipo/kto: strength of the reference; simpo: reward scale; orpo: lambda
    loss_type: Literal["sigmoid", "robust"] = "sigmoid"  # dpo: cDPO-style sigmoid, or robust DPO
    label_smoothing: float = 0.0  # dpo, simpo: probability that a preference label is flipped
    gamma: float = 0.5  # simpo: target reward margin (TRL's simpo_gamma)
    cpo_alpha: float = 0.0  # simpo: weight of the chosen completions' NLL (TRL's CPO default is 1)
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
    precompute_ref: bool = False  # reference log-probs computed once before training (no reference in memory)
    center_rewards_coefficient: float | None = None  # reward: pulls the rewards' mean towards 0


def settings(plan) -> PreferenceConfig:
    from llmctl.config import build

    args = {ALIASES.get(k, k): v for k, v in plan.config.objective_args.items()}
    return build(PreferenceConfig, args, prefix="objective_args.")


class Logps(NamedTuple):
    """Per-sequence log-probabilities of the completion tokens: sums [N], token counts [N]."""

    sums: torch.Tensor
    counts: torch.Tensor

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)


def sequence_logps(model: nn.Module, forward, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[Logps, torch.Tensor]:
    """(Logps, MoE aux loss): `forward` runs `model`'s body; its head makes logits at labelled positions only."""
    from llmctl.core.model.logprobs import token_logprobs

    out = forward(inputs, skip_head=True)
    mask = labels != -100
    logprobs, _ = token_logprobs(out.features[mask], labels[mask], model.head, vocab=model.cfg.vocab_size)
    sums = logprobs.new_zeros(len(labels)).index_add(0, mask.nonzero()[:, 0], logprobs)
    return Logps(sums, mask.sum(1)), out.aux_loss


class Preference(SFT):
    """The shared parts: data, batches, reference log-probs, metrics. Subclasses set `criterion`."""

    takes_args = True
    perplexity = False  # a preference loss's exp() is no perplexity: val_loss only
    reference = True  # whether the loss compares with a reference model
    average = False  # per-token mean log-probs instead of sums (ipo, simpo, orpo)
    paired = True  # chosen/rejected pairs, else KTO's labelled examples
    targets = Objective.targets  # a loss over pairs or examples, not tokens: micro-batches weigh equally

    @classmethod
    def resolve(cls, plan) -> None:
        s = settings(plan)
        if s.beta <= 0 or not 0 <= s.label_smoothing < 0.5:
            raise ConfigError(f"objective_args: beta must be > 0 and label_smoothing in [0, 0.5), got {s.beta}, "
                              f"{s.label_smoothing}")
        if cls.reference and plan.init_from is None:
            raise ConfigError(f"method {plan.objective}: the reference model is the base; give a base checkpoint")
        super().resolve(plan)

    @classmethod
    def encode(cls, plan) -> dict:
        from llmctl.core.data.preference import PreferenceEncoder, encode_preferences
        from llmctl.core.train.sft import chat_template, hold_out, pad_id

        cfg = plan.config
        template = chat_template(plan)
        encoder = PreferenceEncoder(plan.tokenizer, paired=cls.paired, template=template)
        pad, length = pad_id(plan.tokenizer), cfg.seq_len + 1
        rows, stats = encode_preferences(plan.text_files, encoder, length, pad)
        if plan.val_files:
            val = encode_preferences(plan.val_files, encoder, length, pad)[0]
        else:
            keep, held = hold_out(list(range(len(rows))), cfg)
            rows, val = rows[keep], rows[held] if held else None
        text = f"{plan.objective} data: {stats.describe(cls.paired)}"
        plan.report.info(text + (f"; validation: {len(val)}" if val is not None else ""))
        return {"train": rows, "val": val, "stats": stats, "chat_template": template}

    def __init__(self, plan, device):
        super().__init__(plan, device)
        self.settings = settings(plan)
        self.model: nn.Module | None = None
        self.reference_model = None
        if self.reference_source == "copy":
            from llmctl.core.model.io import load_model

            self.reference_model = load_model(plan.init_from, device=device, dtype=torch.float32,
                                              config=plan.model_config)[0]  # the run's context settings

    @property
    def reference_source(self) -> str | None:
        """Where reference log-probs come from: precomputed, adapter (switched off), copy, or None."""
        if not self.reference:
            return None
        if self.settings.precompute_ref:
            return "precomputed"
        return "copy" if self.cfg.adapter_method == "full" else "adapter"

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.model = model

    def companions(self) -> dict[str, nn.Module]:
        return {"reference": self.reference_model} if self.reference_model is not None else {}

    def data(self, d):
        train, val = self.plan.prepared["train"], self.plan.prepared["val"]
        if self.reference_source == "precomputed":
            from llmctl.core.train.reference import with_reference_logps

            train, val = with_reference_logps(self, train, val)
        return SFTBatches(train, val, batch_size=self.cfg.batch_size, rank=d.rank, world=d.world, seed=self.cfg.seed,
                          eval_batches=self.cfg.eval_batches)

    def batch(self, rows, index, generator=None) -> Batch:
        """Rows [B, 2, C, L] → 2B sequences (each record's first, then each one's second), cut
        after the last completion token; `extra`: the mask's per-sequence value (KTO's labels)
        and precomputed reference log-probs (channel 2)."""
        seqs = sequences(rows)
        ids, mask = seqs[:, 0], seqs[:, 1]
        width = ids.shape[1]
        inputs = ids[:, : width - 1]
        labels = torch.where(mask[:, 1:width].bool(), ids[:, 1:width], -100)
        extra = {"kind": mask.amax(1)}
        if seqs.shape[1] == 3:
            extra["reference"] = seqs[:, 2, 0].contiguous().view(torch.float64).float()
        return *self._to_device(inputs, labels), dict(zip(extra, self._to_device(*extra.values())))

    # -- log-probs --------------------------------------------------------------------------

    def policy_logps(self, forward, inputs, labels) -> tuple[Logps, torch.Tensor]:
        return sequence_logps(self.model, forward, inputs, labels)

    @torch.no_grad()
    def reference_logps(self, inputs, labels, extra) -> Logps | None:
        """The reference model's log-probs of these sequences (None for reference-free methods)."""
        source = self.reference_source
        if source is None:
            return None
        if source == "precomputed":
            return Logps(extra["reference"], (labels != -100).sum(1))
        if source == "copy":
            return sequence_logps(self.reference_model, self.reference_model, inputs, labels)[0]
        from llmctl.core.adapters import adapters_disabled

        with adapters_disabled(self.model):
            return sequence_logps(self.model, self.model, inputs, labels)[0]

    def loss(self, forward, inputs, labels, extra):
        policy, aux = self.policy_logps(forward, inputs, labels)
        loss, metrics = self.criterion(policy, self.reference_logps(inputs, labels, extra), extra)
        if self.model.training:
            self.record(**metrics)
        loss = loss + aux
        return loss, loss.detach()

    def val_loss(self, forward, inputs, labels, extra):
        return self.loss(forward, inputs, labels, extra)[0]

    def criterion(self, policy: Logps, reference: Logps | None, extra: dict) -> tuple[torch.Tensor, dict]:
        """(loss, metrics to record) from the 2B sequences' log-probs."""
        raise NotImplementedError

    def _values(self, logps: Logps | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(chosen, rejected) sums or means."""
        if logps is None:
            return None
        values = logps.means() if self.average else logps.sums
        return values.chunk(2)


def sequences(rows: torch.Tensor) -> torch.Tensor:
    """Rows [B, 2, C, L] → [2B, C, W]: every record's first sequence, then every second one,
    cut after the last completion token."""
    seqs = rows.transpose(0, 1).reshape(-1, *rows.shape[2:])
    return seqs[..., : int(seqs[:, 1].nonzero()[:, 1].max()) + 1]


def pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """TRL's per-step preference metrics."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}


def chosen_nll(policy: Logps) -> torch.Tensor:
    """Mean NLL of the chosen completions' tokens (the SFT term of CPO and ORPO)."""
    sums, counts = policy.sums.chunk(2)[0], policy.counts.chunk(2)[0]
    return -sums.sum() / counts.sum().clamp(min=1)


@OBJECTIVES.register("dpo")
class DPO(Preference):
    """Direct Preference Optimization (sigmoid; `label_smoothing`: cDPO, or `loss_type=robust`)."""

    def criterion(self, policy, reference, extra):
        (pc, pr), (rc, rr) = self._values(policy), self._values(reference)
        s = self.settings
        losses, cr, rr_ = L.dpo_loss(pc, pr, rc, rr, beta=s.beta, label_smoothing=s.label_smoothing,
                                     loss_type=s.loss_type)
        return losses.mean(), pair_metrics(cr, rr_, pc, pr)


@OBJECTIVES.register("ipo")
class IPO(Preference):
    """Identity Preference Optimization on per-token mean log-probs (as TRL)."""

    average = True

    def criterion(self, policy, reference, extra):
        (pc, pr), (rc, rr) = self._values(policy), self._values(reference)
        losses, cr, rr_ = L.ipo_loss(pc, pr, rc, rr, beta=self.settings.beta)
        return losses.mean(), pair_metrics(cr, rr_, pc, pr)


@OBJECTIVES.register("simpo")
class SimPO(Preference):
    """SimPO: length-normalised, reference-free, target margin `gamma` (+ `cpo_alpha` · NLL)."""

    reference = False
    average = True

    def criterion(self, policy, reference, extra):
        pc, pr = self._values(policy)
        s = self.settings
        losses, cr, rr = L.simpo_loss(pc, pr, beta=s.beta, gamma=s.gamma, label_smoothing=s.label_smoothing)
        loss = losses.mean()
        if s.cpo_alpha:
            loss = loss + s.cpo_alpha * chosen_nll(policy)
        return loss, pair_metrics(cr, rr, pc, pr)


@OBJECTIVES.register("orpo")
class ORPO(Preference):
    """ORPO: NLL of the chosen completions plus `beta` (lambda) times the odds-ratio loss; no reference."""

    reference = False
    average = True

    def criterion(self, policy, reference, extra):
        pc, pr = self._values(policy)
        losses, cr, rr, ratio = L.orpo_loss(pc, pr, beta=self.settings.beta)
        nll = chosen_nll(policy)
        return nll + losses.mean(), {**pair_metrics(cr, rr, pc, pr), "nll_loss": nll.detach(),
                                      "log_odds_ratio": ratio.mean()}


@OBJECTIVES.register("kto")
class KTO(Preference):
    """KTO on unpaired examples labelled desirable or not; the KL reference point from
    mismatched prompt/completion pairs (no gradient through it, as TRL)."""

    paired = False

    def policy_logps(self, forward, inputs, labels):
        half = len(inputs) // 2
        examples, aux = sequence_logps(self.model, forward, inputs[:half], labels[:half])
        with torch.no_grad():
            kl, _ = sequence_logps(self.model, self.model, inputs[half:], labels[half:])
        return Logps(torch.cat([examples.sums, kl.sums]), torch.cat([examples.counts, kl.counts])), aux

    def criterion(self, policy, reference, extra):
        from llmctl.core.data.preference import DESIRABLE

        (logps, kl_logps), (ref, ref_kl) = policy.sums.chunk(2), reference.sums.chunk(2)
        good = extra["kind"].chunk(2)[0] == DESIRABLE
        s = self.settings
        kl = L.kto_kl(kl_logps, ref_kl)
        losses, cr, rr = L.kto_loss(logps[good], logps[~good], ref[good], ref[~good], kl, beta=s.beta,
                                    desirable_weight=s.desirable_weight, undesirable_weight=s.undesirable_weight)
        metrics = {"kl": kl}
        if good.any():
            metrics.update({"rewards/chosen": cr.mean(), "logps/chosen": logps[good].detach().mean()})
        if (~good).any():
            metrics.update({"rewards/rejected": rr.mean(), "logps/rejected": logps[~good].detach().mean()})
        return losses.nanmean(), metrics



@OBJECTIVES.register("reward")
class Reward(Preference):
    """A Bradley–Terry reward model (TRL's RewardTrainer): the base with a one-score head,
    scored at each sequence's last token, trained so chosen outscores rejected; saved as a
    transformers *ForSequenceClassification checkpoint, or with an adapter (lora, dora, qlora)
    as PEFT's SEQ_CLS adapter whose fresh score head trains in full as a module to save."""

    reference = False

    @classmethod
    def resolve(cls, plan) -> None:
        from llmctl.core.train.sft import pad_id

        super().resolve(plan)
        if plan.config.adapter_method in ("prefix", "prompt"):
            raise ConfigError(f"method reward with adapter={plan.config.adapter_method}: use lora, dora, qlora or full")
        plan.model_config = dataclasses.replace(plan.model_config, num_labels=1, tie_embeddings=False,
                                                pad_token_id=pad_id(plan.tokenizer))

    def adapter_options(self):
        """The adapter's, with the score head (`lm_head`, HF's `score`) trained in full and saved."""
        from llmctl.core.adapters.peft_format import HEAD

        options = self.cfg.adapter
        return dataclasses.replace(options, modules_to_save=list(dict.fromkeys([*(options.modules_to_save or []), HEAD])))

    def batch(self, rows, index, generator=None) -> Batch:
        seqs = sequences(rows)
        return *self._to_device(seqs[:, 0], seqs[:, 1]), {}

    def loss(self, forward, inputs, labels, extra):
        from llmctl.core.model.reward import sequence_scores

        chosen, rejected = sequence_scores(forward, inputs, self.model.cfg.pad_token_id)[:, 0].chunk(2)
        loss = L.bradley_terry_loss(chosen, rejected, center_rewards_coefficient=self.settings.center_rewards_coefficient)
        if self.model.training:
            scores = torch.cat([chosen, rejected]).detach()
            self.record(**{"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
                           "mean_reward": scores.mean(), "min_reward": scores.min(), "max_reward": scores.max()})
        return loss, loss.detach()
