"""Hand-written x86 kernels for batch-1 decoding on CPU (`matvec.cpp`), built once on this machine.

torch's CPU matrix-vector products read the weights at 40–55 % of this machine's bandwidth and its
int8/int4 kernels at less; at batch 1 decoding is nothing but those products. The kernels here
stream each weight once: float32 with FMA, bfloat16 with vdpbf16ps (or widened to float32), and
int8/int4 as integer dot products (vpdpbusd, or vpmaddubsw on AVX2) against the input quantized
per block of 64 (int8) or 128 (int4) values — what llama.cpp's q8_0/q4_0 do with blocks of 32.
Each kernel has an AVX2 + FMA form and, where the CPU has AVX-512 (F, BF16, VNNI), a wider one.

`ops()` compiles `matvec.cpp` and `decode.cpp` (`decode.py`: a whole decode step per call) with the local C++ compiler and `-march=native` into
`~/.cache/llmctl/native/<key>` the first time it is needed (10–70 s; the key covers the sources,
torch's version, Python's ABI, the CPU's flags and the compiler's), then loads it — later processes load the built
library directly: `torch.ops.llmctl.mv_float`, `mv_quant`, `torch.classes.llmctl.DecodePlan`. It returns
None — and callers keep torch's kernels — without a compiler, on a CPU without AVX2 and FMA, or
when `LLMCTL_NATIVE=0`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sysconfig
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).parent
SOURCES = [HERE / "matvec.cpp", HERE / "decode.cpp"]  # and kernels.h, which they share
F32, BF16, QUANT = 1, 2, 4  # llmctl::capabilities bits (QUANT: int8/int4 products)
NEEDS = {"avx2", "fma"}  # CPU flags without which nothing is built
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
PYTHON_ABI = sysconfig.get_config_var("EXT_SUFFIX") or ""  # e.g. .cpython-311-x86_64-linux-gnu.so


def block_of(bits: int) -> int:
    """Inputs per activation scale in mv_quant: those whose weights fill 64 bytes (int8 64, int4 128)."""
    return 512 // bits


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmctl" / "native"


@functools.cache
def ops():
    """`torch.ops.llmctl` with the kernels loaded, or None where they cannot be built or are disabled."""
    flags = _cpu_flags()
    if os.environ.get("LLMCTL_NATIVE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64") \
            or not NEEDS <= set(flags.split()):  # whole flags
        return None
    import torch
    from torch.utils import cpp_extension

    if _loaded(torch):  # a library loads once per process (TORCH_LIBRARY aborts on a second)
        return torch.ops.llmctl
    build = build_dir(flags)
    name = f"llmctl_native_{build.name}"
    library = build / f"{name}.so"
    try:
        build.mkdir(parents=True, exist_ok=True)
        from llmctl.console import info
        if not library.exists():
            info("building llmctl's native CPU kernels (once per machine and torch version)…")
        with _build_lock(build):
            if not _load_built(torch, library):
                cpp_extension.load(name=name, sources=[str(f) for f in SOURCES], build_directory=str(build),
                                   extra_cflags=CFLAGS, is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 — no compiler, no ninja, a failed build: torch's kernels serve
        from llmctl.console import warn
        warn(f"native CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             "using torch's")
        return None
    _register_fakes(torch)
    return torch.ops.llmctl


def _load_built(torch, library: Path) -> bool:
    """Load the library a build left, without asking ninja whether it is current: its directory's key
    covers everything it was built from, and ninja would rebuild it for a checkout of the same sources at
    another path (the object files name the sources by path and time). A library that does not load (a
    build killed while linking) is removed, so that the build relinks it."""
    if not library.exists():
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError):
        library.unlink(missing_ok=True)
        return False
    return True


def build_dir(flags: str | None = None) -> Path:
    """Where the kernels for these sources, this torch, this Python and this CPU are built and cached."""
    import torch

    code = b"".join(f.read_bytes() for f in [*SOURCES, HERE / "kernels.h"])
    key = hashlib.sha256(code + torch.__version__.encode() + (flags or _cpu_flags()).encode()
                         + " ".join(CFLAGS).encode() + PYTHON_ABI.encode()).hexdigest()[:16]
    return cache_dir() / key


@contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold an flock on the build directory, which the kernel drops if this process dies. torch's
    own `lock` file there outlives a build killed midway and would make every later load wait for
    ever; under our lock no other llmctl process is building, so such a file is stale."""
    import fcntl

    with open(build / ".llmctl-build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        yield


def _loaded(torch) -> bool:
    try:
        return torch.ops.llmctl.capabilities is not None
    except (AttributeError, RuntimeError):
        return False


def _register_fakes(torch) -> None:
    """Shapes for torch.compile's tracing."""
    @torch.library.register_fake("llmctl::mv_float")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("llmctl::mv_quant")
    def _(x, w, scale, zero, bias, bits):
        return x.new_empty(*x.shape[:-1], w.shape[0])


def has(capability: int) -> bool:
    """Whether the built kernels include `capability` (F32, BF16 or QUANT); builds them if needed."""
    lib = ops()
    return lib is not None and bool(lib.capabilities() & capability)
