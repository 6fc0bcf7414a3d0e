"""Checkpoint directories: round trips, sharding, HF interop, atomicity, lineage, bad inputs."""

import json
import os
from datetime import datetime
from pathlib import Path

import pytest
import torch

from llmctl.core.checkpoint import (
    append_metrics,
    check_tensors,
    checkpoint_hash,
    open_checkpoint,
    save_checkpoint,
)
from llmctl.errors import CheckpointError, OutputExistsError, UsageError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "f32": base,
        "tied": base,  # shares storage with f32
        "view": base.t(),  # non-contiguous
        "f16": torch.randn(5, 3, generator=g).half(),
        "bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "i64": torch.arange(10),
        "i8": torch.tensor([-3, 0, 7], dtype=torch.int8),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _assert_same(ck, tensors):
    assert set(ck.tensor_names()) == set(tensors)
    for name, tensor in tensors.items():
        loaded = ck.get_tensor(name)
        assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), name
        assert ck.tensor_shapes()[name] == (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


def _small(path, **kw):
    return save_checkpoint(path, {"w": torch.ones(4, 4), "b": torch.zeros(4)}, {"model_type": "llmctl"},
                           lineage={"command": "test"}, **kw)


def _mapped_files(ptr: int) -> list[str]:
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= ptr < end:
                return parts[5:]
    return []


def test_round_trip_single_file(tmp_path):
    from safetensors.torch import load_file

    tensors = _tensors()
    out = save_checkpoint(tmp_path / "ck", tensors, {"model_type": "llmctl", "num_layers": 2},
                          generation_config={"max_new_tokens": 8}, lineage={"command": "test"})
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "llmctl.json", "model.safetensors"]
    ck = open_checkpoint(out)
    assert ck.shards == ["model.safetensors"] and ck.index is None and ck.weights_format == "safetensors"
    assert ck.config == {"model_type": "llmctl", "num_layers": 2}
    assert ck.generation_config == {"max_new_tokens": 8}
    assert ck.size_bytes == (out / "model.safetensors").stat().st_size
    assert not ck.has_tokenizer
    _assert_same(ck, tensors)
    assert torch.equal(load_file(out / "model.safetensors")["bf16"], tensors["bf16"])  # the reference reader agrees

    state = ck.state_dict()
    if Path("/proc/self/maps").exists():  # Linux: the tensor's memory is a mapping of the file
        assert str(out / "model.safetensors") in _mapped_files(state["f32"].data_ptr())
    state["f32"].add_(1)  # copy-on-write: the file is not modified
    assert torch.equal(open_checkpoint(out).get_tensor("f32"), tensors["f32"])
    assert ck.state_dict(dtype=torch.bfloat16)["f16"].dtype == torch.bfloat16
    assert ck.state_dict(dtype=torch.bfloat16)["i64"].dtype == torch.int64


def test_round_trip_sharded_with_hf_index(tmp_path):
    tensors = _tensors()
    out = save_checkpoint(tmp_path / "ck", tensors, {"model_type": "llmctl"}, lineage={}, max_shard_bytes=200)
    ck = open_checkpoint(out)
    assert len(ck.shards) > 2 and ck.index == "model.safetensors.index.json"
    n = len(ck.shards)
    assert ck.shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / ck.index).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(ck.shards)
    for shard in ck.shards:
        header_bytes = int.from_bytes((out / shard).read_bytes()[:8], "little")
        names = [k for k, v in index["weight_map"].items() if v == shard]
        assert len(names) == 1 or (out / shard).stat().st_size - 8 - header_bytes <= 200
    _assert_same(ck, tensors)


def test_transformers_interop(tmp_path):
    import transformers
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()

    # a directory transformers wrote (sharded) opens with our reader
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    ck = open_checkpoint(tmp_path / "hf")
    assert len(ck.shards) > 1 and ck.lineage is None
    state = model.state_dict()
    assert set(ck.tensor_names()) == set(state)
    assert all(torch.equal(ck.get_tensor(n), t) for n, t in state.items())

    # a sharded directory we wrote loads in transformers
    save_checkpoint(tmp_path / "ours", state, {**config.to_dict(), "architectures": ["LlamaForCausalLM"]},
                    lineage={"command": "test"}, max_shard_bytes=20_000)
    assert len(open_checkpoint(tmp_path / "ours").shards) > 1
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours")
    for name, param in loaded.state_dict().items():
        assert torch.equal(param, state[name]), name


