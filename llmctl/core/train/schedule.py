"""Learning-rate schedules, registered by name.

A schedule is `fn(step, *, lr, min_lr, warmup_steps, max_steps, decay_fraction) -> float`: the
learning rate for optimizer step `step` (0-based). Schedules are stateless, so resuming only
needs the step.
"""

from __future__ import annotations

import math

from llmctl.core.registry import Registry

SCHEDULES = Registry("LR schedule", entry_point_group="llmctl.schedules")


def _warmup(step: int, lr: float, warmup_steps: int) -> float | None:
    """The linear warm-up value while `step < warmup_steps`, else None."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return None


@SCHEDULES.register("cosine")
def cosine(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, **_) -> float:
    """Linear warm-up, then a half cosine from `lr` down to `min_lr` at `max_steps`."""
    warm = _warmup(step, lr, warmup_steps)
    if warm is not None:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("linear")
def linear(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, **_) -> float:
    """Linear warm-up, then a straight line from `lr` down to `min_lr` at `max_steps`."""
    warm = _warmup(step, lr, warmup_steps)
    if warm is not None:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr - (lr - min_lr) * progress


@SCHEDULES.register("constant")
def constant(step: int, *, lr: float, warmup_steps: int, **_) -> float:
    """Linear warm-up, then `lr` for good."""
    warm = _warmup(step, lr, warmup_steps)
    return lr if warm is None else warm


@SCHEDULES.register("wsd")
def warmup_stable_decay(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, decay_fraction: float, **_
) -> float:
    """Warm-up, a stable plateau at `lr`, then a linear decay to `min_lr` over the last
    `decay_fraction` of `max_steps` (MiniCPM's WSD)."""
    warm = _warmup(step, lr, warmup_steps)
    if warm is not None:
        return warm
    decay_steps = max(1, round(max_steps * decay_fraction))
    decay_start = max(warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return lr - (lr - min_lr) * progress


def lr_at(name: str, step: int, **params) -> float:
    """The learning rate of schedule `name` at `step`."""
    return SCHEDULES.get(name)(step, **params)
