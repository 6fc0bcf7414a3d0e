"""`llmctl finetune BASE`: supervised finetuning (full, LoRA, rsLoRA, DoRA, QLoRA) with train's trainer.

Data are JSONL/JSON records (`text`; `prompt` + `completion`; `messages`); the loss is on
completions and assistant turns unless `train_on=all`. OUT is a train work directory whose
final files are a PEFT adapter directory (adapter methods) or a checkpoint (`full`);
`merge_adapter=true` also writes OUT/merged, the base with the adapter folded in.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.options import option


def finetune(
    base: Annotated[Path, typer.Argument(help="Base checkpoint directory (llmctl or Hugging Face).", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value config overrides (e.g. adapter.r=16 train_on=all lr=1e-4).", show_default=False)] = None,
    method: Annotated[Optional[str], option("--method", "-m", help="An adapter method (full, lora, dora, qlora, …) or a preference/RL method (default: the recipe's, lora).")] = None,
    data: Annotated[Optional[list[Path]], option("--data", "-d", help="JSONL/JSON training records (repeatable).")] = None,
    config: Annotated[Optional[str], option("--config", "-c", help="A finetune recipe: YAML file or preset under configs/finetune.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output (work) directory: the adapter or checkpoint.")] = ...,
    resume: Annotated[bool, option("--resume", help="Continue from the newest checkpoint in OUTDIR.")] = False,
) -> None:
    """Finetune a checkpoint on instruction, chat or text records; adapters in PEFT's format, resumable."""
    from llmctl.config import load_config
    from llmctl.console import REPORTER, emit, info
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.loop import CONFIG_FILE, run_training
    from llmctl.errors import UsageError
    from llmctl.runtime import options, resolve_device

    source = config
    if resume and source is None and (output / CONFIG_FILE).is_file():
        source = str(output / CONFIG_FILE)  # continue with the run's own recipe (+ new overrides)
    overrides = [_adapter_shorthand(o) for o in overrides or []]
    cfg = load_config(FinetuneConfig, source, overrides, kind="finetune")
    cfg.model = str(base)
    if data:
        cfg.data = [str(p) for p in data]
    if method:
        cfg.method = method
    _check_method(cfg.method)
    cfg.objective = cfg.training_objective
    if not cfg.data:
        raise UsageError("no training data: give --data FILE (JSONL or JSON records)")
    if options.seed is not None:
        cfg.seed = options.seed
    if cfg.precision == "auto" and options.dtype != "auto":
        cfg.precision = options.dtype
    result = run_training(cfg, output, device=resolve_device(), resume=resume or cfg.resume == "auto",
                          force=options.force, report=REPORTER)
    if result.exit_code != 0:
        raise typer.Exit(result.exit_code)
    merged = None
    if cfg.merge_adapter and cfg.adapter_method != "full":
        from llmctl.core.adapters import merge_to_checkpoint

        merged = merge_to_checkpoint(output, output / "merged", force=True)
    summary = {"output": str(output), "method": cfg.method, "step": result.step, "val_loss": result.val_loss,
               "merged": str(merged) if merged else None}
    emit(summary, lambda: info(f"finetuned ({cfg.method}) {result.step} steps → {output}"
                               + (f" (val loss {result.val_loss:.4f})" if result.val_loss is not None else "")
                               + (f"; merged → {merged}" if merged else "")))


def _adapter_shorthand(override: str) -> str:
    """`adapter=lora` means `adapter.method=lora` (the adapter a preference/RL method trains)."""
    key, sep, value = override.partition("=")
    return f"adapter.method={value}" if sep and key.strip() == "adapter" else override


def _check_method(name: str) -> None:
    """A usage error unless `name` is an adapter method or an objective of finetune's."""
    from llmctl.core.adapters.methods import METHODS
    from llmctl.core.registry import did_you_mean
    from llmctl.core.train.objectives import OBJECTIVES
    from llmctl.errors import UsageError

    choices = METHODS.names() + [n for n, o in OBJECTIVES.items() if o.command == "finetune" and n != "sft"]
    if name not in choices:
        raise UsageError(f"unknown finetuning method '{name}'{did_you_mean(name, choices)}; "
                         f"choose from: {', '.join(choices)}")
