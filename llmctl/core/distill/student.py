"""The student's starting point and what it must share with its teacher.

- `student_config(teacher_cfg, keep_every)`: the teacher's architecture with every k-th block;
  `copy_teacher_layers(teacher, student, keep_every)` fills such a student from the teacher
  (DistilBERT's initialisation: blocks 0, k, 2k, …, the embeddings, final norm and head).
- `check_tokenizers(teacher_hash, student_hash)`: the two models must read the same ids; a
  mismatch is refused with both hashes (no silent vocabulary remapping).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from llmctl.core.model.config import PER_LAYER
from llmctl.errors import ConfigError

_BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


def kept_layers(teacher_layers: int, keep_every: int) -> list[int]:
    """The teacher blocks a `keep_every` student keeps: 0, k, 2k, …"""
    return list(range(0, teacher_layers, keep_every))


def student_config(teacher_cfg, keep_every: int):
    """The teacher's model config with only the kept blocks."""
    if keep_every < 1:
        raise ConfigError(f"config key 'objective_args.keep_every': must be >= 1, got {keep_every}")
    kept = kept_layers(teacher_cfg.num_layers, keep_every)
    # a structurally pruned teacher's sizes, Gemma 2's windows: the kept layers' own
    per_layer = {key: [sizes[i] for i in kept] for key in PER_LAYER if (sizes := getattr(teacher_cfg, key, None))
                 is not None}
    return dataclasses.replace(teacher_cfg, num_layers=len(kept), **per_layer)


@torch.no_grad()
def copy_teacher_layers(teacher: nn.Module, student: nn.Module, keep_every: int) -> None:
    """Copy every tensor of `student` from its teacher counterpart (block i ← block i·k)."""
    source = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        found = _BLOCK.match(name)
        origin = _BLOCK.sub(f"model.layers.{int(found[1]) * keep_every}.", name) if found else name
        if origin not in source or source[origin].shape != tensor.shape:
            raise ConfigError(f"student_init=teacher: the teacher has no tensor {origin} of shape {list(tensor.shape)}")
        tensor.copy_(source[origin])


def check_tokenizers(teacher: str, teacher_hash: str | None, student_hash: str | None) -> None:
    """ConfigError unless the teacher's tokenizer is the student data's."""
    if teacher_hash is None:
        raise ConfigError(f"objective_args.teacher: {teacher} has no tokenizer, so the student's cannot be checked "
                          "against it; copy the tokenizer that made it into the checkpoint")
    if teacher_hash != student_hash:
        raise ConfigError(f"the teacher's tokenizer ({teacher_hash}) is not the student's ({student_hash}): "
                          "distillation needs the same token ids; encode the data with the teacher's tokenizer")
