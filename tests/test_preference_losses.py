"""Each preference loss equals TRL's for the same log-probabilities (≤1e-6): TRL's own loss code
is called on tensors, through minimal trainer instances holding the attributes it reads."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
import trl  # noqa: E402

from llmctl.core.train import preference_losses as L  # noqa: E402

B, T = 6, 9


class Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trainer(cls, **attrs):
    trainer = cls.__new__(cls)
    trainer.__dict__.update(accelerator=Accelerator(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                            _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False, model=SimpleNamespace(training=True),
                            args=SimpleNamespace(gradient_checkpointing_kwargs=None), **attrs)
    return trainer


def _tokens(seed: int, rows: int = 2 * B):
    """Per-token log-probs (zero outside the completion, as TRL's fused head gives) and the completion mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, T + 1, dtype=torch.long)
    for i in range(rows):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 2, T + 2, (1,), generator=g))
        mask[i, start:end] = 1
    logps = -torch.rand(rows, T, generator=g, dtype=torch.float64) * 2 * mask[:, 1:]
    return logps, mask


def _fake_model(per_token):
    rows = per_token.shape[0]

    def forward(**kwargs):
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token), aux_loss=None,
                               mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    return forward if rows else None


def _dpo_trl(loss_type, beta, label_smoothing, policy, ref, mask):
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = _trainer(DPOTrainer, loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                       label_smoothing=label_smoothing, f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False,
                       precompute_ref_logps=True, ref_model=None)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    return trainer._compute_loss(_fake_model(policy), inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0),
                                                       ("robust", 0.2, 0.1)])
def test_dpo_equals_trl(loss_type, beta, smoothing):
    policy, mask = _tokens(0)
    ref = (policy * 0.9 - 0.05 * mask[:, 1:]).sum(1)
    sums = policy.sum(1)
    ours, chosen, rejected = L.dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=beta, label_smoothing=smoothing,
                                        loss_type=loss_type)
    theirs = _dpo_trl(loss_type, beta, smoothing, policy, ref, mask)
    assert abs(ours.mean().item() - theirs.item()) <= 1e-6
    assert ours.mean().item() > 0.01  # not a degenerate comparison


def test_cdpo_label_smoothing_equals_trls_conservative_sigmoid():
    """TRL 1.x's DPOTrainer keeps label smoothing for robust/EXO; the conservative (cDPO) sigmoid
    lives on in its CPO trainer, whose sigmoid loss on log-ratios is DPO's."""
    from trl.experimental.cpo import CPOTrainer

    policy, mask = _tokens(1)
    ref = (policy * 0.8).sum(1)
    sums = policy.sum(1)
    ours, _, _ = L.dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=0.3, label_smoothing=0.2)
    cpo = _trainer(CPOTrainer, alpha=0.0, beta=0.3, label_smoothing=0.2, loss_type="sigmoid")
    theirs, _, _ = cpo.cpo_loss(sums[:B] - ref[:B], sums[B:] - ref[B:])
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_ipo_equals_trl():
    policy, mask = _tokens(2)
    ref = (policy * 1.1).sum(1)
    counts = mask[:, 1:].sum(1)
    means, ref_means = policy.sum(1) / counts, ref / counts
    ours, _, _ = L.ipo_loss(means[:B], means[B:], ref_means[:B], ref_means[B:], beta=0.1)
    theirs = _dpo_trl("ipo", 0.1, 0.0, policy, ref, mask)
    assert abs(ours.mean().item() - theirs.item()) <= 1e-6


@pytest.mark.parametrize("gamma,smoothing", [(0.5, 0.0), (1.2, 0.1)])
def test_simpo_equals_trls_cpo_trainer(gamma, smoothing):
    from trl.experimental.cpo import CPOTrainer

    policy, mask = _tokens(3)
    means = policy.sum(1) / mask[:, 1:].sum(1)
    ours, cr, rr = L.simpo_loss(means[:B], means[B:], beta=2.0, gamma=gamma, label_smoothing=smoothing)
    cpo = _trainer(CPOTrainer, alpha=0.0, beta=2.0, label_smoothing=smoothing, loss_type="simpo", simpo_gamma=gamma)
    theirs, tcr, trr = cpo.cpo_loss(means[:B], means[B:])
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert torch.allclose(cr, tcr) and torch.allclose(rr, trr)


def test_orpo_equals_trl():
    from trl.experimental.orpo import ORPOTrainer

    policy, mask = _tokens(4)
    means = policy.sum(1) / mask[:, 1:].sum(1)
    means[0] = -0.3  # both branches of log(1 - exp(x)) (around -log 2)
    ours, cr, rr, ratio = L.orpo_loss(means[:B], means[B:], beta=0.25)
    orpo = _trainer(ORPOTrainer, beta=0.25)
    theirs, tcr, trr, mean_ratio, _ = orpo.odds_ratio_loss(means[:B], means[B:])
    assert torch.allclose(ours, -theirs, atol=1e-6, rtol=0)  # TRL minimises nll - mean(losses)
    assert torch.allclose(ratio.mean(), mean_ratio) and torch.allclose(cr, tcr)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl(weights):
    from trl.trainer.kto_trainer import KTOTrainer

    policy, mask = _tokens(5)
    kl_policy, _ = _tokens(6)
    labels = torch.tensor([True, False, True, True, False, False, True, False, True, False, False, True])
    ref = (policy * 0.95).sum(1)
    kl_ref = (kl_policy * 1.2).sum(1)
    sums = policy.sum(1)
    kl = L.kto_kl(kl_policy.sum(1), kl_ref)
    assert kl.item() > 0  # the clamp does not hide the term
    ours, cr, rr = L.kto_loss(sums[labels], sums[~labels], ref[labels], ref[~labels], kl, beta=0.1,
                              desirable_weight=weights[0], undesirable_weight=weights[1])
    kto = _trainer(KTOTrainer, beta=0.1, loss_type="kto", desirable_weight=weights[0], undesirable_weight=weights[1],
                   calculate_KL=True, precompute_ref_logps=True, ref_model=None)
    kto._compute_kl_logps = lambda model, batch: kl_policy.sum(1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "label": labels, "ref_logps": ref, "ref_KL_logps": kl_ref}
    theirs = kto._compute_loss(_fake_model(policy), inputs, return_outputs=False)
    assert abs(ours.nanmean().item() - theirs.item()) <= 1e-6


def test_reward_loss_equals_trls_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer

    scores = torch.randn(2 * B, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    margin = torch.rand(B, dtype=torch.float64)
    trainer = _trainer(RewardTrainer)
    for coefficient, m in [(None, None), (0.01, margin)]:
        trainer.args = SimpleNamespace(center_rewards_coefficient=coefficient)
        inputs = {"input_ids": torch.zeros(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3)}
        if m is not None:
            inputs["margin"] = m
        theirs = trainer.compute_loss(lambda **kw: SimpleNamespace(logits=scores), inputs)
        ours = L.bradley_terry_loss(scores[:B, 0], scores[B:, 0], m, coefficient)
        assert abs(ours.item() - theirs.item()) <= 1e-6
