"""Adapter directories without torch: recognising one, its config, its base, and what `info` shows."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from llmctl.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_adapter(path: str | os.PathLike) -> bool:
    """A PEFT adapter directory (not a full checkpoint)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def read_config(path: str | os.PathLike) -> dict:
    """An adapter directory's adapter_config.json."""
    from llmctl.core.checkpoint import read_json_object

    return read_json_object(Path(path) / ADAPTER_CONFIG, required=True)


def base_path(path: str | os.PathLike, config: dict | None = None) -> Path:
    """The base checkpoint of adapter directory `path` (`base_model_name_or_path`: absolute, or
    relative to the adapter directory first, then to the working directory)."""
    path = Path(path)
    name = (config or read_config(path)).get("base_model_name_or_path")
    if not name:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path")
    for candidate in (path / name, Path(name)):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{path / ADAPTER_CONFIG}: base model {name!r} not found (as a directory, absolute or "
                          f"relative to {path} or the working directory)")


def method_name(config: dict) -> str:
    """lora, rslora, dora, prefix or prompt: what an adapter config describes."""
    kind = str(config.get("peft_type", "")).lower()
    if kind == "lora":
        return "dora" if config.get("use_dora") else "rslora" if config.get("use_rslora") else "lora"
    return {"prefix_tuning": "prefix", "prompt_tuning": "prompt"}.get(kind, kind)


def describe_adapter(path: str | os.PathLike, base_parameters: int | None) -> dict[str, Any]:
    """Method, rank, targets, adapted modules and trainable share (of the base's parameters)."""
    from llmctl.core.checkpoint import read_safetensors_header

    path = Path(path)
    config = read_config(path)
    header, _ = read_safetensors_header(path / ADAPTER_WEIGHTS)
    shapes = {n: e["shape"] for n, e in header.items() if n != "__metadata__"}
    count = sum(math.prod(s) for s in shapes.values())
    lineage_file = path / "llmctl.json"
    lineage = json.loads(lineage_file.read_text(encoding="utf-8")) if lineage_file.is_file() else None
    return {
        "method": method_name(config),
        "task_type": config.get("task_type"),
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "targets": config.get("target_modules"),
        "modules": len({n.rsplit(".lora_A", 1)[0] for n in shapes if ".lora_A" in n}),
        "ranks": sorted({s[0] for n, s in shapes.items() if ".lora_A" in n}),  # rank_pattern's, fused modules'
        "modules_to_save": config.get("modules_to_save"),
        "num_virtual_tokens": config.get("num_virtual_tokens"),
        "parameters": count,
        "trainable_share": count / base_parameters if base_parameters else None,
        "base": config.get("base_model_name_or_path"),
        "base_transforms": (lineage or {}).get("base_transforms", []),
        "lineage": {k: lineage.get(k) for k in ("command", "created", "llmctl_version", "parents")} if lineage else None,
        "metrics": len((lineage or {}).get("metrics", [])),
    }


def base_transforms(path: str | os.PathLike) -> list[str]:
    """The names of the transforms an adapter's base had under it (QLoRA's `nf4`), from llmctl.json."""
    lineage_file = Path(path) / "llmctl.json"
    try:
        lineage = json.loads(lineage_file.read_text(encoding="utf-8")) if lineage_file.is_file() else {}
    except (OSError, ValueError):
        return []
    specs = lineage.get("base_transforms", []) if isinstance(lineage, dict) else []
    return [str(s.get("type", "?")) if isinstance(s, dict) else str(s) for s in specs if s] \
        if isinstance(specs, list) else []


def lineage_hash(path: str | os.PathLike) -> str:
    """`checkpoint_hash` of a checkpoint; of an adapter directory, a sha256 of its config, its
    weights and its base's `checkpoint_hash` (what a lineage's parent records)."""
    import hashlib

    from llmctl.core.checkpoint import checkpoint_hash

    if not is_adapter(path):
        return checkpoint_hash(path)
    path = Path(path)
    digest = hashlib.sha256((path / ADAPTER_CONFIG).read_bytes())
    weights = path / ADAPTER_WEIGHTS
    if weights.is_file():
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    digest.update(f"\0base\0{checkpoint_hash(base_path(path))}".encode())
    return digest.hexdigest()
