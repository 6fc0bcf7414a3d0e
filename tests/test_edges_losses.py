"""Edges of the preference and distillation losses the parity tests miss (found by mutation testing):
the implicit rewards TRL logs, log(1 - exp(x)) next to 0, and KTO's KL over two processes."""

from __future__ import annotations

import mpmath
import pytest
import torch
from test_preference_losses import B, _fake_model, _tokens, _trainer

from llmctl.core.distill import losses as D
from llmctl.core.train import preference_losses as L


def _logged(trainer) -> dict:
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_and_ipo_rewards_equal_trls_logged_rewards(kind):
    from trl.trainer.dpo_trainer import DPOTrainer

    policy, mask = _tokens(8)
    ref = (policy * 0.7 + 0.1 * mask[:, 1:]).sum(1)
    sums = policy.sum(1)
    trainer = _trainer(DPOTrainer, loss_types=[kind], loss_weights=[1.0], beta=0.3, label_smoothing=0.0,
                       f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False,
                       precompute_ref_logps=True, ref_model=None)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    trainer._compute_loss(_fake_model(policy), inputs, return_outputs=False)
    theirs = _logged(trainer)
    fn = L.dpo_loss if kind == "sigmoid" else L.ipo_loss
    _, chosen, rejected = fn(sums[:B], sums[B:], ref[:B], ref[B:], beta=0.3)
    assert chosen.mean().item() == pytest.approx(theirs["rewards/chosen"], abs=1e-9)
    assert rejected.mean().item() == pytest.approx(theirs["rewards/rejected"], abs=1e-9)
    assert chosen.std() > 0 and rejected.std() > 0


def test_kto_rewards_equal_trls_logged_rewards():
    from trl.trainer.kto_trainer import KTOTrainer

    policy, mask = _tokens(9)
    labels = torch.tensor([True, True, False, True, False, False, True, False, False, True, True, False])
    ref = (policy * 0.8).sum(1)
    sums = policy.sum(1)
    _, chosen, rejected = L.kto_loss(sums[labels], sums[~labels], ref[labels], ref[~labels], torch.tensor(0.0),
                                     beta=0.2)
    kto = _trainer(KTOTrainer, beta=0.2, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                   calculate_KL=False, precompute_ref_logps=True, ref_model=None)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "label": labels, "ref_logps": ref}
    kto._compute_loss(_fake_model(policy), inputs, return_outputs=False)
    theirs = _logged(kto)
    assert chosen.mean().item() == pytest.approx(theirs["rewards/chosen"], abs=1e-9)
    assert rejected.mean().item() == pytest.approx(theirs["rewards/rejected"], abs=1e-9)


def test_orpo_rejected_reward_equals_trls():
    from trl.experimental.orpo import ORPOTrainer

    policy, mask = _tokens(10)
    means = policy.sum(1) / mask[:, 1:].sum(1)
    _, _, rejected, _ = L.orpo_loss(means[:B], means[B:], beta=0.4)
    _, _, theirs, _, _ = _trainer(ORPOTrainer, beta=0.4).odds_ratio_loss(means[:B], means[B:])
    assert torch.allclose(rejected, theirs)


def test_log1mexp_is_accurate_next_to_zero_and_far_from_it():
    xs = torch.tensor([-1e-20, -1e-8, -1e-3, -0.5, -0.6931471805599453, -0.9, -3.0, -40.0], dtype=torch.float64)
    mpmath.mp.dps = 60
    expected = torch.tensor([float(mpmath.log(-mpmath.expm1(mpmath.mpf(x)))) for x in xs.tolist()], dtype=torch.float64)
    assert torch.allclose(L.log1mexp(xs), expected, rtol=1e-14, atol=0)


def _kto_kl_rank(rank: int, path: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    policy = torch.tensor([0.5, 1.5]) if rank == 0 else torch.tensor([2.0, 4.0, 6.0])
    kl = L.kto_kl(policy, torch.zeros_like(policy))
    torch.save(kl, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_kto_kl_averages_the_ranks_means(tmp_path):
    """Two gloo processes: the reference point is the mean over ranks of each rank's mean (TRL's gather)."""
    torch.multiprocessing.spawn(_kto_kl_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path / "kl")), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"kl.{rank}", weights_only=True).item() == pytest.approx((1.0 + 4.0) / 2)


def test_distillation_losses_are_registered_with_their_kind():
    kinds = {name: D.LOSSES.get(name).kind for name in ("forward_kl", "reverse_kl", "jsd", "ce", "hidden_mse",
                                                           "hidden_cosine")}
    assert kinds == {"forward_kl": "logits", "reverse_kl": "logits", "jsd": "logits", "ce": "labels",
                     "hidden_mse": "hidden", "hidden_cosine": "hidden"}
    assert D.LOSSES.get("jsd") is D.jsd
