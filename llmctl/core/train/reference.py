"""Reference log-probabilities computed once (`precompute_ref=true`) and cached beside the data.

    train, val = with_reference_logps(objective, train_rows, val_rows)

The base checkpoint scores every sequence before training and is freed, so no reference
model stays in memory. The result is cached in `.DATA.ref-KEY.safetensors` beside the first
data file, KEY hashing the encoded rows, the base checkpoint and the precision, so a resumed
run (or a second method on the same data) reads it instead. The log-prob sums travel with
their rows, as the float64 bits in column 0 of a third channel, so every batching, rank and
validation split finds its own.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path

import torch


def with_reference_logps(objective, train: torch.Tensor, val: torch.Tensor | None):
    """(train, val) rows [N, 2, 3, L]: channel 2 holds each sequence's reference log-prob sum."""
    plan = objective.plan
    parts = {"train": train, **({"val": val} if val is not None else {})}
    cache = _cache_path(plan, parts)
    logps = _read(cache, parts) if cache.is_file() else None
    if logps is None:
        logps = _compute(objective, parts)
        _write(cache, logps, plan.report)
    out = {}
    for name, rows in parts.items():
        extra = torch.zeros_like(rows[:, :, :1])
        extra[:, :, 0, 0] = logps[name].double().view(torch.int64)
        out[name] = torch.cat([rows, extra], dim=2)
    return out["train"], out.get("val")


def _cache_path(plan, parts: dict[str, torch.Tensor]) -> Path:
    from llmctl.core.checkpoint import checkpoint_hash

    digest = hashlib.sha256(f"{checkpoint_hash(plan.init_from)} {plan.precision}".encode())
    for name, rows in parts.items():
        digest.update(name.encode())
        digest.update(rows.numpy().tobytes())
    data = Path(plan.text_files[0])
    return data.with_name(f".{data.name}.ref-{digest.hexdigest()[:16]}.safetensors")


def _read(path: Path, parts: dict) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        logps = load_file(path)
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed
        return None
    return logps if all(k in logps and logps[k].shape == parts[k].shape[:2] for k in parts) else None


@torch.no_grad()
def _compute(objective, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every sequence's reference log-prob sum [N, 2], by the base checkpoint in eval mode."""
    from llmctl.core.model.io import load_model
    from llmctl.core.train.preference import sequence_logps

    plan, device = objective.plan, objective.device
    model = load_model(plan.init_from, device=device, dtype=torch.float32, config=plan.model_config)[0]
    autocast = nullcontext() if plan.precision == "float32" else torch.autocast(
        device.type, dtype=getattr(torch, plan.precision))
    out = {}
    size = max(1, objective.cfg.batch_size)
    with autocast, plan.report.progress("reference log-probs", total=sum(len(r) for r in parts.values()),
                                        unit="record") as bar:
        for name, rows in parts.items():
            sums = []
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                inputs, labels, _ = objective.batch(chunk, 0)
                logps = sequence_logps(model, model, inputs, labels)[0].sums
                sums.append(logps.view(2, len(chunk)).t().cpu())
                bar.advance(len(chunk))
            out[name] = torch.cat(sums)
    del model
    return out


def _write(path: Path, logps: dict[str, torch.Tensor], report) -> None:
    from safetensors.torch import save

    from llmctl.core.io import atomic_file

    try:
        with atomic_file(path, "wb", force=True) as f:
            f.write(save({k: v.contiguous() for k, v in logps.items()}))
    except OSError as exc:
        report.warn(f"precompute_ref: could not cache the reference log-probs beside the data ({exc})")
