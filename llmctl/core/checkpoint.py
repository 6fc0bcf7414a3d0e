"""Checkpoint directories: the one on-disk format every command reads and writes.

    config.json                         HF keys (or `model_type: "llmctl"` + ModelConfig fields)
    model.safetensors                   or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
    generation_config.json
    llmctl.json                         lineage: command, resolved config, parents + hashes, metrics

Reading is lazy: safetensors headers (8-byte little-endian length + JSON) are parsed here without
torch, so `open_checkpoint` and `llmctl info` never import it; tensors come from a memory map, so
loading never needs twice the checkpoint in RAM. Writing is atomic (a temporary directory renamed
into place) and streams each tensor's bytes to disk without an intermediate copy.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypedDict

from llmctl import __version__
from llmctl.core.io import atomic_dir, inside, write_json
from llmctl.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import torch

FORMAT = "llmctl-checkpoint"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
LINEAGE_NAME = "llmctl.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
CHAT_TEMPLATE_GLOB = "chat_template*"  # chat_template.jinja / chat_template.json

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_CODES = {name: code for code, (name, _) in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors limit
_HASH_WINDOW = 4096
# the order safetensors writes tensors in: by its Dtype enum, descending (sizes never grow
# along it, so every tensor stays aligned), then by name
_WRITE_ORDER = {code: i for i, code in enumerate(
    ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"))}


class Lineage(TypedDict, total=False):
    """What a command passes as `lineage=`; extra keys (quantization, sparsity, …) are kept."""

    command: str
    config: dict
    parents: list  # checkpoint paths, or {"path": …, "hash": …} records
    metrics: list
    quantization: dict
    sparsity: dict
    transforms: list  # module transform specs (see core/model/transforms.py), re-applied on load


# ---------------------------------------------------------------------------------------- reading


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header without torch: (header, offset of the data).

    Raises CheckpointError naming the file when it is truncated or corrupt (header length past
    the end, invalid JSON, tensor bytes past the end or not matching shape × dtype) or holds a
    dtype we cannot load.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(file, f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise _corrupt(file, f"header length {length} exceeds the file size {size}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(file, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "header is not a JSON object")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            expected = math.prod(shape) * DTYPES[code][1] if code in DTYPES else None
        except (TypeError, KeyError, ValueError):
            raise _corrupt(file, f"header entry of {name!r} lacks a valid dtype/shape/data_offsets") from None
        if expected is None:
            raise CheckpointError(
                f"{file}: tensor {name!r} has unsupported dtype {code} (supported: {', '.join(DTYPES)})"
            )
        if end > data_size:
            raise _corrupt(file, f"data of {name!r} ends at byte {8 + length + end}, past the end ({size} bytes)")
        if not 0 <= begin <= end or end - begin != expected:
            raise _corrupt(file, f"data offsets of {name!r} do not match its shape {shape} and dtype {code}")
    return header, 8 + length


def _corrupt(file: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{file}: truncated or corrupt safetensors file: {why}")


def read_json_object(file: Path, *, required: bool) -> dict | None:
    """A JSON object file's contents; None when it is absent and not `required`; one-line errors."""
    if not file.is_file():
        if required:
            raise CheckpointError(f"{file.parent}: no {file.name} (not a model checkpoint directory)")
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _load_bin(file: Path) -> dict[str, "torch.Tensor"]:
    """Tensors of a pickle `.bin` through torch's weights-only unpickler (memory-mapped)."""
    import pickle

    import torch

    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{file}: refusing to unpickle: it needs Python code beyond plain tensors{what}; "
            "convert it to safetensors with the tool that wrote it"
        ) from None
    except Exception as e:  # zip / EOF / legacy-format errors: all mean "not a readable tensor file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: unreadable PyTorch file ({first})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{file}: expected a flat dict of tensors, found {type(data).__name__}")
    for name, tensor in data.items():
        if str(tensor.dtype).removeprefix("torch.") not in _CODES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {tensor.dtype}")
    return data


