"""The finetuning recipe schema: train's keys (`TrainConfig`) plus the method, its adapter and the SFT data.

    llmctl finetune BASE --method lora --data chat.jsonl adapter.r=16 train_on=all -o OUT
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmctl.core.train.config import TrainConfig


@dataclass
class AdapterOptions:
    """PEFT's options for the parameter-efficient methods (ignored by `full`)."""

    method: str = "full"  # preference/RL methods: the adapter they train (`adapter=lora` on the command line)
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scaling numerator: scaling = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # on the adapter's input
    target_modules: str | list[str] = "all-linear"  # names (or `.suffix`es), a full-match regex, or all-linear
    exclude_modules: str | list[str] | None = None
    rslora: bool = False  # rank-stabilised scaling
    modules_to_save: list[str] | None = None  # trained in full and saved with the adapter (e.g. [lm_head])
    rank_pattern: dict[str, int] | None = None  # per-module r, PEFT's: {"o_proj": 4} (a key matches a path's end)
    alpha_pattern: dict[str, float] | None = None  # per-module alpha, likewise
    num_virtual_tokens: int = 20  # prefix / prompt tuning: virtual tokens per layer / before the input


@dataclass
class FinetuneConfig(TrainConfig):
    objective: str = "sft"
    method: str = "lora"  # an adapter method (full, lora, dora, qlora, …: SFT) or a training objective (dpo, grpo, …)
    adapter: AdapterOptions = field(default_factory=AdapterOptions)
    train_on: Literal["completion", "all"] = "completion"  # loss on completions / assistant turns, or everything
    packing: bool = True  # several examples per sequence (no attention across them), else one per row, padded
    chat_template: str | None = None  # a built-in name or .jinja file; default: the checkpoint tokenizer's
    merge_adapter: bool = False  # also write OUT/merged: the base with the adapter folded in
    rope_scaling: dict | None = None  # long context: {type: linear|dynamic|yarn|llama3, factor: F, …}
    max_seq_len: int | None = None  # long context: the model's new context length
    gradient_checkpointing: bool | None = None  # None: on for qlora (PEFT's prepare_model_for_kbit_training), else off

    max_steps: int = 200
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    save_every: int = 100
    val_fraction: float = 0.05

    @property
    def adapter_method(self) -> str:
        """The adapter method that makes the model trainable: `method` itself for SFT, else `adapter.method`."""
        from llmctl.core.adapters.methods import METHODS

        return self.method if self.method in METHODS else self.adapter.method

    @property
    def training_objective(self) -> str:
        """The objective that trains: `sft` for an adapter method, else the method (dpo, grpo, …)."""
        from llmctl.core.adapters.methods import METHODS

        return "sft" if self.method in METHODS else self.method
