"""Global options shared by every command (set once by the CLI host).

Commands read `options`; device and dtype resolution import torch lazily.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class Options:
    device: str = "auto"
    dtype: str = "auto"
    seed: int | None = None
    json: bool = False
    quiet: bool = False
    debug: bool = False
    force: bool = False

    def update(self, **values: Any) -> None:
        """Set the given options, ignoring `None` (an option not given keeps its value)."""
        names = {f.name for f in fields(self)}
        for key, value in values.items():
            if key in names and value is not None and value is not False:
                setattr(self, key, value)


options = Options()


def resolve_device(name: str | None = None):
    """`auto` → cuda if available, else mps, else cpu; returns a `torch.device`."""
    import torch

    from llmctl.errors import UsageError

    name = name or options.device
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name not in DEVICES[1:] and not re.fullmatch(r"cuda:\d+", name):
        raise UsageError(f"--device {name}: expected one of {', '.join(DEVICES)} (or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str | None = None, default: str = "float32"):
    """Map a dtype name (or `auto` → `default`) to a `torch.dtype`."""
    import torch

    from llmctl.errors import UsageError

    name = name or options.dtype
    if name == "auto":
        name = default
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES[1:]:
        raise UsageError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def seed_everything(seed: int | None = None) -> int:
    """Seed python, and torch when it is loaded; returns the seed used."""
    import random

    seed = options.seed if seed is None else seed
    seed = 0 if seed is None else seed
    random.seed(seed)
    import torch

    torch.manual_seed(seed)
    return seed


# glibc malloc serves blocks above its mmap threshold with fresh mappings and returns freed
# memory above its trim threshold to the system. The thresholds start at 128 KiB and only
# adapt as large blocks are freed, so a loop allocating 1–32 MiB tensors can page-fault on
# every pass: the transformers perplexity loop took up to 1.1M faults (2.9 s of kernel time)
# per 35k-token run here, and llmctl eval up to 0.5M. Fixed thresholds keep such blocks in
# the process (the same values glibc adapts towards: 32 MiB, and twice that for trimming).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
_MALLOPT = {-3: MMAP_THRESHOLD, -1: TRIM_THRESHOLD}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def tune_allocator() -> bool:
    """Fix glibc's malloc thresholds (see above); True when applied. Skipped on other C
    libraries and when the user tunes malloc already (MALLOC_* or GLIBC_TUNABLES set)."""
    import ctypes

    if not _glibc() or any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in _MALLOPT.items())


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False
