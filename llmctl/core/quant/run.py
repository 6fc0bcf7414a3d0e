"""`run_quantize`: checkpoint in, quantized checkpoint out (what the `quantize` command runs).

Checks the output first, loads the model, reads the calibration windows (calibrated methods),
quantizes (`methods.quantize_model`) and writes the checkpoint with its lineage: the method and
grid, what stayed in floating point, the errors measured, the calibration files and the sha256
of the token windows used, the time taken and the peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

from torch import nn

from llmctl.core.outputs import OUTPUT_KINDS, check_output, claim_output
from llmctl.core.quant.config import QuantizeConfig
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import UsageError


@OUTPUT_KINDS.register("quantized")
def _is_quantized(path: Path) -> bool:
    """A checkpoint `llmctl quantize` wrote."""
    try:
        lineage = json.loads((path / "llmctl.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(lineage, dict) and lineage.get("command") == "quantize" and (path / "config.json").is_file()


def unquantized(model: nn.Module) -> list[str]:
    """The modules holding weights that stayed in floating point: embeddings and linears by path,
    the rest (norms, positions) counted."""
    from llmctl.core.quant.linear import PackedLinear

    named, others = [], 0
    for path, module in model.named_modules():
        if isinstance(module, PackedLinear) or not any(True for _ in module.parameters(recurse=False)):
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)):
            named.append(path)
        else:
            others += 1
    return named + ([f"{others} norm/other modules"] if others else [])


def kept_sparsity(model: nn.Module, parent: dict | None, report: Reporter = SILENT) -> dict | None:
    """A pruned parent's sparsity record (`llmctl prune`'s lineage), measured again on the quantized
    blocks; its N:M pattern is kept only where every linear still has it (warned otherwise)."""
    from llmctl.core.prune.run import model_sparsity

    record = dict((parent or {}).get("sparsity") or {})
    if "achieved" not in record:  # not pruned, or pruned structurally (the shapes carry that)
        return None
    record["achieved"], holds = model_sparsity(model, record.get("pattern"))
    if not holds:
        report.warn(f"the parent's {record.pop('pattern')} sparsity pattern is lost in the quantized weights")
    return record


def _size(path: Path) -> int:
    """The bytes of the weights llmctl reads: safetensors, else PyTorch `.bin` files (a `.bin`
    beside safetensors is never loaded)."""
    files = [f for f in path.iterdir() if f.is_file()]
    for suffix in (".safetensors", ".bin"):
        if any(f.suffix == suffix for f in files):
            return sum(f.stat().st_size for f in files if f.suffix == suffix)
    return 0


def run_quantize(checkpoint: str | os.PathLike, output: str | os.PathLike, cfg: QuantizeConfig,
                 calibration: list[str], *, force: bool = False, device: str | None = None, seed: int | None = None,
                 report: Reporter = SILENT) -> dict:
    from llmctl.core.checkpoint import open_checkpoint, tokenizer_files
    from llmctl.core.model.io import load_model, save_model
    from llmctl.core.quant.methods import QUANTIZERS, quantize_model
    from llmctl.runtime import resolve_device

    checkpoint, output = Path(checkpoint), Path(output)
    method = QUANTIZERS.get(cfg.method)
    cfg = method.settle(cfg)  # what the method applies is what the lineage and the report record
    check_output(output, "quantized", force=force, inputs=[checkpoint, *calibration])
    ck = open_checkpoint(checkpoint)
    if ck.config.get("quantization_config") or (ck.lineage or {}).get("transforms"):
        raise UsageError(f"{checkpoint} is already transformed (quantized or adapted); quantize its float base")
    if method.calibrated and not calibration:
        raise UsageError(f"--method {cfg.method} needs --calibration text (a .txt/.jsonl file, a directory or a glob)")
    if calibration and not method.calibrated:
        report.warn(f"--method {cfg.method} is round-to-nearest: --calibration is not used")

    start = time.perf_counter()
    model, mcfg = load_model(checkpoint, device=resolve_device(device))
    ids, record = None, None
    if method.calibrated:
        from llmctl.core.quant.calibration import calibration_windows
        from llmctl.core.tokenizer import load_tokenizer

        if cfg.seq_len > mcfg.max_seq_len:
            raise UsageError(f"--seq-len {cfg.seq_len} exceeds the model's context of {mcfg.max_seq_len}")
        ids, record = calibration_windows(calibration, load_tokenizer(checkpoint), cfg.samples, cfg.seq_len,
                                          seed=seed or 0)
    errors = quantize_model(model, cfg, ids, report)
    recorded = model.transforms[-1]
    seconds = time.perf_counter() - start
    quantization = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                    "format": f"{recorded.quant_method} {recorded.name}", "unquantized": unquantized(model), "error": errors,
                    **({"calibration": record} if record else {}), "seconds": round(seconds, 2)}
    from llmctl.config import to_dict

    sparsity = kept_sparsity(model, ck.lineage, report)
    lineage = {"command": "quantize", "parents": [str(checkpoint)], "config": to_dict(cfg),
               "quantization": quantization, **({"sparsity": sparsity} if sparsity else {})}
    tokenizer = checkpoint if tokenizer_files(checkpoint) else None
    with claim_output(output, "quantized", force=force, inputs=[checkpoint, *calibration]):
        save_model(model, output, tokenizer_dir=tokenizer, lineage=lineage, generation_config=ck.generation_config,
                   force=force)
    return {"output": str(output), "quantization": quantization, "sparsity": sparsity, "seconds": seconds,
            "size_mb": _size(output) / 1e6, "input_size_mb": _size(checkpoint) / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
