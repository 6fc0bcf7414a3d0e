"""Resolve a `TrainConfig` into a checked plan (model config, tokenizer, data) before any write.

Every problem a user can fix — unknown preset, missing or empty data, shards from another
tokenizer, a sequence longer than the model's context, fp16 without CUDA — is a ConfigError
(exit 2) raised here, so a bad run never creates OUTDIR.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmctl.core.report import SILENT, Reporter
from llmctl.core.train.config import TrainConfig
from llmctl.errors import CheckpointError, ConfigError, DataError, UsageError

PRECISIONS = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
              "fp16": "float16", "float16": "float16"}


@dataclass
class Plan:
    """Everything the loop needs to know, resolved and validated."""

    config: TrainConfig
    model_config: Any  # ModelConfig
    init_from: Path | None  # a checkpoint whose weights start the run (model=CKPT)
    tokenizer: Any | None  # Tok
    tokenizer_dir: Path | None  # copied into every checkpoint
    shards: Any | None  # TokenShards, or None for raw text
    text_files: list[Path] = field(default_factory=list)
    val_files: list[Path] = field(default_factory=list)
    objective: str = "causal"  # a name in core/train/objectives.py's OBJECTIVES
    precision: str = "float32"
    mask_id: int | None = None  # masked objective: filled by its `resolve`
    special_ids: list[int] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    prepared: Any = None  # what the objective's `resolve` made of the data (SFT: encoded rows)
    report: Reporter = SILENT  # where `resolve` reports (a data summary, warnings)


def make_plan(cfg: TrainConfig, device_type: str, report: Reporter = SILENT) -> Plan:
    """Check `cfg` against the model, tokenizer and data; ConfigError on the first problem
    (warnings go to `report`)."""
    _check_numbers(cfg)
    precision = _precision(cfg.precision, device_type)
    model_config, init_from, ckpt_tok = _model_config(cfg.model, cfg.model_args)
    tokenizer, tokenizer_dir = _tokenizer(cfg.tokenizer, ckpt_tok)
    if not cfg.data:
        raise ConfigError("config key 'data': no training data given (a token-shard directory or text files)")
    paths = [Path(p) for p in cfg.data]
    for p in paths:
        if not p.exists():
            raise ConfigError(f"config key 'data': {p} does not exist")
    shards, text_files = None, []
    if len(paths) == 1 and (paths[0] / "manifest.json").is_file():
        shards = _open_shards(paths[0], tokenizer)
        if tokenizer is None and shards.tokenizer_dir is not None:  # the shards' own tokenizer
            tokenizer, tokenizer_dir = _tokenizer(str(shards.tokenizer_dir), None)
        longest = max(s["tokens"] for s in shards.manifest["splits"]["train"]["shards"])
        if longest <= cfg.seq_len:
            raise ConfigError(f"config key 'data': {paths[0]} has no train shard longer than seq_len={cfg.seq_len} "
                              f"tokens (longest: {longest})")
        vocab, eos, bos = shards.manifest["vocab_size"], shards.manifest.get("eos_id"), shards.manifest.get("bos_id")
    else:
        text_files = _text_files(paths)
        if tokenizer is None:
            raise ConfigError("config key 'tokenizer': raw text data needs a tokenizer (tokenizer=DIR)")
        vocab, eos, bos = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id
    val_files = _text_files([Path(p) for p in cfg.val_data]) if cfg.val_data else []

    if init_from is None:  # a preset: the vocabulary comes from the data's tokenizer (or a larger model_args one)
        asked = cfg.model_args.get("vocab_size")
        if asked is not None and int(asked) < vocab:
            raise ConfigError(f"config key 'model_args.vocab_size': {asked} is smaller than the data's tokenizer "
                              f"({vocab} tokens); leave it out to use the tokenizer's size")
        model_config = dataclasses.replace(model_config, vocab_size=int(asked or vocab), eos_token_id=eos,
                                            bos_token_id=bos, pad_token_id=getattr(tokenizer, "pad_id", None))
    elif vocab > model_config.vocab_size:
        raise ConfigError(
            f"config key 'data': its tokenizer has {vocab} tokens but model {cfg.model} has vocab_size "
            f"{model_config.vocab_size}; tokenize with the model's tokenizer"
        )
    model_config = _context(cfg, model_config)
    if cfg.seq_len > model_config.max_seq_len:
        raise ConfigError(
            f"config key 'seq_len': {cfg.seq_len} exceeds the context of model {cfg.model} "
            f"(max_seq_len {model_config.max_seq_len})"
        )
    if shards is not None:  # ids the manifest does not account for would index past the embedding mid-run
        from llmctl.core.checks import check_ids_fit

        check_ids_fit([a for split in shards.splits for a in shards.split(split)], model_config.vocab_size, paths[0])
    model_config = _training_overrides(cfg, model_config)
    from llmctl.core.train.objectives import OBJECTIVES, default_objective

    objective = cfg.objective if cfg.objective != "auto" else default_objective(model_config)
    plan = Plan(cfg, model_config, init_from, tokenizer, tokenizer_dir, shards, text_files, val_files,
                objective, precision, parents=[str(init_from)] if init_from else [], report=report)
    OBJECTIVES.get(objective).resolve(plan)  # an unknown name is a usage error, as any registry's
    if cfg.max_time is None and 0 < cfg.max_steps < cfg.warmup_steps:
        report.warn(f"warmup_steps={cfg.warmup_steps} is longer than max_steps={cfg.max_steps}: "
                    f"lr never reaches {cfg.lr:g}")
    return plan


NUMBER_RULES: list[tuple[tuple[str, ...], Callable[[float], bool], str]] = [  # keys, test, what it asks for
    (("batch_size", "seq_len", "grad_accum", "keep_last", "log_every"), lambda v: v >= 1, "must be >= 1"),
    (("max_time",), lambda v: v > 0, "must be > 0 minutes"),
    (("max_steps", "warmup_steps", "save_every", "eval_every", "eval_batches", "grad_clip", "weight_decay",
      "min_lr", "seed", "mtp_weight", "peak_tflops"), lambda v: v >= 0, "must be >= 0"),
    (("lr", "eps"), lambda v: v > 0, "must be > 0"),
    (("val_fraction", "beta1", "beta2", "dropout"), lambda v: 0 <= v < 1, "must be in [0, 1)"),
    (("mask_prob",), lambda v: 0 < v < 1, "must be in (0, 1)"),
    (("decay_fraction",), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
]


def _check_numbers(cfg: TrainConfig) -> None:
    """Every numeric key in its range, and finite (NaN and inf fail here, not at the optimiser's first
    step); None, where a key allows it, means unset."""
    import math

    for keys, ok, asks in NUMBER_RULES:
        for key in keys:
            value = getattr(cfg, key)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise ConfigError(f"config key '{key}': {asks}, got {value}")
    from llmctl.core.train.schedule import SCHEDULES

    if cfg.schedule not in SCHEDULES:
        SCHEDULES.get(cfg.schedule)  # raises with a suggestion


def _precision(name: str, device_type: str) -> str:
    import torch

    if name == "auto":
        return "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    precision = PRECISIONS[name]
    if precision == "float16" and device_type != "cuda":
        raise ConfigError("config key 'precision': fp16 needs CUDA (it trains with a grad scaler); use bf16 on CPU")
    return precision


def _model_config(name: str, model_args: dict):
    """(ModelConfig, checkpoint path, checkpoint dir if it holds a tokenizer)."""
    path = Path(name)
    if path.is_dir():
        from llmctl.core.checkpoint import open_checkpoint
        from llmctl.core.model.io import load_model

        try:
            ck = open_checkpoint(path)
            model_config = load_model(path)[1]  # checks every tensor; memory-mapped, nothing read
        except CheckpointError as exc:
            raise ConfigError(f"config key 'model': {exc}") from None
        if model_args:
            raise ConfigError("config key 'model_args': applies to presets only, not to checkpoint " + name)
        return model_config, path, (path if ck.has_tokenizer else None)
    import json

    from llmctl.core.model.presets import load_preset

    return load_preset(name, [f"{k}={json.dumps(v)}" for k, v in model_args.items()]), None, None


def _tokenizer(name: str | None, ckpt_tok: Path | None):
    source = Path(name) if name else ckpt_tok
    if source is None:
        return None, None
    if not source.exists():
        raise ConfigError(f"config key 'tokenizer': {source} does not exist")
    from llmctl.core.tokenizer import load_tokenizer

    try:
        return load_tokenizer(source), source
    except (DataError, CheckpointError, OSError) as exc:
        raise ConfigError(f"config key 'tokenizer': {exc}") from None


def _open_shards(path: Path, tokenizer):
    from llmctl.core.data.shards import TokenShards

    try:
        shards = TokenShards(path)
    except (DataError, UsageError, OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"config key 'data': {exc}") from None
    manifest = shards.manifest
    if tokenizer is not None:
        try:
            shards.check_tokenizer(tokenizer.hash, tokenizer.vocab_size)
        except (DataError, UsageError) as exc:
            raise ConfigError(f"config key 'data': {exc}") from None
    if not manifest.get("splits", {}).get("train", {}).get("tokens"):
        raise ConfigError(f"config key 'data': {path} has an empty train split")
    return shards


def _text_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".text"))
            if not found:
                raise ConfigError(f"config key 'data': {p} has no manifest.json and no .txt/.md files")
            files += found
        else:
            files.append(p)
    if sum(f.stat().st_size for f in files) == 0:
        raise ConfigError(f"config key 'data': {', '.join(map(str, paths))} is empty")
    return files


def _context(cfg, model_config):
    """A longer or rescaled context set at finetune time (`max_seq_len`, `rope_scaling` keys of
    the finetune schema) for a rotary model; other position encodings refuse it."""
    changes = {k: v for k in ("max_seq_len", "rope_scaling") if (v := getattr(cfg, k, None)) is not None}
    if not changes:
        return model_config
    if model_config.position != "rope":
        raise ConfigError(f"config key '{next(iter(changes))}': only a rotary (rope) model's context can be changed, "
                          f"not {model_config.position}")
    from llmctl.core.model.position import ROPE_SCALINGS

    if "rope_scaling" in changes:
        scaling = dict(changes["rope_scaling"])
        kind = scaling.pop("type", None) or scaling.get("rope_type")
        ROPE_SCALINGS.get(kind)  # unknown: a usage error naming the choices
        changes["rope_scaling"] = {**scaling, "rope_type": kind}
    return dataclasses.replace(model_config, **changes)


def _training_overrides(cfg: TrainConfig, model_config):
    changes: dict[str, Any] = {"gradient_checkpointing": bool(cfg.gradient_checkpointing)}  # finetune: None = auto
    if cfg.dropout is not None:
        changes.update(embedding_dropout=cfg.dropout, attention_dropout=cfg.dropout, residual_dropout=cfg.dropout)
    if cfg.mtp_weight is not None:
        changes["mtp_loss_weight"] = cfg.mtp_weight
    return dataclasses.replace(model_config, **changes)
