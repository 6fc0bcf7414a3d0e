"""`torchrun --nproc_per_node=2 -m llmctl distill …` on CPU (gloo) under DDP and FSDP2, with a
hidden-state loss: the trained projections (the objective's extra modules, beside the student) and the
student equal one process's with the same global batch, and the export holds the student alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from _ports import free_port  # noqa: E402
from test_distill import teacher  # noqa: E402,F401  (the shared teacher fixture)
from test_train import FAST, corpus, curve  # noqa: E402,F401  (the shared corpus fixture)
from test_train_distributed import assert_close  # noqa: E402

ARGS = [*FAST, "max_steps=4", "save_every=4", "eval_every=2", "sampling=sequential",
        "objective_args.losses={forward_kl: 1, hidden_mse: 0.5}"]


def _common(corpus, teacher) -> list[str]:  # noqa: F811
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--data", str(corpus["shards"]), *ARGS]


@pytest.fixture(scope="module")
def single(corpus, teacher, tmp_path_factory) -> Path:  # noqa: F811
    """The reference: one process with the global batch (2 ranks × batch_size 2 = 4)."""
    from llmctl.cli import main

    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["--quiet", *_common(corpus, teacher), "batch_size=4", "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distillation_with_projections_matches_one_process(corpus, teacher, single, tmp_path, strategy):  # noqa: F811
    from safetensors.torch import load_file

    from llmctl.core.train.state import load_state

    out = tmp_path / strategy
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "-m", "llmctl", "--quiet", *_common(corpus, teacher),
                        "batch_size=2", f"distributed.strategy={strategy}", "-o", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close(curve(out), curve(single))
    ours, reference = load_file(out / "model.safetensors"), load_file(single / "model.safetensors")
    assert ours.keys() == reference.keys() and all(k.startswith(("model.", "lm_head.")) for k in ours)
    for key, tensor in reference.items():
        assert torch.allclose(ours[key], tensor, rtol=1e-4, atol=1e-5), key
    step = "checkpoints/step-000004"
    (meta, _), (meta_single, _) = load_state(out / step), load_state(single / step)
    assert sorted(meta["modules"]) == sorted(meta_single["modules"]) == ["0.weight", "1.weight"]
    for key, tensor in meta_single["modules"].items():  # the projections, whole
        assert torch.allclose(meta["modules"][key], tensor, rtol=1e-4, atol=1e-5), key
