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


# -- fused_chunks ---------------------------------------------------------------------------------


def _chunked_ce(rows: int, n: int = 5, scale: float = 1.0):
    """`fused_chunks` over a linear head's cross-entropy (mean over `n` rows, `rows` at a time), scaled
    by `scale` before the backward pass (as gradient accumulation does): (value, grads, chunks seen)."""
    from llmctl.core.distill.chunked import fused_chunks

    torch.manual_seed(3)
    features, head = torch.randn(n, H, requires_grad=True), nn.Linear(H, V, bias=False)
    targets, seen = torch.randint(0, V, (n,)), []

    def compute(chunk, start, stop):
        seen.append((start, min(stop, n)))
        loss = F.cross_entropy(head(chunk), targets[start:stop], reduction="sum") / n
        return loss, loss.detach()[None]

    total, parts = fused_chunks(compute, features, list(head.parameters()), rows)
    (total * scale).backward()
    direct = F.cross_entropy(head(features.detach()), targets) * scale
    expected = torch.autograd.grad(direct, head.weight)[0]
    return total, parts, (features.grad, head.weight.grad), (direct, expected), seen


def test_fused_chunks_gradient_is_scaled_by_the_upstream_gradient():
    """A loss scaled after the chunks (1/grad_accum, a loss weight) scales the stored gradients."""
    total, parts, (_, head_grad), (direct, expected), _ = _chunked_ce(2, scale=0.25)
    assert (total * 0.25).item() == pytest.approx(direct.item(), rel=1e-6) and parts.item() == pytest.approx(total.item())
    assert torch.allclose(head_grad, expected, atol=1e-7)


@pytest.mark.parametrize("rows", [0, 1])
def test_fused_chunks_of_one_row_and_one_position(rows):
    """`rows` 0 or 1 makes one row at a time (no larger chunk); a single position is a batch like any other."""
    assert _chunked_ce(rows)[-1] == [(i, i + 1) for i in range(5)]
    total, _, (feature_grad, head_grad), (direct, expected), seen = _chunked_ce(rows, n=1)
    assert seen == [(0, 1)] and total.item() == pytest.approx(direct.item(), rel=1e-6)
    assert torch.allclose(head_grad, expected, atol=1e-7) and feature_grad.shape == (1, H)


def test_fused_chunks_refuses_no_positions():
    from llmctl.core.distill.chunked import fused_chunks

    with pytest.raises(ValueError, match="^no positions to compute a loss over$"):
        fused_chunks(lambda *a: None, torch.zeros(0, H), [], 4)
