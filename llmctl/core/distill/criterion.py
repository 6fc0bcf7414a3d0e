"""The weighted sum of the chosen distillation losses for one batch.

    criterion = Criterion({"forward_kl": 0.5, "ce": 0.5}, temperature=2.0)
    total, parts = criterion(student, out, labels, teacher=teacher, teacher_out=t_out)

`out` / `t_out` are the models' outputs with `skip_head=True` (and `output_hidden_states`
when a hidden-state loss is chosen): their final hidden states become logits a chunk of rows
at a time (`chunked.py`), so neither model's [batch, seq, vocab] float32 logits exist at once.
Offline, `topk` = (ids, log-probs) [B, T, K] stands in for the teacher: both distributions
are then restricted to the teacher's top-k ids and renormalised there (the tail mass beyond
the top-k is dropped for both; with K = vocab this is the online loss). Every loss is a mean
over the positions with a label (labels != -100); `parts` holds each unweighted mean, and
`ce` (the student's LM loss) always.
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.core.distill.chunked import fused_chunks
from llmctl.core.distill.losses import LOSSES
from llmctl.core.model.transformer import IGNORE_INDEX

CHUNK, MIN_ROWS = 1 << 20, 64  # logits per chunk (4 MB in float32: cache-sized on a CPU), at least this many rows


class Criterion:
    def __init__(self, losses: dict[str, float], *, temperature: float = 1.0, beta: float = 0.5,
                 layer_map: list[tuple[int, int]] = (), chunk_rows: int = 0):
        self.weights = dict(losses)
        self.fns = {name: LOSSES.get(name) for name in self.weights}
        self.logit_names = [n for n, fn in self.fns.items() if fn.kind == "logits"]
        self.hidden_names = [n for n, fn in self.fns.items() if fn.kind == "hidden"]
        self.names = [*self.logit_names, "ce"]  # the chunked parts, in order
        self.temperature, self.beta, self.layer_map, self.chunk_rows = temperature, beta, list(layer_map), chunk_rows

    @property
    def hidden(self) -> bool:
        """Whether a hidden-state loss needs the models' hidden states."""
        return bool(self.hidden_names)

    def __call__(self, student: nn.Module, out, labels: torch.Tensor, *, teacher: nn.Module | None = None,
                 teacher_out=None, topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                 projections: nn.ModuleList | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = out.features.flatten(0, 1)
        labels = labels.reshape(-1).to(features.device)
        mask = (labels != IGNORE_INDEX).float()
        count = mask.sum().clamp(min=1)
        t_features = teacher_out.features.flatten(0, 1) if teacher_out is not None else None
        ids, values = (t.flatten(0, 1) for t in topk) if topk is not None else (None, None)
        if self.logit_names and t_features is None and ids is None:
            raise ValueError("a logit loss needs the teacher's outputs or its stored top-k")
        weights = torch.tensor([self.weights.get(n, 0.0) for n in self.names], device=features.device)
        settings = dict(temperature=self.temperature, beta=self.beta)

        def compute(rows: torch.Tensor, start: int, stop: int):
            logits, keep = student.head(rows), mask[start:stop]
            parts = []
            if self.logit_names:
                if ids is not None:  # both restricted to the teacher's top-k ids
                    chunk_ids = ids[start:stop]
                    s, t = logits.gather(-1, chunk_ids), values[start:stop].float()
                else:
                    s, t = logits, teacher.head(t_features[start:stop])
                parts += [(self.fns[n](s, t, **settings) * keep).sum() for n in self.logit_names]
            parts.append((LOSSES.get("ce")(logits, labels[start:stop]) * keep).sum())
            parts = torch.stack(parts) / count
            return (parts * weights).sum(), parts

        rows = self.chunk_rows or max(MIN_ROWS, CHUNK // student.cfg.vocab_size)
        total, parts = fused_chunks(compute, features, list(student.parameters()), rows)
        result = dict(zip(self.names, parts))
        for name in self.hidden_names:
            result[name] = self._hidden(self.fns[name], out, teacher_out, projections, mask, count)
            total = total + self.weights[name] * result[name]
        return total, result

    def _hidden(self, fn, out, teacher_out, projections, mask, count) -> torch.Tensor:
        """The mean over the layer map's pairs of `fn` between projected student and teacher states."""
        if teacher_out is None:
            raise ValueError("a hidden-state loss needs the teacher online (not stored top-k outputs)")
        terms = []
        for k, (s, t) in enumerate(self.layer_map):
            student = out.hidden_states[s]
            if projections is not None:
                student = projections[k](student)
            per_row = fn(student.flatten(0, 1), teacher_out.hidden_states[t].flatten(0, 1))
            terms.append((per_row * mask).sum() / count)
        return torch.stack(terms).mean()


def default_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Each student block's output matched to the teacher's at the same relative depth
    (hidden state i is the output of block i; 0 is the embeddings)."""
    return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


class Projections(nn.ModuleList):
    """One linear map per layer-map pair from the student's width to the teacher's (only when they
    differ): trained with the student, kept in the training state, never exported."""

    def __init__(self, pairs: int, student_width: int, teacher_width: int):
        super().__init__(nn.Linear(student_width, teacher_width, bias=False) for _ in range(pairs))
