"""Finetuning methods: a name → the transforms that make a base model trainable that way.

    transforms = METHODS.get("qlora")(options)     # options: finetune's AdapterOptions
    for t in transforms: t.apply(model)            # then `mark_trainable(model)` unless full

A method with no transforms (`full`) trains every weight and saves a full checkpoint; the
others train only their adapter (and `modules_to_save`) and save a PEFT adapter directory.
"""

from __future__ import annotations

from llmctl.core.registry import Registry

METHODS = Registry("finetuning method")


def _lora(o, **extra):
    from llmctl.core.adapters.lora import LoRA

    return LoRA(r=o.r, alpha=o.alpha, dropout=o.dropout, target_modules=o.target_modules,
                exclude_modules=o.exclude_modules, rslora=o.rslora, modules_to_save=o.modules_to_save,
                rank_pattern=o.rank_pattern, alpha_pattern=o.alpha_pattern, **extra)


@METHODS.register("full")
def full(o) -> list:
    return []


@METHODS.register("lora")
def lora(o) -> list:
    return [_lora(o)]


@METHODS.register("dora")
def dora(o) -> list:
    return [_lora(o, dora=True)]


@METHODS.register("qlora")
def qlora(o) -> list:
    """The frozen base's linear layers (all but the head) as NF4, LoRA on top."""
    from llmctl.core.quant.nf4 import NF4

    return [NF4(), _lora(o)]


@METHODS.register("prefix")
def prefix(o) -> list:
    """Trainable per-layer key/value prefixes of `num_virtual_tokens` virtual tokens."""
    from llmctl.core.adapters.prompt import Prefix

    return [Prefix(num_virtual_tokens=o.num_virtual_tokens)]


@METHODS.register("prompt")
def prompt(o) -> list:
    """`num_virtual_tokens` trainable input embeddings before every input."""
    from llmctl.core.adapters.prompt import Prompt

    return [Prompt(num_virtual_tokens=o.num_virtual_tokens)]
