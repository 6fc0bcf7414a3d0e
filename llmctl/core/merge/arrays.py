"""The array back ends a merge runs on: `Torch` (every method) and `Numpy` (a plan whose method
is declared `arrays=True`, safetensors inputs, no vocabulary to align), which never imports torch:
a linear, slerp, TIES or DARE merge starts in a fraction of torch's import time. An `arrays`
method gets numpy arrays on either back end (`Torch.array`: the tensor's memory).

Both read a tensor by one `pread` (`Checkpoint.read_into`) and hand the writer its bytes. numpy
has no bfloat16: such a tensor is held as its uint16 bit patterns, widened to float32 exactly
(bits << 16) and narrowed with round-to-nearest-even, as torch rounds.
"""

from __future__ import annotations

from llmctl.core.checkpoint import Checkpoint, CheckpointWriter

FLOATS = ("float16", "bfloat16", "float32", "float64")


class _Slots:
    """One reused read buffer per input slot, grown to the largest tensor, so a merge does not
    page-fault fresh memory for every tensor it reads; a job's result must be written before
    the next job reads."""

    def __init__(self):
        self.slots: dict[int, object] = {}

    def _read(self, ck: Checkpoint, name: str, dtype: str, slot: int):
        """The tensor's bytes in the slot's buffer, as a numpy array of its shape (bfloat16: uint16)."""
        import math

        import numpy as np

        shape = ck.tensor_shapes()[name][0]
        kind = np.dtype(_numpy_dtype(dtype))
        nbytes = math.prod(shape) * kind.itemsize
        if slot not in self.slots or self.slots[slot].nbytes < nbytes:
            self.slots[slot] = None  # the old buffer goes before the new one comes
            self.slots[slot] = np.empty(nbytes, dtype=np.uint8)
        buffer = self.slots[slot][:nbytes]
        ck.read_into(name, memoryview(buffer))
        return buffer.view(kind).reshape(shape)


class Torch(_Slots):
    def array(self, x):
        """A float tensor as a numpy array of its memory (for an `arrays` method)."""
        import numpy as np

        return np.ascontiguousarray(x.numpy())

    def tensor(self, x):
        import torch

        return torch.from_numpy(x)

    def read(self, ck: Checkpoint, name: str, dtype: str, slot: int = 0):
        import torch

        if ck.weights_format != "safetensors":
            return ck.read_tensor(name)
        try:
            _numpy_dtype(dtype)
        except TypeError:  # float8: no numpy dtype
            return ck.read_tensor(name)
        return torch.from_numpy(self._read(ck, name, dtype, slot)).view(getattr(torch, dtype))

    def cast(self, x, dtype: str, to: str):
        import torch

        return x.to(getattr(torch, to))

    def equal(self, a, b) -> bool:
        import torch

        return torch.equal(a, b)

    def write(self, writer: CheckpointWriter, name: str, x, dtype: str) -> None:
        writer.add(name, x)


class Numpy(_Slots):
    def array(self, x):
        return x

    tensor = array

    def read(self, ck: Checkpoint, name: str, dtype: str, slot: int = 0):
        return self._read(ck, name, dtype, slot)

    def cast(self, x, dtype: str, to: str):
        import numpy as np

        if dtype == to:
            return x
        if dtype == "bfloat16":
            x = (x.astype(np.uint32) << 16).view(np.float32)
        if to != "bfloat16":
            return x.astype(_numpy_dtype(to), copy=False)
        bits = x.astype(np.float32, copy=False).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            rounded[nan] = 0x7FC0
        return rounded

    def equal(self, a, b) -> bool:
        import numpy as np

        return bool(np.array_equal(a, b))

    def write(self, writer: CheckpointWriter, name: str, x, dtype: str) -> None:
        import numpy as np

        x = np.ascontiguousarray(x)
        writer.add_bytes(name, memoryview(x.reshape(-1).view(np.uint8)), x.shape, dtype)


def narrowed(x, dtype: str):
    """The float32 array `x` rounded in place to `dtype`'s precision (bfloat16, float16, float8)."""
    try:
        _numpy_dtype(dtype)
    except TypeError:  # float8: torch's rounding
        import torch

        t = torch.from_numpy(x)
        t.copy_(t.to(getattr(torch, dtype)))
        return x
    xp = Numpy()
    x[...] = xp.cast(xp.cast(x, "float32", dtype), dtype, "float32")
    return x


def _numpy_dtype(name: str):
    import numpy as np

    return np.uint16 if name == "bfloat16" else np.dtype(name)


def backend_for(plan) -> Torch | Numpy:
    """Numpy when every job can run on it, else Torch."""
    if not plan.method.arrays or plan.vocabulary is not None:
        return Torch()
    if any(ck.weights_format != "safetensors" for ck in plan.checkpoints.values()):
        return Torch()
    names = {d for job in plan.jobs for d in (job.dtype, *job.input_dtypes)}
    try:
        for d in names:
            _numpy_dtype(d)
    except TypeError:  # a dtype numpy lacks (float8)
        return Torch()
    return Numpy()
