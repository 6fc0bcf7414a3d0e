"""Distillation losses, registered by name and combined with weights (`objective_args.losses`).

Three kinds, one registry (`LOSSES`, entry-point group `llmctl.distill_losses`):

| kind        | signature                                         | built-in                          |
| ----------- | ------------------------------------------------- | --------------------------------- |
| `"logits"`  | `(student, teacher, *, temperature, beta) -> [N]` | forward_kl, reverse_kl, jsd       |
| `"labels"`  | `(student_logits, labels) -> [N]`                 | ce                                |
| `"hidden"`  | `(student_hidden, teacher_hidden) -> [N]`         | hidden_mse, hidden_cosine         |

Each returns one value per position (rows of logits or hidden states); the caller masks the
positions without a label and averages. Logit losses see both models' logits over the same
support: the whole vocabulary online, the teacher's stored top-k ids offline (see store.py).
Every divergence is taken between the distributions at `temperature` and scaled by T², so its
gradient keeps its size across temperatures (Hinton et al.).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from llmctl.core.registry import Registry

LOSSES: Registry[Callable] = Registry("distillation loss", "llmctl.distill_losses")


def loss(name: str, kind: str):
    """Register a loss of `kind` ("logits", "labels" or "hidden") under `name`."""

    def add(fn: Callable) -> Callable:
        fn.kind = kind
        return LOSSES.register(name)(fn)

    return add


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


@loss("forward_kl", "logits")
def forward_kl(student, teacher, *, temperature=1.0, beta=0.5):
    """T² · KL(p_teacher ‖ p_student): mass-covering (torchtune's ForwardKLLoss minus the teacher's entropy)."""
    t = temperature
    return t * t * _kl(F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1))


@loss("reverse_kl", "logits")
def reverse_kl(student, teacher, *, temperature=1.0, beta=0.5):
    """T² · KL(p_student ‖ p_teacher): mode-seeking."""
    t = temperature
    return t * t * _kl(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1))


@loss("jsd", "logits")
def jsd(student, teacher, *, temperature=1.0, beta=0.5):
    """T² · generalised Jensen-Shannon (GKD, Agarwal et al.): β·KL(p_T ‖ m) + (1-β)·KL(p_S ‖ m)
    with m = β·p_T + (1-β)·p_S; β = 0 is forward KL, β = 1 reverse KL (the limits, as in TRL)."""
    t = temperature
    log_s, log_t = F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)
    if beta <= 0:
        return t * t * _kl(log_t, log_s)
    if beta >= 1:
        return t * t * _kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_t + torch.log(torch.tensor(beta)),
                                         log_s + torch.log(torch.tensor(1 - beta))]), 0)
    return t * t * (beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m))


@loss("ce", "labels")
def cross_entropy(student_logits, labels):
    """The student's cross-entropy on the data's next tokens (its language-model loss)."""
    return F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")


@loss("hidden_mse", "hidden")
def hidden_mse(student, teacher):
    """Mean squared difference of the (projected) student's and the teacher's hidden states."""
    return (student.float() - teacher.float()).pow(2).mean(-1)


@loss("hidden_cosine", "hidden")
def hidden_cosine(student, teacher):
    """1 − cosine similarity of the (projected) student's and the teacher's hidden states."""
    return 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