def test_atomic_and_force(tmp_path):
    out = tmp_path / "ck"
    _small(out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError):
        save_checkpoint(out, {"w": torch.zeros(2)}, {"model_type": "llmctl"}, lineage={})
    assert (out / "model.safetensors").read_bytes() == before
    with pytest.raises(CheckpointError, match="'bad'"):  # a failure mid-write leaves nothing behind
        save_checkpoint(out, {"w": torch.zeros(2), "bad": torch.zeros(2, dtype=torch.complex64)},
                        {"model_type": "llmctl"}, lineage={}, force=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    save_checkpoint(out, {"w": torch.zeros(2)}, {"model_type": "llmctl"}, lineage={}, force=True)
    assert open_checkpoint(out).tensor_names() == ["w"]


def test_tokenizer_and_extra_files(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    (tok / "chat_template.jinja").write_text("{{ messages }}")
    (tok / "unrelated.txt").write_text("no")
    out = _small(tmp_path / "ck", tokenizer_dir=tok, extra_files={"notes/readme.md": "hi", "blob.bin": b"\x00"})
    assert open_checkpoint(out).has_tokenizer
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not (out / "unrelated.txt").exists()
    assert (out / "notes" / "readme.md").read_text() == "hi" and (out / "blob.bin").read_bytes() == b"\x00"
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        _small(tmp_path / "ck2", tokenizer_dir=tmp_path / "ck" / "notes")


def test_lineage_hashes_and_metrics(tmp_path):
    parent = _small(tmp_path / "parent")
    child = save_checkpoint(tmp_path / "child", {"w": torch.ones(3)}, {"model_type": "llmctl"},
                            lineage={"command": "quantize", "config": {"method": "int8", "out": tmp_path},
                                     "parents": [parent], "quantization": {"method": "int8", "bits": 8}})
    record = json.loads((child / "llmctl.json").read_text())
    assert record["format"] == "llmctl-checkpoint" and record["version"] == 1
    assert record["command"] == "quantize" and record["config"] == {"method": "int8", "out": str(tmp_path)}
    assert record["parents"] == [{"path": str(parent.resolve()), "hash": checkpoint_hash(parent)}]
    assert record["quantization"] == {"method": "int8", "bits": 8} and record["metrics"] == []
    assert datetime.fromisoformat(record["created"]).utcoffset().total_seconds() == 0
    assert record["llmctl_version"]
    assert open_checkpoint(child).lineage == record

    # the hash is a content hash: stable across copies and metrics, changed by any weight change
    h = checkpoint_hash(parent)
    assert len(h) == 64 and checkpoint_hash(_small(tmp_path / "copy")) == h
    append_metrics(parent, {"task": "perplexity", "ppl": 12.5})
    append_metrics(parent, {"task": "mmlu", "acc": 0.25})
    metrics = open_checkpoint(parent).lineage["metrics"]
    assert [m["task"] for m in metrics] == ["perplexity", "mmlu"] and "time" in metrics[0]
    assert checkpoint_hash(parent) == h
    w = torch.ones(4, 4)
    w[2, 3] = 1.5
    changed = save_checkpoint(tmp_path / "changed", {"w": w, "b": torch.zeros(4)}, {"model_type": "llmctl"}, lineage={})
    assert checkpoint_hash(changed) != h


def test_append_metrics_to_hf_directory(tmp_path):
    _small(tmp_path / "ck")
    (tmp_path / "ck" / "llmctl.json").unlink()
    append_metrics(tmp_path / "ck", {"task": "perplexity", "ppl": 3.0})
    assert open_checkpoint(tmp_path / "ck").lineage["metrics"][0]["ppl"] == 3.0


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad(kind: str, root: Path) -> tuple[Path, str]:
    """Make a broken checkpoint of the given kind; returns (path, text the error must contain)."""
    ck = root / kind
    if kind == "missing_dir":
        return ck, str(ck)
    _small(ck)
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    if kind == "not_a_dir":
        return weights, "not a checkpoint directory"
    if kind == "no_config":
        (ck / "config.json").unlink()
        return ck, "config.json"
    if kind == "bad_config_json":
        (ck / "config.json").write_text("{not json")
        return ck, "config.json: invalid JSON"
    if kind == "no_weights":
        weights.unlink()
        return ck, "no weights"
    if kind == "missing_shard":
        weights.rename(ck / "model-00001-of-00002.safetensors")
        (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 80}, "weight_map": {
            "w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        return ck, "missing shard model-00002-of-00002.safetensors"
    if kind == "index_wrong_shard":
        weights.rename(ck / "model-00001-of-00001.safetensors")
        (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
            "w": "model-00001-of-00001.safetensors", "x": "model-00001-of-00001.safetensors"}}))
        return ck, "'x'"
    if kind == "truncated":
        weights.write_bytes(data[:-10])
        return ck, "model.safetensors: truncated or corrupt"
    if kind == "header_too_long":
        weights.write_bytes((10**6).to_bytes(8, "little") + data[8:])
        return ck, "header length 1000000 exceeds"
    if kind == "header_not_json":
        weights.write_bytes(data[:8] + b"\xff" * header_len + data[8 + header_len:])
        return ck, "header is not valid JSON"
    if kind == "tiny_file":
        weights.write_bytes(b"\x01\x02")
        return ck, "model.safetensors: truncated or corrupt"
    if kind == "unsupported_dtype":
        header = json.loads(data[8:8 + header_len]).get("w")
        raw = data[8:8 + header_len].replace(b'"F32"', b'"C64"')
        weights.write_bytes(data[:8] + raw + data[8 + header_len:])
        assert header is not None
        return ck, "unsupported dtype C64"
    if kind == "pickle_code":
        weights.unlink()
        torch.save({"w": torch.zeros(2), "evil": Evil(str(root / "pwned"))}, ck / "pytorch_model.bin")
        return ck, "pytorch_model.bin: refusing to unpickle"
    if kind == "pickle_garbage":
        weights.unlink()
        (ck / "pytorch_model.bin").write_bytes(b"definitely not a zip")
        return ck, "pytorch_model.bin: unreadable PyTorch file"
    raise AssertionError(kind)


