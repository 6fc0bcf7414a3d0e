"""Edges of the distillation criterion and of strided perplexity that the parity tests miss (found
by mutation testing): the criterion against TRL's GKD loss (weights, one labelled position, none),
its refusals, and the chunked gradient's edges."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from llmctl.core.distill.criterion import Criterion

V, H = 11, 6


class _Student(nn.Module):
    """The two things `Criterion` asks of a model: `head` (features -> logits) and `cfg.vocab_size`."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(H, V, bias=False)
        nn.init.normal_(self.head.weight, std=1.5)
        self.cfg = SimpleNamespace(vocab_size=V)


def _batch(labelled: int, seed: int = 0):
    """Features [2, 4, H] and labels with `labelled` positions not -100."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((2, 4), -100)
    labels.view(-1)[torch.randperm(8, generator=g)[:labelled]] = torch.randint(0, V, (labelled,), generator=g)
    return torch.randn(2, 4, H, generator=g), torch.randn(2, 4, H, generator=g), labels


def _gkd(student_logits, teacher_logits, labels, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                           temperature=temperature)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("labelled", [0, 1, 5])
def test_criterion_is_t_squared_times_trls_gkd_loss(beta, labelled):
    """TRL's `GKDTrainer.generalized_jsd_loss` (masked, summed over positions, divided by the count of
    labelled ones, at least 1) times T²: the loss alone when "ce" has no weight; the CE part is the
    student's masked cross-entropy; one labelled position is that position's divergence, none is 0."""
    student, teacher = _Student(0), _Student(1).requires_grad_(False)
    features, t_features, labels = _batch(labelled)
    T = 2.0
    crit = Criterion({"jsd": 0.7}, temperature=T, beta=beta, chunk_rows=3)
    total, parts = crit(student, SimpleNamespace(features=features), labels, teacher=teacher,
                        teacher_out=SimpleNamespace(features=t_features))
    s, t = student.head(features), teacher.head(t_features)
    reference = T * T * _gkd(s, t, labels, beta, T)
    assert parts["jsd"].item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    assert total.item() == pytest.approx(0.7 * reference.item(), rel=1e-5, abs=1e-7)
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), reduction="sum") / max(labelled, 1)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5, abs=1e-7)
    if labelled:
        assert total.item() > 0
        (grad,) = torch.autograd.grad(0.7 * reference, student.head.weight)
        total.backward()
        assert torch.allclose(student.head.weight.grad, grad, atol=1e-6)


def test_criterion_refusals_name_what_is_missing():
    student = _Student(0)
    features, _, labels = _batch(3)
    out = SimpleNamespace(features=features, hidden_states=[features])
    with pytest.raises(ValueError, match="^a logit loss needs the teacher's outputs or its stored top-k$"):
        Criterion({"forward_kl": 1.0})(student, out, labels)
    ids = torch.zeros(2, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^a hidden-state loss needs the teacher online \(not stored top-k outputs\)$"):
        Criterion({"hidden_mse": 1.0}, layer_map=[(0, 0)])(student, out, labels, topk=(ids, torch.zeros(2, 4, 2)))
