"""Checkpoint edges (`core/checkpoint.py`): which bytes the lineage hash samples, the refusals of
pickle files, direct reads, metrics on adapter directories, and lineage parents."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch

from llmctl.core.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    append_metrics,
    check_tensors,
    checkpoint_hash,
    copy_tokenizer,
    open_checkpoint,
    save_checkpoint,
)
from llmctl.errors import CheckpointError, UsageError

KIB = 1024


def _flip(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _changes_hash(ck: Path, file: Path, offset: int) -> bool:
    before = checkpoint_hash(ck)
    _flip(file, offset)
    after = checkpoint_hash(ck)
    _flip(file, offset)
    assert checkpoint_hash(ck) == before
    return after != before


def test_the_hash_samples_each_tensors_start_middle_and_end(tmp_path):
    """Documented: three 4 KiB windows per tensor (start, middle, end); bytes between them are
    not read, so an edit confined there goes unnoticed."""
    tensors = {"a": torch.arange(16 * KIB, dtype=torch.float32), "b": torch.arange(16 * KIB, dtype=torch.float32)}
    ck = save_checkpoint(tmp_path / "ck", tensors, {"model_type": "llmctl"})
    file = ck / "model.safetensors"
    opened = open_checkpoint(ck)
    header, start = opened._headers["model.safetensors"]
    begin, end = (start + o for o in header["b"]["data_offsets"])  # the second tensor: 64 KiB
    middle = (begin + end - 4 * KIB) // 2
    for offset in (begin, begin + 4 * KIB - 1, middle, middle + 4 * KIB - 1, end - 4 * KIB, end - 1):
        assert _changes_hash(ck, file, offset), offset - begin
    for offset in (begin + 4 * KIB, begin + (end - begin) // 4, middle - 1, end - 4 * KIB - 1):
        assert not _changes_hash(ck, file, offset), offset - begin


def test_the_hash_of_a_pickle_file_samples_64_even_windows(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    file = ck / "pytorch_model.bin"
    torch.save({"w": torch.zeros(256 * KIB, dtype=torch.uint8)}, file)
    size = file.stat().st_size
    step = size // 64
    data = file.read_bytes()
    zeros = data.index(b"\0" * 4096)  # the tensor's bytes: edits there keep the file readable
    first = -(-zeros // step) * step  # the first window start inside them
    assert _changes_hash(ck, file, first) and _changes_hash(ck, file, first + 4 * KIB - 1)
    assert _changes_hash(ck, file, first + step)
    assert not _changes_hash(ck, file, first + 4 * KIB) and not _changes_hash(ck, file, first + step - 1)


def _bin_checkpoint(root: Path, content) -> Path:
    root.mkdir()
    (root / "config.json").write_text("{}")
    torch.save(content, root / "pytorch_model.bin")
    return root


@pytest.mark.parametrize("content, message", [
    ({"w": torch.zeros(2), "when": datetime.date(2020, 1, 1)},
     "refusing to unpickle: it needs Python code beyond plain tensors (datetime.date); "
     "convert it to safetensors with the tool that wrote it"),
    ([torch.zeros(2)], "expected a flat dict of tensors, found list"),
    ({"w": torch.zeros(2), "step": 3}, "expected a flat dict of tensors, found dict"),
    ({"w": torch.zeros(2, dtype=torch.complex64)}, "tensor 'w' has unsupported dtype torch.complex64"),
])
def test_pickle_files_that_are_not_plain_tensors_are_refused(tmp_path, content, message):
    ck = _bin_checkpoint(tmp_path / "ck", content)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(ck)
    assert str(caught.value) == f"{ck / 'pytorch_model.bin'}: {message}"


def test_an_unreadable_pickle_file_names_the_first_line_of_the_error(tmp_path):
    ck = _bin_checkpoint(tmp_path / "ck", {"w": torch.zeros(2)})
    file = ck / "pytorch_model.bin"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(ck)
    message = str(caught.value)
    assert message.startswith(f"{file}: unreadable PyTorch file (") and message.endswith(")") and "\n" not in message
    assert len(message) > len(f"{file}: unreadable PyTorch file ()")


def test_reads_name_what_is_missing_or_truncated(tmp_path):
    ck = save_checkpoint(tmp_path / "ck", {"w": torch.arange(1024, dtype=torch.float32)}, {"model_type": "llmctl"})
    opened = open_checkpoint(ck)
    assert repr(opened) == f"Checkpoint({str(ck)!r}, 1 tensors in 1 file(s))"
    with pytest.raises(CheckpointError) as caught:
        opened.get_tensor("nope")
    assert str(caught.value) == f"{ck}: no tensor 'nope'"
    buffer = memoryview(bytearray(4096))
    with pytest.raises(CheckpointError) as caught:
        opened.read_into("nope", buffer)
    assert str(caught.value) == f"{ck}: no safetensors tensor 'nope'"
    opened.read_into("w", buffer)
    assert torch.equal(torch.frombuffer(bytearray(buffer), dtype=torch.float32), torch.arange(1024.0))
    file = ck / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    with pytest.raises(CheckpointError) as caught:
        opened.read_into("w", buffer)
    assert str(caught.value) == f"{file}: truncated while reading 'w'"


def test_a_pickle_checkpoint_reads_through_get_tensor(tmp_path):
    tensors = {"w": torch.randn(3, 2)}
    ck = _bin_checkpoint(tmp_path / "ck", tensors)
    opened = open_checkpoint(ck)
    assert torch.equal(opened.read_tensor("w"), tensors["w"])
    with pytest.raises(CheckpointError, match="no safetensors tensor 'w'"):
        opened.read_into("w", memoryview(bytearray(24)))


def test_state_dict_moves_tensors_to_the_device_asked_for(tmp_path):
    ck = save_checkpoint(tmp_path / "ck", {"w": torch.ones(2, 2), "i": torch.arange(3)}, {"model_type": "llmctl"})
    state = open_checkpoint(ck).state_dict(device="meta", dtype=torch.bfloat16)
    assert {n: (t.device.type, t.dtype) for n, t in state.items()} == \
        {"w": ("meta", torch.bfloat16), "i": ("meta", torch.int64)}


def test_check_tensors_names_the_checkpoint_by_default():
    with pytest.raises(CheckpointError) as caught:
        check_tensors({"a": (2,), "b": (3,)}, {"a": (2,)})
    assert str(caught.value) == "checkpoint: missing tensor 'b' (expected shape [3])"  # one: no "and N more"


def test_metrics_go_to_adapter_directories_and_start_a_lineage(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    append_metrics(adapter, {"task": "perplexity", "ppl": 3.5, "time": "then"})
    lineage = json.loads((adapter / "llmctl.json").read_text())
    assert lineage == {"format": FORMAT, "version": FORMAT_VERSION,
                       "metrics": [{"time": "then", "task": "perplexity", "ppl": 3.5}]}
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(CheckpointError) as caught:
        append_metrics(plain, {"task": "x"})
    assert str(caught.value) == f"{plain}: no config.json (not a model checkpoint or adapter directory)"


def test_lineage_parents_keep_records_and_hash_only_checkpoints(tmp_path):
    parent = save_checkpoint(tmp_path / "parent", {"w": torch.ones(2)}, {"model_type": "llmctl"})
    data = tmp_path / "data.txt"
    data.write_text("text")
    given = {"path": "elsewhere", "hash": "abc", "note": "as recorded"}
    out = save_checkpoint(tmp_path / "out", {"w": torch.ones(2)}, {"model_type": "llmctl"},
                          lineage={"command": "test", "parents": [given, data, parent]})
    parents = json.loads((out / "llmctl.json").read_text())["parents"]
    assert parents == [given, {"path": str(data.resolve()), "hash": None},
                       {"path": str(parent.resolve()), "hash": checkpoint_hash(parent)}]


def test_copy_tokenizer_needs_a_directory(tmp_path):
    with pytest.raises(UsageError) as caught:
        copy_tokenizer(tmp_path / "missing", tmp_path)
    assert str(caught.value) == f"tokenizer {tmp_path / 'missing'} is not a directory"


def test_the_writer_writes_the_bytes_safetensors_writes(tmp_path):
    """Header order (widest dtypes first, then names), compact UTF-8 JSON, space padding to 8
    bytes, data in header order: byte for byte what `safetensors.torch.save_file` writes."""
    from safetensors.torch import save_file

    from llmctl.core.checkpoint import DTYPES

    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=g).half(), "a": torch.arange(7, dtype=torch.int8),
               "c": torch.randn(2, 3, generator=g), "flags": torch.tensor([True, False]),
               "m": torch.arange(3, dtype=torch.int64), "poids_é": torch.ones(2).bfloat16(),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    tensors |= {f"every_{code}": torch.ones(3).to(getattr(torch, name)) for code, (name, _) in DTYPES.items()}
    ck = save_checkpoint(tmp_path / "ck", tensors, {"model_type": "llmctl"})
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (ck / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_the_writer_refuses_an_existing_output_by_default(tmp_path):
    from llmctl.core.checkpoint import CheckpointWriter
    from llmctl.errors import OutputExistsError

    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        with CheckpointWriter(tmp_path / "out", {"w": ((2,), "float32")}):
            pass


def _raw_safetensors(file: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    file.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return file


def _corrupt_message(file: Path) -> str:
    from llmctl.core.checkpoint import read_safetensors_header

    with pytest.raises(CheckpointError) as caught:
        read_safetensors_header(file)
    return str(caught.value).removeprefix(f"{file}: ")


def test_safetensors_header_refusals(tmp_path):
    from llmctl.core.checkpoint import DTYPES, read_safetensors_header

    f = tmp_path / "x.safetensors"
    bad = "truncated or corrupt safetensors file: "
    f.write_bytes(b"\x01\x02\x03\x04\x05")
    assert _corrupt_message(f) == bad + "5 bytes, shorter than the 8-byte header length"
    _raw_safetensors(f, b"{}", length=3)  # 8 + 2 bytes: a length one past what the file holds
    assert _corrupt_message(f) == bad + "header length 3 exceeds the file size 10"
    _raw_safetensors(f, b"[1]")
    assert _corrupt_message(f) == bad + "header is not a JSON object"
    _raw_safetensors(f, {"w": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8)
    assert _corrupt_message(f) == bad + "header entry of 'w' lacks a valid dtype/shape/data_offsets"
    entry = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    length = len(json.dumps(entry))
    _raw_safetensors(f, entry, b"\0" * 7)
    assert _corrupt_message(f) == bad + f"data of 'w' ends at byte {8 + length + 8}, past the end ({8 + length + 7} bytes)"
    _raw_safetensors(f, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8)
    assert _corrupt_message(f) == bad + "data offsets of 'w' do not match its shape [2] and dtype F32"
    _raw_safetensors(f, {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    assert _corrupt_message(f) == f"tensor 'w' has unsupported dtype Q4 (supported: {', '.join(DTYPES)})"
    empty = {"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}
    _raw_safetensors(f, empty)  # the header is the rest of the file: valid
    assert read_safetensors_header(f) == (empty, 8 + len(json.dumps(empty)))
