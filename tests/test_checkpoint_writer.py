"""The streaming checkpoint writer: one tensor at a time, sharded, indexed, atomic, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from llmctl.core.checkpoint import CheckpointWriter, open_checkpoint  # noqa: E402
from llmctl.errors import CheckpointError  # noqa: E402


def test_any_order_shards_index_and_reads_back(tmp_path):
    tensors = {f"t{i}": torch.arange(i * 10, i * 10 + 6, dtype=torch.float32).reshape(2, 3) for i in range(5)}
    tensors["half"] = torch.ones(3, dtype=torch.bfloat16)
    tensors["mask"] = torch.tensor([True, False])
    layout = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()}
    with CheckpointWriter(tmp_path / "ck", layout, max_shard_bytes=60) as writer:
        for name in reversed(list(tensors)):
            writer.add(name, tensors[name])
        assert not (tmp_path / "ck").exists()  # nothing in place before the end
        writer.finish({"model_type": "llmctl"}, lineage={"command": "test"})
    ck = open_checkpoint(tmp_path / "ck")
    assert len(ck.shards) > 1 and ck.index == "model.safetensors.index.json"
    index = json.loads((tmp_path / "ck" / ck.index).read_text())
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == 5 * 24 + 6 + 2
    for name, tensor in tensors.items():
        assert torch.equal(ck.get_tensor(name), tensor)
    assert json.loads((tmp_path / "ck" / "llmctl.json").read_text())["command"] == "test"


def test_mistakes_leave_no_output(tmp_path):
    layout = {"a": ((2,), "float32"), "b": ((2,), "float32")}
    with pytest.raises(CheckpointError, match="'a' is float32 \\[3\\], the layout says float32 \\[2\\]"):
        with CheckpointWriter(tmp_path / "x", layout) as writer:
            writer.add("a", torch.zeros(3))
    with pytest.raises(CheckpointError, match="'b' was never written"):
        with CheckpointWriter(tmp_path / "x", layout) as writer:
            writer.add("a", torch.zeros(2))
            writer.finish({})
    with pytest.raises(CheckpointError, match="closed before finish"):
        with CheckpointWriter(tmp_path / "x", layout) as writer:
            pass
    with pytest.raises(CheckpointError, match="'c' is not in the layout"):
        with CheckpointWriter(tmp_path / "x", layout) as writer:
            writer.add("c", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []  # not even a temporary directory


def test_peak_memory_is_about_one_tensor(tmp_path):
    """Eight 64 MB tensors, each made, written and dropped: the peak stays under three tensors."""
    script = textwrap.dedent(f"""
        import resource, torch
        from llmctl.core.checkpoint import CheckpointWriter, open_checkpoint
        n = 16 * 1024 * 1024  # 64 MB of float32
        torch.ones(n).sum()  # warm the allocator and torch's kernels
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        layout = {{f"t{{i}}": ((n,), "float32") for i in range(8)}}
        with CheckpointWriter({str(tmp_path / "big")!r}, layout, max_shard_bytes=3 * 4 * n) as writer:
            for i in range(8):
                writer.add(f"t{{i}}", torch.full((n,), float(i)))
            writer.finish({{"model_type": "llmctl"}})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ck = open_checkpoint({str(tmp_path / "big")!r})
        assert len(ck.shards) == 3 and float(ck.get_tensor("t7")[-1]) == 7.0
        print(peak - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    assert grown < 3 * 64 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB while writing 8 × 64 MiB"
