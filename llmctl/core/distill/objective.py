"""The `distill` training objective: a student learns from a frozen teacher (or its stored top-k).

    llmctl train objective=distill objective_args.teacher=TEACHER model=STUDENT data=SHARDS -o OUT

An objective, not a loop: the Trainer keeps accumulation, precision, checkpoints and exact
resume. Here: the teacher is a frozen companion (eval mode, no gradients); the loss is the
`Criterion`'s weighted losses over both models' final hidden states, made into logits a chunk
at a time; hidden-state losses train `Projections` beside the student (kept in the training
state, never in the exported student); `student_init=teacher` starts the student from every
k-th teacher block. Validation reports the student's own language-model loss.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llmctl.core.distill.config import DistillConfig
from llmctl.core.distill.criterion import Criterion, Projections, default_layer_map
from llmctl.core.train.objectives import Causal
from llmctl.errors import ConfigError

TOPK = "teacher_topk"  # the batch's stored teacher outputs, beside the model kwargs


def settings(plan) -> DistillConfig:
    from llmctl.config import build

    return build(DistillConfig, plan.config.objective_args, prefix="objective_args.")


class Distill(Causal):
    """Next-token distillation of a causal student from a teacher with the same tokenizer."""

    takes_args = True
    command = "distill"

    @classmethod
    def resolve(cls, plan) -> None:
        s = settings(plan)
        if (s.teacher is None) == (s.teacher_outputs is None):
            raise ConfigError("objective_args: give the teacher checkpoint (teacher) or its stored outputs "
                              "(teacher_outputs), one of them")
        _check_losses(s)
        if s.lora and s.adapter != "lora":
            raise ConfigError("config key 'objective_args.lora': set objective_args.adapter=lora to train adapters")
        if s.adapter == "lora":
            from llmctl.core.model.transforms import TRANSFORMS

            try:
                TRANSFORMS.get("lora")(**s.lora)
            except TypeError as exc:
                raise ConfigError(f"config key 'objective_args.lora': {exc}") from None
        if s.teacher is not None:
            _resolve_teacher(plan, s)
        else:
            _resolve_store(plan, s)
        super().resolve(plan)

    def __init__(self, plan, device):
        super().__init__(plan, device)
        s = self.settings = settings(plan)
        self.teacher = load_teacher(s.teacher, device) if s.teacher else None
        self.store = None
        if s.teacher_outputs:
            from llmctl.core.distill.store import TeacherOutputs

            self.store = TeacherOutputs(s.teacher_outputs)
        student = plan.model_config
        layer_map = [tuple(p) for p in s.layer_map] or (
            default_layer_map(student.num_layers, self.teacher.cfg.num_layers) if self.teacher else [])
        self.criterion = Criterion(s.losses, temperature=s.temperature, beta=s.beta, layer_map=layer_map,
                                   chunk_rows=s.chunk_rows)
        self.projections = None
        if self.criterion.hidden and student.hidden_size != self.teacher.cfg.hidden_size:
            with torch.random.fork_rng(devices=[]):  # the same projections whatever ran before
                torch.manual_seed(plan.config.seed)
                self.projections = Projections(len(layer_map), student.hidden_size, self.teacher.cfg.hidden_size)
        self.student: nn.Module | None = None
        self.source = None

    def initialise(self, model: nn.Module) -> None:
        """The teacher's blocks (student_init=teacher), then adapters (adapter=lora; on resume the
        checkpoint's recorded transform brings them back)."""
        if self.settings.student_init == "teacher":
            from llmctl.core.distill.student import copy_teacher_layers

            copy_teacher_layers(self.teacher, model, self.settings.keep_every)
        if self.settings.adapter == "lora":
            from llmctl.core.model.transforms import TRANSFORMS

            TRANSFORMS.get("lora")(**self.settings.lora).apply(model)

    def prepare(self, model: nn.Module) -> None:
        self.student = model  # its head turns features into logits chunk by chunk
        if self.settings.adapter == "lora":
            from llmctl.core.adapters import mark_trainable

            mark_trainable(model, self.settings.lora.get("modules_to_save"))

    def companions(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def extra(self) -> nn.Module | None:
        return self.projections

    def data(self, d):
        self.source = super().data(d)
        return self.source

    def batch(self, rows, index, generator=None):
        inputs, labels, extra = super().batch(rows, index, generator)
        if self.store is not None and generator is None:  # a training micro-batch (validation passes a generator)
            ids, values = self.store.lookup(self.source.positions(index))
            extra[TOPK] = tuple(self._to_device(ids, values))
        return inputs, labels, extra

    def loss(self, forward, inputs, labels, extra):
        extra = dict(extra)
        topk = extra.pop(TOPK, None)
        hidden = self.criterion.hidden
        out = forward(inputs, skip_head=True, output_hidden_states=hidden, **extra)
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher(inputs, skip_head=True, output_hidden_states=hidden, **extra)
        total, parts = self.criterion(self.student, out, labels, teacher=self.teacher, teacher_out=teacher_out,
                                      topk=topk, projections=self.projections)
        return total + out.aux_loss, parts["ce"]


def load_teacher(path: str, device) -> nn.Module:
    """The teacher as a plain model: a checkpoint, or a PEFT adapter directory loaded on its base
    with its LoRA deltas folded in (a prefix or prompt adapter stays as it loads)."""
    from llmctl.core.adapters import is_adapter, merge_adapter
    from llmctl.core.model.io import load_model

    model = load_model(path, device=device, dtype=torch.float32)[0]
    if is_adapter(path) and getattr(model, "prompt_encoder", None) is None:
        model = merge_adapter(model)
    return model


def _check_losses(s: DistillConfig) -> None:
    from llmctl.core.distill.losses import LOSSES

    if not s.losses or any(w < 0 for w in s.losses.values()) or not any(w > 0 for w in s.losses.values()):
        raise ConfigError(f"config key 'objective_args.losses': name: weight pairs, weights >= 0, one > 0; "
                          f"got {s.losses}")
    for name in s.losses:
        if LOSSES.get(name).kind == "hidden" and s.teacher is None:
            raise ConfigError(f"objective_args.losses: {name} matches hidden states, which need the teacher online "
                              "(objective_args.teacher), not stored outputs")
    if s.temperature <= 0 or not 0 <= s.beta <= 1:
        raise ConfigError(f"objective_args: temperature must be > 0 and beta in [0, 1], got {s.temperature}, {s.beta}")


def _resolve_teacher(plan, s: DistillConfig) -> None:
    """Check the teacher against the student; `student_init=teacher` makes the student's config."""
    from pathlib import Path

    from llmctl.core.adapters import base_path, is_adapter
    from llmctl.core.distill.student import check_tokenizers, student_config
    from llmctl.core.model.io import load_model
    from llmctl.core.tokenizer import load_tokenizer
    from llmctl.core.train.build import _training_overrides
    from llmctl.errors import CheckpointError, DataError

    try:
        teacher = load_model(s.teacher)[1]  # memory-mapped: checks the files, reads no weights
        tok = load_tokenizer(s.teacher) if (Path(s.teacher) / "tokenizer.json").is_file() or (
            is_adapter(s.teacher) and (base_path(s.teacher) / "tokenizer.json").is_file()) else None  # an adapter's: its base's
    except (CheckpointError, DataError, OSError) as exc:
        raise ConfigError(f"config key 'objective_args.teacher': {exc}") from None
    check_tokenizers(s.teacher, tok.hash if tok else None, getattr(plan.tokenizer, "hash", None))
    if not teacher.is_causal:
        raise ConfigError(f"objective_args.teacher: {s.teacher} is encoder-only; distill trains causal students")
    if s.student_init == "teacher":
        if plan.init_from is not None:
            raise ConfigError("objective_args.student_init=teacher builds the student from the teacher's blocks; "
                              f"leave out model={plan.config.model}")
        plan.model_config = _training_overrides(plan.config, student_config(teacher, s.keep_every))
    elif plan.init_from is None and plan.model_config.vocab_size != teacher.vocab_size:  # a preset: the teacher's
        plan.model_config = dataclasses.replace(plan.model_config, vocab_size=teacher.vocab_size)
    if plan.model_config.vocab_size != teacher.vocab_size:
        raise ConfigError(f"the student's vocab_size ({plan.model_config.vocab_size}) is not the teacher's "
                          f"({teacher.vocab_size}); their logits must line up")
    if plan.config.seq_len > teacher.max_seq_len:
        raise ConfigError(f"config key 'seq_len': {plan.config.seq_len} exceeds the teacher's context "
                          f"({teacher.max_seq_len})")
    for student_layer, teacher_layer in s.layer_map:
        if not (0 <= student_layer <= plan.model_config.num_layers and 0 <= teacher_layer <= teacher.num_layers):
            raise ConfigError(f"config key 'objective_args.layer_map': [{student_layer}, {teacher_layer}] is out of "
                              f"range (student 0…{plan.model_config.num_layers}, teacher 0…{teacher.num_layers})")
    plan.parents.append(s.teacher)


def _resolve_store(plan, s: DistillConfig) -> None:
    from llmctl.core.distill.store import TeacherOutputs
    from llmctl.errors import DataError

    if s.student_init == "teacher":
        raise ConfigError("objective_args.student_init=teacher needs the teacher checkpoint (objective_args.teacher)")
    if plan.shards is None or plan.config.sampling != "sequential":
        raise ConfigError("objective_args.teacher_outputs: stored teacher outputs are per window of token shards; "
                          "train on the shards they were made from with sampling=sequential")
    try:
        store = TeacherOutputs(s.teacher_outputs)
    except DataError as exc:
        raise ConfigError(f"config key 'objective_args.teacher_outputs': {exc}") from None
    if plan.init_from is None:  # a preset student: the teacher's vocabulary
        plan.model_config = dataclasses.replace(plan.model_config, vocab_size=store.manifest["vocab_size"])
    store.check(tokenizer_hash=plan.shards.tokenizer_hash, seq_len=plan.config.seq_len,
                vocab_size=plan.model_config.vocab_size, train_tokens=plan.shards.num_tokens("train"))
