"""`objective_args` of the distill objective (`llmctl distill` fills them from its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DistillConfig:
    teacher: str | None = None  # the teacher checkpoint (online: run beside the student, frozen)
    teacher_outputs: str | None = None  # or its stored top-k log-probs (`llmctl distill --save-teacher`)
    losses: dict[str, float] = field(default_factory=lambda: {"forward_kl": 0.5, "ce": 0.5})  # name: weight
    temperature: float = 2.0  # of the logit divergences (each scaled by T²)
    beta: float = 0.5  # jsd: the teacher's weight in the mixture (0: forward KL, 1: reverse KL)
    layer_map: list[list[int]] = field(default_factory=list)  # hidden losses: [[student, teacher], …]; [] evenly spaced
    student_init: Literal["model", "teacher"] = "model"  # teacher: the student is every k-th block of the teacher
    keep_every: int = 2  # student_init=teacher: keep teacher blocks 0, k, 2k, …
    adapter: Literal["none", "lora"] = "none"  # lora: the student trains low-rank adapters only
    lora: dict = field(default_factory=dict)  # the lora transform's settings (r, alpha, target_modules, dora, …)
    chunk_rows: int = 0  # positions whose logits are made at a time; 0: about 4 MB of float32 logits
