"""`llmctl train`: pre-train a model from a preset (or continue a checkpoint) on tokens or text."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.runtime import options


def train(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value config overrides (e.g. lr=1e-3 distributed.strategy=fsdp).", show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="A train recipe: YAML file or preset under configs/train.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output (work) directory; the final checkpoint.")] = ...,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in OUTDIR.")] = False,
) -> None:
    """Train a language model; periodic atomic checkpoints, metrics.jsonl, resumable.

    Runs data-parallel under `torchrun --nproc_per_node=N -m llmctl train …`.
    """
    from llmctl.config import load_config
    from llmctl.console import REPORTER, emit, info
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import CONFIG_FILE, run_training

    from llmctl.errors import UsageError
    from llmctl.runtime import resolve_device

    overrides = list(overrides or [])
    if resume and not (output / CONFIG_FILE).is_file() and not any(o.startswith("data=") for o in overrides) \
            and config is None:
        raise UsageError(f"--resume: {output} holds no training run ({CONFIG_FILE}); "
                         "drop --resume to start one, or give its config and data")
    source = config
    if resume and source is None and (output / CONFIG_FILE).is_file():
        source = str(output / CONFIG_FILE)  # continue with the run's own recipe (+ new overrides)
    cfg = load_config(TrainConfig, source, overrides, kind="train")
    if options.seed is not None:
        cfg.seed = options.seed
    if cfg.precision == "auto" and options.dtype != "auto":
        cfg.precision = options.dtype  # --dtype bfloat16 means bf16 autocast over fp32 master weights
    result = run_training(cfg, output, device=resolve_device(), resume=resume or cfg.resume == "auto",
                          force=options.force, report=REPORTER)
    summary = {"output": str(output), "step": result.step, "val_loss": result.val_loss,
               "checkpoint": str(result.checkpoint) if result.checkpoint else None, "exit_code": result.exit_code}
    if result.exit_code == 0:
        emit(summary, lambda: info(f"trained {result.step} steps → {output}"
                                   + (f" (val loss {result.val_loss:.4f})" if result.val_loss is not None else "")))
    else:
        raise typer.Exit(result.exit_code)
