"""Edges of decorated functions — registered strategies and the like, which mutmut 3 leaves
unmutated unless the scratch copy is rewritten with `scripts/undecorate.py`: the learning-rate
schedules at and past their ends, and the distillation losses over any leading shape."""

from __future__ import annotations

import pytest
import torch


# -- learning-rate schedules ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_schedules_stay_at_min_lr_past_max_steps(name):
    """A refit `max_time` horizon can end a run's schedule before its step: the rate then stays
    at min_lr (a cosine would climb back, a line go negative)."""
    from llmctl.core.train.schedule import lr_at

    p = dict(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=10, decay_fraction=0.2)
    assert [lr_at(name, step, **p) for step in (10, 15, 18, 30)] == pytest.approx([0.1] * 4)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_a_one_step_decay_reaches_min_lr_at_its_end(name):
    from llmctl.core.train.schedule import lr_at

    p = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=5)
    assert [lr_at(name, step, **p) for step in (3, 4, 5)] == pytest.approx([1.0, 1.0, 0.1])


def test_wsd_with_a_one_step_decay():
    """decay_fraction 0.1 of 10 steps: one decay step — the plateau lasts through step 9."""
    from llmctl.core.train.schedule import lr_at

    p = dict(lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10, decay_fraction=0.1)
    assert [lr_at("wsd", step, **p) for step in (8, 9, 10)] == pytest.approx([1.0, 1.0, 0.1])
    p["decay_fraction"] = 0.01  # rounds to no step: still one
    assert [lr_at("wsd", step, **p) for step in (9, 10)] == pytest.approx([1.0, 0.1])


# -- distillation losses ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "hidden_mse", "hidden_cosine"])
def test_losses_reduce_the_last_dimension_whatever_leads(name):
    """One value per position: [2, 3, V] inputs give the [2, 3] values of their six rows; with
    no settings, the loss is at temperature 1 and β = 0.5."""
    from llmctl.core.distill.losses import LOSSES

    fn = LOSSES.get(name)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    settings = {} if fn.kind == "hidden" else dict(temperature=2.0, beta=0.3)
    rows = fn(student.reshape(6, 7), teacher.reshape(6, 7), **settings)
    assert rows.shape == (6,)
    torch.testing.assert_close(fn(student, teacher, **settings), rows.reshape(2, 3))
    if fn.kind == "logits":
        torch.testing.assert_close(fn(student, teacher), fn(student, teacher, temperature=1.0, beta=0.5))
