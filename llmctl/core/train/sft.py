"""The `sft` objective: supervised finetuning on prompt/completion, chat or text records.

`resolve` encodes the data (`core/data/sft.py`) before anything is written and reports its
summary; batches are rows of (ids, loss mask, document id), packed or padded; `prepare` applies
the finetuning method's transforms (`core/adapters/methods.py`) and freezes all but the
adapter; `save` writes a PEFT adapter directory for adapter methods, a checkpoint for `full`.
Batch i is a pure function of (seed, i), so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from llmctl.core.train.objectives import OBJECTIVES, Batch, Objective, labelled
from llmctl.errors import ConfigError, DataError


class SFTBatches:
    """Rows in a seeded order, reshuffled every epoch; each rank its own slice of each batch."""

    def __init__(self, train: torch.Tensor, val: torch.Tensor | None, *, batch_size: int, rank: int, world: int,
                 seed: int, eval_batches: int):
        self.train, self.val, self.seed = train, val, seed
        self.batch_size, self.rank, self.world, self.eval_batches = batch_size, rank, world, eval_batches
        self._order: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(len(self.train), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))}
        return self._order[epoch]

    def batch(self, index: int) -> torch.Tensor:
        start = (index * self.world + self.rank) * self.batch_size
        rows = [self._permutation(p // len(self.train))[p % len(self.train)]
                for p in range(start, start + self.batch_size)]
        return self.train[torch.stack(rows)]

    def val_batches(self) -> list[torch.Tensor]:
        if self.val is None or not len(self.val):
            return []
        # every rank must take part in validation: fewer rows than ranks, and each scores them all
        mine = self.val[self.rank::self.world] if len(self.val) >= self.world else self.val
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)][: self.eval_batches]

    def state(self) -> dict:
        return {"rows": len(self.train)}

    def load_state(self, state: dict) -> None:
        if state.get("rows") != len(self.train):
            raise DataError(f"the training data changed since the checkpoint ({state.get('rows')} rows then, "
                            f"{len(self.train)} now); resume with the same data")


@OBJECTIVES.register("sft")
class SFT(Objective):
    """Next-token loss on the learned tokens of SFT examples (completions, assistant turns)."""

    command = "finetune"
    targets = staticmethod(labelled)  # a step's loss is the mean over all its learned tokens

    @classmethod
    def resolve(cls, plan) -> None:
        super().resolve(plan)
        from llmctl.core.adapters.methods import METHODS

        cfg = plan.config
        if not plan.model_config.is_causal:
            raise ConfigError(f"config key 'model': {cfg.model} is encoder-only; finetuning is for causal models")
        transforms = METHODS.get(cfg.adapter_method)(cfg.adapter)  # a usage error naming the choices
        if cfg.merge_adapter and not all(getattr(t, "mergeable", True) for t in transforms):
            raise ConfigError(f"config key 'merge_adapter': method {cfg.adapter_method} has no weights to merge into "
                              "the base; its adapter directory loads as it is")
        if cfg.adapter_method != "full" and plan.init_from is None:
            raise ConfigError(f"method {cfg.adapter_method}: adapters need a base checkpoint, not the preset {cfg.model}")
        if plan.shards is not None:
            raise ConfigError("config key 'data': SFT reads JSONL/JSON records, not token shards")
        if cfg.adapter_method == "qlora" and cfg.precision == "auto":
            plan.precision = "bfloat16"  # QLoRA computes in bf16 (CPU and GPU)
        if cfg.adapter_method == "qlora" and cfg.gradient_checkpointing is None:  # and recomputes its blocks
            plan.model_config = dataclasses.replace(plan.model_config, gradient_checkpointing=True)
        plan.prepared = cls.encode(plan)

    @classmethod
    def encode(cls, plan) -> dict:
        """The data as rows (`{"train", "val", …}`), its summary reported."""
        prepared = _encode(plan)
        plan.report.info(_describe(prepared["stats"], prepared.get("val_stats")))
        return prepared

    def data(self, d):
        cfg, prepared = self.cfg, self.plan.prepared
        return SFTBatches(prepared["train"], prepared["val"], batch_size=cfg.batch_size, rank=d.rank, world=d.world,
                          seed=cfg.seed, eval_batches=cfg.eval_batches)

    def batch(self, rows, index, generator=None) -> Batch:
        ids, mask, docs = rows.unbind(1)
        inputs = ids[:, :-1]
        labels = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
        extra = {}
        docs = docs[:, :-1]
        if self.cfg.packing and bool((docs != docs[:, :1]).any()):  # else one document a row:
            [extra["document_ids"]] = self._to_device(docs)  # no mask needed, SDPA's causal kernel (rows on CPU)
        return *self._to_device(inputs, labels), extra

    def prepare(self, model: nn.Module) -> None:
        from llmctl.core.adapters import mark_trainable
        from llmctl.core.adapters.methods import METHODS

        options = self.adapter_options()
        transforms = METHODS.get(self.cfg.adapter_method)(options)
        names = [t.name for t in transforms]
        if names and [t.name for t in model.transforms][-len(names):] != names:  # not a resumed one
            for transform in transforms:
                transform.apply(model)
        if names:
            mark_trainable(model, options.modules_to_save)
        self._model = model  # whose frozen head makes the logits chunk by chunk (`loss`)

    def adapter_options(self):
        """The adapter's options (`adapter.*`): what `prepare` applies and trains."""
        return self.cfg.adapter

    def loss(self, forward, inputs, labels, extra):
        """The mean next-token loss over the learned positions. With a frozen, unsharded head (an
        adapter) the logits are made a few hundred rows at a time, each chunk's gradient taken at
        once (`fused_chunks`): no [batch, seq, vocab] float32 logits, nothing recomputed; on CPU
        only the learned positions get logits (elsewhere selecting them would cost a host sync)."""
        model = getattr(self, "_model", None)
        head = model.lm_head.weight if model is not None else None
        if head is None or head.requires_grad or type(head.data) is not torch.Tensor or model.cfg.num_mtp_heads:
            return super().loss(forward, inputs, labels, extra)  # trained or FSDP-sharded head: the model's loss
        from llmctl.core.distill.chunked import fused_chunks
        from llmctl.core.model.logprobs import CHUNK, MIN_ROWS

        out = forward(inputs, skip_head=True, **extra)
        features, targets = out.features.flatten(0, 1), labels.flatten()
        if features.device.type == "cpu":
            learned = targets != -100
            features, targets = features[learned], targets[learned]
        count = (targets != -100).sum()

        def chunk_loss(rows, start, stop):
            loss = F.cross_entropy(model.head(rows), targets[start:stop], ignore_index=-100, reduction="sum") / count
            return loss, loss.detach()[None]

        if not len(targets):  # nothing learned in this batch: the mean over none, as cross_entropy gives
            return super().loss(forward, inputs, labels, extra)
        loss, _ = fused_chunks(chunk_loss, features, [], rows=max(MIN_ROWS, CHUNK // model.cfg.vocab_size))
        return loss + out.aux_loss, loss

    def save(self, model: nn.Module, directory, **kwargs) -> None:
        if self.cfg.adapter_method == "full":
            super().save(model, directory, **kwargs)
        else:
            from llmctl.core.adapters import save_adapter

            save_adapter(model, directory, base=self.plan.init_from, **kwargs)
        template = (getattr(self.plan, "prepared", None) or {}).get("chat_template")
        if template is not None and kwargs.get("tokenizer_dir") is not None:
            save_template(directory, template)


def save_template(directory, template: str) -> None:
    """Make the tokenizer files in `directory` carry the chat template the run trained with (the
    `chat_template` key), as TRL's SFTTrainer saves it: tokenizer_config.json's `chat_template`,
    and chat_template.jinja when the tokenizer has one (it takes precedence)."""
    from pathlib import Path

    from llmctl.core.checkpoint import read_json_object
    from llmctl.core.io import atomic_file, write_json
    from llmctl.core.tokenizer import JINJA

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        return
    config = read_json_object(directory / "tokenizer_config.json", required=False) or {}
    config["chat_template"] = template
    write_json(directory / "tokenizer_config.json", config)
    if (directory / JINJA).is_file():
        with atomic_file(directory / JINJA, "w", force=True, encoding="utf-8") as f:
            f.write(template)


def _encode(plan) -> dict:
    """{"train", "val": row tensors, "stats", "val_stats"}: the records encoded and packed."""
    from llmctl.core.data.sft import SFTEncoder, encode_files, pack

    cfg, tok = plan.config, plan.tokenizer
    template = chat_template(plan)
    encoder = SFTEncoder(tok, train_on=cfg.train_on, template=template)
    examples = encode_files(plan.text_files, encoder)
    if plan.val_files:
        val = encode_files(plan.val_files, encoder)
    else:
        examples, val = hold_out(examples, cfg)
    pad = pad_id(tok)
    length = cfg.seq_len + 1
    train_rows, stats = pack(examples, length, pad, cfg.packing)
    val_rows, val_stats = pack(val, length, pad, cfg.packing) if val else (None, None)
    return {"train": train_rows, "val": val_rows, "stats": stats, "val_stats": val_stats, "chat_template": template}


def chat_template(plan) -> str | None:
    """The `chat_template` key's template (checked against the tokenizer), or None: the tokenizer's."""
    if not plan.config.chat_template:
        return None
    from llmctl.core.chat_templates import resolve_template

    template, needed = resolve_template(plan.config.chat_template)
    missing = [t for t in needed if plan.tokenizer.inner.token_to_id(t) is None]
    if missing:
        raise ConfigError(f"config key 'chat_template': the tokenizer lacks {', '.join(missing)}; "
                          "give a template its vocabulary has")
    return template


def hold_out(items: list, cfg) -> tuple[list, list]:
    """(train, validation): a seeded `val_fraction` of `items` held out (none of a single item)."""
    import random

    order = list(range(len(items)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[: math.floor(len(items) * cfg.val_fraction) if len(items) > 1 else 0])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def pad_id(tok) -> int:
    return tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)


def _describe(stats, val_stats) -> str:
    s = stats.summary()
    per = s["tokens_per_example"]
    text = (f"SFT data: {s['examples']} examples, {per['min']}/{per['mean']:g}/{per['max']} tokens per example "
            f"(min/mean/max), {s['loss_tokens']} learned tokens in {s['rows']} rows ({s['fill']:.0%} filled)")
    if s["truncated"] or s["dropped"]:
        text += f"; {s['truncated']} cut to seq_len, {s['dropped']} dropped (nothing left to learn)"
    if val_stats is not None:
        text += f"; validation: {val_stats.examples} examples in {val_stats.rows} rows"
    return text
