"""`prune_checkpoint`: load, (calibrate,) prune, measure, save — what `llmctl prune` runs.

    result = prune_checkpoint("base", PruneConfig(method="wanda", calibration=["c4.txt"]), "base-50")
    result["layers"], result["parameters"], result["perplexity"]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from llmctl.core.prune.base import PRUNERS
from llmctl.core.prune.config import PruneConfig
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import UsageError


def layer_report(model: nn.Module) -> list[dict]:
    """Per block: parameters, zero weights and the sparsity of its Linear weights, heads, MLP width."""
    rows = []
    for i, block in enumerate(model.model.layers):
        weights = [m.weight for m in block.modules() if isinstance(m, nn.Linear)]
        total = sum(w.numel() for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        cfg = model.cfg.layer(i)
        rows.append({"layer": i, "parameters": sum(p.numel() for p in block.parameters()),
                     "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size,
                     "sparsity": zeros / max(total, 1)})
    return rows


def block_weights(model: nn.Module):
    """The weight of every linear in the blocks, dense or quantized (dequantized one at a time)."""
    for block in model.model.layers:
        for m in block.modules():
            if hasattr(m, "dequantize"):
                yield m.dequantize()
            elif isinstance(m, nn.Linear):
                yield m.weight


def model_sparsity(model: nn.Module, pattern: str | None = None) -> tuple[float, bool]:
    """Zero weights over all weights of the blocks' linears, and whether every one of them has
    the N:M `pattern` (True without one)."""
    from llmctl.core.prune.masks import parse_pattern

    n, m = parse_pattern(pattern) if pattern else (0, 0)
    zeros = total = 0
    holds = True
    for w in block_weights(model):
        nonzero = w != 0
        zeros, total = zeros + int(nonzero.numel() - nonzero.sum()), total + w.numel()
        if m:
            holds &= w.shape[-1] % m == 0 and bool((nonzero.reshape(-1, m).sum(-1) <= n).all())
    return zeros / max(total, 1), holds


def held_out_perplexity(model: nn.Module, tokenizer, files: list[str]) -> float:
    """Perplexity of `files`, as `llmctl eval --task perplexity` computes it."""
    from llmctl.core.evaluate.lm import ScoringModel
    from llmctl.core.evaluate.perplexity import perplexity

    device = model.model.embed_tokens.weight.device
    lm = ScoringModel(model, tokenizer, max_length=model.cfg.max_seq_len, device=device)
    return perplexity(lm, files)["perplexity"]


def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prune_checkpoint(checkpoint: str | os.PathLike, settings: PruneConfig, output: str | os.PathLike, *,
                     device: torch.device | str = "cpu", force: bool = False, report: Reporter = SILENT) -> dict:
    """Prune `checkpoint` by `settings` into the checkpoint `output`; the report as JSON data."""
    from llmctl.config import to_dict
    from llmctl.core.checkpoint import open_checkpoint, tokenizer_files
    from llmctl.core.model.io import load_model, save_model
    from llmctl.core.prune.calibration import calibration_tokens
    from llmctl.core.tokenizer import load_tokenizer

    pruner = PRUNERS.get(settings.method)(settings)
    if pruner.calibrated and not settings.calibration:
        raise UsageError(f"--method {settings.method} needs calibration text (--calibration FILE)")
    if settings.samples < 1 or settings.seq_len < 2:
        raise UsageError(f"samples and seq_len must be >= 1 and >= 2, got {settings.samples} and {settings.seq_len}")
    source = open_checkpoint(checkpoint)
    model, cfg = load_model(checkpoint, device=device)
    stored = model.model.embed_tokens.weight.dtype  # saved back in the checkpoint's dtype
    model.float()  # scores, solver and perplexity in float32
    pruner.check_model(model)
    needs_tokenizer = pruner.calibrated or settings.eval_data
    tokenizer = load_tokenizer(checkpoint) if needs_tokenizer else None
    seq_len = min(settings.seq_len, cfg.max_seq_len)
    tokens = calibration_tokens(settings.calibration, tokenizer, samples=settings.samples, seq_len=seq_len,
                                seed=settings.seed) if pruner.calibrated else None
    before = {"parameters": model.num_parameters(), "layers": layer_report(model)}
    ppl = {}
    if settings.eval_data:
        ppl["before"] = held_out_perplexity(model, tokenizer, settings.eval_data)
    start = time.perf_counter()
    model = pruner.prune(model, tokens, report)
    seconds = time.perf_counter() - start
    if settings.eval_data:
        ppl["after"] = held_out_perplexity(model, tokenizer, settings.eval_data)
    after = model.num_parameters()
    measured = {"parameters_removed": 1 - after / before["parameters"]} if pruner.structured \
        else {"achieved": model_sparsity(model)[0]}  # zeros among the blocks' Linear weights
    sparsity = {"method": settings.method, "sparsity": settings.sparsity if settings.pattern is None else None,
                "pattern": settings.pattern, **measured, **pruner.summary}
    calibration = {"files": [str(Path(f).resolve()) for f in settings.calibration], "samples": len(tokens),
                   "seq_len": seq_len} if tokens is not None else None
    lineage = {"command": "prune", "config": to_dict(settings), "parents": [source.path],
               "sparsity": {k: v for k, v in sparsity.items() if v is not None},
               **({"calibration": calibration} if calibration else {})}
    generation = source.path / "generation_config.json"
    save_model(model.to("cpu", dtype=stored), output, lineage=lineage, force=force,
               tokenizer_dir=source.path if tokenizer_files(source.path) else None,
               generation_config=json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else None)
    return {"output": str(output), "method": settings.method, "sparsity": sparsity,
            "parameters": {"before": before["parameters"], "after": after},
            "layers": {"before": before["layers"], "after": layer_report(model)},
            "perplexity": ppl or None, "seconds": seconds, "peak_rss_bytes": _rss_peak_bytes(),
            "calibration": calibration, "model_type": json.loads((Path(output) / "config.json").read_text())["model_type"]}
