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


def _refused(ck: Path) -> str:
    """The one-line error `open_checkpoint` raises for `ck`."""
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(ck)
    return str(caught.value)


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
    assert _refused(ck) == f"{ck / 'pytorch_model.bin'}: {message}"


def test_an_unreadable_pickle_file_names_the_first_line_of_the_error(tmp_path):
    ck = _bin_checkpoint(tmp_path / "ck", {"w": torch.zeros(2)})
    file = ck / "pytorch_model.bin"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(ck)
    try:
        torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's own words, first line
        first = str(e).strip().splitlines()[0]
    assert str(caught.value) == f"{file}: unreadable PyTorch file ({first})"


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
    _raw_safetensors(f, b"{x")
    assert _corrupt_message(f).startswith(bad + "header is not valid JSON (Expecting property name")
    _raw_safetensors(f, b"[1]")
    assert _corrupt_message(f) == bad + "header is not a JSON object"
    _raw_safetensors(f, {"w": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8)
    assert _corrupt_message(f) == bad + "header entry of 'w' lacks a valid dtype/shape/data_offsets"
    entry = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    length = len(json.dumps(entry))
    _raw_safetensors(f, entry, b"\0" * 7)
    assert _corrupt_message(f) == \
        bad + f"data of 'w' ends at byte {8 + length + 8}, past the end ({8 + length + 7} bytes)"
    _raw_safetensors(f, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8)
    assert _corrupt_message(f) == bad + "data offsets of 'w' do not match its shape [2] and dtype F32"
    _raw_safetensors(f, {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    assert _corrupt_message(f) == f"tensor 'w' has unsupported dtype Q4 (supported: {', '.join(DTYPES)})"
    empty = {"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}
    _raw_safetensors(f, empty)  # the header is the rest of the file: valid
    assert read_safetensors_header(f) == (empty, 8 + len(json.dumps(empty)))


def test_the_writer_refuses_what_the_layout_does_not_say(tmp_path):
    from llmctl.core.checkpoint import CheckpointWriter

    old = os.umask(0o022)
    try:
        with CheckpointWriter(tmp_path / "out", {"w": ((2,), "float32")}) as writer:
            for tensor, message in ((torch.zeros(2, dtype=torch.int32), "is int32 [2], the layout says float32 [2]"),
                                    (torch.zeros(1, 2), "is float32 [1, 2], the layout says float32 [2]")):
                with pytest.raises(CheckpointError) as caught:
                    writer.add("w", tensor)
                assert str(caught.value) == f"tensor 'w' {message}"
            writer.add("w", torch.ones(2))
            for name, why in (("w", "was already written"), ("v", "is not in the layout")):
                with pytest.raises(CheckpointError) as caught:
                    writer.add(name, torch.ones(2))
                assert str(caught.value) == f"tensor {name!r} {why}"
            writer.finish({"model_type": "llmctl"})
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "out" / "model.safetensors").st_mode & 0o777) == oct(0o644)


def test_the_lineage_record_has_exactly_its_fields(tmp_path):
    import numpy as np

    from llmctl import __version__

    metrics = [{"task": "perplexity", "ppl": 3.0}]
    out = save_checkpoint(tmp_path / "out", {"w": torch.ones(2)}, {"model_type": "llmctl"},
                          lineage={"command": "merge", "metrics": metrics, "quantization": {"bits": np.int64(4)},
                                   "config": {"lr": np.float32(0.5), "data": Path("corpus.txt")}})
    record = json.loads((out / "llmctl.json").read_text())
    created = record.pop("created")
    assert datetime.datetime.fromisoformat(created).tzinfo is not None
    assert record == {"format": FORMAT, "version": FORMAT_VERSION, "llmctl_version": __version__,
                      "command": "merge", "config": {"lr": 0.5, "data": "corpus.txt"}, "parents": [],
                      "metrics": metrics, "quantization": {"bits": 4}}
    bare = save_checkpoint(tmp_path / "bare", {"w": torch.ones(2)}, {"model_type": "llmctl"})
    record = json.loads((bare / "llmctl.json").read_text())
    assert (record["command"], record["config"], record["parents"], record["metrics"]) == (None, {}, [], [])


def _sharded(root: Path, weight_map) -> Path:
    ck = save_checkpoint(root, {"a": torch.ones(4), "b": torch.zeros(4)}, {"model_type": "llmctl"}, max_shard_bytes=16)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ck


@pytest.mark.parametrize("weight_map, message", [
    (None, "no 'weight_map' object"),
    ({}, "no 'weight_map' object"),
    ({"a": 3}, "'weight_map' values must be file names"),
    ({"a": "model-00003-of-00002.safetensors"}, "names missing shard model-00003-of-00002.safetensors"),
    ({"a": "../x.safetensors"}, "'../x.safetensors' points outside {ck}; refusing to read it"),
])
def test_a_bad_shard_index_is_named(tmp_path, weight_map, message):
    ck = _sharded(tmp_path / "ck", weight_map)
    assert _refused(ck) == f"{ck / 'model.safetensors.index.json'}: {message.format(ck=ck)}"


def test_an_adapter_directory_is_named_when_weights_are_missing(tmp_path):
    adapter = ["config.json", "adapter_config.json"]
    for hint, files in (("", ["config.json"]), (" (this is a PEFT adapter directory)", adapter)):
        ck = tmp_path / f"ck{len(files)}"
        ck.mkdir()
        for name in files:
            (ck / name).write_text("{}")
        assert _refused(ck) == (f"{ck}: no weights{hint} (expected model.safetensors, "
                                "model.safetensors.index.json or pytorch_model.bin)")


def test_read_tensor_reads_safetensors_files_directly(tmp_path, monkeypatch):
    from llmctl.core.checkpoint import Checkpoint

    ck = save_checkpoint(tmp_path / "ck", {"a": torch.arange(4.0), "b": torch.arange(3)}, {"model_type": "llmctl"},
                         max_shard_bytes=16)
    opened = open_checkpoint(ck)
    assert len(opened.shards) == 2
    read, real = [], Checkpoint.read_into
    monkeypatch.setattr(Checkpoint, "read_into", lambda self, name, buf: read.append(name) or real(self, name, buf))
    assert torch.equal(opened.read_tensor("a"), torch.arange(4.0))
    assert torch.equal(opened.read_tensor("b"), torch.arange(3))
    assert read == ["a", "b"]


def test_extra_files_go_to_subdirectories_and_stay_inside(tmp_path):
    ck = save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)}, {"model_type": "llmctl"},
                         extra_files={"templates/chat/default.jinja": "{{ x }}"})
    assert (ck / "templates" / "chat" / "default.jinja").read_text() == "{{ x }}"
    for name in ("../escape.txt", "/abs.txt", "sub/../../x.txt"):
        with pytest.raises(UsageError) as caught:
            save_checkpoint(tmp_path / "bad", {"w": torch.ones(2)}, {"model_type": "llmctl"}, extra_files={name: "x"})
        assert str(caught.value) == f"extra checkpoint file {name!r} must be a relative path inside the checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_an_error_inside_the_writer_propagates_unchanged(tmp_path):
    from llmctl.core.checkpoint import CheckpointWriter

    with pytest.raises(ValueError, match="^boom$"):
        with CheckpointWriter(tmp_path / "out", {"w": ((2,), "float32")}) as writer:
            writer.add("w", torch.ones(2))
            raise ValueError("boom")
    with pytest.raises(CheckpointError) as caught:
        with CheckpointWriter(tmp_path / "out", {"w": ((2,), "float32")}):
            pass
    assert str(caught.value) == f"{tmp_path / 'out'}: the checkpoint writer was closed before finish()"
    assert list(tmp_path.iterdir()) == []


