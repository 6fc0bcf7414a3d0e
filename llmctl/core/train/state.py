"""Resumable training state: `trainer_state/` = `state.safetensors` + `state.json`, no pickle.

Tensors (optimizer moments, RNG generator states) go to safetensors under flat names;
everything else (step, param-group hyper-parameters, python/numpy RNG, data position, grad
scaler) goes to JSON. Optimizer state is keyed by parameter name (FQN), not by position, so
it survives DDP/FSDP wrapping and a change of world size.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmctl.errors import CheckpointError

STATE_DIR = "trainer_state"
TENSORS, META = "state.safetensors", "state.json"


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of the python, numpy, torch CPU and CUDA generator states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_state(directory: Path, *, step: int, optimizer: dict, data: dict, scaler: dict | None,
               extra: dict | None = None, modules: dict[str, torch.Tensor] | None = None,
               objective: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Write `directory/trainer_state/`. `optimizer` is a full, FQN-keyed optimizer state dict;
    `modules` the state of modules trained beside the model (an objective's extras); `objective`
    each rank's `Objective.state()`."""
    out = Path(directory) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, entries in optimizer["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{fqn}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(fqn, {})[key] = value
    rng_meta, rng_tensors = capture_rng()
    tensors.update(rng_tensors)
    tensors.update({f"module.{k}": v.detach().cpu().contiguous() for k, v in (modules or {}).items()})
    tensors.update({f"objective.{rank}.{k}": v.detach().cpu().contiguous()
                    for rank, state in enumerate(objective or []) for k, v in state.items()})
    save_file(tensors, str(out / TENSORS))
    meta = {
        "format": "llmctl-trainer-state", "version": 1, "step": step, "data": data, "scaler": scaler,
        "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars}, "rng": rng_meta,
        **(extra or {}),
    }
    (out / META).write_text(json.dumps(meta) + "\n", encoding="utf-8")


def load_state(directory: Path) -> tuple[dict, dict]:
    """(meta, optimizer state dict) from `directory/trainer_state/`; RNG states are restored by
    `restore_rng(meta["rng"], meta["rng_tensors"])`; `meta["modules"]` is save_state's `modules`,
    `meta["objective"]` its `objective` as {rank: state} (ranks with an empty state absent)."""
    src = Path(directory) / STATE_DIR
    try:
        meta = json.loads((src / META).read_text(encoding="utf-8"))
        tensors = load_file(str(src / TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a damaged file
        raise CheckpointError(f"cannot read training state in {src}: {exc}") from None
    state: dict[str, dict[str, Any]] = {fqn: dict(v) for fqn, v in meta["optimizer"]["scalars"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            fqn, _, key = name[len("optimizer."):].rpartition(".")
            state.setdefault(fqn, {})[key] = value
    meta["rng_tensors"] = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    meta["modules"] = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
    meta["objective"] = {}
    for name, value in tensors.items():
        if name.startswith("objective."):
            rank, _, key = name.removeprefix("objective.").partition(".")
            meta["objective"].setdefault(int(rank), {})[key] = value
    return meta, {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
