"""The README's quickstart pipeline, in a reduced mode: every output exists, loads, and helps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SMALL = {  # a step budget, not a time budget: the result must not depend on the machine's load
    "QUICKSTART_MINUTES": "5",
    "QUICKSTART_VOCAB": "512",
    "QUICKSTART_TRAIN": "model_args.hidden_size=64 model_args.num_layers=2 model_args.num_heads=4 "
                        "batch_size=8 seq_len=64 eval_every=10 save_every=20 warmup_steps=5 max_steps=80",
    "QUICKSTART_EVAL": "--limit 40",
}


def run_quickstart(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **SMALL, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_quickstart_end_to_end_and_rerun(tmp_path):
    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.data import TokenShards
    from llmctl.core.model.io import load_model
    from llmctl.core.tokenizer import load_tokenizer

    out = tmp_path / "qs"
    proc = run_quickstart(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llmctl quickstart" in proc.stdout and "val perplexity" in proc.stdout

    tok = load_tokenizer(out / "tokenizer")
    assert tok.vocab_size == 512
    assert TokenShards(out / "tokens").num_tokens("train") > 10_000
    for name in ("init", "model"):
        model, cfg = load_model(out / name)
        assert cfg.vocab_size == 512 and load_tokenizer(out / name).hash == tok.hash
    lineage = open_checkpoint(out / "model").lineage
    assert lineage["command"] == "train" and lineage["config"]["max_time"] == 5
    assert any(m.get("task") == "perplexity" for m in lineage["metrics"])  # eval recorded itself

    results = json.loads((out / "eval.json").read_text())["results"]
    before, after = results[str(out / "init")], results[str(out / "model")]
    assert after["perplexity"]["perplexity"] < 0.7 * before["perplexity"]["perplexity"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["tokens"] for s in samples)

    again = run_quickstart(out)  # finished steps are reused, nothing is redone
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reusing") == 7
    assert json.loads((out / "eval.json").read_text())["results"] == results