BAD = ["missing_dir", "not_a_dir", "no_config", "bad_config_json", "no_weights", "missing_shard", "index_wrong_shard",
       "truncated", "header_too_long", "header_not_json", "tiny_file", "unsupported_dtype", "pickle_code",
       "pickle_garbage"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_checkpoints(tmp_path, kind):
    path, needle = _bad(kind, tmp_path)
    error = UsageError if kind in ("missing_dir", "not_a_dir") else CheckpointError  # a wrong argument: exit 2
    with pytest.raises(error) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled


def test_pytorch_bin_is_read_weights_only(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text('{"model_type": "gpt2"}')
    tensors = {"w": torch.randn(3, 2), "h": torch.randn(4).bfloat16()}
    torch.save(tensors, ck / "pytorch_model.bin")
    opened = open_checkpoint(ck)
    assert opened.weights_format == "bin"
    _assert_same(opened, tensors)
    assert len(checkpoint_hash(ck)) == 64


def test_check_tensors():
    expected = {"a": (2, 3), "b": [4]}
    check_tensors(expected, {"a": ((2, 3), "float32"), "b": (4,)})
    with pytest.raises(CheckpointError, match=r"ck: missing tensor 'b' \(expected shape \[4\]\)"):
        check_tensors(expected, {"a": (2, 3)}, where="ck")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'c' \(shape \[1\]\) and 1 more"):
        check_tensors(expected, {"a": (2, 3), "b": (4,), "c": (1,), "d": (2,)})
    with pytest.raises(CheckpointError, match=r"tensor 'a' has shape \[3, 2\], expected \[2, 3\]"):
        check_tensors(expected, {"a": (3, 2), "b": (4,)})
