"""The training recipe schema: every key `llmctl train` accepts (YAML or `key=value`).

The flat keys `model data tokenizer max_steps batch_size seq_len grad_accum lr warmup_steps
schedule precision save_every eval_every keep_last seed` are a contract scripts rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CONFIG_FILE = "train_config.yaml"  # the resolved recipe in a train OUTDIR
CHECKPOINTS = "checkpoints"  # its checkpoints/step-NNNNNN directories


@dataclass
class DistributedConfig:
    """Data parallelism under torchrun: DDP replicas or FSDP2 (`fully_shard`) shards."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = "nano"  # a configs/model preset name or YAML file, or a checkpoint directory
    model_args: dict = field(default_factory=dict)  # preset field overrides, e.g. {num_layers: 4}
    data: list[str] = field(default_factory=list)  # a token-shard directory, or raw text file(s)
    tokenizer: str | None = None  # tokenizer dir/checkpoint (needed with raw text)
    val_data: list[str] = field(default_factory=list)  # raw text only: explicit validation files
    val_fraction: float = 0.05  # raw text only: tail of the text held out when val_data is empty
    objective: str = "auto"  # a registered objective: causal, masked, mtp; auto: by the model's kind
    objective_args: dict = field(default_factory=dict)  # the objective's own settings (distill: teacher, losses)
    mask_prob: float = 0.15  # masked LM: share of positions predicted (80% [MASK], 10% random, 10% kept)
    mtp_weight: float | None = None  # overrides the model's mtp_loss_weight (models with MTP heads)
    sampling: Literal["random", "sequential"] = "random"  # random windows or sequential packing
    document_mask: bool = False  # causal: attend only within each document of a window (positions restart)

    # length and batch
    max_steps: int = 1000
    max_time: float | None = None  # minutes per invocation: max_steps shrinks to what fits (timed)
    batch_size: int = 8  # sequences per micro-batch per process
    seq_len: int = 256
    grad_accum: int = 1

    # optimisation
    lr: float = 3e-4
    min_lr: float = 0.0  # the floor of decaying schedules (absolute)
    warmup_steps: int = 100
    schedule: str = "cosine"  # a registered schedule: cosine, linear, constant, wsd
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying at the end
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias", "embed"])  # name parts exempt
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    # execution
    precision: Literal["auto", "float32", "fp32", "bf16", "bfloat16", "fp16", "float16"] = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    dropout: float | None = None  # override the model's dropout for training
    keep_sparsity: bool = False  # a pruned model's zero weights stay zero (masks from its zeros)

    # evaluation, logging, checkpoints
    eval_every: int = 100  # 0 disables periodic evaluation (a final one still runs)
    eval_batches: int = 20
    log_every: int = 1
    save_every: int = 500  # 0: only the final checkpoint
    keep_last: int = 3
    tensorboard: bool = True  # log to OUTDIR/tensorboard when the package is installed
    peak_tflops: float | None = None  # for the MFU estimate; None measures a matmul at start
    seed: int = 0
    resume: Literal["never", "auto"] = "never"  # auto: like --resume, continue OUTDIR's newest checkpoint

    distributed: DistributedConfig = field(default_factory=DistributedConfig)


PATH_KEYS = frozenset({"model", "data", "val_data", "tokenizer", "teacher", "teacher_outputs", "chat_template", "path"})


def anchor_paths(value, key: str | None = None):
    """A resolved recipe with its relative paths (keys in PATH_KEYS, at any depth) made absolute, so that the
    `train_config.yaml` a run saves names the same files when `--resume` runs from another directory.
    Preset and template names stay names: only what exists here, or a glob pattern, is a path."""
    import os
    from pathlib import Path

    if isinstance(value, dict):
        return {k: anchor_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [anchor_paths(v, key) for v in value]
    if key in PATH_KEYS and isinstance(value, str) and value not in ("", "-") and not os.path.isabs(value) \
            and (Path(value).exists() or any(c in value for c in "*?[")):
        return os.path.abspath(value)
    return value
