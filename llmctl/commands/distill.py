"""`llmctl distill`: train a student on a teacher's outputs (`llmctl train objective=distill`).

    llmctl distill --teacher T --student micro --data SHARDS [--config RECIPE] [key=value …] -o OUT
    llmctl distill --teacher T --data SHARDS --save-teacher STORE --top-k 32 seq_len=256
    llmctl distill --teacher-outputs STORE --student micro --data SHARDS sampling=sequential -o OUT

The flags become train config keys (`objective=distill`, `objective_args.*`, `model`, `data`);
recipes live in `configs/distill/`; everything else (checkpoints, --resume, metrics) is train's.
"""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.options import option

INPUTS = "Teacher and student"


def distill(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value config overrides (train keys; objective_args.losses.jsd=1, objective_args.temperature=4, …).", show_default=False)] = None,
    teacher: Annotated[Optional[Path], option("--teacher", help="The teacher checkpoint (same tokenizer as the student's data).", panel=INPUTS)] = None,
    student: Annotated[Optional[str], option("--student", help="A model preset or checkpoint, or 'teacher': every k-th teacher block (objective_args.keep_every).", panel=INPUTS)] = None,
    data: Annotated[Optional[list[Path]], option("--data", help="Token shards (or text files with tokenizer=…); repeatable.", panel=INPUTS)] = None,
    teacher_outputs: Annotated[Optional[Path], option("--teacher-outputs", help="Train from stored teacher top-k outputs instead of running the teacher (implies sampling=sequential).", panel=INPUTS)] = None,
    save_teacher: Annotated[Optional[Path], option("--save-teacher", help="Store the teacher's top-k log-probs over --data (train split, windows of seq_len) in this directory, and stop.", panel="Offline")] = None,
    top_k: Annotated[int, option("--top-k", help="--save-teacher: log-probs kept per position.", panel="Offline")] = 32,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="A distill recipe: YAML file or preset under configs/distill.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output (work) directory; the final student checkpoint.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in OUTDIR.")] = False,
) -> None:
    """Distil a teacher into a student: KL / JSD / CE / hidden-state losses, online or from stored top-k outputs."""
    from llmctl.config import preset_path
    from llmctl.errors import UsageError

    recipe = str(preset_path(config, "distill")) if config else None
    args = ["objective=distill", *(overrides or [])]
    if teacher is not None:
        args.append(f"objective_args.teacher={json.dumps(str(teacher))}")
    if teacher_outputs is not None:
        args += [f"objective_args.teacher_outputs={json.dumps(str(teacher_outputs))}", "sampling=sequential"]
    if student == "teacher":
        args.append("objective_args.student_init=teacher")
    elif student is not None:
        args.append(f"model={json.dumps(student)}")
    if data:
        args.append(f"data={json.dumps([str(p) for p in data])}")
    if save_teacher is not None:
        if teacher is None or not data or len(data) != 1:
            raise UsageError("--save-teacher needs --teacher and one token-shard directory as --data")
        return _save_teacher(teacher, data[0], save_teacher, top_k, recipe, overrides or [])
    if output is None:
        raise UsageError("missing option '--output' / '-o': the student's work directory")
    from llmctl.commands.train import train

    train(overrides=args, config=recipe, output=output, resume=resume)


def _save_teacher(teacher: Path, shards: Path, out: Path, top_k: int, recipe: str | None, overrides: list[str]) -> None:
    from llmctl.config import load_config
    from llmctl.console import REPORTER, emit, info
    from llmctl.core.distill.store import save_teacher_outputs
    from llmctl.core.outputs import claim_output
    from llmctl.core.train.config import TrainConfig
    from llmctl.options import human_bytes
    from llmctl.runtime import options, resolve_device

    cfg = load_config(TrainConfig, recipe, overrides, kind="distill")  # seq_len and batch_size
    with claim_output(out, "teacher-outputs", force=options.force, inputs=[teacher, shards]):
        manifest = save_teacher_outputs(teacher, shards, out, top_k=top_k, seq_len=cfg.seq_len,
                                        batch_size=cfg.batch_size, device=resolve_device(), force=options.force,
                                        report=REPORTER)
    size = sum(f.stat().st_size for f in out.iterdir())
    emit({"output": str(out), "windows": manifest["windows"], "top_k": top_k, "seq_len": cfg.seq_len, "bytes": size},
         lambda: info(f"teacher top-{top_k} of {manifest['windows']} windows × {cfg.seq_len} positions → {out} "
                      f"({human_bytes(size)})"))
