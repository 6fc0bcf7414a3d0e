"""Load and save a model as a checkpoint directory (the formats live in `core/hf.py`).

    model, cfg = load_model(path)                # an llmctl or a transformers checkpoint
    save_model(model, out_dir, lineage={...})    # transformers-loadable whenever HF has the arch
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from llmctl.core.checkpoint import open_checkpoint, save_checkpoint
from llmctl.core.hf import config_from_hf, read_tensors, to_checkpoint
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.model.build import build_model
from llmctl.errors import CheckpointError

if TYPE_CHECKING:
    from llmctl.core.model.transforms import Transform


def load_model(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    transforms: Iterable[Transform] = (),
    config: ModelConfig | None = None,
) -> tuple[Transformer, ModelConfig]:
    """Load an llmctl or transformers checkpoint directory as a `Transformer` (eval mode).

    The model is built on the meta device with the transforms the checkpoint records, and the
    stored tensors are assigned to it (strict: every tensor used, every one present), so no
    weight is allocated twice. Tensors stay memory-mapped until moved; `dtype` None keeps the
    stored dtype (it converts floating-point tensors only). `transforms` are then applied to the
    loaded model (LoRA on a base, quantizing a dense model). `config` replaces the stored
    config by one of the same architecture with other run-time settings (dropout, …, and a
    rotary model's context: `max_seq_len`, `rope_scaling`).
    A PEFT adapter directory loads as its base with the adapter (`core/adapters`).
    """
    from llmctl.core.adapters import is_adapter, load_adapter
    from llmctl.core.model import transforms as tf

    if is_adapter(path):
        return load_adapter(path, device, dtype, transforms=transforms, config=config)

    ck = open_checkpoint(path)
    cfg = config_from_hf(ck.config)
    classifier = None
    if config is not None and config.num_labels and not cfg.num_labels:  # as transformers: a new score head
        classifier, config = config, dataclasses.replace(config, num_labels=None, tie_embeddings=cfg.tie_embeddings,
                                                         pad_token_id=cfg.pad_token_id)
    if config is not None:
        if config.weights_architecture() != cfg.weights_architecture():
            raise CheckpointError(f"{ck.path}: the given model config is not the checkpoint's architecture")
        cfg = config
    model = build_model(cfg, tf.recorded(ck.config, ck.lineage), device="meta")
    tensors = read_tensors(ck, model)
    if model.cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    if classifier is not None:
        from llmctl.core.model.reward import add_score_head

        add_score_head(model, classifier)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    for transform in transforms:
        transform.apply(model)
    return model.eval(), model.cfg


def save_model(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    lineage: dict | None = None,
    generation_config: dict | None = None,
    force: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write `model` as a checkpoint transformers can load whenever it has the architecture.

    The model's transforms are recorded (`transforms.record`); when the architecture's weight
    names cannot carry a transformed module's tensors, it is written as `model_type: llmctl`.
    """
    from llmctl.core.model import transforms as tf

    tensors, config = to_checkpoint(model)
    quantization, specs = tf.record(model.transforms)
    if quantization is not None:
        config["quantization_config"] = quantization
    lineage = {**(lineage or {}), **({"transforms": specs} if specs else {})}
    return save_checkpoint(out_dir, tensors, config, generation_config=generation_config,
                           tokenizer_dir=tokenizer_dir, lineage=lineage, force=force,
                           max_shard_bytes=max_shard_bytes)
