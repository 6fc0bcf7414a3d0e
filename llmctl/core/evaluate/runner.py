"""Evaluate checkpoints on tasks: load each model once, run every task, record the results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from llmctl.core.evaluate.lm import ScoringModel
from llmctl.core.evaluate.tasks import Task
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import CheckpointError, UsageError


def load_scorer(path: str | Path, *, device, dtype, batch_size: int | None = None, seed: int = 1234) -> ScoringModel:
    """A checkpoint (llmctl or HF directory, or an adapter directory) and its tokenizer, ready to score."""
    from llmctl.core.checks import check_finite, check_tokenizer_fits
    from llmctl.core.model.io import load_model
    from llmctl.core.tokenizer import load_tokenizer

    check_scorable(path)
    model, cfg = load_model(path, device=device, dtype=dtype)
    tok = load_tokenizer(path)
    check_tokenizer_fits(tok, cfg.vocab_size, path)
    check_finite(model, path)
    if not cfg.is_causal:  # pseudo-log-likelihoods
        from llmctl.core.evaluate.masked import MaskedScoringModel

        return MaskedScoringModel(model, tok, max_length=cfg.max_seq_len, batch_size=batch_size, device=device)
    return ScoringModel(model, tok, max_length=cfg.max_seq_len, batch_size=batch_size, device=device, seed=seed)


def check_scorable(path: str | Path) -> None:
    """What `load_scorer` can tell without loading weights: the directory opens as a checkpoint (or is an
    adapter) and holds a tokenizer; CheckpointError otherwise."""
    from llmctl.core.adapters import is_adapter
    from llmctl.core.checkpoint import open_checkpoint

    if not is_adapter(path):
        open_checkpoint(path)  # a missing or broken directory says so first
    if not (Path(path) / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: checkpoint has no tokenizer (tokenizer.json); eval needs one to encode text")


def task_record(task: Task, metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics-history entry of one task result (for llmctl.json)."""
    from llmctl.config import to_dict

    config = {k: v for k, v in to_dict(task).items() if k not in ("name", "base_dir")}
    return {"command": "eval", "task": task.name, "type": _type_name(task), "config": config, "metrics": metrics}


def _finite(value: Any) -> Any:
    """NaN/inf (e.g. the stderr of one example) become None: valid JSON, shown as blank."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _type_name(task: Task) -> str:
    from llmctl.core.evaluate.tasks import TASK_TYPES

    return next(name for name in TASK_TYPES.names() if TASK_TYPES.get(name) is type(task))


def write_samples(path: str | Path, samples: list[dict], force: bool = False) -> None:
    """The per-sample records as JSONL, written atomically."""
    import json

    from llmctl.core.io import atomic_file

    with atomic_file(path, "w", force=force, encoding="utf-8") as f:
        for record in samples:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def record_results(results: dict[str, dict[str, dict[str, Any]]], tasks: Sequence[Task]) -> None:
    """Append each checkpoint's results to its llmctl.json; CheckpointError (suggesting
    --no-record) if one cannot be written, e.g. a read-only checkpoint."""
    from llmctl.core.checkpoint import append_metrics
    from llmctl.core.outputs import output_lock
    from llmctl.errors import OutputLocked

    by_name = {task.name: task for task in tasks}
    for path, per_task in results.items():
        try:
            with output_lock(path):  # not while a training run publishes into it
                for name, metrics in per_task.items():
                    append_metrics(path, task_record(by_name[name], metrics))
        except (OSError, OutputLocked) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CheckpointError(f"{path}: could not record the results in its llmctl.json ({why}); "
                                  "the results were printed; use --no-record to skip recording") from None


def evaluate(checkpoints: Sequence[str | Path], tasks: Sequence[Task], *, device, dtype, batch_size: int | None = None,
             record: bool = True, seed: int | None = None, samples: list[dict] | None = None,
             report: Reporter = SILENT
             ) -> dict[str, dict[str, dict[str, Any]]]:
    """{checkpoint: {task: {metric: value}}}, appended to each llmctl.json when `record`;
    `seed` (default 1234) seeds sampled generations; every sample's record (prompt, answer,
    scores) is appended to `samples` when given; progress and messages go to `report`."""
    from llmctl.core.model.attention import inference_backends

    for task in tasks:  # missing data fails before any model loads
        task.prepare()
    seen: dict[Path, str | Path] = {}
    for path in checkpoints:  # and so does a missing or broken checkpoint, however late in the list
        check_scorable(path)
        key = Path(path).resolve()
        if key in seen:  # one column of results, but the work (and the lineage record) twice
            also = "" if str(seen[key]) == str(path) else f" (as {seen[key]})"
            raise UsageError(f"checkpoint {path} is given twice{also}")
        seen[key] = path
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for path in checkpoints:
        lm = load_scorer(path, device=device, dtype=dtype, batch_size=batch_size,
                         seed=1234 if seed is None else seed)
        report.info(f"[bold]{path}[/bold]: {sum(p.numel() for p in lm.model.parameters()):,} parameters, "
             f"context {lm.max_length}")
        results[str(path)] = {}
        for task in tasks:
            task.samples_log = [] if samples is not None else None
            task.report = report
            with inference_backends(lm.device):
                metrics = {k: _finite(v) for k, v in task.run(lm).items()}
            results[str(path)][task.name] = metrics
            if samples is not None:
                samples += [{"checkpoint": str(path), "task": task.name, **r} for r in task.samples_log]
        del lm
    if record:
        record_results(results, tasks)
    return results