class Checkpoint:
    """An opened checkpoint directory. Configs are read; tensors are read lazily (mmap).

    Attributes: `path`, `config` (config.json), `lineage` (llmctl.json or None),
    `generation_config` (or None), `shards` (weight file names), `index` (the index file name
    when sharded, else None), `weights_format` ("safetensors" or "bin").
    """

    def __init__(self, path: Path):
        self.path = path
        self.config: dict = read_json_object(path / CONFIG_NAME, required=True)
        self.lineage: dict | None = read_json_object(path / LINEAGE_NAME, required=False)
        self.generation_config: dict | None = read_json_object(path / GENERATION_CONFIG_NAME, required=False)
        self.weights_format, self.shards, self.index, weight_map = _find_weights(path)
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        self._file_of: dict[str, str] = {}
        self._headers: dict[str, tuple[dict, int]] = {}
        self._handles: dict[str, Any] = {}
        self._bin: dict[str, "torch.Tensor"] = {}
        for shard in self.shards:
            self._read_shard(shard)
        self._check_index(weight_map)

    def _read_shard(self, shard: str) -> None:
        file = self.path / shard
        if self.weights_format == "safetensors":
            header, start = self._headers[shard] = read_safetensors_header(file)
            shapes = {n: (tuple(e["shape"]), DTYPES[e["dtype"]][0]) for n, e in header.items() if n != "__metadata__"}
        else:
            tensors = _load_bin(file)
            self._bin.update(tensors)
            shapes = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()}
        self._shapes.update(shapes)
        self._file_of.update(dict.fromkeys(shapes, shard))

    def _check_index(self, weight_map: dict[str, str] | None) -> None:
        for name, shard in (weight_map or {}).items():
            if self._file_of.get(name) != shard:
                raise CheckpointError(f"{self.path / self.index}: maps {name!r} to {shard}, which does not hold it")

    def tensor_names(self) -> list[str]:
        return list(self._shapes)

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """{name: (shape, dtype name)} from the headers, without reading any tensor."""
        return dict(self._shapes)

    def get_tensor(self, name: str) -> "torch.Tensor":
        """One tensor, backed by the file's memory map (copy-on-write)."""
        shard = self._file_of.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        if self.weights_format == "bin":
            return self._bin[name]
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(self.path / shard, framework="pt", device="cpu")
        return self._handles[shard].get_tensor(name)

    def read_tensor(self, name: str) -> "torch.Tensor":
        """One tensor copied into fresh memory by a single read, without a memory map: for a
        pass that touches each tensor once (merge), so the file's pages stay in the page cache,
        not in this process's RSS, and are not faulted in one page at a time."""
        shard = self._file_of.get(name)
        if self.weights_format == "bin" or shard is None:
            return self.get_tensor(name)
        import torch

        shape, dtype = self._shapes[name]
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        self.read_into(name, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B"))
        return tensor

    def read_into(self, name: str, buffer: memoryview) -> None:
        """`read_tensor` without torch: a safetensors tensor's bytes into `buffer` (its size)."""
        shard = self._file_of.get(name)
        if self.weights_format == "bin" or shard is None:
            raise CheckpointError(f"{self.path}: no safetensors tensor {name!r}")
        header, start = self._headers[shard]
        begin, end = header[name]["data_offsets"]
        with open(self.path / shard, "rb", buffering=0) as f:
            done = 0
            while done < end - begin:
                got = os.preadv(f.fileno(), [buffer[done:]], start + begin + done)
                if not got:
                    raise CheckpointError(f"{self.path / shard}: truncated while reading {name!r}")
                done += got

    def state_dict(self, device="cpu", dtype=None) -> dict[str, "torch.Tensor"]:
        """All tensors. On CPU without a dtype change they stay memory-mapped (no copy);
        `dtype` converts floating-point tensors only."""
        out = {}
        for name in self._shapes:
            tensor = self.get_tensor(name)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[name] = tensor.to(device)
        return out

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer.json").is_file()

    @property
    def size_bytes(self) -> int:
        """Bytes of the weight files."""
        return sum((self.path / s).stat().st_size for s in self.shards)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._shapes)} tensors in {len(self.shards)} file(s))"


