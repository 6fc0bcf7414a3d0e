"""`torchrun --nproc_per_node=2 -m llmctl train …` on CPU (gloo): DDP and FSDP2 match one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import FAST, corpus, curve, records  # noqa: F401  (the shared corpus fixture)

ARGS = [*FAST, "max_steps=6", "eval_every=3", "save_every=3", "sampling=sequential"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "llmctl", "--quiet", "train", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def assert_close(a: list[tuple], b: list[tuple]) -> None:
    assert [r[0] for r in a] == [r[0] for r in b]
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert (u is None) == (v is None) and (u is None or u == pytest.approx(v, rel=1e-4, abs=1e-5)), (x, y)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:  # noqa: F811
    """The reference: one process with the global batch (2 ranks × batch_size 2 = 4)."""
    from llmctl.cli import main

    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["--quiet", "train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *ARGS,
                 "batch_size=4", "-o", str(out)]) == 0
    return out


def test_ddp_two_processes_match_one(corpus, single, tmp_path):  # noqa: F811
    out = tmp_path / "ddp"
    r = torchrun(f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *ARGS, "batch_size=2", "-o", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close(curve(out), curve(single))
    assert (out / "config.json").is_file() and not list(out.glob("metrics*rank*"))


def test_fsdp_matches_one_and_resumes(corpus, single, tmp_path):  # noqa: F811
    out = tmp_path / "fsdp"
    args = [f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *ARGS, "batch_size=2",
            "distributed.strategy=fsdp", "-o", out]
    r = torchrun(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close(curve(out), curve(single))
    assert json.loads((out / "checkpoints" / "step-000006" / "trainer_state" / "state.json").read_text())["world_size"] == 2

    # lose the last checkpoint and the final model: --resume continues from step 3
    shutil.rmtree(out / "checkpoints" / "step-000006")
    (out / "model.safetensors").unlink()
    r = torchrun(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close(curve(out), curve(single))
    assert [x["step"] for x in records(out) if "loss" in x] == list(range(1, 7))


FSDP_UNITS = """
import json, torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from llmctl.core.model import ModelConfig
from llmctl.core.model.build import build_model
from llmctl.core.train import distributed as dist_

d = dist_.init("gloo", torch.device("cpu"))
model = build_model(ModelConfig(vocab_size=64, hidden_size=16, num_layers=3, num_heads=2, num_mtp_heads=1))
dist_.wrap(model, "fsdp", d, torch.device("cpu"))
units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
sharded = all(isinstance(p, DTensor) for p in model.parameters())
if d.is_main:
    print("UNITS", sharded, json.dumps(units))
dist_.shutdown(d)
"""


def test_fsdp_wraps_every_block(tmp_path):
    script = tmp_path / "units.py"
    script.write_text(FSDP_UNITS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(script)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("UNITS"))
    _, sharded, units = line.split(maxsplit=2)
    assert json.loads(units) == ["", "model.layers.0", "model.layers.1", "model.layers.2", "mtp_heads.0"]
    assert sharded == "True"
