"""`llmctl eval CKPT… --task TASK…`: perplexity, multiple choice and generation benchmarks.

A task is a preset of `configs/eval/` (perplexity, word_order, arithmetic, copy, reverse; the
public benchmarks mmlu, hellaswag, arc_easy, arc_challenge, winogrande, truthfulqa_mc1/mc2,
gsm8k, gsm8k_cot, humaneval, mbpp, read from `--data`) or a task YAML file. Results print as
one column per checkpoint (`--json`: one object) and are appended to each checkpoint's
llmctl.json unless `--no-record`; `--log-samples FILE` keeps every sample.
"""

import functools
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmctl.console import REPORTER, console, emit, print_json, warn
from llmctl.options import option

TASK = "Task options"
_opt = functools.partial(option, panel=TASK)



def eval_command(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoint directories (llmctl or Hugging Face).", show_default=False)],
    task: Annotated[list[str], _opt("--task", "-t", help="Task preset (configs/eval/NAME.yaml) or task YAML file; repeatable.")],
    data: Annotated[Optional[list[Path]], _opt("--data", help="Benchmark presets (mmlu, hellaswag, …): their files or folder; perplexity: text file(s) to score (repeatable).")] = None,
    max_length: Annotated[Optional[int], _opt("--max-length", help="perplexity: window length (default: the model's context).")] = None,
    stride: Annotated[Optional[int], _opt("--stride", help="perplexity: window step (default: max-length / 2).")] = None,
    num_fewshot: Annotated[Optional[int], _opt("--num-fewshot", help="Few-shot examples before each prompt (seeded).")] = None,
    limit: Annotated[Optional[int], _opt("--limit", help="Evaluate the first N documents only.")] = None,
    samples: Annotated[Optional[int], _opt("--samples", help="Generation: sample N answers and majority-vote (self-consistency); code: N programs per problem for pass@k.")] = None,
    cot: Annotated[bool, _opt("--cot", help="Generation: wrap prompts in the task's chain-of-thought template.")] = False,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "-b", help="Sequences per forward pass (default 16 on CPU, at most 1,024 tokens; 128 on a GPU, at most 65,536 tokens).")] = None,
    no_record: Annotated[bool, _opt("--no-record", help="Do not append results to the checkpoints' llmctl.json.")] = False,
    log_samples: Annotated[Optional[Path], _opt("--log-samples", help="Write every sample (prompt, answer, scores) to this JSONL file (- for stdout).")] = None,
) -> None:
    """Evaluate checkpoints: perplexity, multiple choice (lm-eval semantics), generation and pass@k tasks; public benchmarks from local files."""
    from llmctl.core.evaluate.runner import evaluate, record_results, write_samples
    from llmctl.core.evaluate.tasks import load_tasks
    from llmctl.core.outputs import check_output, claim_output
    from llmctl.errors import UsageError
    from llmctl.runtime import options, resolve_device, resolve_dtype, seed_everything

    for flag, value, least in (("--batch-size", batch_size, 1), ("--max-length", max_length, 2),
                               ("--stride", stride, 1), ("--limit", limit, 1), ("--num-fewshot", num_fewshot, 0),
                               ("--samples", samples, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    seed_everything()
    overrides = {"data": [str(p) for p in data] if data else None, "max_length": max_length, "stride": stride,
                 "num_fewshot": num_fewshot, "limit": limit, "samples": samples,
                 "chain_of_thought": True if cot else None}
    tasks = load_tasks(task, overrides)
    to_stdout = log_samples is not None and str(log_samples) == "-"
    if to_stdout and options.json:
        raise UsageError("--log-samples - and --json both write to stdout; give --log-samples a file")
    if log_samples is not None and not to_stdout:  # before the work, not after it
        check_output(log_samples, "samples", force=options.force, inputs=[*checkpoints, *(data or [])])
    logged: list[dict] | None = [] if log_samples is not None else None
    results = evaluate(checkpoints, tasks, device=resolve_device(), dtype=resolve_dtype(),
                       batch_size=batch_size, record=False, seed=options.seed, samples=logged, report=REPORTER)
    if to_stdout:
        for record in logged:
            print_json(record)
    elif log_samples is not None and not logged:
        warn(f"--log-samples {log_samples}: no samples to log (perplexity scores text, not samples); not written")
    elif log_samples is not None:
        with claim_output(log_samples, "samples", force=options.force, inputs=[*checkpoints, *(data or [])]):
            write_samples(log_samples, logged, force=options.force)
    emit({"results": results}, lambda: console.print(_table(results)))
    if not no_record:  # after printing: a checkpoint that cannot be written keeps its results on screen
        record_results(results, tasks)


def _table(results: dict[str, dict[str, dict[str, Any]]]):
    from llmctl.console import table

    columns = list(results)
    first = results[columns[0]]
    rows = []
    for task_name, metrics in first.items():
        for metric in metrics:
            if metric.endswith("_stderr"):
                continue
            cells = [_cell(results[c][task_name], metric) for c in columns]
            rows.append([task_name, metric, *cells])
    return table("eval", ["task", "metric", *columns], rows)


def _cell(metrics: dict[str, Any], metric: str) -> str:
    value = metrics.get(metric)
    if value is None or isinstance(value, int):
        return "–" if value is None else f"{value:,}"
    stderr = metrics.get(f"{metric}_stderr")
    text = f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return text if stderr is None else f"{text} ± {stderr:.4f}"