def _find_weights(path: Path) -> tuple[str, list[str], str | None, dict[str, str] | None]:
    """(format, weight files, index file name, index weight_map): a single file wins over an
    index, safetensors over pickle."""
    for fmt, single in (("safetensors", SAFETENSORS_NAME), ("bin", BIN_NAME)):
        if (path / single).is_file():
            return fmt, [single], None, None
        index_file = path / (single + INDEX_SUFFIX)
        if index_file.is_file():
            index = read_json_object(index_file, required=True)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_file}: no 'weight_map' object")
            if not all(isinstance(shard, str) for shard in weight_map.values()):
                raise CheckpointError(f"{index_file}: 'weight_map' values must be file names")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not inside(path, shard, str(index_file)).is_file():
                    raise CheckpointError(f"{index_file}: names missing shard {shard}")
            return fmt, shards, index_file.name, weight_map
    hint = " (this is a PEFT adapter directory)" if (path / "adapter_config.json").is_file() else ""
    raise CheckpointError(
        f"{path}: no weights{hint} (expected {SAFETENSORS_NAME}, {SAFETENSORS_NAME}{INDEX_SUFFIX} or {BIN_NAME})"
    )


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open and validate a checkpoint directory (llmctl or Hugging Face).

    Raises CheckpointError naming the file for a missing or corrupt part, UsageError (exit 2,
    a wrong argument) when `path` does not exist or is not a directory.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"{path} is not a checkpoint directory (give the directory that holds config.json)")
    return Checkpoint(path)


def check_tensors(
    expected: Mapping[str, Any], found: Mapping[str, Any], where: str | os.PathLike = "checkpoint"
) -> None:
    """Raise CheckpointError naming the first missing, unexpected or wrongly shaped tensor.

    Values are shapes; `(shape, dtype)` pairs as from `tensor_shapes()` are accepted too.
    """
    expected = {n: _shape(s) for n, s in expected.items()}
    found = {n: _shape(s) for n, s in found.items()}
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    if missing:
        name = missing[0]
        shape = list(expected[name])
        raise CheckpointError(f"{where}: missing tensor {name!r} (expected shape {shape}){_more(missing)}")
    if unexpected:
        name = unexpected[0]
        raise CheckpointError(f"{where}: unexpected tensor {name!r} (shape {list(found[name])}){_more(unexpected)}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(found[name])}, expected {list(shape)}")


def _more(names: list) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""