def test_non_object_json_files_are_named(tmp_path):
    ck = save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)}, {"model_type": "llmctl"})
    (ck / "generation_config.json").write_text("[1, 2]")
    assert _refused(ck) == f"{ck / 'generation_config.json'}: expected a JSON object, found list"


def test_shards_split_where_huggingface_hub_splits(tmp_path):
    """Greedy in order; a tensor that exactly fills a shard stays in it."""
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(4), "d": torch.ones(1), "e": torch.ones(3)}
    ck = save_checkpoint(tmp_path / "ck", tensors, {"model_type": "llmctl"}, max_shard_bytes=16)
    ours = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    theirs = split_torch_state_dict_into_shards(tensors, max_shard_size=16,
                                                filename_pattern="model{suffix}.safetensors").tensor_to_filename
    assert ours == theirs and len(set(ours.values())) == 3


def test_reads_and_writes_that_come_back_short_are_continued(tmp_path, monkeypatch):
    """The kernel may move fewer bytes than asked (over 2 GiB it always does): loop until done."""
    import llmctl.core.checkpoint as checkpoint

    real_pread, real_pwrite = os.preadv, os.pwrite
    monkeypatch.setattr(checkpoint.os, "preadv", lambda fd, buffers, at: real_pread(fd, [buffers[0][:1000]], at))
    monkeypatch.setattr(checkpoint.os, "pwrite", lambda fd, data, at: real_pwrite(fd, data[:1000], at))
    tensor = torch.arange(2500, dtype=torch.float32)
    ck = save_checkpoint(tmp_path / "ck", {"w": tensor, "v": -tensor}, {"model_type": "llmctl"})
    opened = open_checkpoint(ck)
    assert torch.equal(opened.read_tensor("w"), tensor) and torch.equal(opened.read_tensor("v"), -tensor)
