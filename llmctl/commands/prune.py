"""`llmctl prune CKPT --method M -o OUT`: unstructured, N:M or structured pruning (logic in `llmctl.core.prune`)."""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmctl.options import option

CALIBRATION = "Calibration and evaluation"


def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (llmctl or Hugging Face).", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value recipe overrides (e.g. scope=global uniform=false unit=queries).", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The pruned checkpoint.")] = ...,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="A prune recipe: YAML file or preset under configs/prune.")] = None,
    method: Annotated[Optional[str], option("--method", "-m", help="magnitude, wanda, sparsegpt (unstructured or N:M); heads, channels, layers (structured).")] = None,
    sparsity: Annotated[Optional[float], option("--sparsity", "-s", help="Fraction removed: of weights, heads (KV groups), MLP channels or layers (default 0.5).")] = None,
    pattern: Annotated[Optional[str], option("--pattern", help="N:M semi-structured sparsity, e.g. 2:4 or 4:8 (unstructured methods; sets the sparsity).")] = None,
    calibration: Annotated[Optional[list[Path]], option("--calibration", help="Calibration text (files, dirs, globs; repeatable).", panel=CALIBRATION)] = None,
    samples: Annotated[Optional[int], option("--samples", help="Calibration windows (default 64).", panel=CALIBRATION)] = None,
    seq_len: Annotated[Optional[int], option("--seq-len", help="Tokens per calibration window (default 256).", panel=CALIBRATION)] = None,
    eval_data: Annotated[Optional[list[Path]], option("--eval-data", help="Held-out text: perplexity before and after (repeatable).", panel=CALIBRATION)] = None,
) -> None:
    """Prune a checkpoint: zeros in place (magnitude, Wanda, SparseGPT, N:M) or a smaller model (heads, channels, layers)."""
    from llmctl.config import load_config
    from llmctl.console import REPORTER, console, emit
    from llmctl.core.outputs import claim_output
    from llmctl.core.prune import PruneConfig
    from llmctl.core.prune.run import prune_checkpoint
    from llmctl.runtime import options, resolve_device

    flags = [f"method={method}" if method else None, f"sparsity={sparsity}" if sparsity is not None else None,
             f"samples={samples}" if samples is not None else None, f"seq_len={seq_len}" if seq_len is not None else None]
    settings = load_config(PruneConfig, config, [*(overrides or []), *filter(None, flags)], kind="prune")
    if pattern:  # not through YAML, which reads 2:4 as a base-60 number
        settings.pattern = pattern
    if calibration:
        settings.calibration = [str(p) for p in calibration]
    if eval_data:
        settings.eval_data = [str(p) for p in eval_data]
    if options.seed is not None:
        settings.seed = options.seed
    inputs = [checkpoint, *settings.calibration, *settings.eval_data]
    with claim_output(output, "prune", force=options.force, inputs=inputs):
        result = prune_checkpoint(checkpoint, settings, output, device=resolve_device(), force=options.force,
                                  report=REPORTER)
    emit(result, lambda: console.print(_table(result)))


def _table(r: dict[str, Any]):
    from llmctl.console import table
    from llmctl.options import human_bytes, human_count

    before, after = r["layers"]["before"], r["layers"]["after"]
    rows = []
    if len(after) == len(before):
        pairs = zip(before, after)
    else:  # layers removed: the kept ones, renumbered
        removed = set(r["sparsity"].get("removed_layers", []))
        pairs = zip([b for b in before if b["layer"] not in removed], after)
        rows += [[b["layer"], "removed", "", "", ""] for b in before if b["layer"] in removed]
    for b, a in pairs:
        rows.append([b["layer"], f"{human_count(b['parameters'])} → {human_count(a['parameters'])}",
                     f"{b['heads']}/{b['kv_heads']} → {a['heads']}/{a['kv_heads']}",
                     f"{b['intermediate_size']} → {a['intermediate_size']}", f"{a['sparsity']:.1%}"])
    rows.sort(key=lambda row: row[0])
    p = r["parameters"]
    rows.append(["all", f"{human_count(p['before'])} → {human_count(p['after'])}", "", "",
                 f"{r['sparsity'].get('achieved', 0):.1%}"])
    if r["perplexity"]:
        rows.append(["perplexity", f"{r['perplexity']['before']:.3f} → {r['perplexity']['after']:.3f}", "", "", ""])
    title = (f"prune {r['method']} → {r['output']} ({r['model_type']}; {r['seconds']:.1f} s, "
             f"peak RSS {human_bytes(r['peak_rss_bytes'])})")
    return table(title, ["layer", "parameters", "heads/kv", "mlp width", "sparsity"], rows)