def _shape(value) -> tuple[int, ...]:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        value = value[0]
    return tuple(int(d) for d in value)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """A cheap, stable content fingerprint of a checkpoint (hex sha256).

    Hashed: config.json, and for each weight file its name, size and safetensors header, plus
    up to three 4 KiB windows of every tensor's bytes (start, middle, end); a `.bin` file
    contributes 64 evenly spaced windows instead. It reads a few MB however large the model
    and never holds the weights in RAM. Training, merging, quantization and pruning change the
    sampled bytes of every tensor they touch; an edit confined to unsampled bytes would go
    unnoticed: this identifies lineage, it is not an integrity check. Identical directories
    hash equally wherever they live; llmctl.json (metrics) is not hashed.
    """
    import hashlib

    ck = open_checkpoint(path)
    digest = hashlib.sha256((ck.path / CONFIG_NAME).read_bytes())
    for shard in ck.shards:
        file = ck.path / shard
        size = file.stat().st_size
        digest.update(f"\0{shard}\0{size}\0".encode())
        if ck.weights_format == "safetensors":
            header, start = ck._headers[shard]
            tensors = [e["data_offsets"] for n, e in header.items() if n != "__metadata__"]
            windows = [(0, start)] + [w for b, e in tensors for w in _windows(start + b, start + e)]
        else:
            windows = [(i, min(i + _HASH_WINDOW, size)) for i in range(0, size, max(size // 64, 1))]
        with open(file, "rb") as f:
            for begin, end in windows:
                f.seek(begin)
                digest.update(f.read(end - begin))
    return digest.hexdigest()


def _windows(begin: int, end: int) -> list[tuple[int, int]]:
    """Up to three windows of [begin, end): its start, middle and end."""
    starts = sorted({begin, max(begin, (begin + end - _HASH_WINDOW) // 2), max(begin, end - _HASH_WINDOW)})
    return [(s, min(s + _HASH_WINDOW, end)) for s in starts]


# ---------------------------------------------------------------------------------------- writing


def save_checkpoint(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, "torch.Tensor"],
    config: dict,
    *,
    generation_config: dict | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    lineage: Lineage | None = None,
    force: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; an existing `out_dir` needs `force`.

    Tensors are saved contiguous, in shards of at most `max_shard_bytes` (HF names and index
    format above it), through `CheckpointWriter`. Tensors sharing storage (tied weights) are
    each written in full: pass only the names the model needs, as HF drops `lm_head.weight`
    when embeddings are tied. `lineage` (command, resolved config, parent paths, extra facts
    such as quantization) is completed with the format version, llmctl version, UTC time and
    parents' content hashes.
    """
    layout = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()}
    with CheckpointWriter(out_dir, layout, force=force, max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.finish(config, generation_config=generation_config, tokenizer_dir=tokenizer_dir, lineage=lineage,
                      extra_files=extra_files)
    return Path(out_dir)


class CheckpointWriter:
    """Writes a checkpoint one tensor at a time, so only the tensor being written is in memory.

        layout = {name: (shape, dtype name)}          # e.g. from the inputs' safetensors headers
        with CheckpointWriter(out_dir, layout, force=False) as writer:
            for name in layout:
                writer.add(name, make_tensor(name))   # any order; written at once, then dropped
            writer.finish(config, lineage={...})

    The layout fixes the shards (greedy in layout order, at most `max_shard_bytes` each, as
    transformers shards) and every tensor's offset, so each shard's safetensors header is
    written first and a tensor's bytes go straight to their place. Everything is written in a
    temporary sibling directory that becomes `out_dir` when the block ends without error.
    """

    def __init__(self, out_dir: str | os.PathLike, layout: Mapping[str, tuple[tuple[int, ...], str]], *,
                 force: bool = False, max_shard_bytes: int = 2 * 1024**3):
        self.out_dir, self.force = Path(out_dir), force
        self.layout = {n: (tuple(int(d) for d in shape), dtype) for n, (shape, dtype) in layout.items()}
        for name, (_, dtype) in self.layout.items():
            if dtype not in _CODES:
                raise CheckpointError(f"cannot save tensor {name!r}: dtype {dtype} is not supported by safetensors")
        sizes = {n: math.prod(shape) * DTYPES[_CODES[dtype]][1] for n, (shape, dtype) in self.layout.items()}
        self.shards = _plan_shards(sizes, max_shard_bytes)
        self.total_size = sum(sizes.values())
        self._place: dict[str, tuple[str, int, int]] = {}  # name -> (shard, file offset, bytes)
        self._headers: dict[str, bytes] = {}
        for file, names in self.shards.items():
            self._headers[file] = self._header(file, names, sizes)
        self._pending = set(self.layout)
        self._fds: dict[str, int] = {}
        self._finished = False
        self.tmp: Path | None = None

    def _header(self, file: str, names: list[str], sizes: dict[str, int]) -> bytes:
        """The shard's safetensors header, laid out as safetensors lays it out (`_WRITE_ORDER`)."""
        order = sorted(names, key=lambda n: (_WRITE_ORDER[_CODES[self.layout[n][1]]], n))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in order:
            shape, dtype = self.layout[name]
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # as safetensors writes it
        raw += b" " * (-len(raw) % 8)
        for name in order:
            begin, end = header[name]["data_offsets"]
            self._place[name] = (file, 8 + len(raw) + begin, end - begin)
        return len(raw).to_bytes(8, "little") + raw

    def __enter__(self) -> CheckpointWriter:
        self._atomic = atomic_dir(self.out_dir, self.force)
        self.tmp = self._atomic.__enter__()
        try:
            for file, header in self._headers.items():
                fd = self._fds[file] = os.open(self.tmp / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, header)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        """Write one tensor of the layout (its shape and dtype must match)."""
        import torch

        given = str(tensor.dtype).removeprefix("torch.")
        data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")
        self.add_bytes(name, data, tuple(tensor.shape), given)

    def add_bytes(self, name: str, data: memoryview, shape: tuple[int, ...], dtype: str) -> None:
        """`add` without torch: a tensor's bytes, with the shape and dtype name they hold."""
        if name not in self._pending:
            why = "was already written" if name in self.layout else "is not in the layout"
            raise CheckpointError(f"tensor {name!r} {why}")
        want, want_dtype = self.layout[name]
        file, offset, nbytes = self._place[name]
        if tuple(shape) != want or dtype != want_dtype or data.nbytes != nbytes:
            raise CheckpointError(f"tensor {name!r} is {dtype} {list(shape)}, the layout says "
                                  f"{want_dtype} {list(want)}")
        done = 0
        while done < nbytes:
            done += os.pwrite(self._fds[file], data[done:], offset + done)
        self._pending.discard(name)

    def finish(self, config: dict, *, generation_config: dict | None = None,
               tokenizer_dir: str | os.PathLike | None = None, lineage: Lineage | None = None,
               extra_files: Mapping[str, bytes | str] | None = None) -> None:
        """Write the index (when sharded), configs, tokenizer, extra files and lineage."""
        if self._pending:
            missing = sorted(self._pending)
            raise CheckpointError(f"tensor {missing[0]!r} was never written{_more(missing)}")
        record = _lineage_record(lineage or {})  # before the rename: out_dir may be a parent
        tmp = self.tmp
        write_json(tmp / CONFIG_NAME, _jsonable(config))
        if len(self.shards) > 1:
            weight_map = {n: file for file, names in self.shards.items() for n in names}
            write_json(tmp / (SAFETENSORS_NAME + INDEX_SUFFIX),
                       {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))})
        if generation_config is not None:
            write_json(tmp / GENERATION_CONFIG_NAME, _jsonable(generation_config))
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise UsageError(f"extra checkpoint file {name!r} must be a relative path inside the checkpoint")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        write_json(tmp / LINEAGE_NAME, record)
        self._finished = True

    def __exit__(self, kind, value, traceback) -> bool:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if kind is None and not self._finished:
            value = CheckpointError(f"{self.out_dir}: the checkpoint writer was closed before finish()")
            self._atomic.__exit__(CheckpointError, value, None)  # removes the temporary directory
            raise value
        self._atomic.__exit__(kind, value, traceback)  # renames into place, or cleans up
        return False


def _plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> dict[str, list[str]]:
    """Greedy, in the given order, like `transformers`: {file name: tensor names}."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {SAFETENSORS_NAME: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def tokenizer_files(src: str | os.PathLike) -> list[str]:
    """The names of the tokenizer files in a directory that `copy_tokenizer` carries over (tokenizer.json,
    or vocab.json + merges.txt, tokenizer.model, … with tokenizer_config.json; chat templates)."""
    src = Path(src)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    return names + sorted(p.name for p in src.glob(CHAT_TEMPLATE_GLOB) if p.is_file())


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of a tokenizer or checkpoint directory; returns their names."""
    import shutil

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UsageError(f"tokenizer {src} is not a directory")
    names = tokenizer_files(src)
    if not names:
        raise CheckpointError(f"{src}: no tokenizer files (expected tokenizer.json)")
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return names


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    """Plain JSON types: paths and other objects become strings, numpy scalars numbers."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _parent(parent: str | os.PathLike | Mapping) -> dict:
    if isinstance(parent, Mapping):
        return dict(parent)
    path = Path(parent)
    is_checkpoint = (path / CONFIG_NAME).is_file()
    return {"path": str(path.resolve()), "hash": checkpoint_hash(path) if is_checkpoint else None}


def _lineage_record(lineage: Mapping) -> dict:
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "llmctl_version": __version__,
        "created": _now(),
        "command": lineage.get("command"),
        "config": lineage.get("config", {}),
        "parents": [_parent(p) for p in lineage.get("parents", [])],
        "metrics": list(lineage.get("metrics", [])),
    }
    record.update({k: v for k, v in lineage.items() if k not in record})
    return _jsonable(record)


def append_metrics(path: str | os.PathLike, record: Mapping) -> None:
    """Append one metrics record (an eval result) to a checkpoint's llmctl.json, atomically.

    A `time` (UTC) is added unless given; an HF directory gets a fresh llmctl.json.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() and not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (not a model checkpoint or adapter directory)")
    lineage = read_json_object(path / LINEAGE_NAME, required=False) or {"format": FORMAT, "version": FORMAT_VERSION}
    lineage.setdefault("metrics", []).append({"time": _now(), **record})
    write_json(path / LINEAGE_NAME, _jsonable(lineage))
