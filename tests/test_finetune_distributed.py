"""`torchrun --nproc_per_node=2 -m llmctl finetune …` on CPU (gloo): adapters trained under DDP and
FSDP2 equal one process's with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_finetune import base  # noqa: E402,F401  (the shared base fixture)
from test_train import curve  # noqa: E402
from test_train_distributed import _free_port, assert_close  # noqa: E402


def torchrun_finetune(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "llmctl", "--quiet", "finetune", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """Text records of 1 to 8 questions, one per row (packing=false): the rows hold different
    numbers of learned tokens (the rest is padding), so the ranks' batches do too, and the global
    batch's loss is a mean over its tokens only if each rank's share is weighed by its count.
    The 5% validation split is one row: fewer than the ranks, which must all validate anyway."""
    import random

    r = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "long.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"what is {r.randint(0, 9)} plus {r.randint(0, 9)}?"
                                                         for _ in range(r.randint(1, 8)))}) + "\n"
                            for _ in range(24)))
    return path


COMMON = ["--config", "tiny", "packing=false", "adapter.num_virtual_tokens=4"]


@pytest.fixture(scope="module")
def single(base, records, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """The references: one process with the global batch (2 ranks × batch_size 2 = 4)."""
    from llmctl.cli import main

    runs = {}
    for method in ("lora", "prefix"):
        runs[method] = tmp_path_factory.mktemp("single") / method
        assert main(["--quiet", "finetune", str(base), *COMMON, "--method", method, "--data", str(records),
                     "batch_size=4", "-o", str(runs[method])]) == 0
    return runs


@pytest.mark.parametrize("method, strategy", [("lora", "ddp"), ("prefix", "fsdp")])
def test_distributed_finetune_matches_one_process(base, records, single, tmp_path, method, strategy):  # noqa: F811
    out = tmp_path / strategy
    r = torchrun_finetune(base, *COMMON, "--method", method, "--data", records, "batch_size=2",
                          f"distributed.strategy={strategy}", "-o", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close(curve(out), curve(single[method]))
    ours, reference = _adapter(out), _adapter(single[method])
    assert ours.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.allclose(ours[key], tensor, rtol=1e-4, atol=1e-5), key
