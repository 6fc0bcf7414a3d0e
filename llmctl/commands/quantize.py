"""`llmctl quantize CKPT --method M -o OUT`: int8/int4 weight-only checkpoints in compressed-tensors'
`pack-quantized` layout (round-to-nearest, GPTQ, AWQ). The methods live in `llmctl.core.quant`."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.options import option

GRID = "Grid"
CALIBRATION = "Calibration"


def quantize(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (llmctl or Hugging Face).", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value settings (e.g. gptq.damp=0.05 gptq.act_order=true awq.grid=10).", show_default=False)] = None,
    output: Annotated[Path, option("--output", "-o", help="The quantized checkpoint directory.")] = ...,
    method: Annotated[str, option("--method", "-m", help="int8, int4 (round-to-nearest), gptq, awq or nf4; a preset under configs/quantize/ or a YAML file.", panel=GRID)] = "int8",
    bits: Annotated[Optional[int], option("--bits", help="4 or 8 (default: the method's).", panel=GRID)] = None,
    group_size: Annotated[Optional[int], option("--group-size", help="Inputs per scale; 0 = one scale per output channel (default: the method's).", panel=GRID)] = None,
    symmetric: Annotated[Optional[bool], option("--sym/--asym", help="Symmetric grid (no zero points) or not (default: the method's).", panel=GRID)] = None,
    calibration: Annotated[Optional[list[Path]], option("--calibration", help="Calibration text (repeatable; .txt/.jsonl/.gz, dirs, globs) for gptq and awq.", panel=CALIBRATION)] = None,
    samples: Annotated[Optional[int], option("--samples", help="Calibration windows (default 128).", panel=CALIBRATION)] = None,
    seq_len: Annotated[Optional[int], option("--seq-len", help="Tokens per calibration window (default 512).", panel=CALIBRATION)] = None,
) -> None:
    """Quantize a checkpoint's linear layers to int8 or int4 (transformers and vLLM load the output)."""
    from llmctl.config import load_config
    from llmctl.config import list_presets
    from llmctl.console import REPORTER, console, emit, table
    from llmctl.errors import UsageError
    from llmctl.runtime import options

    overrides = list(overrides or [])
    given = {o.partition("=")[0].strip() for o in overrides}  # the grid keys the user set, to refuse for nf4
    given |= {k for k, v in (("bits", bits), ("group_size", group_size), ("symmetric", symmetric)) if v is not None}
    for name, value in (("bits", bits), ("samples", samples), ("seq_len", seq_len)):
        if value is not None:
            overrides.append(f"{name}={value}")
    if group_size is not None:
        overrides.append(f"group_size={group_size or 'null'}")
    if symmetric is not None:
        overrides.append(f"symmetric={str(symmetric).lower()}")
    from llmctl.core.quant.config import QuantizeConfig

    preset = method in list_presets("quantize") or method.endswith((".yaml", ".yml"))
    if not preset:  # a method without a preset (a plugin's): the defaults and this method
        overrides.insert(0, f"method={method}")
    cfg = load_config(QuantizeConfig, method if preset else None, overrides, kind="quantize")
    from llmctl.core.quant.methods import QUANTIZERS

    fixed = getattr(QUANTIZERS.get(cfg.method), "GRID", None)  # nf4: 4-bit NormalFloat in blocks of 64
    refused = [k for k in ("bits", "group_size", "symmetric") if fixed and k in given and getattr(cfg, k) != fixed[k]]
    if refused:
        flags = {"bits": f"--bits {cfg.bits}", "group_size": f"--group-size {cfg.group_size or 0}",
                 "symmetric": "--asym"}
        raise UsageError(f"--method {cfg.method} has a fixed grid (4-bit NormalFloat levels, one absmax per 64 "
                         f"weights, symmetric) and takes no {', '.join(flags[k] for k in refused)}")
    if cfg.samples < 1 or cfg.seq_len < 1 or cfg.micro_batch < 1:
        raise UsageError("--samples, --seq-len and micro_batch must be at least 1")

    from llmctl.core.quant.run import run_quantize

    result = run_quantize(checkpoint, output, cfg, [str(c) for c in calibration or []], force=options.force,
                          device=options.device, seed=options.seed, report=REPORTER)

    def render():
        q = result["quantization"]
        rows = [["method", q["method"]], ["bits / group / symmetric", f"{q['bits']} / {q['group_size'] or 'channel'} / {q['symmetric']}"],
                ["quantized linears", q["error"]["linears"]], ["kept in float", ", ".join(q["unquantized"])],
                ["weight error (rel. MSE)", f"{q['error']['weight_error']:.3g}"]]
        if "output_error" in q["error"]:
            rows.append(["output error (rel. MSE)", f"{q['error']['output_error']:.3g}"])
        if result["sparsity"]:
            sp = result["sparsity"]
            rows.append(["sparsity kept", f"{sp['achieved']:.1%}" + (f", {sp['pattern']}" if sp.get("pattern") else "")])
        rows += [["size", f"{result['size_mb']:.1f} MB (from {result['input_size_mb']:.1f} MB)"],
                 ["time", f"{result['seconds']:.1f} s"], ["output", result["output"]]]
        console.print(table(f"quantized {checkpoint}", ["", ""], rows))

    emit(result, render, report=True)
