"""Each preference option that changes the math reaches the loss: an objective built from
`objective_args` (TRL's names, aliases too) gives the loss function's value with those options,
and a different value than with the defaults (an option dropped on the way would pass unnoticed
by the loss-level TRL parity tests)."""

from types import SimpleNamespace

import pytest
import torch

from llmctl.core.data.preference import DESIRABLE, UNDESIRABLE
from llmctl.core.train import preference as P
from llmctl.core.train import preference_losses as L


def _objective(cls, **objective_args):
    obj = object.__new__(cls)  # the criterion needs only the settings
    obj.settings = P.settings(SimpleNamespace(config=SimpleNamespace(objective_args=objective_args)))
    return obj


def _logps(n: int, seed: int) -> P.Logps:
    g = torch.Generator().manual_seed(seed)
    return P.Logps(-torch.rand(n, generator=g, dtype=torch.float64) * 20, torch.randint(3, 9, (n,), generator=g))


POLICY, REFERENCE = _logps(8, 0), _logps(8, 1)


def _criterion(cls, extra=None, **args) -> torch.Tensor:
    return _objective(cls, **args).criterion(POLICY, REFERENCE, extra or {})[0]


@pytest.mark.parametrize("args", [{"beta": 0.7}, {"label_smoothing": 0.2}, {"loss_type": "robust", "label_smoothing": 0.2}])
def test_dpo_options_reach_the_loss(args):
    full = {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid", **args}
    (pc, pr), (rc, rr) = POLICY.sums.chunk(2), REFERENCE.sums.chunk(2)
    expected = L.dpo_loss(pc, pr, rc, rr, **full)[0].mean()
    assert torch.allclose(_criterion(P.DPO, **args), expected)
    assert not torch.allclose(_criterion(P.DPO), expected)


def test_ipo_and_orpo_beta_reach_the_loss():
    (pc, pr), (rc, rr) = POLICY.means().chunk(2), REFERENCE.means().chunk(2)
    assert torch.allclose(_criterion(P.IPO, beta=0.7), L.ipo_loss(pc, pr, rc, rr, beta=0.7)[0].mean())
    nll = P.chosen_nll(POLICY)
    assert torch.allclose(_criterion(P.ORPO, **{"lambda": 0.7}), nll + L.orpo_loss(pc, pr, beta=0.7)[0].mean())
    assert not torch.allclose(_criterion(P.ORPO), _criterion(P.ORPO, beta=0.7))


@pytest.mark.parametrize("args", [{"beta": 2.5}, {"simpo_gamma": 1.5}, {"gamma": 1.5}, {"label_smoothing": 0.2},
                                  {"cpo_alpha": 0.5}])
def test_simpo_options_reach_the_loss(args):
    full = {"beta": 0.1, "gamma": 0.5, "label_smoothing": 0.0, "cpo_alpha": 0.0,
            **{P.ALIASES.get(k, k): v for k, v in args.items()}}
    pc, pr = POLICY.means().chunk(2)
    expected = L.simpo_loss(pc, pr, beta=full["beta"], gamma=full["gamma"], label_smoothing=full["label_smoothing"])[0]
    expected = expected.mean() + full["cpo_alpha"] * P.chosen_nll(POLICY)
    assert torch.allclose(_criterion(P.SimPO, **args), expected)
    assert not torch.allclose(_criterion(P.SimPO), expected)


@pytest.mark.parametrize("args", [{"beta": 0.5}, {"desirable_weight": 1.7}, {"undesirable_weight": 0.4}])
def test_kto_options_reach_the_loss(args):
    full = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, **args}
    kind = torch.tensor([DESIRABLE, UNDESIRABLE, DESIRABLE, UNDESIRABLE] * 2)
    (logps, kl_logps), (ref, ref_kl) = POLICY.sums.chunk(2), REFERENCE.sums.chunk(2)
    good = kind.chunk(2)[0] == DESIRABLE
    kl = L.kto_kl(kl_logps, ref_kl)
    expected = L.kto_loss(logps[good], logps[~good], ref[good], ref[~good], kl, **full)[0].nanmean()
    assert torch.allclose(_criterion(P.KTO, {"kind": kind}, **args), expected)
    assert not torch.allclose(_criterion(P.KTO, {"kind": kind}), expected)


def test_reward_centering_reaches_the_loss(monkeypatch):
    from llmctl.core.model import reward

    scores = torch.tensor([[2.0], [1.5], [0.5], [-1.0]])
    monkeypatch.setattr(reward, "sequence_scores", lambda forward, inputs, pad: scores)
    obj = _objective(P.Reward, center_rewards_coefficient=0.3)
    obj.model = SimpleNamespace(cfg=SimpleNamespace(pad_token_id=0), training=False)
    loss = obj.loss(None, None, None, {})[0]
    chosen, rejected = scores[:, 0].chunk(2)
    assert torch.allclose(loss, L.bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.3))
    assert not torch.allclose(loss, L.bradley_terry_loss(chosen, rejected))
