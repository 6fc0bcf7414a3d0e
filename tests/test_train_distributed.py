"""`torchrun --nproc_per_node=2 -m llmctl train …` on CPU (gloo): DDP and FSDP2 match one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _ports import free_port as _free_port  # noqa: F401  (also imported by other distributed tests)
from test_train import FAST, corpus, curve, records  # noqa: F401  (the shared corpus fixture)

ARGS = [*FAST, "max_steps=6", "eval_every=3", "save_every=3", "sampling=sequential"]


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


def test_fsdp_bf16_mixed_precision_tracks_one_process(corpus, tmp_path):  # noqa: F811
    """FSDP2's MixedPrecisionPolicy (bf16 parameters, float32 gradient reduction) trains like
    one process under bf16 autocast, and its checkpoint stays float32."""
    from llmctl.cli import main

    common = [f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *ARGS, "precision=bf16"]
    one = tmp_path / "one"
    assert main(["--quiet", "train", *common, "batch_size=4", "-o", str(one)]) == 0
    r = torchrun(*common, "batch_size=2", "distributed.strategy=fsdp", "-o", tmp_path / "fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = [x["loss"] for x in records(one) if "loss" in x], [x["loss"] for x in records(tmp_path / "fsdp") if "loss" in x]
    assert len(a) == len(b) == 6 and max(abs(x - y) / x for x, y in zip(a, b)) < 0.02
    header = json.loads((tmp_path / "fsdp" / "model.safetensors").read_bytes()[8:][:int.from_bytes(
        (tmp_path / "fsdp" / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}


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
seen = {}
for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):  # the weights a forward computes with
    m = build_model(ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2))
    dist_.wrap(m, "fsdp", d, torch.device("cpu"), dtype)
    m.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, i, o, name=name: seen.__setitem__(name, str(mod.weight.dtype)))
    m(torch.randint(0, 64, (1, 8)))
if d.is_main:
    print("UNITS", sharded, json.dumps(units))
    print("DTYPES", json.dumps(seen))
del model, m  # as the trainer ends: the sharded models freed while gloo is idle, not at interpreter exit
dist_.settle(d)
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
    dtypes = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("DTYPES")).split(maxsplit=1)[1])
    assert dtypes == {"float32": "torch.float32", "bfloat16": "torch.bfloat16"}  # MixedPrecisionPolicy
